//! SQL for `connector_configs`. Documents are stored as given (secrets already sealed by the caller);
//! every change notifies listeners so caches in other processes drop the entry at once.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};

use crate::domain::Provider;
use crate::error::Result;

/// The channel config caches LISTEN on; the payload is `<provider>:<tenant>`.
pub const NOTIFY_CHANNEL: &str = "activekg_connector_configs";

/// A stored configuration.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConnectorRow {
    /// Tenant.
    pub tenant_id: String,
    /// Provider name.
    pub provider: String,
    /// The document, with secret fields sealed.
    pub config: Value,
    /// Whether ingestion runs for it.
    pub enabled: bool,
    /// Key version of its sealed fields.
    pub key_version: i32,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "tenant_id, provider, config, enabled, key_version, created_at, updated_at";

async fn notify(conn: &mut PgConnection, provider: Provider, tenant_id: &str) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(NOTIFY_CHANNEL)
        .bind(format!("{provider}:{tenant_id}"))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Inserts a configuration; returns `None` when the tenant already has one for the provider.
pub async fn insert(
    conn: &mut PgConnection,
    tenant_id: &str,
    provider: Provider,
    config: &Value,
    enabled: bool,
    key_version: u32,
) -> Result<Option<ConnectorRow>> {
    let row = sqlx::query_as::<_, ConnectorRow>(sqlx::AssertSqlSafe(format!(
        "INSERT INTO connector_configs (tenant_id, provider, config, enabled, key_version)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, provider) DO NOTHING RETURNING {COLUMNS}"
    )))
    .bind(tenant_id)
    .bind(provider.as_str())
    .bind(config)
    .bind(enabled)
    .bind(key_version as i32)
    .fetch_optional(&mut *conn)
    .await?;
    if row.is_some() {
        notify(conn, provider, tenant_id).await?;
    }
    Ok(row)
}

/// One configuration; `lock` holds it for update until the transaction ends.
pub async fn get(
    conn: &mut PgConnection,
    tenant_id: &str,
    provider: Provider,
    lock: bool,
) -> Result<Option<ConnectorRow>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM connector_configs WHERE tenant_id = $1 AND provider = $2{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    Ok(sqlx::query_as::<_, ConnectorRow>(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id)
        .bind(provider.as_str())
        .fetch_optional(&mut *conn)
        .await?)
}

/// Configurations, optionally of one tenant and/or provider, in key order.
pub async fn list<'e>(
    db: impl PgExecutor<'e>,
    tenant_id: Option<&str>,
    provider: Option<Provider>,
) -> Result<Vec<ConnectorRow>> {
    Ok(
        sqlx::query_as::<_, ConnectorRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM connector_configs
         WHERE ($1::text IS NULL OR tenant_id = $1) AND ($2::text IS NULL OR provider = $2)
         ORDER BY tenant_id, provider"
        )))
        .bind(tenant_id)
        .bind(provider.map(Provider::as_str))
        .fetch_all(db)
        .await?,
    )
}

/// Enabled configurations of `provider` whose `bucket` is `bucket`.
pub async fn by_bucket<'e>(
    db: impl PgExecutor<'e>,
    provider: Provider,
    bucket: &str,
) -> Result<Vec<ConnectorRow>> {
    Ok(sqlx::query_as::<_, ConnectorRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM connector_configs WHERE provider = $1 AND config->>'bucket' = $2 ORDER BY tenant_id"
    )))
    .bind(provider.as_str())
    .bind(bucket)
    .fetch_all(db)
    .await?)
}

/// Whether some enabled `provider` connector names `topic` in its `topic_allowlist`.
pub async fn topic_allowed<'e>(
    db: impl PgExecutor<'e>,
    provider: Provider,
    topic: &str,
) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM connector_configs
                        WHERE provider = $1 AND enabled
                          AND jsonb_typeof(config->'topic_allowlist') = 'array'
                          AND config->'topic_allowlist' ? $2)",
    )
    .bind(provider.as_str())
    .bind(topic)
    .fetch_one(db)
    .await?)
}

/// Tenants whose enabled GCS connector names a Pub/Sub subscription to pull from.
pub async fn pulling_tenants<'e>(db: impl PgExecutor<'e>) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT tenant_id FROM connector_configs
          WHERE provider = 'gcs' AND enabled AND coalesce(config->>'subscription', '') <> ''
          ORDER BY tenant_id",
    )
    .fetch_all(db)
    .await?)
}

/// Replaces a configuration's document, enabled flag and key version.
pub async fn update(
    conn: &mut PgConnection,
    tenant_id: &str,
    provider: Provider,
    config: &Value,
    enabled: bool,
    key_version: u32,
) -> Result<ConnectorRow> {
    let row = sqlx::query_as::<_, ConnectorRow>(sqlx::AssertSqlSafe(format!(
        "UPDATE connector_configs SET config = $3, enabled = $4, key_version = $5, updated_at = now()
         WHERE tenant_id = $1 AND provider = $2 RETURNING {COLUMNS}"
    )))
    .bind(tenant_id)
    .bind(provider.as_str())
    .bind(config)
    .bind(enabled)
    .bind(key_version as i32)
    .fetch_one(&mut *conn)
    .await?;
    notify(conn, provider, tenant_id).await?;
    Ok(row)
}

/// Deletes a configuration; returns whether it existed.
pub async fn delete(conn: &mut PgConnection, tenant_id: &str, provider: Provider) -> Result<bool> {
    let done = sqlx::query("DELETE FROM connector_configs WHERE tenant_id = $1 AND provider = $2")
        .bind(tenant_id)
        .bind(provider.as_str())
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() == 1 {
        notify(conn, provider, tenant_id).await?;
    }
    Ok(done.rows_affected() == 1)
}

/// Which rows a rotation covers.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RotationScope {
    /// Only this tenant.
    pub tenant_id: Option<String>,
    /// Only this provider.
    pub provider: Option<Provider>,
}

/// How many rows of `scope` are not at key version `active`.
pub async fn count_behind<'e>(
    db: impl PgExecutor<'e>,
    scope: &RotationScope,
    active: u32,
) -> Result<u64> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM connector_configs
         WHERE key_version <> $1 AND ($2::text IS NULL OR tenant_id = $2) AND ($3::text IS NULL OR provider = $3)",
    )
    .bind(active as i32)
    .bind(scope.tenant_id.as_deref())
    .bind(scope.provider.map(Provider::as_str))
    .fetch_one(db)
    .await?;
    Ok(n as u64)
}

/// The next `limit` rows of `scope` behind key version `active`, after `(tenant_id, provider)` cursor
/// `after`, locked for update in the caller's transaction.
pub async fn lock_behind(
    conn: &mut PgConnection,
    scope: &RotationScope,
    active: u32,
    after: Option<&(String, String)>,
    limit: i64,
) -> Result<Vec<ConnectorRow>> {
    behind(conn, scope, active, after, limit, "FOR UPDATE").await
}

/// The same rows as [`lock_behind`], read without locking them: a dry run looks and changes nothing.
pub async fn read_behind(
    conn: &mut PgConnection,
    scope: &RotationScope,
    active: u32,
    after: Option<&(String, String)>,
    limit: i64,
) -> Result<Vec<ConnectorRow>> {
    behind(conn, scope, active, after, limit, "").await
}

async fn behind(
    conn: &mut PgConnection,
    scope: &RotationScope,
    active: u32,
    after: Option<&(String, String)>,
    limit: i64,
    locking: &'static str,
) -> Result<Vec<ConnectorRow>> {
    let (after_tenant, after_provider) =
        after.map_or((None, None), |(t, p)| (Some(t.as_str()), Some(p.as_str())));
    Ok(sqlx::query_as::<_, ConnectorRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM connector_configs
         WHERE key_version <> $1 AND ($2::text IS NULL OR tenant_id = $2) AND ($3::text IS NULL OR provider = $3)
           AND ($4::text IS NULL OR (tenant_id, provider) > ($4, $5))
         ORDER BY tenant_id, provider
         LIMIT $6
         {locking}"
    )))
    .bind(active as i32)
    .bind(scope.tenant_id.as_deref())
    .bind(scope.provider.map(Provider::as_str))
    .bind(after_tenant)
    .bind(after_provider)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?)
}

/// Stores a rotated document at `key_version`, leaving `updated_at` alone (nothing the operator set changed).
pub async fn store_rotated(
    conn: &mut PgConnection,
    tenant_id: &str,
    provider: &str,
    config: &Value,
    key_version: u32,
) -> Result<()> {
    sqlx::query("UPDATE connector_configs SET config = $3, key_version = $4 WHERE tenant_id = $1 AND provider = $2")
        .bind(tenant_id)
        .bind(provider)
        .bind(config)
        .bind(key_version as i32)
        .execute(&mut *conn)
        .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(NOTIFY_CHANNEL)
        .bind(format!("{provider}:{tenant_id}"))
        .execute(&mut *conn)
        .await?;
    Ok(())
}
