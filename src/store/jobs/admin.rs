//! The operators' queries: filtered listings, one job, retry, cancel, reschedule, replay, purge, counts.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgConnection, PgExecutor, Row};

use crate::domain::{AttemptError, JobId, JobState};
use crate::error::{Error, Result};

use super::notify_kinds;

// ---------------------------------------------------------------------------------------------------------
// Admin queries

/// Which jobs an admin query is about. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only this tenant's jobs.
    pub tenant_id: Option<String>,
    /// Enqueued at or after.
    pub since: Option<DateTime<Utc>>,
    /// Enqueued before.
    pub until: Option<DateTime<Utc>>,
    /// Only these ids.
    pub ids: Option<Vec<i64>>,
}

impl JobFilter {
    /// True when no field narrows the selection.
    pub fn is_empty(&self) -> bool {
        self.queue.is_none()
            && self.kind.is_none()
            && self.state.is_none()
            && self.tenant_id.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && self.ids.is_none()
    }
}

/// The operator's view of the stored state; 'available' shows as pending or scheduled by its run time.
pub(super) const VIEW_STATE: &str = "CASE WHEN j.state = 'available' THEN (CASE WHEN j.run_at > now() THEN 'scheduled' ELSE 'pending' END) ELSE j.state END";

/// The filter as SQL over alias `j`, with its parameters starting at `$1`.
fn filter_sql(first_param: usize) -> String {
    let p = |i: usize| format!("${}", first_param + i);
    format!(
        "({q}::text IS NULL OR j.queue = {q}) AND ({k}::text IS NULL OR j.kind = {k}) \
         AND ({s}::text IS NULL OR {VIEW_STATE} = {s}) AND ({t}::text IS NULL OR j.tenant_id = {t}) \
         AND ({a}::timestamptz IS NULL OR j.enqueued_at >= {a}) AND ({b}::timestamptz IS NULL OR j.enqueued_at < {b}) \
         AND ({i}::int8[] IS NULL OR j.id = ANY({i}))",
        q = p(0),
        k = p(1),
        s = p(2),
        t = p(3),
        a = p(4),
        b = p(5),
        i = p(6),
    )
}

fn bind_filter<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    filter: &'q JobFilter,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(filter.queue.as_deref())
        .bind(filter.kind.as_deref())
        .bind(filter.state.map(JobState::as_str))
        .bind(filter.tenant_id.as_deref())
        .bind(filter.since)
        .bind(filter.until)
        .bind(filter.ids.as_deref())
}

/// Everything stored about a job.
#[derive(Debug, Clone)]
pub struct JobRecord {
    /// Id.
    pub id: JobId,
    /// Kind.
    pub kind: String,
    /// Queue.
    pub queue: String,
    /// State as operators see it.
    pub state: JobState,
    /// Arguments.
    pub args: Value,
    /// Priority (higher first).
    pub priority: i16,
    /// Attempts started.
    pub attempt: i32,
    /// Attempt budget.
    pub max_attempts: i32,
    /// Every failed or interrupted attempt.
    pub errors: Vec<AttemptError>,
    /// Inserted at.
    pub enqueued_at: DateTime<Utc>,
    /// Due at (next run time while pending or scheduled).
    pub run_at: DateTime<Utc>,
    /// Latest attempt started at.
    pub attempted_at: Option<DateTime<Utc>>,
    /// Finished (completed, dead or cancelled) at.
    pub finished_at: Option<DateTime<Utc>>,
    /// Worker running it.
    pub locked_by: Option<String>,
    /// Idempotency key while it holds one.
    pub unique_key: Option<String>,
    /// Tenant.
    pub tenant_id: Option<String>,
    /// Provider.
    pub provider: Option<String>,
    /// What the job has done so far (long jobs checkpoint it), or its final result.
    pub progress: Option<Value>,
}

const RECORD_COLUMNS: &str = "j.id, j.kind, j.queue, j.args, j.priority, j.attempt, j.max_attempts, j.errors, \
    j.enqueued_at, j.run_at, j.attempted_at, j.finished_at, j.locked_by, j.unique_key, j.tenant_id, j.provider, \
    j.progress";

fn record_from_row(row: &sqlx::postgres::PgRow) -> Result<JobRecord> {
    let state: String = row.try_get("view_state")?;
    let errors: Value = row.try_get("errors")?;
    Ok(JobRecord {
        id: JobId(row.try_get("id")?),
        kind: row.try_get("kind")?,
        queue: row.try_get("queue")?,
        state: state
            .parse()
            .map_err(|e: String| Error::Internal(anyhow::anyhow!(e)))?,
        args: row.try_get("args")?,
        priority: row.try_get("priority")?,
        attempt: row.try_get("attempt")?,
        max_attempts: row.try_get("max_attempts")?,
        errors: serde_json::from_value(errors).unwrap_or_default(),
        enqueued_at: row.try_get("enqueued_at")?,
        run_at: row.try_get("run_at")?,
        attempted_at: row.try_get("attempted_at")?,
        finished_at: row.try_get("finished_at")?,
        locked_by: row.try_get("locked_by")?,
        unique_key: row.try_get("unique_key")?,
        tenant_id: row.try_get("tenant_id")?,
        provider: row.try_get("provider")?,
        progress: row.try_get("progress")?,
    })
}

/// Jobs matching `filter`, newest first, strictly older than `before` (the cursor), at most `limit`.
pub async fn list<'e>(
    db: impl PgExecutor<'e>,
    filter: &JobFilter,
    before: Option<JobId>,
    limit: i64,
) -> Result<Vec<JobRecord>> {
    list_from(db, "jobs", filter, before, limit).await
}

/// [`list`] over `source`: `jobs`, or rows shaped like it.
pub(super) async fn list_from<'e>(
    db: impl PgExecutor<'e>,
    source: &str,
    filter: &JobFilter,
    before: Option<JobId>,
    limit: i64,
) -> Result<Vec<JobRecord>> {
    let sql = format!(
        "SELECT {RECORD_COLUMNS}, {VIEW_STATE} AS view_state FROM {source} j \
         WHERE {} AND ($8::int8 IS NULL OR j.id < $8) ORDER BY j.id DESC LIMIT $9",
        filter_sql(1)
    );
    let rows = bind_filter(sqlx::query(AssertSqlSafe(sql)), filter)
        .bind(before.map(|id| id.0))
        .bind(limit)
        .fetch_all(db)
        .await?;
    rows.iter().map(record_from_row).collect()
}

/// One job.
pub async fn get<'e>(db: impl PgExecutor<'e>, id: JobId) -> Result<Option<JobRecord>> {
    get_from(db, "jobs", id).await
}

/// [`get`] from `source`: `jobs`, or rows shaped like it.
pub(super) async fn get_from<'e>(
    db: impl PgExecutor<'e>,
    source: &str,
    id: JobId,
) -> Result<Option<JobRecord>> {
    let sql = format!(
        "SELECT {RECORD_COLUMNS}, {VIEW_STATE} AS view_state FROM {source} j WHERE j.id = $1"
    );
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(id.0)
        .fetch_optional(db)
        .await?;
    row.as_ref().map(record_from_row).transpose()
}

/// Locks one job for an admin change and returns its current view state.
async fn lock_for_change(conn: &mut PgConnection, id: JobId) -> Result<JobState> {
    let sql = format!("SELECT {VIEW_STATE} AS view_state FROM jobs j WHERE j.id = $1 FOR UPDATE");
    let state: Option<String> = sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(id.0)
        .fetch_optional(&mut *conn)
        .await?;
    let state = state.ok_or_else(|| Error::NotFound {
        what: "job",
        id: id.to_string(),
    })?;
    state
        .parse()
        .map_err(|e: String| Error::Internal(anyhow::anyhow!(e)))
}

/// Makes a pending or scheduled job due now, or replays a dead or cancelled one with a fresh set of attempts.
pub async fn retry_now(conn: &mut PgConnection, id: JobId) -> Result<JobState> {
    let state = lock_for_change(conn, id).await?;
    match state {
        JobState::Pending | JobState::Scheduled => {
            sqlx::query("UPDATE jobs SET run_at = now() WHERE id = $1")
                .bind(id.0)
                .execute(&mut *conn)
                .await?;
        }
        JobState::Dead | JobState::Cancelled => {
            let only_this = JobFilter {
                ids: Some(vec![id.0]),
                ..JobFilter::default()
            };
            let replayed = replay(&mut *conn, &only_this, &[state], 1).await?;
            if let Some((_, holder)) = replayed.held.first() {
                return Err(Error::Conflict(format!(
                    "job {id} was not replayed: job {holder} holds its idempotency key (the same change was \
                     queued again), so replaying it would do that work twice; look at job {holder} instead"
                )));
            }
        }
        JobState::Running | JobState::Completed => {
            return Err(Error::Conflict(format!(
                "job {id} is {state}: only pending, scheduled, dead or cancelled jobs can be retried"
            )));
        }
    }
    let kind: String = sqlx::query_scalar("SELECT kind FROM jobs WHERE id = $1")
        .bind(id.0)
        .fetch_one(&mut *conn)
        .await?;
    notify_kinds(conn, [kind.as_str()]).await?;
    Ok(JobState::Pending)
}

/// Cancels a pending, scheduled or running job; it gives its idempotency key back. A running attempt is told
/// to stop (NOTIFY to its worker) and can no longer commit effects or a result: its claim is gone. If the
/// attempt is committing its effects right now, the cancel waits for that commit and applies after it.
pub async fn cancel(conn: &mut PgConnection, id: JobId) -> Result<()> {
    match lock_for_change(conn, id).await? {
        JobState::Pending | JobState::Scheduled | JobState::Running => {
            let (attempt, was_running): (i32, bool) = sqlx::query_as(
                "UPDATE jobs j SET state = 'cancelled', finished_at = now(), unique_key = NULL, locked_by = NULL,
                     errors = CASE WHEN j.state = 'running' THEN j.errors || jsonb_build_array(jsonb_build_object(
                         'attempt', j.attempt, 'at', now(), 'class', 'cancelled', 'worker', j.locked_by,
                         'error', 'cancelled by an operator while running'))
                         ELSE j.errors END
                 FROM (SELECT id, state AS old_state FROM jobs WHERE id = $1) old
                 WHERE j.id = old.id
                 RETURNING j.attempt, old.old_state = 'running'",
            )
            .bind(id.0)
            .fetch_one(&mut *conn)
            .await?;
            if was_running {
                tell_cancelled(&mut *conn, id, attempt).await?;
            }
            Ok(())
        }
        state => Err(Error::Conflict(format!(
            "job {id} is {state}: only pending, scheduled or running jobs can be cancelled"
        ))),
    }
}

/// Tells the worker running attempt `attempt` of job `id` that it was cancelled (whichever store holds it).
pub async fn tell_cancelled<'e>(db: impl PgExecutor<'e>, id: JobId, attempt: i32) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(super::CANCEL_CHANNEL)
        .bind(format!("{}:{attempt}", id.0))
        .execute(db)
        .await?;
    Ok(())
}

/// Moves a pending or scheduled job's run time.
pub async fn reschedule(conn: &mut PgConnection, id: JobId, run_at: DateTime<Utc>) -> Result<()> {
    match lock_for_change(conn, id).await? {
        JobState::Pending | JobState::Scheduled => {
            let kind: String =
                sqlx::query_scalar("UPDATE jobs SET run_at = $2 WHERE id = $1 RETURNING kind")
                    .bind(id.0)
                    .bind(run_at)
                    .fetch_one(&mut *conn)
                    .await?;
            if run_at <= Utc::now() {
                notify_kinds(conn, [kind.as_str()]).await?;
            }
            Ok(())
        }
        state => Err(Error::Conflict(format!(
            "job {id} is {state}: only pending or scheduled jobs can be rescheduled"
        ))),
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Jobs replayed.
    pub count: u64,
    /// Jobs not replayed because another job holds their idempotency key now: (job, the holder).
    pub held: Vec<(JobId, JobId)>,
}

/// Replays up to `limit` jobs matching `filter` whose state is in `from` (dead and/or cancelled): each gets a
/// fresh set of attempts and runs now; its history is kept, with a `replayed` entry marking the boundary.
/// Each takes its idempotency key back, so it is unique again as when it was enqueued; a job whose key
/// another job holds by now (the same change was queued again meanwhile) is left as it is and reported with
/// that job, since replaying it would do the same work twice. Of several matching jobs with one key, the
/// newest is replayed.
pub async fn replay(
    conn: &mut PgConnection,
    filter: &JobFilter,
    from: &[JobState],
    limit: i64,
) -> Result<Replayed> {
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let sql = format!(
        r#"
        WITH picked AS (
            SELECT j.id, j.kind, j.idempotency_key,
                   (SELECT o.id FROM jobs o WHERE o.kind = j.kind AND o.unique_key = j.idempotency_key) AS holder
            FROM jobs j
            WHERE {} AND {VIEW_STATE} = ANY($8)
            ORDER BY j.id
            LIMIT $9
            FOR UPDATE OF j SKIP LOCKED
        ),
        ranked AS (
            SELECT picked.*,
                   first_value(id) OVER (PARTITION BY kind, idempotency_key ORDER BY id DESC) AS newest
            FROM picked
        ),
        replayed AS (
            UPDATE jobs j
            SET state = 'available', run_at = now(), finished_at = NULL, attempt = 0, handbacks = 0,
                locked_by = NULL, unique_key = j.idempotency_key,
                errors = j.errors || jsonb_build_array(jsonb_build_object(
                    'attempt', j.attempt, 'at', now(), 'class', 'replayed',
                    'error', format('replayed by an operator after %s attempt(s)', j.attempt)))
            FROM ranked
            WHERE j.id = ranked.id AND ranked.holder IS NULL
              AND (ranked.idempotency_key IS NULL OR ranked.id = ranked.newest)
            RETURNING j.id, j.kind
        )
        SELECT r.id, r.kind, NULL::int8 AS holder FROM replayed r
        UNION ALL
        SELECT ranked.id, ranked.kind, coalesce(ranked.holder, ranked.newest) FROM ranked
        WHERE ranked.holder IS NOT NULL OR (ranked.idempotency_key IS NOT NULL AND ranked.id <> ranked.newest)
        "#,
        filter_sql(1)
    );
    let rows = bind_filter(sqlx::query(AssertSqlSafe(sql)), filter)
        .bind(&from)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await
        .map_err(|err| match Error::from(err) {
            Error::Conflict(_) => Error::Conflict(
                "another replay took one of these jobs' idempotency keys at the same moment; try again"
                    .to_owned(),
            ),
            other => other,
        })?;
    let mut replayed = Replayed::default();
    let mut kinds = Vec::new();
    for row in rows {
        let (id, kind, holder): (i64, String, Option<i64>) = (
            row.try_get("id")?,
            row.try_get("kind")?,
            row.try_get("holder")?,
        );
        match holder {
            None => {
                replayed.count += 1;
                kinds.push(kind);
            }
            Some(holder) => replayed.held.push((JobId(id), JobId(holder))),
        }
    }
    notify_kinds(conn, kinds.iter().map(String::as_str)).await?;
    Ok(replayed)
}

/// Cancels up to `limit` waiting (pending or scheduled) jobs matching `filter`, or with `dry_run` counts
/// them; jobs running now are left to finish (cancel one by id to stop it). Cancelled jobs give up their
/// idempotency keys, so the same change can be queued again.
pub async fn cancel_waiting<'e>(
    db: impl PgExecutor<'e>,
    filter: &JobFilter,
    limit: i64,
    dry_run: bool,
) -> Result<u64> {
    let picked = format!(
        "SELECT j.id FROM jobs j WHERE {} AND j.state = 'available' ORDER BY j.id LIMIT $8",
        filter_sql(1)
    );
    if dry_run {
        let sql = format!("SELECT count(*) FROM ({picked}) picked");
        let count: i64 = bind_filter(sqlx::query(AssertSqlSafe(sql)), filter)
            .bind(limit)
            .fetch_one(db)
            .await?
            .try_get(0)?;
        return Ok(u64::try_from(count).unwrap_or_default());
    }
    let sql = format!(
        "WITH picked AS ({picked} FOR UPDATE OF j SKIP LOCKED) \
         UPDATE jobs SET state = 'cancelled', finished_at = now(), unique_key = NULL \
         FROM picked WHERE jobs.id = picked.id"
    );
    let done = bind_filter(sqlx::query(AssertSqlSafe(sql)), filter)
        .bind(limit)
        .execute(db)
        .await?;
    Ok(done.rows_affected())
}

/// Deletes up to `limit` dead jobs matching `filter`.
pub async fn purge_dead<'e>(
    db: impl PgExecutor<'e>,
    filter: &JobFilter,
    limit: i64,
) -> Result<u64> {
    let sql = format!(
        "WITH picked AS (SELECT j.id FROM jobs j WHERE {} AND j.state = 'dead' ORDER BY j.id LIMIT $8 \
         FOR UPDATE OF j SKIP LOCKED) DELETE FROM jobs USING picked WHERE jobs.id = picked.id",
        filter_sql(1)
    );
    let done = bind_filter(sqlx::query(AssertSqlSafe(sql)), filter)
        .bind(limit)
        .execute(db)
        .await?;
    Ok(done.rows_affected())
}

/// Counts for one (queue, kind, tenant) group.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QueueCounts {
    /// Queue.
    pub queue: String,
    /// Kind.
    pub kind: String,
    /// Tenant, when the jobs carry one.
    pub tenant_id: Option<String>,
    /// Provider, when the jobs carry one.
    pub provider: Option<String>,
    /// Due and waiting.
    pub pending: i64,
    /// Waiting for a later run time (including backoff).
    pub scheduled: i64,
    /// Being run.
    pub running: i64,
    /// Dead-lettered.
    pub dead: i64,
    /// Run time of the oldest pending job.
    pub oldest_pending: Option<DateTime<Utc>>,
    /// Completed in the last five minutes.
    pub completed_5m: i64,
    /// Dead-lettered in the last five minutes.
    pub dead_5m: i64,
    /// The database's clock, so ages are computed against one time source.
    pub now: DateTime<Utc>,
}

/// Counts by queue, kind and tenant, in one pass over the active and recently finished rows, and the
/// outbox's jobs bound for Redis as waiting (the caller adds what Redis holds, see `RedisJobs::queue_counts`).
pub async fn queue_counts<'e>(db: impl PgExecutor<'e>) -> Result<Vec<QueueCounts>> {
    Ok(sqlx::query_as::<_, QueueCounts>(
        r#"
        SELECT queue, kind, tenant_id, provider,
               count(*) FILTER (WHERE state = 'available' AND run_at <= now()) AS pending,
               count(*) FILTER (WHERE state = 'available' AND run_at > now()) AS scheduled,
               count(*) FILTER (WHERE state = 'running') AS running,
               count(*) FILTER (WHERE state = 'dead') AS dead,
               min(run_at) FILTER (WHERE state = 'available' AND run_at <= now()) AS oldest_pending,
               count(*) FILTER (WHERE state = 'completed' AND finished_at > now() - interval '5 minutes') AS completed_5m,
               count(*) FILTER (WHERE state = 'dead' AND finished_at > now() - interval '5 minutes') AS dead_5m,
               now() AS now
        FROM jobs
        WHERE state IN ('available', 'running', 'dead')
           OR (state = 'completed' AND finished_at > now() - interval '5 minutes')
        GROUP BY queue, kind, tenant_id, provider
        UNION ALL
        -- Jobs bound for Redis and not handed over yet (a backlog here while Redis is away) are waiting too.
        SELECT queue, kind, tenant_id, provider,
               count(*) FILTER (WHERE coalesce(run_at, enqueued_at) <= now()),
               count(*) FILTER (WHERE run_at > now()),
               0::bigint, 0::bigint,
               min(coalesce(run_at, enqueued_at)) FILTER (WHERE coalesce(run_at, enqueued_at) <= now()),
               0::bigint, 0::bigint, now()
        FROM job_outbox
        GROUP BY queue, kind, tenant_id, provider
        ORDER BY queue, kind, tenant_id
        "#,
    )
    .fetch_all(db)
    .await?)
}
