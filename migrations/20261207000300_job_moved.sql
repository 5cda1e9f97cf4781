-- The embedding status rule of `activekg_embed_job_moved`, callable for jobs that move outside the `jobs`
-- table (in Redis, under ACTIVEKG_JOBS_BACKEND=redis), where no trigger sees them. Those moves arrive after
-- the fact, so `strict` keeps a late one from undoing a newer attempt's: a job handed back or retried marks
-- its node queued only if the node is failed, or processing for that attempt or an older one.
CREATE FUNCTION activekg_job_moved(p_kind TEXT, p_args JSONB, p_state TEXT, p_attempt INTEGER,
                                   p_last_error TEXT, p_strict BOOLEAN) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    node UUID;
BEGIN
    IF p_kind <> 'embed_node' THEN
        RETURN;
    END IF;
    node := (p_args->>'node_id')::uuid;
    IF p_state = 'running' THEN
        UPDATE nodes SET embedding_status = 'processing', embedding_attempts = p_attempt
        WHERE id = node AND (embedding_status <> 'processing' OR embedding_attempts <> p_attempt)
          AND (NOT p_strict OR embedding_status IN ('queued', 'processing', 'failed'));
    ELSIF p_state = 'available' THEN
        UPDATE nodes SET embedding_status = 'queued', embedding_error = p_last_error
        WHERE id = node AND embedding_status IN ('processing', 'failed')
          AND (NOT p_strict OR embedding_status = 'failed' OR embedding_attempts <= p_attempt);
    ELSIF p_state IN ('dead', 'cancelled') THEN
        UPDATE nodes
        SET embedding_status = 'failed', embedding_attempts = p_attempt,
            embedding_error = coalesce(p_last_error, 'the embedding job was ' || p_state)
        WHERE id = node AND embedding_status IN ('queued', 'processing');
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION activekg_embed_job_moved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM activekg_job_moved(NEW.kind, NEW.args, NEW.state, NEW.attempt, NEW.errors -> -1 ->> 'error', false);
    RETURN NULL;
END
$$;
