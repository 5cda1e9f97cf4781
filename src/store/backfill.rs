//! SQL for backfill runs: one row per run, advanced by each page job in the transaction that enqueues the
//! page's objects, so the counters always match the jobs that exist.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::Result;

/// A backfill run.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BackfillRun {
    /// Run id.
    pub id: Uuid,
    /// Tenant.
    pub tenant_id: String,
    /// Provider.
    pub provider: String,
    /// Key prefix listed.
    pub prefix: String,
    /// Most objects to enqueue, if limited.
    pub max_objects: Option<i64>,
    /// Pages listed.
    pub pages: i64,
    /// Objects listed.
    pub seen: i64,
    /// Ingest jobs enqueued.
    pub enqueued: i64,
    /// Objects skipped because the same version was already queued.
    pub skipped: i64,
    /// running, completed or failed.
    pub state: String,
    /// Why it failed.
    pub error: Option<String>,
    /// Started.
    pub created_at: DateTime<Utc>,
    /// Finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// `api` (an operator's backfill) or `poll` (a poller's pass).
    pub started_by: String,
    /// Only objects changed at or after this are queued.
    pub changed_since: Option<DateTime<Utc>>,
    /// The newest change time among the objects listed so far.
    pub newest_change: Option<DateTime<Utc>>,
    /// Objects listed that could not be ingested.
    pub failed: i64,
    /// The first of those (`[{key, reason}]`, at most 100).
    pub failures: serde_json::Value,
}

impl BackfillRun {
    /// Whether a poller started this run (its end moves the connector's watermark).
    pub fn is_poll_pass(&self) -> bool {
        self.started_by == "poll"
    }
}

/// Who starts a run, and what it queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// An operator's backfill: every object.
    Api,
    /// A poller's pass: objects changed at or after the instant.
    Poll(Option<DateTime<Utc>>),
}

/// Records a new run.
pub async fn create(
    conn: &mut PgConnection,
    id: Uuid,
    tenant_id: &str,
    provider: &str,
    prefix: &str,
    max_objects: Option<i64>,
    origin: Origin,
) -> Result<()> {
    let (started_by, changed_since) = match origin {
        Origin::Api => ("api", None),
        Origin::Poll(since) => ("poll", since),
    };
    sqlx::query(
        "INSERT INTO backfill_runs (id, tenant_id, provider, prefix, max_objects, started_by, changed_since)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
        .bind(id)
        .bind(tenant_id)
        .bind(provider)
        .bind(prefix)
        .bind(max_objects)
        .bind(started_by)
        .bind(changed_since)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A run, locked for update when `lock`.
pub async fn get(conn: &mut PgConnection, id: Uuid, lock: bool) -> Result<Option<BackfillRun>> {
    let sql = if lock {
        "SELECT * FROM backfill_runs WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT * FROM backfill_runs WHERE id = $1"
    };
    Ok(sqlx::query_as::<_, BackfillRun>(sql)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?)
}

/// One page's counts.
#[derive(Debug, Clone, Default)]
pub struct PageCounts {
    /// Objects listed.
    pub seen: i64,
    /// Ingest jobs inserted.
    pub enqueued: i64,
    /// Objects whose job already existed.
    pub skipped: i64,
    /// The newest change time among the objects listed.
    pub newest_change: Option<DateTime<Utc>>,
    /// Objects that could not be ingested, `[{key, reason}]`.
    pub failures: Vec<serde_json::Value>,
}

/// Adds one page's counts; `finished` closes the run as completed.
pub async fn advance(
    conn: &mut PgConnection,
    id: Uuid,
    page: PageCounts,
    finished: bool,
) -> Result<()> {
    sqlx::query(
        "UPDATE backfill_runs
         SET pages = pages + 1, seen = seen + $2, enqueued = enqueued + $3, skipped = skipped + $4,
             newest_change = GREATEST(newest_change, $6),
             failed = failed + jsonb_array_length($7),
             failures = CASE WHEN jsonb_array_length(failures) >= 100 THEN failures
                             ELSE failures || (SELECT coalesce(jsonb_agg(f), '[]'::jsonb) FROM (
                                 SELECT f FROM jsonb_array_elements($7) f LIMIT 100 - jsonb_array_length(failures)) x)
                        END,
             state = CASE WHEN $5 THEN 'completed' ELSE state END,
             finished_at = CASE WHEN $5 THEN now() ELSE finished_at END
         WHERE id = $1",
    )
    .bind(id)
    .bind(page.seen)
    .bind(page.enqueued)
    .bind(page.skipped)
    .bind(finished)
    .bind(page.newest_change)
    .bind(serde_json::Value::Array(page.failures))
    .execute(&mut *conn)
    .await?;
    Ok(())
}
