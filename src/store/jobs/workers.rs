//! Processes of the job engine: registration and heartbeats. Every process registers (API, workers,
//! scheduler), so any of them can rescue orphans on the evidence of its own unbroken heartbeat.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use crate::error::Result;

/// Who a process is, as registered.
#[derive(Debug, Clone)]
pub struct ProcessInfo<'a> {
    /// Process id in the engine (host:pid:nonce), stored in `jobs.locked_by`.
    pub id: &'a str,
    /// Host name.
    pub host: &'a str,
    /// OS process id.
    pub pid: i32,
    /// Job kinds it runs (empty for a process without workers).
    pub kinds: &'a [String],
    /// What it does: `api`, `worker`, `scheduler`.
    pub roles: &'a [String],
    /// Its version.
    pub version: &'a str,
}

/// Registers (or refreshes) a process. Its unbroken-heartbeat clock starts now.
pub async fn register_worker<'e>(db: impl PgExecutor<'e>, process: &ProcessInfo<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO job_workers (id, host, pid, kinds, roles, version) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO UPDATE
         SET kinds = EXCLUDED.kinds, roles = EXCLUDED.roles, last_seen = now(), alive_since = now()",
    )
    .bind(process.id)
    .bind(process.host)
    .bind(process.pid)
    .bind(process.kinds)
    .bind(process.roles)
    .bind(process.version)
    .execute(db)
    .await?;
    Ok(())
}

/// Records a heartbeat. A beat more than `gap` after the previous one restarts the process's unbroken-
/// heartbeat clock (`alive_since`): it was out of touch meanwhile. Returns false when the row is gone (e.g.
/// forgotten after a day of silence), in which case the caller registers again.
pub async fn heartbeat<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
    gap: std::time::Duration,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE job_workers
         SET alive_since = CASE WHEN last_seen < now() - make_interval(secs => $2) THEN now() ELSE alive_since END,
             last_seen = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(gap.as_secs_f64())
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Removes a process that stopped cleanly.
pub async fn deregister_worker<'e>(db: impl PgExecutor<'e>, id: &str) -> Result<()> {
    sqlx::query("DELETE FROM job_workers WHERE id = $1")
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

/// A process as last seen.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkerRecord {
    /// Process id in the engine (host:pid:nonce).
    pub id: String,
    /// Host name.
    pub host: String,
    /// OS process id.
    pub pid: i32,
    /// Job kinds it runs.
    pub kinds: Vec<String>,
    /// What it does: `api`, `worker`, `scheduler`.
    pub roles: Vec<String>,
    /// Its version.
    pub version: String,
    /// Started at.
    pub started_at: DateTime<Utc>,
    /// Last heartbeat.
    pub last_seen: DateTime<Utc>,
    /// Since when it has heartbeated without a gap.
    pub alive_since: DateTime<Utc>,
    /// Seconds since the last heartbeat (database clock).
    pub silent_seconds: f64,
}

/// Every registered process.
pub async fn workers<'e>(db: impl PgExecutor<'e>) -> Result<Vec<WorkerRecord>> {
    Ok(sqlx::query_as::<_, WorkerRecord>(
        "SELECT id, host, pid, kinds, roles, version, started_at, last_seen, alive_since,
                extract(epoch FROM now() - last_seen)::float8 AS silent_seconds
         FROM job_workers ORDER BY host, started_at",
    )
    .fetch_all(db)
    .await?)
}
