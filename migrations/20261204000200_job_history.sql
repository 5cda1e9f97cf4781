-- One row per queue and minute, sampled by whichever process gets there first: the dashboard's charts of
-- throughput, failures and depth over the last hours. Kept for a day.
CREATE TABLE job_history (
    minute    TIMESTAMPTZ NOT NULL,
    queue     TEXT        NOT NULL,
    pending   BIGINT      NOT NULL,
    scheduled BIGINT      NOT NULL,
    running   BIGINT      NOT NULL,
    completed BIGINT      NOT NULL,
    failed    BIGINT      NOT NULL,
    dead      BIGINT      NOT NULL,
    PRIMARY KEY (minute, queue)
);
