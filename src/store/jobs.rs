//! SQL for the job tables: enqueue, claim, finish, heartbeat, rescue, prune, schedules, and the admin queries.
//!
//! Functions take a connection or transaction so that callers own atomicity: a job is inserted in the same
//! transaction as the change it follows from. Nothing here knows about job kinds' policies; callers pass the
//! numbers (attempt budget, backoff result) they computed.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgConnection, PgExecutor, Row};

use crate::domain::{AttemptError, JobId, JobState};
use crate::error::{Error, Result};

/// The channel workers LISTEN on; the payload is the kind that has new due work.
pub const NOTIFY_CHANNEL: &str = "activekg_jobs";

/// A job to insert.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// The job kind's stable name.
    pub kind: &'static str,
    /// The queue it is reported under.
    pub queue: &'static str,
    /// Serialized arguments.
    pub args: Value,
    /// Higher runs first.
    pub priority: i16,
    /// Attempt budget.
    pub max_attempts: i32,
    /// Run no earlier than this; `None` means now.
    pub run_at: Option<DateTime<Utc>>,
    /// Idempotency key; a second job with the same kind and key is skipped.
    pub unique_key: Option<String>,
    /// Whether the key is released when the job finishes (true) or kept while the row exists (false).
    pub unique_while_active: bool,
    /// Whether the key is released as soon as a worker claims the job (implies `unique_while_active`).
    pub unique_while_pending: bool,
    /// The tenant the job works for, when it has one.
    pub tenant_id: Option<String>,
    /// The storage provider the job works on, when it has one.
    pub provider: Option<String>,
}

/// What happened to one job of an enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The new job, or the existing one its idempotency key matched (`None` only when that job was inserted
    /// by a transaction this one cannot see yet).
    pub id: Option<JobId>,
    /// False when the job was skipped as a duplicate.
    pub inserted: bool,
}

/// Inserts jobs in the caller's transaction. Duplicates by idempotency key (against existing rows or earlier
/// rows of the same batch) are skipped, never an error for the rest of the batch. Workers of kinds with due
/// jobs are notified when the transaction commits.
pub async fn insert(conn: &mut PgConnection, jobs: &[NewJob]) -> Result<Vec<Enqueued>> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let mut kinds = Vec::with_capacity(jobs.len());
    let mut queues = Vec::with_capacity(jobs.len());
    let mut args = Vec::with_capacity(jobs.len());
    let mut priorities = Vec::with_capacity(jobs.len());
    let mut max_attempts = Vec::with_capacity(jobs.len());
    let mut run_ats = Vec::with_capacity(jobs.len());
    let mut keys = Vec::with_capacity(jobs.len());
    let mut while_active = Vec::with_capacity(jobs.len());
    let mut while_pending = Vec::with_capacity(jobs.len());
    let mut tenants = Vec::with_capacity(jobs.len());
    let mut providers = Vec::with_capacity(jobs.len());
    for job in jobs {
        kinds.push(job.kind);
        queues.push(job.queue);
        args.push(&job.args);
        priorities.push(job.priority);
        max_attempts.push(job.max_attempts);
        run_ats.push(job.run_at);
        keys.push(job.unique_key.as_deref());
        while_active.push(job.unique_while_active || job.unique_while_pending);
        while_pending.push(job.unique_while_pending);
        tenants.push(job.tenant_id.as_deref());
        providers.push(job.provider.as_deref());
    }
    // Ids are drawn before the insert so each input row knows its id even when ON CONFLICT skips some.
    // The notify CTE is joined into the result because PostgreSQL skips unreferenced SELECT CTEs.
    let rows = sqlx::query(
        r#"
        WITH input AS (
            SELECT t.*, nextval(pg_get_serial_sequence('jobs', 'id')) AS id
            FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::int2[], $5::int4[], $6::timestamptz[],
                        $7::text[], $8::bool[], $9::text[], $10::text[], $12::bool[])
                 WITH ORDINALITY AS t(kind, queue, args, priority, max_attempts, run_at, unique_key,
                                      unique_while_active, tenant_id, provider, unique_while_pending, ord)
        ),
        inserted AS (
            INSERT INTO jobs (id, kind, queue, args, priority, max_attempts, run_at, unique_key,
                              unique_while_active, tenant_id, provider, unique_while_pending)
            SELECT id, kind, queue, args, priority, max_attempts, COALESCE(run_at, now()), unique_key,
                   unique_while_active, tenant_id, provider, unique_while_pending
            FROM input
            ORDER BY ord
            ON CONFLICT (kind, unique_key) WHERE unique_key IS NOT NULL DO NOTHING
            RETURNING id, kind, run_at
        ),
        notified AS (
            SELECT count(pg_notify($11, kind)) AS n
            FROM (SELECT DISTINCT kind FROM inserted WHERE run_at <= now()) due
        )
        SELECT input.ord, input.kind, input.unique_key, inserted.id AS inserted_id
        FROM input LEFT JOIN inserted ON inserted.id = input.id CROSS JOIN notified
        ORDER BY input.ord
        "#,
    )
    .bind(&kinds)
    .bind(&queues)
    .bind(&args)
    .bind(&priorities)
    .bind(&max_attempts)
    .bind(&run_ats)
    .bind(&keys)
    .bind(&while_active)
    .bind(&tenants)
    .bind(&providers)
    .bind(NOTIFY_CHANNEL)
    .bind(&while_pending)
    .fetch_all(&mut *conn)
    .await?;

    let mut results: Vec<Enqueued> = Vec::with_capacity(rows.len());
    let mut missing: Vec<(String, String)> = Vec::new();
    for row in &rows {
        let inserted: Option<i64> = row.try_get("inserted_id")?;
        results.push(Enqueued {
            id: inserted.map(JobId),
            inserted: inserted.is_some(),
        });
        if inserted.is_none()
            && let Some(key) = row.try_get::<Option<String>, _>("unique_key")?
        {
            missing.push((row.try_get("kind")?, key));
        }
    }
    if !missing.is_empty() {
        // A new statement takes a new snapshot, so it sees rows committed meanwhile and this batch's own.
        let (kinds, keys): (Vec<String>, Vec<String>) = missing.into_iter().unzip();
        let existing: HashMap<(String, String), i64> = sqlx::query_as::<_, (String, String, i64)>(
            "SELECT j.kind, j.unique_key, j.id FROM jobs j
             JOIN unnest($1::text[], $2::text[]) AS k(kind, unique_key)
               ON j.kind = k.kind AND j.unique_key = k.unique_key",
        )
        .bind(&kinds)
        .bind(&keys)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|(kind, key, id)| ((kind, key), id))
        .collect();
        for (row, result) in rows.iter().zip(results.iter_mut()) {
            if !result.inserted
                && let Some(key) = row.try_get::<Option<String>, _>("unique_key")?
            {
                result.id = existing
                    .get(&(row.try_get("kind")?, key))
                    .copied()
                    .map(JobId);
            }
        }
    }
    Ok(results)
}

/// A job claimed by a worker.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    /// The job's id.
    pub id: i64,
    /// Serialized arguments.
    pub args: Value,
    /// This attempt's number (1-based).
    pub attempt: i32,
    /// Attempt budget.
    pub max_attempts: i32,
    /// When the job was inserted.
    pub enqueued_at: DateTime<Utc>,
    /// When it became (or was due to become) runnable.
    pub run_at: DateTime<Utc>,
    /// When this attempt was claimed (database clock).
    pub attempted_at: DateTime<Utc>,
    /// What earlier attempts checkpointed, if anything.
    pub progress: Option<Value>,
}

/// What claiming the jobs in `next` does, shared by both fetch paths: the attempt counts from here, the worker
/// holds the row, and kinds unique only while pending give their key back.
macro_rules! claim_next {
    () => {
        r#"
        UPDATE jobs j
        SET state = 'running', attempt = j.attempt + 1, attempted_at = now(), locked_by = $2,
            unique_key = CASE WHEN j.unique_while_pending THEN NULL ELSE j.unique_key END
        FROM next
        WHERE j.id = next.id
        RETURNING j.id, j.args, j.attempt, j.max_attempts, j.enqueued_at, j.run_at, j.attempted_at, j.progress
        "#
    };
}

/// Claims up to `limit` due jobs of `kind` for `worker`, most urgent first, skipping rows other workers hold.
/// The attempt counter moves here, before any work, so a crash mid-attempt still uses up an attempt.
pub async fn claim<'e>(
    db: impl PgExecutor<'e>,
    kind: &str,
    worker: &str,
    limit: i64,
) -> Result<Vec<Claimed>> {
    Ok(sqlx::query_as::<_, Claimed>(concat!(
        r#"
        WITH next AS (
            SELECT id FROM jobs
            WHERE kind = $1 AND state = 'available' AND run_at <= now()
            ORDER BY priority DESC, run_at, id
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        )
        "#,
        claim_next!()
    ))
    .bind(kind)
    .bind(worker)
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// Like [`claim`], but shares the batch between tenants: it walks tenants with due jobs in key order starting
/// after `after_tenant` (at most `limit` of them), and takes up to an equal share from each, oldest first.
/// One tenant's backlog therefore cannot hold back another tenant's first job. Returns the claimed jobs and
/// where the next claim should start (empty once the walk reached the last tenant).
pub async fn claim_fair<'e>(
    db: impl PgExecutor<'e>,
    kind: &str,
    worker: &str,
    limit: i64,
    after_tenant: &str,
) -> Result<(Vec<Claimed>, String)> {
    let rows = sqlx::query(concat!(
        r#"
        WITH RECURSIVE tenants(t, depth) AS (
            (SELECT coalesce(tenant_id, ''), 1 FROM jobs
             WHERE kind = $1 AND state = 'available' AND run_at <= now() AND coalesce(tenant_id, '') > $4
             ORDER BY coalesce(tenant_id, '') LIMIT 1)
            UNION ALL
            SELECT (SELECT coalesce(j.tenant_id, '') FROM jobs j
                    WHERE j.kind = $1 AND j.state = 'available' AND j.run_at <= now()
                      AND coalesce(j.tenant_id, '') > tenants.t
                    ORDER BY coalesce(j.tenant_id, '') LIMIT 1),
                   tenants.depth + 1
            FROM tenants WHERE tenants.t IS NOT NULL AND tenants.depth < $3
        ),
        walked AS (SELECT t FROM tenants WHERE t IS NOT NULL),
        share AS (SELECT greatest(1, ceil($3::float8 / greatest(count(*), 1)))::int AS n,
                         CASE WHEN count(*) >= $3 THEN max(t) ELSE '' END AS resume
                  FROM walked),
        next AS (
            SELECT picked.id FROM walked CROSS JOIN share
            CROSS JOIN LATERAL (
                SELECT j.id FROM jobs j
                WHERE j.kind = $1 AND j.state = 'available' AND j.run_at <= now()
                  AND coalesce(j.tenant_id, '') = walked.t
                ORDER BY j.priority DESC, j.run_at, j.id
                LIMIT share.n
                FOR UPDATE OF j SKIP LOCKED
            ) picked
            LIMIT $3
        ),
        claimed AS ("#,
        claim_next!(),
        r#")
        SELECT claimed.*, (SELECT resume FROM share) AS resume FROM claimed
        UNION ALL
        SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, (SELECT resume FROM share)
        WHERE NOT EXISTS (SELECT 1 FROM claimed)
        "#
    ))
    .bind(kind)
    .bind(worker)
    .bind(limit)
    .bind(after_tenant)
    .fetch_all(db)
    .await?;
    let mut resume = String::new();
    let mut claimed = Vec::with_capacity(rows.len());
    for row in rows {
        resume = row
            .try_get::<Option<String>, _>("resume")?
            .unwrap_or_default();
        if let Some(id) = row.try_get::<Option<i64>, _>("id")? {
            claimed.push(Claimed {
                id,
                args: row.try_get("args")?,
                attempt: row.try_get("attempt")?,
                max_attempts: row.try_get("max_attempts")?,
                enqueued_at: row.try_get("enqueued_at")?,
                run_at: row.try_get("run_at")?,
                attempted_at: row.try_get("attempted_at")?,
                progress: row.try_get("progress")?,
            });
        }
    }
    Ok((claimed, resume))
}

/// How an attempt ended, as the engine decided from the job's policy.
#[derive(Debug, Clone)]
pub enum Finish {
    /// Done.
    Completed,
    /// Failed; run again after `delay` (measured on the database's clock).
    Retry {
        /// The backoff, or the delay the failure asked for.
        delay: std::time::Duration,
        /// What went wrong.
        error: AttemptError,
    },
    /// Failed for good: dead-lettered.
    Dead {
        /// What went wrong.
        error: AttemptError,
    },
    /// Could not start yet: run again after `delay`, with the attempt given back.
    Snooze {
        /// How long to wait.
        delay: std::time::Duration,
    },
}

/// One attempt's result, applied by [`finish`].
#[derive(Debug, Clone)]
pub struct Completion {
    /// The job.
    pub id: JobId,
    /// The attempt that ended; a completion for an attempt that is no longer current is ignored.
    pub attempt: i32,
    /// How it ended.
    pub finish: Finish,
}

/// Applies attempt results of `worker` in one statement. Returns the ids that were applied; a completion for
/// a row that is no longer running that attempt under that worker (rescued and re-run elsewhere, or
/// released) is skipped, so only the claim's holder can finish it.
pub async fn finish<'e>(
    db: impl PgExecutor<'e>,
    worker: &str,
    completions: &[Completion],
) -> Result<Vec<JobId>> {
    let mut ids = Vec::with_capacity(completions.len());
    let mut attempts = Vec::with_capacity(completions.len());
    let mut states = Vec::with_capacity(completions.len());
    let mut delays: Vec<Option<f64>> = Vec::with_capacity(completions.len());
    let mut errors: Vec<Option<Value>> = Vec::with_capacity(completions.len());
    let mut give_back = Vec::with_capacity(completions.len());
    for c in completions {
        ids.push(c.id.0);
        attempts.push(c.attempt);
        let (state, delay, error) = match &c.finish {
            Finish::Completed => ("completed", None, None),
            Finish::Retry { delay, error } => ("available", Some(delay.as_secs_f64()), Some(error)),
            Finish::Dead { error } => ("dead", None, Some(error)),
            Finish::Snooze { delay } => ("available", Some(delay.as_secs_f64()), None),
        };
        give_back.push(matches!(c.finish, Finish::Snooze { .. }));
        states.push(state);
        delays.push(delay);
        errors.push(error.map(|e| serde_json::to_value(e).unwrap_or(Value::Null)));
    }
    // Not a cached prepared statement: after a few runs PostgreSQL would switch to a generic plan that
    // cannot see how many rows `unnest` yields and walks every running row of the worker per result
    // (measured at 300-800 ms for 1000 results, against ~7 ms planned for the actual arrays).
    let rows: Vec<(i64,)> = sqlx::query_as(
        r#"
        WITH c AS (
            SELECT * FROM unnest($1::int8[], $2::int4[], $3::text[], $4::float8[], $5::jsonb[], $7::bool[])
                AS c(id, attempt, state, delay, error, give_back)
        )
        UPDATE jobs j
        SET state = c.state,
            attempt = CASE WHEN c.give_back THEN j.attempt - 1 ELSE j.attempt END,
            run_at = CASE WHEN c.delay IS NULL THEN j.run_at ELSE now() + make_interval(secs => c.delay) END,
            finished_at = CASE WHEN c.state = 'available' THEN NULL ELSE now() END,
            locked_by = NULL,
            errors = CASE WHEN c.error IS NULL THEN j.errors ELSE j.errors || jsonb_build_array(c.error) END,
            unique_key = CASE WHEN c.state <> 'available' AND j.unique_while_active THEN NULL ELSE j.unique_key END
        FROM c
        WHERE j.id = c.id AND j.attempt = c.attempt AND j.state = 'running' AND j.locked_by = $6
        RETURNING j.id
        "#,
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&states)
    .bind(&delays)
    .bind(&errors)
    .bind(worker)
    .bind(&give_back)
    .persistent(false)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|(id,)| JobId(id)).collect())
}

/// Saves a running job's progress in the caller's transaction, so it commits (or not) with the work it
/// describes. Returns false when `worker` no longer holds this attempt (it was rescued meanwhile): the caller
/// must stop, since another worker owns the job now.
pub async fn save_progress(
    conn: &mut PgConnection,
    id: JobId,
    attempt: i32,
    worker: &str,
    progress: &Value,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE jobs SET progress = $4 WHERE id = $1 AND attempt = $2 AND locked_by = $3 AND state = 'running'",
    )
    .bind(id.0)
    .bind(attempt)
    .bind(worker)
    .bind(progress)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Hands running jobs of `worker` back to the queue without using up the attempt: the jobs a worker had
/// claimed but not started, or interrupted at shutdown. `ids = None` releases all of them.
pub async fn release<'e>(
    db: impl PgExecutor<'e>,
    worker: &str,
    ids: Option<&[i64]>,
    note: Option<&AttemptError>,
) -> Result<Vec<(JobId, String)>> {
    let note = note.map(|n| serde_json::to_value(n).unwrap_or(Value::Null));
    let rows: Vec<(i64, String)> = sqlx::query_as(
        r#"
        UPDATE jobs
        SET state = 'available', run_at = now(), locked_by = NULL, attempt = GREATEST(attempt - 1, 0),
            errors = CASE WHEN $3::jsonb IS NULL THEN errors ELSE errors || jsonb_build_array($3::jsonb) END
        WHERE state = 'running' AND locked_by = $1 AND ($2::int8[] IS NULL OR id = ANY($2))
        RETURNING id, kind
        "#,
    )
    .bind(worker)
    .bind(ids)
    .bind(note)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, kind)| (JobId(id), kind))
        .collect())
}

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

/// A job taken back from a dead worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rescued {
    /// The job.
    pub id: JobId,
    /// Its kind.
    pub kind: String,
    /// True when it had no attempts left and was dead-lettered instead of requeued.
    pub dead: bool,
}

/// Takes back up to `limit` running jobs whose worker has not heartbeated for `silent_for`, counting the lost
/// attempt: requeued to run now, or dead-lettered when that was the last attempt. Safe to run on many
/// processes at once (rows are claimed with SKIP LOCKED). Also forgets workers silent for a day.
pub async fn rescue_orphans(
    conn: &mut PgConnection,
    silent_for: std::time::Duration,
    limit: i64,
) -> Result<Vec<Rescued>> {
    let silent_for = silent_for.as_secs_f64();
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        r#"
        WITH orphans AS (
            SELECT j.id
            FROM jobs j
            LEFT JOIN job_workers w ON w.id = j.locked_by
            WHERE j.state = 'running'
              AND (w.id IS NULL OR w.last_seen < now() - make_interval(secs => $1))
              AND j.attempted_at < now() - make_interval(secs => $1)
            ORDER BY j.id
            LIMIT $2
            FOR UPDATE OF j SKIP LOCKED
        )
        UPDATE jobs j
        SET state = CASE WHEN j.attempt >= j.max_attempts THEN 'dead' ELSE 'available' END,
            run_at = now(),
            finished_at = CASE WHEN j.attempt >= j.max_attempts THEN now() END,
            locked_by = NULL,
            errors = j.errors || jsonb_build_array(jsonb_build_object(
                'attempt', j.attempt, 'at', now(), 'class', 'crash', 'worker', j.locked_by,
                'error', format('worker %s stopped heartbeating during attempt %s (killed or crashed)',
                                coalesce(j.locked_by, '?'), j.attempt))),
            unique_key = CASE WHEN j.attempt >= j.max_attempts AND j.unique_while_active THEN NULL
                              ELSE j.unique_key END
        FROM orphans
        WHERE j.id = orphans.id
        RETURNING j.id, j.kind, j.state
        "#,
    )
    .bind(silent_for)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM job_workers WHERE last_seen < now() - interval '1 day'")
        .execute(&mut *conn)
        .await?;
    let rescued: Vec<Rescued> = rows
        .into_iter()
        .map(|(id, kind, state)| Rescued {
            id: JobId(id),
            kind,
            dead: state == "dead",
        })
        .collect();
    notify_kinds(
        &mut *conn,
        rescued.iter().filter(|r| !r.dead).map(|r| r.kind.as_str()),
    )
    .await?;
    Ok(rescued)
}

/// Wakes workers of the given kinds (delivered when the surrounding transaction commits).
pub async fn notify_kinds<'a>(
    conn: &mut PgConnection,
    kinds: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    let mut kinds: Vec<&str> = kinds.into_iter().collect();
    kinds.sort_unstable();
    kinds.dedup();
    if !kinds.is_empty() {
        sqlx::query("SELECT pg_notify($1, k) FROM unnest($2::text[]) AS k")
            .bind(NOTIFY_CHANNEL)
            .bind(&kinds)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Deletes up to `limit` finished jobs past retention: completed and cancelled older than `keep_completed`,
/// dead older than `keep_dead`. Returns how many went; callers loop until it returns less than `limit`.
pub async fn prune<'e>(
    db: impl PgExecutor<'e>,
    keep_completed: std::time::Duration,
    keep_dead: std::time::Duration,
    limit: i64,
) -> Result<u64> {
    let done = sqlx::query(
        r#"
        WITH doomed AS (
            SELECT id FROM jobs
            WHERE (state IN ('completed', 'cancelled') AND finished_at < now() - make_interval(secs => $1))
               OR (state = 'dead' AND finished_at < now() - make_interval(secs => $2))
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        )
        DELETE FROM jobs j USING doomed WHERE j.id = doomed.id
        "#,
    )
    .bind(keep_completed.as_secs_f64())
    .bind(keep_dead.as_secs_f64())
    .bind(limit)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

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
const VIEW_STATE: &str = "CASE WHEN j.state = 'available' THEN (CASE WHEN j.run_at > now() THEN 'scheduled' ELSE 'pending' END) ELSE j.state END";

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
    let sql = format!(
        "SELECT {RECORD_COLUMNS}, {VIEW_STATE} AS view_state FROM jobs j \
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
    let sql =
        format!("SELECT {RECORD_COLUMNS}, {VIEW_STATE} AS view_state FROM jobs j WHERE j.id = $1");
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
            replay(&mut *conn, &only_this, &[state], 1).await?;
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

/// Cancels a pending or scheduled job.
pub async fn cancel(conn: &mut PgConnection, id: JobId) -> Result<()> {
    match lock_for_change(conn, id).await? {
        JobState::Pending | JobState::Scheduled => {
            sqlx::query(
                "UPDATE jobs SET state = 'cancelled', finished_at = now(),
                     unique_key = CASE WHEN unique_while_active THEN NULL ELSE unique_key END
                 WHERE id = $1",
            )
            .bind(id.0)
            .execute(&mut *conn)
            .await?;
            Ok(())
        }
        state => Err(Error::Conflict(format!(
            "job {id} is {state}: only pending or scheduled jobs can be cancelled"
        ))),
    }
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

/// Replays up to `limit` jobs matching `filter` whose state is in `from` (dead and/or cancelled): each gets a
/// fresh set of attempts and runs now; its history is kept, with a `replayed` entry marking the boundary.
/// (A kind unique only while active released its key when the job died, so the replayed job runs without it.)
pub async fn replay(
    conn: &mut PgConnection,
    filter: &JobFilter,
    from: &[JobState],
    limit: i64,
) -> Result<u64> {
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let sql = format!(
        r#"
        WITH picked AS (
            SELECT j.id FROM jobs j
            WHERE {} AND {VIEW_STATE} = ANY($8)
            ORDER BY j.id
            LIMIT $9
            FOR UPDATE OF j SKIP LOCKED
        )
        UPDATE jobs j
        SET state = 'available', run_at = now(), finished_at = NULL, attempt = 0, locked_by = NULL,
            errors = j.errors || jsonb_build_array(jsonb_build_object(
                'attempt', j.attempt, 'at', now(), 'class', 'replayed',
                'error', format('replayed by an operator after %s attempt(s)', j.attempt)))
        FROM picked
        WHERE j.id = picked.id
        RETURNING j.kind
        "#,
        filter_sql(1)
    );
    let kinds: Vec<String> = bind_filter(sqlx::query(AssertSqlSafe(sql)), filter)
        .bind(&from)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| row.try_get::<String, _>("kind"))
        .collect::<Result<_, _>>()?;
    notify_kinds(conn, kinds.iter().map(String::as_str)).await?;
    Ok(kinds.len() as u64)
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

/// Counts by queue, kind and tenant, in one pass over the active and recently finished rows.
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
        ORDER BY queue, kind, tenant_id
        "#,
    )
    .fetch_all(db)
    .await?)
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

// ---------------------------------------------------------------------------------------------------------
// Schedules

/// Records a schedule, keeping its last fired tick when it exists. A new schedule starts at `initial_tick` so
/// that first deploying it does not fire a tick that passed before it existed.
pub async fn upsert_schedule<'e>(
    db: impl PgExecutor<'e>,
    name: &str,
    cron: &str,
    kind: &str,
    initial_tick: DateTime<Utc>,
) -> Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar(
        "INSERT INTO job_schedules (name, cron, kind, last_tick) VALUES ($1, $2, $3, $4)
         ON CONFLICT (name) DO UPDATE SET cron = EXCLUDED.cron, kind = EXCLUDED.kind, updated_at = now()
         RETURNING last_tick",
    )
    .bind(name)
    .bind(cron)
    .bind(kind)
    .bind(initial_tick)
    .fetch_one(db)
    .await?)
}

/// Claims `tick` of schedule `name` if no process has fired it (or a later one) yet. Run in the transaction
/// that enqueues the tick's job: the row lock makes concurrent claimers wait, then see the advanced tick.
pub async fn claim_tick(conn: &mut PgConnection, name: &str, tick: DateTime<Utc>) -> Result<bool> {
    let claimed = sqlx::query(
        "UPDATE job_schedules SET last_tick = $2, updated_at = now() WHERE name = $1 AND last_tick < $2",
    )
    .bind(name)
    .bind(tick)
    .execute(&mut *conn)
    .await?;
    Ok(claimed.rows_affected() == 1)
}

/// Notes which job a fired tick produced.
pub async fn set_schedule_job(
    conn: &mut PgConnection,
    name: &str,
    job: Option<JobId>,
) -> Result<()> {
    sqlx::query("UPDATE job_schedules SET last_job_id = $2 WHERE name = $1")
        .bind(name)
        .bind(job.map(|j| j.0))
        .execute(&mut *conn)
        .await?;
    Ok(())
}
