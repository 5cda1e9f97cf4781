-- Fair claims take turns between (tenant, provider) pairs, the guide's connector:{provider}:{tenant}
-- queues, not only between tenants: the key is tenant and provider joined by '/', which neither may hold.
DROP INDEX jobs_fair_fetch;
CREATE INDEX jobs_fair_fetch ON jobs ((kind), (coalesce(tenant_id, '') || '/' || coalesce(provider, '')), run_at, id)
    WHERE state = 'available';
