//! Operator actions on jobs, each one short transaction: inspect, retry, cancel, reschedule, and the
//! dead-letter queue's replay and purge. The admin API and the CLI both call these.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::domain::{JobId, JobState};
use crate::error::{Error, Result};
use crate::store::jobs::{self as store, JobFilter, JobRecord, Replayed};

/// Most jobs one bulk action touches; callers repeat it for more.
pub const MAX_BULK: i64 = 10_000;

/// A page of jobs, newest first, and the cursor for the next page.
pub async fn list(
    pool: &PgPool,
    filter: &JobFilter,
    before: Option<JobId>,
    limit: i64,
) -> Result<(Vec<JobRecord>, Option<JobId>)> {
    let mut jobs = store::list(pool, filter, before, limit + 1).await?;
    let next = if jobs.len() as i64 > limit {
        jobs.truncate(limit as usize);
        jobs.last().map(|j| j.id)
    } else {
        None
    };
    Ok((jobs, next))
}

/// One job.
pub async fn get(pool: &PgPool, id: JobId) -> Result<JobRecord> {
    store::get(pool, id).await?.ok_or_else(|| Error::NotFound {
        what: "job",
        id: id.to_string(),
    })
}

/// The job once it has finished (completed, dead or cancelled), or as it is when `timeout` runs out.
pub async fn wait(pool: &PgPool, id: JobId, timeout: std::time::Duration) -> Result<JobRecord> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let job = get(pool, id).await?;
        let finished = matches!(
            job.state,
            JobState::Completed | JobState::Dead | JobState::Cancelled
        );
        if finished || tokio::time::Instant::now() >= deadline {
            return Ok(job);
        }
        tokio::time::sleep_until(
            deadline.min(tokio::time::Instant::now() + std::time::Duration::from_millis(100)),
        )
        .await;
    }
}

/// Runs a pending or scheduled job now, or replays a dead or cancelled one.
pub async fn retry(pool: &PgPool, id: JobId) -> Result<JobRecord> {
    let mut tx = pool.begin().await?;
    let done = store::retry_now(&mut tx, id).await;
    settle(tx, done).await?;
    get(pool, id).await
}

/// Cancels a pending, scheduled or running job.
pub async fn cancel(pool: &PgPool, id: JobId) -> Result<JobRecord> {
    let mut tx = pool.begin().await?;
    let done = store::cancel(&mut tx, id).await;
    settle(tx, done).await?;
    get(pool, id).await
}

/// Moves a pending or scheduled job to `run_at`.
pub async fn reschedule(pool: &PgPool, id: JobId, run_at: DateTime<Utc>) -> Result<JobRecord> {
    let mut tx = pool.begin().await?;
    let done = store::reschedule(&mut tx, id, run_at).await;
    settle(tx, done).await?;
    get(pool, id).await
}

/// Commits `tx` when `done` succeeded, and otherwise rolls it back before the error is returned. A dropped
/// transaction is rolled back later, when the pool gets to it; until then its row locks stay, and a bulk
/// replay made right after a refused retry skipped the very job it was about.
async fn settle<T>(tx: sqlx::Transaction<'_, sqlx::Postgres>, done: Result<T>) -> Result<T> {
    match done {
        Ok(value) => {
            tx.commit().await?;
            Ok(value)
        }
        Err(err) => {
            let _ = tx.rollback().await;
            Err(err)
        }
    }
}

fn check_bulk(filter: &JobFilter, all: bool, limit: i64) -> Result<()> {
    check_bulk_of("dead", filter, all, limit)
}

fn check_bulk_of(which: &str, filter: &JobFilter, all: bool, limit: i64) -> Result<()> {
    if filter.is_empty() && !all {
        return Err(Error::Invalid(format!(
            "the filter is empty, which would select every {which} job: give at least one of queue, kind, \
             tenant_id, since, until or ids, or set \"all\": true"
        )));
    }
    if !(1..=MAX_BULK).contains(&limit) {
        return Err(Error::Invalid(format!(
            "limit must be from 1 to {MAX_BULK}"
        )));
    }
    Ok(())
}

/// Replays dead jobs matching `filter` (at most `limit`), each with a fresh set of attempts; jobs whose
/// idempotency key another job holds by now are reported, not replayed.
pub async fn replay_dead(
    pool: &PgPool,
    filter: &JobFilter,
    all: bool,
    limit: i64,
) -> Result<Replayed> {
    check_bulk(filter, all, limit)?;
    let mut tx = pool.begin().await?;
    let done = store::replay(&mut tx, filter, &[JobState::Dead], limit).await;
    let replayed = settle(tx, done).await?;
    tracing::info!(
        replayed = replayed.count,
        held = replayed.held.len(),
        ?filter,
        "replayed dead jobs"
    );
    Ok(replayed)
}

/// Cancels (or with `dry_run` counts) up to `limit` pending or scheduled jobs matching `filter`: a backlog
/// queued by mistake, or for a tenant being removed. An empty filter needs `all`.
pub async fn cancel_waiting(
    pool: &PgPool,
    filter: &JobFilter,
    all: bool,
    limit: i64,
    dry_run: bool,
) -> Result<u64> {
    check_bulk_of("waiting", filter, all, limit)?;
    if let Some(state) = filter.state
        && !matches!(state, JobState::Pending | JobState::Scheduled)
    {
        return Err(Error::Invalid(format!(
            "only waiting jobs are cancelled in bulk: state may be pending or scheduled, not {state}"
        )));
    }
    let count = store::cancel_waiting(pool, filter, limit, dry_run).await?;
    if !dry_run {
        tracing::info!(cancelled = count, ?filter, "cancelled waiting jobs");
    }
    Ok(count)
}

/// Deletes dead jobs matching `filter` (at most `limit`).
pub async fn purge_dead(pool: &PgPool, filter: &JobFilter, all: bool, limit: i64) -> Result<u64> {
    check_bulk(filter, all, limit)?;
    let purged = store::purge_dead(pool, filter, limit).await?;
    tracing::info!(purged, ?filter, "purged dead jobs");
    Ok(purged)
}
