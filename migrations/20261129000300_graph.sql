-- The knowledge graph: nodes (documents, their chunks, and nodes created through the API) and typed edges.
CREATE TABLE nodes (
    -- Documents and chunks get stable ids (UUIDv5 of tenant, provider and key; of document and index), so
    -- re-ingesting an object updates the same rows instead of colliding with them.
    id                 UUID        PRIMARY KEY,
    tenant_id          TEXT        NOT NULL,
    classes            TEXT[]      NOT NULL CONSTRAINT nodes_have_a_class CHECK (cardinality(classes) > 0),
    -- The first class, so the operations guide's queries (`WHERE entity_type = 'Document'`) work as written.
    entity_type        TEXT        GENERATED ALWAYS AS (classes[1]) STORED,
    props              JSONB       NOT NULL DEFAULT '{}'::jsonb,
    -- Where the node's content came from (e.g. s3://bucket/key).
    payload_ref        TEXT,
    embedding_status   TEXT        NOT NULL DEFAULT 'queued'
        CONSTRAINT nodes_embedding_status_valid CHECK (embedding_status IN ('queued', 'processing', 'ready', 'failed', 'skipped')),
    embedding_error    TEXT,
    -- Attempts of the current embedding request (reset when a new one is made).
    embedding_attempts INTEGER     NOT NULL DEFAULT 0,
    embedding_model    TEXT,
    embedded_at        TIMESTAMPTZ,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Soft delete: hidden from listings and search, hard-deleted by the purger after retention.
    deleted_at         TIMESTAMPTZ
);

CREATE INDEX nodes_tenant_live ON nodes (tenant_id, entity_type, created_at) WHERE deleted_at IS NULL;
CREATE INDEX nodes_classes ON nodes USING gin (classes);
CREATE INDEX nodes_embedding_status ON nodes (tenant_id, embedding_status);
CREATE INDEX nodes_deleted ON nodes (deleted_at) WHERE deleted_at IS NOT NULL;

CREATE TABLE edges (
    src        UUID        NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    rel        TEXT        NOT NULL,
    dst        UUID        NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    tenant_id  TEXT        NOT NULL,
    props      JSONB       NOT NULL DEFAULT '{}'::jsonb,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (src, rel, dst)
);

-- Chunks of a document: edges (chunk) -[DERIVED_FROM]-> (document), looked up from the document's side.
CREATE INDEX edges_dst ON edges (dst, rel);

-- Backfill runs: one row per run, advanced by each page job in the transaction that enqueues its objects.
CREATE TABLE backfill_runs (
    id          UUID        PRIMARY KEY,
    tenant_id   TEXT        NOT NULL,
    provider    TEXT        NOT NULL,
    prefix      TEXT        NOT NULL,
    max_objects BIGINT,
    pages       BIGINT      NOT NULL DEFAULT 0,
    seen        BIGINT      NOT NULL DEFAULT 0,
    enqueued    BIGINT      NOT NULL DEFAULT 0,
    skipped     BIGINT      NOT NULL DEFAULT 0,
    state       TEXT        NOT NULL DEFAULT 'running' CONSTRAINT backfill_runs_state_valid CHECK (state IN ('running', 'completed', 'failed')),
    error       TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ
);

-- Kinds that share workers fairly between tenants claim through this index: the next due job of each
-- tenant in turn, so one tenant's backlog cannot starve another's first job.
CREATE INDEX jobs_fair_fetch ON jobs (kind, (coalesce(tenant_id, '')), priority DESC, run_at, id) WHERE state = 'available';
