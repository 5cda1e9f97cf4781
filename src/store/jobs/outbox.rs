//! Jobs bound for the Redis backend: staged in the caller's transaction, then handed over by the relay.
//!
//! The guarantee is PostgreSQL's: a job is safe once the enqueuing transaction commits, exactly as with the
//! `jobs` table. The relay sends staged rows to Redis and deletes them only after Redis has them; Redis adds a
//! job id once, so rows sent twice (a relay that died before its delete committed) are harmless. The cost is
//! one insert and one delete in PostgreSQL per job, against the `jobs` table's insert and two updates.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor, PgPool};

use crate::domain::JobId;
use crate::error::Result;
use crate::store::redis_jobs::{Pushed, RedisJobs};

use super::admin::{get_from, list_from};
use super::{Enqueued, JobFilter, JobRecord, NewJob};

/// Staged jobs shaped as `jobs` rows, for the operators' queries: waiting, never attempted.
const AS_JOBS: &str = "(SELECT id, kind, queue, args, priority, 0 AS attempt, max_attempts, '[]'::jsonb AS errors, \
    enqueued_at, coalesce(run_at, enqueued_at) AS run_at, NULL::timestamptz AS attempted_at, \
    NULL::timestamptz AS finished_at, NULL::text AS locked_by, unique_key, tenant_id, provider, \
    NULL::jsonb AS progress, 'available'::text AS state FROM job_outbox)";

/// Staged jobs matching `filter`, newest first, below `before`, at most `limit` (as [`super::list`]).
pub async fn list_staged<'e>(
    db: impl PgExecutor<'e>,
    filter: &JobFilter,
    before: Option<JobId>,
    limit: i64,
) -> Result<Vec<JobRecord>> {
    list_from(db, AS_JOBS, filter, before, limit).await
}

/// One staged job.
pub async fn get_staged<'e>(db: impl PgExecutor<'e>, id: JobId) -> Result<Option<JobRecord>> {
    get_from(db, AS_JOBS, id).await
}

/// The channel the relay listens on; staging a job notifies it when the transaction commits.
pub const OUTBOX_CHANNEL: &str = "activekg_outbox";

/// A staged job on its way to Redis.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Outgoing {
    /// The id PostgreSQL gave it.
    pub id: i64,
    /// The job kind.
    pub kind: String,
    /// The queue it is reported under.
    pub queue: String,
    /// Serialized arguments.
    pub args: Value,
    /// Higher runs first.
    pub priority: i16,
    /// Attempt budget.
    pub max_attempts: i32,
    /// Run no earlier than this; `None` means as soon as it arrives.
    pub run_at: Option<DateTime<Utc>>,
    /// When it was staged.
    pub enqueued_at: DateTime<Utc>,
    /// Idempotency key.
    pub unique_key: Option<String>,
    /// Whether the key is released when the job finishes.
    pub unique_while_active: bool,
    /// Whether the key is released when a worker claims the job.
    pub unique_while_pending: bool,
    /// The tenant.
    pub tenant_id: Option<String>,
    /// The provider.
    pub provider: Option<String>,
    /// Whether the kind claims fairly between (tenant, provider) groups.
    pub fair: bool,
}

/// Stages jobs for Redis in the caller's transaction; `fair` says, per job, whether its kind claims fairly.
/// Duplicates by idempotency key among staged jobs are skipped as [`super::insert`] skips them, naming the
/// staged job. A duplicate of a job already in Redis is staged and then folded by the relay: `inserted` says
/// the job is safe, not that it will run apart from the one holding its key.
pub async fn stage(conn: &mut PgConnection, jobs: &[(NewJob, bool)]) -> Result<Vec<Enqueued>> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(Option<i64>, String, Option<String>)> = sqlx::query_as(
        r#"
        WITH input AS (
            SELECT t.*, nextval(pg_get_serial_sequence('jobs', 'id')) AS id
            FROM ROWS FROM (jsonb_to_recordset($1) AS (
                kind text, queue text, args jsonb, priority int2, max_attempts int4, run_at timestamptz,
                unique_key text, unique_while_active bool, unique_while_pending bool, tenant_id text,
                provider text, fair bool)) WITH ORDINALITY AS t(
                kind, queue, args, priority, max_attempts, run_at, unique_key, unique_while_active,
                unique_while_pending, tenant_id, provider, fair, ord)
        ),
        staged AS (
            INSERT INTO job_outbox (id, kind, queue, args, priority, max_attempts, run_at, unique_key,
                                    unique_while_active, unique_while_pending, tenant_id, provider, fair)
            SELECT id, kind, queue, args, priority, max_attempts, run_at, unique_key,
                   unique_while_active OR unique_while_pending, unique_while_pending, tenant_id, provider, fair
            FROM input ORDER BY ord
            ON CONFLICT (kind, unique_key) WHERE unique_key IS NOT NULL DO NOTHING
            RETURNING id
        ),
        notified AS (SELECT count(pg_notify($2, '')) FROM (SELECT 1 FROM staged LIMIT 1) s)
        SELECT staged.id, input.kind, input.unique_key
        FROM input
        LEFT JOIN staged ON staged.id = input.id
        CROSS JOIN notified
        ORDER BY input.ord
        "#,
    )
    .bind(Value::Array(
        jobs.iter()
            .map(|(j, fair)| {
                serde_json::json!({
                    "kind": j.kind, "queue": j.queue, "args": j.args, "priority": j.priority,
                    "max_attempts": j.max_attempts, "run_at": j.run_at, "unique_key": j.unique_key,
                    "unique_while_active": j.unique_while_active,
                    "unique_while_pending": j.unique_while_pending, "tenant_id": j.tenant_id,
                    "provider": j.provider, "fair": fair,
                })
            })
            .collect(),
    ))
    .bind(OUTBOX_CHANNEL)
    .fetch_all(&mut *conn)
    .await?;
    // Skipped rows name the staged job holding their key; a new statement sees this batch's own rows.
    let mut results = Vec::with_capacity(rows.len());
    for (staged, kind, key) in rows {
        let held = match (staged, key) {
            (None, Some(key)) => {
                sqlx::query_scalar("SELECT id FROM job_outbox WHERE kind = $1 AND unique_key = $2")
                    .bind(kind)
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await?
            }
            _ => None,
        };
        results.push(Enqueued {
            id: staged.or(held).map(JobId),
            inserted: staged.is_some(),
        });
    }
    Ok(results)
}

/// What one relay pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    /// Jobs Redis added.
    pub sent: usize,
    /// Jobs Redis already had (sent by a pass that died before its delete committed).
    pub resent: usize,
    /// Jobs folded into the job already holding their idempotency key in Redis.
    pub folded: usize,
}

impl Relayed {
    /// Rows the pass took off the outbox.
    pub fn total(&self) -> usize {
        self.sent + self.resent + self.folded
    }
}

/// Hands up to `limit` staged jobs to Redis, oldest first, and deletes them from the outbox once Redis has
/// them. Safe on many processes at once (each pass locks the rows it sends).
pub async fn relay(pool: &PgPool, redis: &RedisJobs, limit: i64) -> Result<Relayed> {
    let mut tx = pool.begin().await?;
    let rows: Vec<Outgoing> = sqlx::query_as(
        "SELECT id, kind, queue, args, priority, max_attempts, run_at, enqueued_at, unique_key,
                unique_while_active, unique_while_pending, tenant_id, provider, fair
         FROM job_outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(Relayed::default());
    }
    let pushed = redis.enqueue(&rows).await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    sqlx::query("DELETE FROM job_outbox WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let mut report = Relayed::default();
    for p in pushed {
        match p {
            Pushed::New => report.sent += 1,
            Pushed::Exists => report.resent += 1,
            Pushed::Duplicate(_) => report.folded += 1,
        }
    }
    Ok(report)
}
