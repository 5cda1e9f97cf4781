//! Worker processes: registration and heartbeats.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use crate::error::Result;

/// Registers (or refreshes) a worker process.
pub async fn register_worker<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
    host: &str,
    pid: i32,
    kinds: &[String],
    version: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO job_workers (id, host, pid, kinds, version) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (id) DO UPDATE SET kinds = EXCLUDED.kinds, last_seen = now()",
    )
    .bind(id)
    .bind(host)
    .bind(pid)
    .bind(kinds)
    .bind(version)
    .execute(db)
    .await?;
    Ok(())
}

/// Records a worker's heartbeat. Returns false when the row is gone (e.g. pruned after a long stall), in
/// which case the caller registers again.
pub async fn heartbeat<'e>(db: impl PgExecutor<'e>, id: &str) -> Result<bool> {
    let done = sqlx::query("UPDATE job_workers SET last_seen = now() WHERE id = $1")
        .bind(id)
        .execute(db)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Removes a worker that stopped cleanly.
pub async fn deregister_worker<'e>(db: impl PgExecutor<'e>, id: &str) -> Result<()> {
    sqlx::query("DELETE FROM job_workers WHERE id = $1")
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

/// A worker process as last seen.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkerRecord {
    /// Worker id (host:pid:nonce).
    pub id: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: i32,
    /// Job kinds it runs.
    pub kinds: Vec<String>,
    /// Its version.
    pub version: String,
    /// Started at.
    pub started_at: DateTime<Utc>,
    /// Last heartbeat.
    pub last_seen: DateTime<Utc>,
    /// Seconds since the last heartbeat (database clock).
    pub silent_seconds: f64,
}

/// Every registered worker process.
pub async fn workers<'e>(db: impl PgExecutor<'e>) -> Result<Vec<WorkerRecord>> {
    Ok(sqlx::query_as::<_, WorkerRecord>(
        "SELECT id, host, pid, kinds, version, started_at, last_seen,
                extract(epoch FROM now() - last_seen)::float8 AS silent_seconds
         FROM job_workers ORDER BY host, started_at",
    )
    .fetch_all(db)
    .await?)
}
