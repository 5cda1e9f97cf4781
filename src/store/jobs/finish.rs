//! Ending attempts: results written in batches, checkpoints, and hand-backs, each fenced by the claim.

use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};

use crate::domain::{AttemptError, JobId};
use crate::error::Result;

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
    /// Could not start yet: run again after `delay`, with the attempt given back (counted in `handbacks`).
    Snooze {
        /// How long to wait.
        delay: std::time::Duration,
    },
    /// Claimed but never started (the worker fenced itself first): back to the queue as if never claimed.
    Release,
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

/// Applies attempt results of `worker`: plain completions in one statement, the other endings in another
/// (each only when there are any). Returns the ids that were applied; a completion for a row that is no
/// longer running that attempt under that worker (rescued and re-run elsewhere, or released) is skipped, so
/// only the claim's holder can finish it. Each attempt has one result, so the two need not commit together.
///
/// Both statements find their rows by one primary-key probe per result, whatever the statistics say. Left to
/// choose, the planner read every running row of the worker for each batch (through `jobs_running_by_worker`,
/// visiting its entries for rows that finished since the last vacuum too: a drain of 300,000 jobs spent a
/// sixth of the machine there and slowed as it went), or scanned the table when the arrays were long and the
/// table not analyzed. So the arrays come in as subqueries, which the planner costs as a few rows (not the
/// thousand they may hold) and so probes the primary key for each, and `state` and `locked_by` are compared as
/// a row, which no index matches. The plan no longer depends on the arrays' length, so the statements are
/// prepared once and reused.
pub async fn finish(
    conn: &mut PgConnection,
    worker: &str,
    completions: &[Completion],
) -> Result<Vec<JobId>> {
    // Plain completions, the bulk of every batch, take a narrow path of two arrays; the other endings carry
    // delays, errors and hand-backs (unnesting six arrays cost more than the update itself per row).
    let mut done_ids = Vec::with_capacity(completions.len());
    let mut done_attempts = Vec::with_capacity(completions.len());
    let mut ids = Vec::new();
    let mut attempts = Vec::new();
    let mut states = Vec::new();
    let mut delays: Vec<Option<f64>> = Vec::new();
    let mut errors: Vec<Option<Value>> = Vec::new();
    // How the attempt counter moves: 0 keeps it (the attempt counted), 1 gives it back as a hand-back
    // (a snooze, counted in `handbacks`), 2 gives it back as if it was never claimed.
    let mut give_back: Vec<i16> = Vec::new();
    for c in completions {
        let (state, delay, error, back) = match &c.finish {
            Finish::Completed => {
                done_ids.push(c.id.0);
                done_attempts.push(c.attempt);
                continue;
            }
            Finish::Retry { delay, error } => {
                ("available", Some(delay.as_secs_f64()), Some(error), 0)
            }
            Finish::Dead { error } => ("dead", None, Some(error), 0),
            Finish::Snooze { delay } => ("available", Some(delay.as_secs_f64()), None, 1),
            Finish::Release => ("available", Some(0.0), None, 2),
        };
        ids.push(c.id.0);
        attempts.push(c.attempt);
        give_back.push(back);
        states.push(state);
        delays.push(delay);
        errors.push(error.map(|e| serde_json::to_value(e).unwrap_or(Value::Null)));
    }
    let mut applied = Vec::with_capacity(completions.len());
    if !done_ids.is_empty() {
        // Apart from the other endings: beside them, PostgreSQL still read every running row of the worker to
        // join them with none (measured: 12.7 ms against 5 ms for 500 results with 2,000 rows running).
        let rows: Vec<(i64,)> = sqlx::query_as(
            r#"
            UPDATE jobs j
            SET state = 'completed', finished_at = now(), locked_by = NULL,
                unique_key = CASE WHEN j.unique_while_active THEN NULL ELSE j.unique_key END
            FROM unnest((SELECT $1::int8[]), (SELECT $2::int4[])) AS c(id, attempt)
            WHERE j.id = c.id AND j.attempt = c.attempt
              AND (j.state, j.locked_by) IS NOT DISTINCT FROM ('running', $3)
            RETURNING j.id
            "#,
        )
        .bind(&done_ids)
        .bind(&done_attempts)
        .bind(worker)
        .fetch_all(&mut *conn)
        .await?;
        applied.extend(rows.into_iter().map(|(id,)| JobId(id)));
    }
    if ids.is_empty() {
        return Ok(applied);
    }
    // Dead and cancelled jobs give their idempotency key back whatever the kind's uniqueness: the change
    // they stood for may be queued again once its cause is fixed.
    let rows: Vec<(i64,)> = sqlx::query_as(
        r#"
        WITH c AS (
            SELECT * FROM unnest((SELECT $1::int8[]), (SELECT $2::int4[]), (SELECT $3::text[]),
                                 (SELECT $4::float8[]), (SELECT $5::jsonb[]), (SELECT $7::int2[]))
                AS c(id, attempt, state, delay, error, give_back)
        ),
        done AS (
        UPDATE jobs j
        SET state = c.state,
            attempt = CASE WHEN c.give_back > 0 THEN j.attempt - 1 ELSE j.attempt END,
            handbacks = CASE WHEN c.give_back = 1 THEN j.handbacks + 1 ELSE j.handbacks END,
            run_at = CASE WHEN c.delay IS NULL THEN j.run_at ELSE now() + make_interval(secs => c.delay) END,
            finished_at = CASE WHEN c.state = 'available' THEN NULL ELSE now() END,
            locked_by = NULL,
            errors = CASE WHEN c.error IS NULL THEN j.errors ELSE j.errors || jsonb_build_array(c.error) END,
            unique_key = CASE WHEN c.state = 'dead' OR (c.state <> 'available' AND j.unique_while_active)
                              THEN NULL ELSE j.unique_key END
        FROM c
        WHERE j.id = c.id AND j.attempt = c.attempt
          AND (j.state, j.locked_by) IS NOT DISTINCT FROM ('running', $6)
        RETURNING j.id, j.kind, j.state, j.run_at
        ),
        -- Jobs due again at once (handed back, retried without delay) wake a worker now, not at its next poll.
        woken AS (
            SELECT count(pg_notify($8, kind)) AS n
            FROM (SELECT DISTINCT kind FROM done WHERE state = 'available' AND run_at <= now()) due
        )
        SELECT done.id FROM done CROSS JOIN woken
        "#,
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&states)
    .bind(&delays)
    .bind(&errors)
    .bind(worker)
    .bind(&give_back)
    .bind(super::NOTIFY_CHANNEL)
    .fetch_all(&mut *conn)
    .await?;
    applied.extend(rows.into_iter().map(|(id,)| JobId(id)));
    Ok(applied)
}

/// Proves, in the caller's transaction, that `worker` still runs attempt `attempt` of job `id`, and holds
/// that fact until the transaction ends: the row is share-locked, so a rescue (which skips locked rows) or a
/// cancel (which waits) cannot take the job from under effects about to commit. False when the claim is
/// already lost; the caller must roll back.
pub async fn hold_claim(
    conn: &mut PgConnection,
    id: JobId,
    attempt: i32,
    worker: &str,
) -> Result<bool> {
    let held: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE id = $1 AND attempt = $2 AND locked_by = $3 AND state = 'running' FOR SHARE",
    )
    .bind(id.0)
    .bind(attempt)
    .bind(worker)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(held.is_some())
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

/// Hands running jobs of `worker` back to the queue: the jobs a worker had claimed but not started, or
/// interrupted at shutdown (`ids = None` releases all of them). With a `note` (an interruption) the attempt
/// is given back only while the job has had fewer hand-backs than it has attempts; after that interruptions
/// count, and one on the last attempt dead-letters the job, so a job that never finishes within a shutdown's
/// grace cannot be handed back forever. Without a note (never started) it always is given back.
pub async fn release<'e>(
    db: impl PgExecutor<'e>,
    worker: &str,
    ids: Option<&[i64]>,
    note: Option<&AttemptError>,
) -> Result<Vec<(JobId, String)>> {
    let note = note.map(|n| serde_json::to_value(n).unwrap_or(Value::Null));
    let rows: Vec<(i64, String)> = sqlx::query_as(
        r#"
        WITH r AS (
            SELECT id, ($3::jsonb IS NOT NULL AND handbacks >= max_attempts) AS counted,
                   ($3::jsonb IS NOT NULL AND handbacks >= max_attempts AND attempt >= max_attempts) AS spent
            FROM jobs
            WHERE state = 'running' AND locked_by = $1 AND ($2::int8[] IS NULL OR id = ANY($2))
            FOR UPDATE
        )
        UPDATE jobs j
        SET state = CASE WHEN r.spent THEN 'dead' ELSE 'available' END,
            finished_at = CASE WHEN r.spent THEN now() END,
            run_at = now(), locked_by = NULL,
            attempt = CASE WHEN r.counted THEN j.attempt ELSE GREATEST(j.attempt - 1, 0) END,
            handbacks = CASE WHEN $3::jsonb IS NULL THEN j.handbacks ELSE j.handbacks + 1 END,
            errors = CASE WHEN $3::jsonb IS NULL THEN j.errors ELSE j.errors || jsonb_build_array($3::jsonb) END,
            unique_key = CASE WHEN r.spent THEN NULL ELSE j.unique_key END
        FROM r
        WHERE j.id = r.id
        RETURNING j.id, j.kind
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
