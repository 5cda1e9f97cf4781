//! Operator actions on jobs, each one short transaction: inspect, retry, cancel, reschedule, and the
//! dead-letter queue's replay and purge. The admin API and the CLI both call these, over every store the
//! jobs live in: a job id is in one of them (ids come from one sequence), so one-job actions go where the
//! job is and listings merge newest first.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::domain::{JobId, JobState};
use crate::error::{Error, Result};
use crate::store::jobs::{self as store, JobFilter, JobRecord, Replayed};
use crate::store::redis_jobs::{Acted, Action, Bulk, RedisJobs};

/// Most jobs one bulk action touches; callers repeat it for more.
pub const MAX_BULK: i64 = 10_000;

/// Most jobs in Redis one listing page looks at; a sparse filter answers a shorter page and a cursor.
const LIST_WALK: i64 = 20_000;

/// Where the jobs live: PostgreSQL, and Redis under `ACTIVEKG_JOBS_BACKEND=redis`.
#[derive(Debug, Clone, Copy)]
pub struct Stores<'a> {
    /// The database.
    pub pool: &'a PgPool,
    /// Redis, when the connector and embedding queues live there.
    pub redis: Option<&'a RedisJobs>,
}

impl<'a> From<&'a PgPool> for Stores<'a> {
    fn from(pool: &'a PgPool) -> Self {
        Self { pool, redis: None }
    }
}

fn not_found(id: JobId) -> Error {
    Error::NotFound {
        what: "job",
        id: id.to_string(),
    }
}

/// The action on a job in Redis, with PostgreSQL's answers: `what` names the action for a refusal.
async fn act_in_redis(stores: Stores<'_>, id: JobId, action: Action, what: &str) -> Result<()> {
    let Some(redis) = stores.redis else {
        return Err(not_found(id));
    };
    match redis.act(id, action).await? {
        Acted::Done => Ok(()),
        Acted::CancelledRunning { attempt } => {
            store::tell_cancelled(stores.pool, id, attempt).await
        }
        Acted::Missing => Err(not_found(id)),
        Acted::NotIn(state) => Err(Error::Conflict(format!("job {id} is {state}: only {what}"))),
        Acted::Held(holder) => Err(Error::Conflict(format!(
            "job {id} was not replayed: job {holder} holds its idempotency key (the same change was \
             queued again), so replaying it would do that work twice; look at job {holder} instead"
        ))),
    }
}

/// A page of jobs, newest first, and the cursor for the next page.
pub async fn list<'a>(
    stores: impl Into<Stores<'a>>,
    filter: &JobFilter,
    before: Option<JobId>,
    limit: i64,
) -> Result<(Vec<JobRecord>, Option<JobId>)> {
    let stores = stores.into();
    let mut jobs = store::list(stores.pool, filter, before, limit + 1).await?;
    if let Some(redis) = stores.redis {
        // Jobs on their way to Redis, then Redis's: a job the relay moves in between may show twice.
        jobs.extend(store::list_staged(stores.pool, filter, before, limit + 1).await?);
        let (more, walked_to) = redis.list(filter, before, limit + 1, LIST_WALK).await?;
        jobs.extend(more);
        jobs.sort_by_key(|j| std::cmp::Reverse(j.id.0));
        jobs.dedup_by_key(|j| j.id);
        if let Some(lowest) = walked_to {
            // Redis was looked at only down to `lowest`: the page holds nothing below it, and the next
            // page starts there.
            jobs.retain(|j| j.id.0 >= lowest.0);
            if jobs.len() as i64 <= limit {
                return Ok((jobs, Some(lowest)));
            }
        }
    }
    let next = if jobs.len() as i64 > limit {
        jobs.truncate(limit as usize);
        jobs.last().map(|j| j.id)
    } else {
        None
    };
    Ok((jobs, next))
}

/// One job.
pub async fn get<'a>(stores: impl Into<Stores<'a>>, id: JobId) -> Result<JobRecord> {
    let stores = stores.into();
    if let Some(job) = store::get(stores.pool, id).await? {
        return Ok(job);
    }
    let Some(redis) = stores.redis else {
        return Err(not_found(id));
    };
    if let Some(job) = store::get_staged(stores.pool, id).await? {
        return Ok(job);
    }
    redis.get(id).await?.ok_or_else(|| not_found(id))
}

/// The job once it has finished (completed, dead or cancelled), or as it is when `timeout` runs out.
pub async fn wait<'a>(
    stores: impl Into<Stores<'a>>,
    id: JobId,
    timeout: std::time::Duration,
) -> Result<JobRecord> {
    let stores = stores.into();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let job = get(stores, id).await?;
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
pub async fn retry<'a>(stores: impl Into<Stores<'a>>, id: JobId) -> Result<JobRecord> {
    let stores = stores.into();
    let mut tx = stores.pool.begin().await?;
    let done = store::retry_now(&mut tx, id).await;
    match settle(tx, done).await {
        Err(Error::NotFound { .. }) => {
            act_in_redis(
                stores,
                id,
                Action::Retry,
                "pending, scheduled, dead or cancelled jobs can be retried",
            )
            .await?
        }
        other => {
            other?;
        }
    }
    get(stores, id).await
}

/// Cancels a pending, scheduled or running job.
pub async fn cancel<'a>(stores: impl Into<Stores<'a>>, id: JobId) -> Result<JobRecord> {
    let stores = stores.into();
    let mut tx = stores.pool.begin().await?;
    let done = store::cancel(&mut tx, id).await;
    match settle(tx, done).await {
        Err(Error::NotFound { .. }) => {
            act_in_redis(
                stores,
                id,
                Action::Cancel,
                "pending, scheduled or running jobs can be cancelled",
            )
            .await?
        }
        other => other?,
    }
    get(stores, id).await
}

/// Moves a pending or scheduled job to `run_at`.
pub async fn reschedule<'a>(
    stores: impl Into<Stores<'a>>,
    id: JobId,
    run_at: DateTime<Utc>,
) -> Result<JobRecord> {
    let stores = stores.into();
    let mut tx = stores.pool.begin().await?;
    let done = store::reschedule(&mut tx, id, run_at).await;
    match settle(tx, done).await {
        Err(Error::NotFound { .. }) => {
            act_in_redis(
                stores,
                id,
                Action::Reschedule(run_at),
                "pending or scheduled jobs can be rescheduled",
            )
            .await?
        }
        other => other?,
    }
    get(stores, id).await
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
pub async fn replay_dead<'a>(
    stores: impl Into<Stores<'a>>,
    filter: &JobFilter,
    all: bool,
    limit: i64,
) -> Result<Replayed> {
    check_bulk(filter, all, limit)?;
    let stores = stores.into();
    let mut tx = stores.pool.begin().await?;
    let done = store::replay(&mut tx, filter, &[JobState::Dead], limit).await;
    let mut replayed = settle(tx, done).await?;
    if let Some(redis) = stores.redis {
        let left = limit - (replayed.count + replayed.held.len() as u64) as i64;
        if left > 0 {
            let more = redis.bulk(Bulk::Replay, filter, left).await?;
            replayed.count += more.count;
            replayed.held.extend(more.held);
        }
    }
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
pub async fn cancel_waiting<'a>(
    stores: impl Into<Stores<'a>>,
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
    let stores = stores.into();
    let mut count = store::cancel_waiting(stores.pool, filter, limit, dry_run).await?;
    if let Some(redis) = stores.redis
        && (count as i64) < limit
    {
        let action = if dry_run { Bulk::Count } else { Bulk::Cancel };
        count += redis
            .bulk(action, filter, limit - count as i64)
            .await?
            .count;
    }
    if !dry_run {
        tracing::info!(cancelled = count, ?filter, "cancelled waiting jobs");
    }
    Ok(count)
}

/// Deletes dead jobs matching `filter` (at most `limit`).
pub async fn purge_dead<'a>(
    stores: impl Into<Stores<'a>>,
    filter: &JobFilter,
    all: bool,
    limit: i64,
) -> Result<u64> {
    check_bulk(filter, all, limit)?;
    let stores = stores.into();
    let mut purged = store::purge_dead(stores.pool, filter, limit).await?;
    if let Some(redis) = stores.redis
        && (purged as i64) < limit
    {
        purged += redis
            .bulk(Bulk::Purge, filter, limit - purged as i64)
            .await?
            .count;
    }
    tracing::info!(purged, ?filter, "purged dead jobs");
    Ok(purged)
}
