-- Jobs bound for the Redis backend wait here until the relay has handed them over. A row is written in the
-- enqueuing transaction, so a webhook's 2xx still means its jobs are safe, and deleted in the transaction
-- that follows Redis's answer: a relay that dies between the two sends the rows again, and Redis adds a job
-- id only once.
CREATE TABLE job_outbox (
    -- From the jobs' own sequence: a job has one id whichever backend runs it.
    id                   BIGINT      PRIMARY KEY,
    kind                 TEXT        NOT NULL,
    queue                TEXT        NOT NULL,
    args                 JSONB       NOT NULL,
    priority             SMALLINT    NOT NULL,
    max_attempts         INTEGER     NOT NULL,
    run_at               TIMESTAMPTZ,
    enqueued_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    unique_key           TEXT,
    unique_while_active  BOOLEAN     NOT NULL,
    unique_while_pending BOOLEAN     NOT NULL,
    tenant_id            TEXT,
    provider             TEXT,
    -- Whether the kind shares claims between (tenant, provider) groups: Redis files the job by it.
    fair                 BOOLEAN     NOT NULL
);

-- Duplicates among jobs not yet handed over fold here, at enqueue, as they do in `jobs`; against jobs already
-- in Redis they fold when the relay sends them.
CREATE UNIQUE INDEX job_outbox_unique_key ON job_outbox (kind, unique_key) WHERE unique_key IS NOT NULL;
