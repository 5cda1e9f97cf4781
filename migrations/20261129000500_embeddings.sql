-- Jobs unique only while pending ("one pending job per node"): the key is released when a worker claims the
-- job, so a request made during a run queues the next one instead of being lost.
ALTER TABLE jobs ADD COLUMN unique_while_pending BOOLEAN NOT NULL DEFAULT false;

-- Embeddings: one vector per node, with the model that made it and the hash of the text it was made from.
--
-- Stored as real[] so the schema works on any PostgreSQL. When the pgvector extension is available, start-up
-- adds a generated `vec vector(384)` column and an HNSW cosine index on it (store::embeddings::prepare), and
-- search uses them; without it, search is exact over real[] (correct, slower on large tenants).
CREATE TABLE node_embeddings (
    node_id    UUID        PRIMARY KEY REFERENCES nodes (id) ON DELETE CASCADE,
    tenant_id  TEXT        NOT NULL,
    model      TEXT        NOT NULL,
    dimensions INTEGER     NOT NULL,
    embedding  REAL[]      NOT NULL CONSTRAINT node_embeddings_dimensions CHECK (cardinality(embedding) = dimensions),
    text_hash  TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX node_embeddings_tenant ON node_embeddings (tenant_id, model);

-- Cosine similarity of two equally long arrays, for the exact search path.
CREATE FUNCTION activekg_cosine(a REAL[], b REAL[]) RETURNS DOUBLE PRECISION
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT sum(x * y) / nullif(sqrt(sum(x * x)) * sqrt(sum(y * y)), 0)
    FROM unnest(a, b) AS t(x, y)
$$;

-- A node's embedding status follows its embed_node job, whichever path moves the job: a worker's claim
-- (processing, with the attempt number), a retry or an orphan rescue (queued, with the last error), a dead
-- letter or a cancel (failed). Doing it here keeps the two in one transaction even when the worker died or
-- timed out and no handler code ran. Success (ready, skipped) is written by the handler with the vector.
CREATE FUNCTION activekg_embed_job_moved() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    node UUID := (NEW.args->>'node_id')::uuid;
    last_error TEXT := NEW.errors -> -1 ->> 'error';
BEGIN
    IF NEW.state = 'running' THEN
        UPDATE nodes SET embedding_status = 'processing', embedding_attempts = NEW.attempt
        WHERE id = node AND (embedding_status <> 'processing' OR embedding_attempts <> NEW.attempt);
    ELSIF NEW.state = 'available' THEN
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

CREATE TRIGGER jobs_embed_node_moved
AFTER UPDATE OF state ON jobs
FOR EACH ROW
WHEN (NEW.kind = 'embed_node' AND NEW.state IS DISTINCT FROM OLD.state)
EXECUTE FUNCTION activekg_embed_job_moved();

-- Pending embeddings per tenant are counted on every create request (the caps); this keeps that an
-- index-only walk over the tenant's pending and running jobs.
CREATE INDEX jobs_embed_pending ON jobs (tenant_id) WHERE kind = 'embed_node' AND state IN ('available', 'running');
