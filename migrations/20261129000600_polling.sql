-- Polling for buckets without notifications. A poll pass is a backfill run started by the poller: it lists
-- the connector's prefix page by page (each page a durable job holding its continuation token) and queues
-- only objects changed since the connector's watermark, minus an overlap for late-visible writes.
ALTER TABLE backfill_runs
    ADD COLUMN started_by     TEXT NOT NULL DEFAULT 'api' CONSTRAINT backfill_runs_started_by_valid CHECK (started_by IN ('api', 'poll')),
    -- Only objects changed at or after this instant are queued (all when null).
    ADD COLUMN changed_since  TIMESTAMPTZ,
    -- The newest change time among the objects listed so far.
    ADD COLUMN newest_change  TIMESTAMPTZ;

-- One row per polling connector: its cursor (watermark), the pass in flight, and when the next pass is due.
CREATE TABLE connector_polls (
    tenant_id         TEXT        NOT NULL,
    provider          TEXT        NOT NULL,
    -- The newest object change seen by the last completed pass.
    watermark         TIMESTAMPTZ,
    current_run       UUID        REFERENCES backfill_runs (id) ON DELETE SET NULL,
    next_poll_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    passes            BIGINT      NOT NULL DEFAULT 0,
    last_completed_at TIMESTAMPTZ,
    last_error        TEXT,
    PRIMARY KEY (tenant_id, provider),
    FOREIGN KEY (tenant_id, provider) REFERENCES connector_configs (tenant_id, provider) ON DELETE CASCADE
);
