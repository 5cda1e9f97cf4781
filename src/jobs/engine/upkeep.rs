//! The engine's own upkeep, run by every process (API, worker, scheduler alike), so no deployment shape can
//! leave it undone: taking back jobs of dead workers, pruning finished jobs past retention, and the chores
//! other rooms register (they run on the same clock, knowing nothing of the engine).
//!
//! All of it is safe on many replicas at once (SKIP LOCKED, idempotent deletes).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::lease::Lease;
use crate::config::JobSettings;
use crate::metrics::metrics;
use crate::store::jobs::{self as store, Rescued};
use crate::store::redis_jobs::RedisJobs;

const BATCH: i64 = 1000;

/// How often finished jobs are pruned.
pub const PRUNE_EVERY: Duration = Duration::from_secs(600);

type ChoreFn = Arc<dyn Fn(PgPool) -> BoxFuture<'static, crate::error::Result<u64>> + Send + Sync>;

/// A periodic task another room hands the engine (e.g. pruning webhook delivery ids).
#[derive(Clone)]
pub struct Chore {
    name: &'static str,
    every: Duration,
    run: ChoreFn,
}

impl std::fmt::Debug for Chore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chore")
            .field("name", &self.name)
            .field("every", &self.every)
            .finish()
    }
}

impl Chore {
    /// Runs `run` every `every`; it returns how many rows it handled (logged when not zero).
    pub fn new<F, Fut>(name: &'static str, every: Duration, run: F) -> Self
    where
        F: Fn(PgPool) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = crate::error::Result<u64>> + Send + 'static,
    {
        Self {
            name,
            every,
            run: Arc::new(move |pool| Box::pin(run(pool))),
        }
    }
}

/// Takes back every orphan this process may rescue (see [`store::rescue_orphans`]), a batch at a time.
/// Returns (requeued, dead-lettered).
pub async fn rescue_orphans(
    pool: &PgPool,
    rescuer: &str,
    orphan_timeout: Duration,
) -> crate::error::Result<(u64, u64)> {
    let (mut requeued, mut dead) = (0, 0);
    loop {
        let mut conn = pool.acquire().await?;
        let rescued = store::rescue_orphans(&mut conn, rescuer, orphan_timeout, BATCH).await?;
        let (r, d) = count_rescued(&rescued);
        (requeued, dead) = (requeued + r, dead + d);
        if (rescued.len() as i64) < BATCH {
            return Ok((requeued, dead));
        }
    }
}

/// Like [`rescue_orphans`] for the jobs in Redis: PostgreSQL's worker registry says which of the workers
/// holding jobs there went silent (by the same witness rule), and Redis takes their jobs back.
pub async fn rescue_redis_orphans(
    pool: &PgPool,
    redis: &RedisJobs,
    rescuer: &str,
    orphan_timeout: Duration,
) -> crate::error::Result<(u64, u64)> {
    let holders = redis.holders().await?;
    if holders.is_empty() {
        return Ok((0, 0));
    }
    let (mut requeued, mut dead) = (0, 0);
    for worker in store::silent_workers(pool, rescuer, orphan_timeout, &holders).await? {
        loop {
            let rescued = redis
                .rescue(&worker, orphan_timeout, rescuer, BATCH)
                .await?;
            let (r, d) = count_rescued(&rescued);
            (requeued, dead) = (requeued + r, dead + d);
            if (rescued.len() as i64) < BATCH {
                break;
            }
        }
    }
    Ok((requeued, dead))
}

/// Counts and logs rescued jobs; returns (requeued, dead-lettered).
fn count_rescued(rescued: &[Rescued]) -> (u64, u64) {
    let (mut requeued, mut dead) = (0, 0);
    {
        for job in rescued {
            metrics().jobs_rescued.with_label_values(&[&job.kind]).inc();
            metrics()
                .jobs_failed
                .with_label_values(&[&job.kind, "crash"])
                .inc();
            if job.dead {
                metrics().jobs_dead.with_label_values(&[&job.kind]).inc();
                dead += 1;
                tracing::error!(kind = job.kind, id = %job.id, "job's worker died on its last attempt; dead-lettered");
            } else {
                requeued += 1;
                tracing::warn!(kind = job.kind, id = %job.id, "job's worker died; requeued");
            }
        }
    }
    (requeued, dead)
}

/// Deletes finished jobs past retention, a batch (and a short statement) at a time. Returns how many went.
pub async fn prune_jobs(
    pool: &PgPool,
    redis: Option<&RedisJobs>,
    settings: &JobSettings,
) -> crate::error::Result<u64> {
    let mut total = 0;
    loop {
        let deleted =
            store::prune(pool, settings.keep_completed, settings.keep_dead, BATCH).await?;
        total += deleted;
        if (deleted as i64) < BATCH {
            break;
        }
    }
    while let Some(redis) = redis {
        let deleted = redis
            .prune(settings.keep_completed, settings.keep_dead, BATCH)
            .await?;
        total += deleted;
        if (deleted as i64) < BATCH {
            break;
        }
    }
    Ok(total)
}

/// How often this process looks for orphans: a third of the orphan timeout, so a dead worker's jobs run
/// again within about 1.3 timeouts of its last heartbeat.
pub fn rescue_every(settings: &JobSettings) -> Duration {
    (settings.orphan_timeout / 3).max(Duration::from_millis(200))
}

/// Runs the upkeep until `stop`.
pub(super) async fn run(
    pool: PgPool,
    redis: Option<RedisJobs>,
    lease: Lease,
    settings: JobSettings,
    chores: Vec<Chore>,
    stop: CancellationToken,
) {
    let mut tasks: Vec<(Chore, tokio::time::Interval)> = Vec::new();
    let prune_settings = settings.clone();
    let prune_redis = redis.clone();
    let prune = Chore::new("prune_jobs", PRUNE_EVERY, move |pool| {
        let settings = prune_settings.clone();
        let redis = prune_redis.clone();
        async move { prune_jobs(&pool, redis.as_ref(), &settings).await }
    });
    for chore in std::iter::once(prune).chain(chores) {
        // Replicas started together should not all prune in the same second.
        let offset = chore.every.mul_f64(rand::random::<f64>());
        let mut interval =
            tokio::time::interval_at(tokio::time::Instant::now() + offset, chore.every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tasks.push((chore, interval));
    }
    let mut rescue = tokio::time::interval(rescue_every(&settings));
    rescue.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let due = {
            let next_chore = futures::future::select_all(tasks.iter_mut().enumerate().map(
                |(i, (_, interval))| {
                    Box::pin(async move {
                        interval.tick().await;
                        i
                    })
                },
            ));
            tokio::select! {
                () = stop.cancelled() => return,
                _ = rescue.tick() => None,
                (i, _, _) = next_chore => Some(i),
            }
        };
        match due {
            None if lease.is_fenced() => {}
            None => {
                if let Err(err) = rescue_orphans(&pool, lease.id(), settings.orphan_timeout).await {
                    tracing::warn!(%err, "could not look for orphaned jobs; will try again");
                }
                if let Some(redis) = &redis
                    && let Err(err) =
                        rescue_redis_orphans(&pool, redis, lease.id(), settings.orphan_timeout)
                            .await
                {
                    tracing::warn!(%err, "could not look for orphaned jobs in Redis; will try again");
                }
            }
            Some(i) => {
                let chore = tasks[i].0.clone();
                match (chore.run)(pool.clone()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(chore = chore.name, rows = n, "upkeep chore done"),
                    Err(err) => {
                        tracing::warn!(chore = chore.name, %err, "upkeep chore failed; will try again")
                    }
                }
            }
        }
    }
}
