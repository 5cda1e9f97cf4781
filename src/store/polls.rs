//! SQL for connector polling: each polling connector's cursor (the watermark of the newest change a completed
//! pass saw), the pass in flight (a backfill run), and when the next pass is due.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::error::Result;

/// A connector whose next pass is due.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DuePoll {
    /// Tenant.
    pub tenant_id: String,
    /// Provider.
    pub provider: String,
    /// The connector's prefix.
    pub prefix: String,
    /// The newest change the last completed pass saw.
    pub watermark: Option<DateTime<Utc>>,
    /// `poll_interval_seconds`.
    pub interval_seconds: i32,
}

/// A polling connector's state.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PollState {
    /// Tenant.
    pub tenant_id: String,
    /// Provider.
    pub provider: String,
    /// The newest change the last completed pass saw.
    pub watermark: Option<DateTime<Utc>>,
    /// The pass in flight.
    pub current_run: Option<Uuid>,
    /// When the next pass may start.
    pub next_poll_at: DateTime<Utc>,
    /// Passes started.
    pub passes: i64,
    /// When the last pass completed.
    pub last_completed_at: Option<DateTime<Utc>>,
    /// Why the last pass failed, if it did.
    pub last_error: Option<String>,
}

/// Connectors due for a pass, locked (others' locks are skipped) until the caller's transaction ends. A
/// connector whose pass is still running is not due, however late.
pub async fn due(conn: &mut PgConnection) -> Result<Vec<DuePoll>> {
    sqlx::query(
        "INSERT INTO connector_polls (tenant_id, provider)
         SELECT tenant_id, provider FROM connector_configs
          WHERE enabled AND config ? 'poll_interval_seconds' AND jsonb_typeof(config->'poll_interval_seconds') = 'number'
         ON CONFLICT DO NOTHING",
    )
    .execute(&mut *conn)
    .await?;
    Ok(sqlx::query_as(
        "SELECT p.tenant_id, p.provider, coalesce(c.config->>'prefix', '') AS prefix,
                p.watermark, (c.config->>'poll_interval_seconds')::int AS interval_seconds
           FROM connector_polls p JOIN connector_configs c USING (tenant_id, provider)
          WHERE c.enabled AND jsonb_typeof(c.config->'poll_interval_seconds') = 'number'
            AND p.next_poll_at <= now()
            AND (p.current_run IS NULL
                 OR NOT EXISTS (SELECT 1 FROM backfill_runs r WHERE r.id = p.current_run AND r.state = 'running'))
          ORDER BY p.next_poll_at
          FOR UPDATE OF p SKIP LOCKED",
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Failed passes not yet counted in the metric, by provider, reset in the caller's transaction so each is
/// counted once across all processes.
pub async fn take_failures(conn: &mut PgConnection) -> Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "WITH taken AS (
             SELECT tenant_id, provider, unreported_failures AS n FROM connector_polls
             WHERE unreported_failures > 0 FOR UPDATE SKIP LOCKED),
         reset AS (
             UPDATE connector_polls p SET unreported_failures = 0 FROM taken
             WHERE p.tenant_id = taken.tenant_id AND p.provider = taken.provider)
         SELECT provider, sum(n)::int8 FROM taken GROUP BY provider",
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Records that pass `run_id` started; the next may start `interval_seconds` from now.
pub async fn begin_pass(
    conn: &mut PgConnection,
    tenant_id: &str,
    provider: &str,
    run_id: Uuid,
    interval_seconds: i32,
) -> Result<()> {
    sqlx::query(
        "UPDATE connector_polls
            SET current_run = $3, passes = passes + 1,
                next_poll_at = now() + make_interval(secs => $4)
          WHERE tenant_id = $1 AND provider = $2",
    )
    .bind(tenant_id)
    .bind(provider)
    .bind(run_id)
    .bind(f64::from(interval_seconds))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Moves the watermark to the newest change pass `run_id` saw (never backwards) and frees the connector.
pub async fn complete(conn: &mut PgConnection, run_id: Uuid) -> Result<()> {
    sqlx::query(
        "UPDATE connector_polls p
            SET watermark = GREATEST(p.watermark, r.newest_change), current_run = NULL,
                last_completed_at = now(), last_error = NULL
           FROM backfill_runs r
          WHERE r.id = $1 AND p.current_run = $1",
    )
    .bind(run_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Every polling connector's state, by tenant and provider.
pub async fn list<'e>(db: impl PgExecutor<'e>) -> Result<Vec<PollState>> {
    Ok(sqlx::query_as(
        "SELECT tenant_id, provider, watermark, current_run, next_poll_at, passes, last_completed_at, last_error
           FROM connector_polls ORDER BY tenant_id, provider",
    )
    .fetch_all(db)
    .await?)
}
