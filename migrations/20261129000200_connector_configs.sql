-- Connector configurations, one per tenant and provider. Secret fields inside `config` are stored sealed
-- ({"kek_version": n, "ciphertext": "..."}); everything else is plain so operators can query it
-- (config->>'bucket', config->>'topic_allowlist').
CREATE TABLE connector_configs (
    tenant_id   TEXT        NOT NULL,
    -- The API refuses unknown providers with a 422 first; this is the backstop.
    provider    TEXT        NOT NULL CONSTRAINT connector_configs_provider_known CHECK (provider IN ('s3', 'gcs', 'local')),
    config      JSONB       NOT NULL,
    enabled     BOOLEAN     NOT NULL DEFAULT true,
    -- The key version every sealed field of the row was made with; rotation moves rows to the active one.
    key_version INTEGER     NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, provider)
);

CREATE INDEX connector_configs_key_version ON connector_configs (key_version);

-- Webhooks find a tenant by the bucket an event names.
CREATE INDEX connector_configs_bucket ON connector_configs (provider, (config->>'bucket'));

-- What a long-running job has done so far, saved in the same transaction as that work so a retry resumes
-- where the last attempt committed (and operators can watch it move).
ALTER TABLE jobs ADD COLUMN progress JSONB;
