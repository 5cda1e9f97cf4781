-- The job engine at its edges: outage-aware rescue, self-fencing, keys released by dead and cancelled
-- jobs, capped hand-backs, workflow runs closed by any terminal path, upkeep in every process.

-- Since when a process has heartbeated without a gap. Rescue needs a rescuer that was itself in unbroken
-- touch with the database for a whole orphan timeout: evidence that the silent worker could have
-- heartbeated too. After an outage every process's clock restarts, so no live worker is declared dead.
-- Every process registers here now (API-only and scheduler ones too); `roles` says what each does.
ALTER TABLE job_workers
    ADD COLUMN alive_since TIMESTAMPTZ NOT NULL DEFAULT now(),
    ADD COLUMN roles       TEXT[]      NOT NULL DEFAULT '{}';

-- Attempts given back (snoozes, shutdown interruptions). Capped, so that a job cannot wait, or be handed
-- back at every deploy, forever without using up its attempts.
ALTER TABLE jobs ADD COLUMN handbacks INTEGER NOT NULL DEFAULT 0;

-- The idempotency key as enqueued. `unique_key` (the indexed one) is released when a job dies or is
-- cancelled, or as the kind's uniqueness says; this copy lets a replay take it back, or say which job
-- holds it now.
ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
UPDATE jobs SET idempotency_key = unique_key WHERE unique_key IS NOT NULL;

-- Dead and cancelled jobs give their key back (River's and Oban's behaviour): after fixing what killed
-- them, the same change can be queued again.
UPDATE jobs SET unique_key = NULL WHERE state IN ('dead', 'cancelled') AND unique_key IS NOT NULL;

-- Orphan rescue and pruning are no longer scheduled jobs (they ran only where a scheduler and a
-- maintenance worker happened to be); every process does them itself.
DELETE FROM job_schedules WHERE name IN ('jobs.rescue_orphans', 'jobs.prune');
UPDATE jobs SET state = 'cancelled', finished_at = now(), unique_key = NULL
WHERE kind IN ('rescue_orphans', 'prune_jobs') AND state = 'available';

-- Fair claims step from tenant to tenant and then probe each tenant's due rows by run time; with run_at
-- right after the tenant, a tenant whose jobs all wait out a backoff costs one probe instead of a scan of
-- its rows. (Fair kinds run each tenant's jobs oldest first; priority does not apply to them.)
DROP INDEX jobs_fair_fetch;
CREATE INDEX jobs_fair_fetch ON jobs (kind, (coalesce(tenant_id, '')), run_at, id) WHERE state = 'available';

-- The embedding status no longer follows the claim inside the claim's transaction: that made every claim
-- of an embed_node job wait for the node's row lock, which an ingest writing the node holds while it
-- queues the node's next embedding (whose key check waits for the claim): a deadlock. The handler marks
-- `processing` itself; the trigger keeps the paths no handler sees (retry, rescue, dead letter, cancel).
CREATE OR REPLACE FUNCTION activekg_embed_job_moved() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    node UUID := (NEW.args->>'node_id')::uuid;
    last_error TEXT := NEW.errors -> -1 ->> 'error';
BEGIN
    IF NEW.state = 'available' THEN
        UPDATE nodes SET embedding_status = 'queued', embedding_error = last_error
        WHERE id = node AND embedding_status IN ('processing', 'failed');
    ELSIF NEW.state IN ('dead', 'cancelled') THEN
        UPDATE nodes
        SET embedding_status = 'failed', embedding_attempts = NEW.attempt,
            embedding_error = coalesce(last_error, 'the embedding job was ' || NEW.state)
        WHERE id = node AND embedding_status IN ('queued', 'processing');
    END IF;
    RETURN NULL;
END
$$;

-- A backfill or poll run ends when its page job does, by whatever path: the handler's last attempt, an
-- orphan rescue on the last attempt, a timeout, a panic, undecodable arguments, an operator's cancel.
-- A poller's pass frees its connector for the next pass and records why; the failure waits in
-- `unreported_failures` until the next poll tick counts it in the failed-passes metric (exactly once, by
-- whichever process runs that tick).
ALTER TABLE connector_polls ADD COLUMN unreported_failures INTEGER NOT NULL DEFAULT 0;

CREATE FUNCTION activekg_backfill_page_ended() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    run UUID := (NEW.args->>'run_id')::uuid;
    why TEXT := coalesce(NEW.errors -> -1 ->> 'error', 'its page job was ' || NEW.state);
BEGIN
    UPDATE backfill_runs SET state = 'failed', finished_at = now(), error = why
    WHERE id = run AND state = 'running';
    IF FOUND THEN
        UPDATE connector_polls
        SET current_run = NULL, last_error = why, unreported_failures = unreported_failures + 1
        WHERE current_run = run;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_backfill_page_ended
AFTER UPDATE OF state ON jobs
FOR EACH ROW
WHEN (NEW.kind = 'backfill_page' AND NEW.state IN ('dead', 'cancelled') AND NEW.state IS DISTINCT FROM OLD.state)
EXECUTE FUNCTION activekg_backfill_page_ended();

-- Objects a backfill or poll pass listed but cannot ingest (a key with NUL, a file name that is not UTF-8)
-- are that object's failure, counted and sampled here, never the whole page's.
ALTER TABLE backfill_runs
    ADD COLUMN failed   BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN failures JSONB  NOT NULL DEFAULT '[]'::jsonb;
