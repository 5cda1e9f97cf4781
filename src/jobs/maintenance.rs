//! The job engine's own upkeep, as ordinary scheduled jobs: taking back jobs from dead workers, and pruning
//! finished jobs past retention. Both work in bounded batches and are safe on many replicas at once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::engine::schedule::CronExpr;
use super::engine::{Backoff, Job, JobContext, JobError, Policy, Runtime, Scheduler};
use crate::config::JobSettings;
use crate::metrics::metrics;
use crate::store::jobs as store;

/// Queue of the maintenance kinds.
pub const QUEUE: &str = "maintenance";
const BATCH: i64 = 1000;

/// What maintenance handlers need.
#[derive(Debug, Clone)]
pub struct Upkeep {
    pool: PgPool,
    settings: JobSettings,
}

fn policy() -> Policy {
    Policy {
        priority: 10,
        max_attempts: 3,
        backoff: Backoff::exponential(Duration::from_secs(1), 2.0, Duration::from_secs(30)),
        timeout: Duration::from_secs(120),
        concurrency: 1,
        ..Policy::new(QUEUE)
    }
}

/// Requeues (or dead-letters, when out of attempts) jobs whose worker stopped heartbeating.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RescueOrphans {
    /// The schedule tick that asked for this run.
    pub tick: DateTime<Utc>,
}

impl Job for RescueOrphans {
    const KIND: &'static str = "rescue_orphans";

    fn policy() -> Policy {
        policy()
    }
}

/// Deletes completed and cancelled jobs past `ACTIVEKG_JOBS_KEEP_COMPLETED_HOURS` and dead ones past
/// `ACTIVEKG_JOBS_KEEP_DEAD_DAYS`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruneJobs {
    /// The schedule tick that asked for this run.
    pub tick: DateTime<Utc>,
}

impl Job for PruneJobs {
    const KIND: &'static str = "prune_jobs";

    fn policy() -> Policy {
        policy()
    }
}

/// Takes back every orphan, a batch at a time. Returns (requeued, dead-lettered).
pub async fn rescue_orphans(
    pool: &PgPool,
    orphan_timeout: Duration,
) -> crate::error::Result<(u64, u64)> {
    let (mut requeued, mut dead) = (0, 0);
    loop {
        let mut conn = pool.acquire().await?;
        let rescued = store::rescue_orphans(&mut conn, orphan_timeout, BATCH).await?;
        for job in &rescued {
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
        if (rescued.len() as i64) < BATCH {
            return Ok((requeued, dead));
        }
    }
}

/// Prunes finished jobs past retention, and webhook delivery ids older than a week, a batch (and a short
/// statement) at a time. Returns how many jobs went.
pub async fn prune_jobs(pool: &PgPool, settings: &JobSettings) -> crate::error::Result<u64> {
    let mut total = 0;
    loop {
        let deleted =
            store::prune(pool, settings.keep_completed, settings.keep_dead, BATCH).await?;
        total += deleted;
        if (deleted as i64) < BATCH {
            break;
        }
    }
    // Redeliveries come within hours; a week of delivery ids is ample.
    while crate::store::webhooks::prune_deliveries(pool, Duration::from_secs(7 * 86_400), BATCH)
        .await? as i64
        >= BATCH
    {}
    Ok(total)
}

async fn run_rescue(_: RescueOrphans, cx: JobContext<Upkeep>) -> Result<(), JobError> {
    rescue_orphans(&cx.state.pool, cx.state.settings.orphan_timeout).await?;
    Ok(())
}

async fn run_prune(_: PruneJobs, cx: JobContext<Upkeep>) -> Result<(), JobError> {
    let pruned = prune_jobs(&cx.state.pool, &cx.state.settings).await?;
    if pruned > 0 {
        tracing::info!(pruned, "pruned finished jobs past retention");
    }
    Ok(())
}

pub(super) fn register(runtime: &mut Runtime, pool: &PgPool, settings: &JobSettings) {
    let upkeep = Upkeep {
        pool: pool.clone(),
        settings: settings.clone(),
    };
    runtime.register(upkeep.clone(), run_rescue);
    runtime.register(upkeep, run_prune);
}

/// How often orphans are looked for: a third of the orphan timeout, so a dead worker's jobs run again within
/// about 1.3 timeouts.
pub fn rescue_every(settings: &JobSettings) -> CronExpr {
    let seconds = (settings.orphan_timeout.as_secs() / 3).clamp(1, 59);
    format!("*/{seconds} * * * * *")
        .parse()
        .expect("a seconds step from 1 to 59 is a valid cron expression")
}

pub(super) fn schedule(scheduler: &mut Scheduler, settings: &JobSettings) {
    scheduler.add("jobs.rescue_orphans", rescue_every(settings), |tick| {
        RescueOrphans { tick }
    });
    scheduler.add(
        "jobs.prune",
        "0 */10 * * * *"
            .parse()
            .expect("a fixed, valid cron expression"),
        |tick| PruneJobs { tick },
    );
}
