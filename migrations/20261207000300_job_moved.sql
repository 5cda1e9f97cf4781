-- What PostgreSQL keeps in step with a job's moves (the `jobs` triggers: a node's embedding status, a
-- backfill run ended by its page job), as one function that the triggers call and that is also called for
-- jobs moving outside the `jobs` table (in Redis, under ACTIVEKG_JOBS_BACKEND=redis), where no trigger sees
-- them. Those moves arrive after the fact, so `p_strict` keeps a late one from undoing a newer attempt's:
-- a job handed back or retried marks its node queued only if the node is failed, or processing for that
-- attempt or an older one.
CREATE FUNCTION activekg_job_moved(p_kind TEXT, p_args JSONB, p_state TEXT, p_attempt INTEGER,
                                   p_last_error TEXT, p_strict BOOLEAN) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    node UUID;
    run UUID;
    why TEXT;
BEGIN
    IF p_kind = 'embed_node' THEN
        -- `processing` is the handler's to mark (see 20261203000100_engine_edges.sql).
        node := (p_args->>'node_id')::uuid;
        IF p_state = 'available' THEN
            UPDATE nodes SET embedding_status = 'queued', embedding_error = p_last_error
            WHERE id = node AND embedding_status IN ('processing', 'failed')
              AND (NOT p_strict OR embedding_status = 'failed' OR embedding_attempts <= p_attempt);
        ELSIF p_state IN ('dead', 'cancelled') THEN
            UPDATE nodes
            SET embedding_status = 'failed', embedding_attempts = p_attempt,
                embedding_error = coalesce(p_last_error, 'the embedding job was ' || p_state)
            WHERE id = node AND embedding_status IN ('queued', 'processing');
        END IF;
    ELSIF p_kind = 'backfill_page' AND p_state IN ('dead', 'cancelled') THEN
        run := (p_args->>'run_id')::uuid;
        why := coalesce(p_last_error, 'its page job was ' || p_state);
        UPDATE backfill_runs SET state = 'failed', finished_at = now(), error = why
        WHERE id = run AND state = 'running';
        IF FOUND THEN
            UPDATE connector_polls
            SET current_run = NULL, last_error = why, unreported_failures = unreported_failures + 1
            WHERE current_run = run;
        END IF;
    END IF;
END
$$;

-- Both triggers run the one rule.
CREATE FUNCTION activekg_job_row_moved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM activekg_job_moved(NEW.kind, NEW.args, NEW.state, NEW.attempt, NEW.errors -> -1 ->> 'error', false);
    RETURN NULL;
END
$$;

DROP TRIGGER jobs_embed_node_moved ON jobs;
CREATE TRIGGER jobs_embed_node_moved
AFTER UPDATE OF state ON jobs
FOR EACH ROW
WHEN (NEW.kind = 'embed_node' AND NEW.state IS DISTINCT FROM OLD.state)
EXECUTE FUNCTION activekg_job_row_moved();
DROP FUNCTION activekg_embed_job_moved();

DROP TRIGGER jobs_backfill_page_ended ON jobs;
CREATE TRIGGER jobs_backfill_page_ended
AFTER UPDATE OF state ON jobs
FOR EACH ROW
WHEN (NEW.kind = 'backfill_page' AND NEW.state IN ('dead', 'cancelled') AND NEW.state IS DISTINCT FROM OLD.state)
EXECUTE FUNCTION activekg_job_row_moved();
DROP FUNCTION activekg_backfill_page_ended();
