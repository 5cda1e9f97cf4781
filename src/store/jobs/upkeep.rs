//! The engine's upkeep in SQL: taking back jobs of workers that went silent, and pruning finished jobs.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use crate::domain::JobId;
use crate::error::Result;

use super::notify_kinds;

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

/// The rescue's witness rule as a CTE (`witness`: one row when it holds), for `rescuer` in `$3` and the
/// silence window in seconds in `$1`.
macro_rules! witness {
    () => {
        r#"
        WITH witness AS (
            SELECT 1 FROM job_workers
            WHERE id = $3
              AND alive_since <= now() - make_interval(secs => $1)
              AND last_seen >= now() - make_interval(secs => $1 / 2)
        )"#
    };
}

/// Which of `holders` (workers holding jobs in the Redis backend) have been silent for `silent_for`, by the
/// same rule as [`rescue_orphans`]: none unless `rescuer` itself kept in touch for the whole window. A holder
/// the registry does not know (forgotten after a day) counts as silent.
pub async fn silent_workers<'e>(
    db: impl PgExecutor<'e>,
    rescuer: &str,
    silent_for: std::time::Duration,
    holders: &[String],
) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(concat!(
        witness!(),
        r#"
        SELECT h.id FROM unnest($2::text[]) AS h(id)
        LEFT JOIN job_workers w ON w.id = h.id
        WHERE EXISTS (SELECT 1 FROM witness)
          AND (w.id IS NULL OR w.last_seen < now() - make_interval(secs => $1))
        "#
    ))
    .bind(silent_for.as_secs_f64())
    .bind(holders)
    .bind(rescuer)
    .fetch_all(db)
    .await?)
}

/// Takes back up to `limit` running jobs whose worker has not heartbeated for `silent_for`, counting the lost
/// attempt: requeued to run now, or dead-lettered when that was the last attempt.
///
/// Silence alone is no proof of death: during a database outage every process is silent. So a job is taken
/// back only when `rescuer` itself has heartbeated without a gap for the whole window (its `alive_since` is
/// at least `silent_for` old and its last beat recent): the database was reachable, and the silent worker
/// could have reached it too. After an outage every process's unbroken-heartbeat clock restarts, so live
/// workers heartbeat again before anyone may rescue their jobs. (A worker cut off alone fences itself well
/// before `silent_for`; see the engine's lease.) Safe on many processes at once (SKIP LOCKED). Also forgets
/// workers silent for a day.
pub async fn rescue_orphans(
    conn: &mut PgConnection,
    rescuer: &str,
    silent_for: std::time::Duration,
    limit: i64,
) -> Result<Vec<Rescued>> {
    let silent_for = silent_for.as_secs_f64();
    let rows: Vec<(i64, String, String)> = sqlx::query_as(concat!(
        witness!(),
        r#",
        orphans AS (
            SELECT j.id
            FROM jobs j
            LEFT JOIN job_workers w ON w.id = j.locked_by
            WHERE EXISTS (SELECT 1 FROM witness)
              AND j.state = 'running'
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
                'error', format('worker %s stopped heartbeating during attempt %s (killed, crashed or cut off) while %s kept in touch',
                                coalesce(j.locked_by, '?'), j.attempt, $3::text))),
            unique_key = CASE WHEN j.attempt >= j.max_attempts THEN NULL ELSE j.unique_key END
        FROM orphans
        WHERE j.id = orphans.id
        RETURNING j.id, j.kind, j.state
        "#
    ))
    .bind(silent_for)
    .bind(limit)
    .bind(rescuer)
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

/// Records the minute before this one for every queue with jobs (its completions, failed attempts and
/// dead letters, and the depth now), unless a process did already. Returns the rows written.
pub async fn sample_history<'e>(db: impl PgExecutor<'e>) -> Result<u64> {
    let done = sqlx::query(
        r#"
        WITH m AS (SELECT date_trunc('minute', now()) - interval '1 minute' AS start),
        failures AS (
            SELECT j.queue, j.state, j.run_at, j.finished_at,
                   CASE WHEN j.errors->-1->>'at' ~ '^\d{4}-\d{2}-\d{2}T'
                             AND j.errors->-1->>'class' IS DISTINCT FROM 'replayed'
                        THEN (j.errors->-1->>'at')::timestamptz END AS failed_at
            FROM jobs j, m
            WHERE j.state IN ('available', 'running') OR j.finished_at >= m.start
        )
        INSERT INTO job_history (minute, queue, pending, scheduled, running, completed, failed, dead)
        SELECT m.start, f.queue,
               count(*) FILTER (WHERE f.state = 'available' AND f.run_at <= now()),
               count(*) FILTER (WHERE f.state = 'available' AND f.run_at > now()),
               count(*) FILTER (WHERE f.state = 'running'),
               count(*) FILTER (WHERE f.state = 'completed' AND f.finished_at >= m.start
                                  AND f.finished_at < m.start + interval '1 minute'),
               count(*) FILTER (WHERE f.failed_at >= m.start AND f.failed_at < m.start + interval '1 minute'),
               count(*) FILTER (WHERE f.state = 'dead' AND f.finished_at >= m.start
                                  AND f.finished_at < m.start + interval '1 minute')
        FROM failures f, m
        GROUP BY m.start, f.queue
        ON CONFLICT (minute, queue) DO NOTHING
        "#,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Records minutes sampled elsewhere (the jobs in Redis); as with [`sample_history`], the first sample of
/// a minute and queue stays. Returns how many rows were new.
pub async fn record_history<'e>(db: impl PgExecutor<'e>, rows: &[HistoryRow]) -> Result<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(
        "INSERT INTO job_history (minute, queue, pending, scheduled, running, completed, failed, dead)
         SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[],
                              $7::int8[], $8::int8[])
         ON CONFLICT (minute, queue) DO NOTHING",
    )
    .bind(rows.iter().map(|r| r.minute).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.queue.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.pending).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.scheduled).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.running).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.completed).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.failed).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.dead).collect::<Vec<_>>())
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// The minute [`sample_history`] samples: the last whole one, by the database's clock.
pub async fn last_whole_minute<'e>(db: impl PgExecutor<'e>) -> Result<DateTime<Utc>> {
    Ok(
        sqlx::query_scalar("SELECT date_trunc('minute', now()) - interval '1 minute'")
            .fetch_one(db)
            .await?,
    )
}

/// Applies moves of jobs kept outside the `jobs` table (kind, arguments as JSON text, state, attempt, last
/// error) to what PostgreSQL keeps in step with them, by the trigger's rule (`activekg_job_moved`), in the
/// order given (a function scan of the arrays yields their rows in order).
pub async fn mirror_moves<'e>(
    db: impl PgExecutor<'e>,
    moves: &[(String, String, String, i32, String)],
) -> Result<()> {
    if moves.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "SELECT activekg_job_moved(m.kind, m.args::jsonb, m.state, m.attempt, nullif(m.error, ''), true)
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int4[], $5::text[])
              AS m(kind, args, state, attempt, error)",
    )
    .bind(moves.iter().map(|m| m.0.as_str()).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.1.as_str()).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.2.as_str()).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.3).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.4.as_str()).collect::<Vec<_>>())
    .execute(db)
    .await?;
    Ok(())
}

/// Deletes history older than `keep`. Returns how many rows went.
pub async fn prune_history<'e>(db: impl PgExecutor<'e>, keep: std::time::Duration) -> Result<u64> {
    let done =
        sqlx::query("DELETE FROM job_history WHERE minute < now() - make_interval(secs => $1)")
            .bind(keep.as_secs_f64())
            .execute(db)
            .await?;
    Ok(done.rows_affected())
}

/// One queue's minute, as sampled.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HistoryRow {
    /// The minute.
    pub minute: DateTime<Utc>,
    /// Queue.
    pub queue: String,
    /// Due and waiting, when sampled.
    pub pending: i64,
    /// Waiting for a later time, when sampled.
    pub scheduled: i64,
    /// Running, when sampled.
    pub running: i64,
    /// Completed during the minute.
    pub completed: i64,
    /// Jobs whose attempt failed during the minute.
    pub failed: i64,
    /// Dead-lettered during the minute.
    pub dead: i64,
}

/// The sampled minutes of the last `minutes`, oldest first.
pub async fn history<'e>(db: impl PgExecutor<'e>, minutes: i64) -> Result<Vec<HistoryRow>> {
    Ok(sqlx::query_as::<_, HistoryRow>(
        "SELECT minute, queue, pending, scheduled, running, completed, failed, dead FROM job_history
          WHERE minute >= date_trunc('minute', now()) - make_interval(mins => $1::int)
          ORDER BY minute, queue",
    )
    .bind(minutes)
    .fetch_all(db)
    .await?)
}
