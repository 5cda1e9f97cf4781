//! `purge_deleted`: hard-deletes documents soft-deleted longer ago than the retention, with their chunks and
//! edges, one short transaction per batch until none is left. Each batch commits together with the run's
//! checkpoint (counts and the cutoff), so a retry resumes with the same cutoff and its totals stay exact.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::engine::{Backoff, Job, JobContext, JobError, Policy, Uniqueness};
use crate::metrics::metrics;
use crate::store::graph::{self, PurgeCounts};

/// A purge run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PurgeDeleted {
    /// Only this tenant's documents (all tenants when absent).
    pub tenant_id: Option<String>,
    /// Documents per batch (one transaction each).
    pub batch_size: u32,
    /// Documents soft-deleted more than this many days ago go.
    pub retention_days: u32,
    /// The schedule tick that started it (absent for runs started through the API).
    #[serde(default)]
    pub tick: Option<DateTime<Utc>>,
}

impl Job for PurgeDeleted {
    const KIND: &'static str = "purge_deleted";

    fn policy() -> Policy {
        Policy {
            priority: 5,
            max_attempts: 5,
            backoff: Backoff::exponential(Duration::from_secs(30), 2.0, Duration::from_secs(600)),
            // Resumable: a timeout costs only the batch in flight.
            timeout: Duration::from_secs(3600),
            concurrency: 1,
            uniqueness: Uniqueness::WhileActive,
            resumes: true,
            ..Policy::new(super::MAINTENANCE)
        }
    }

    /// One run per scope at a time: asking again while one runs gets that run.
    fn unique_key(&self) -> Option<String> {
        Some(format!(
            "purge:{}",
            self.tenant_id.as_deref().unwrap_or("*")
        ))
    }

    fn tenant_id(&self) -> Option<&str> {
        self.tenant_id.as_deref()
    }
}

/// A run's progress, and in the end its result (the job's `progress`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PurgeProgress {
    /// Documents soft-deleted before this instant are purged (fixed when the run starts).
    pub cutoff: Option<DateTime<Utc>>,
    /// What went so far.
    #[serde(flatten)]
    pub purged: PurgeCounts,
    /// Batches committed.
    pub batches: u64,
    /// True once nothing past the cutoff is left.
    pub done: bool,
}

/// The cutoff for `retention_days` before `now`.
pub fn cutoff(now: DateTime<Utc>, retention_days: u32) -> DateTime<Utc> {
    now - chrono::Duration::days(i64::from(retention_days))
}

/// Counts what a run over `tenant` with `cutoff` would remove.
pub async fn dry_run(
    pool: &PgPool,
    tenant: Option<&str>,
    cutoff: DateTime<Utc>,
) -> crate::error::Result<PurgeCounts> {
    let mut conn = pool.acquire().await?;
    let counts = graph::count_purgeable(&mut conn, tenant, cutoff).await;
    metrics()
        .purger
        .with_label_values(&[if counts.is_ok() { "dry_run" } else { "error" }])
        .inc();
    counts
}

/// Runs (or resumes) a purge.
pub async fn run(job: PurgeDeleted, cx: JobContext<PgPool>) -> Result<(), JobError> {
    let started = Instant::now();
    let outcome = purge(&job, &cx).await;
    let m = metrics();
    m.purger_duration.observe(started.elapsed().as_secs_f64());
    match &outcome {
        Ok(progress) => {
            m.purger.with_label_values(&["success"]).inc();
            tracing::info!(tenant = ?job.tenant_id, documents = progress.purged.documents,
                chunks = progress.purged.chunks, edges = progress.purged.edges, batches = progress.batches,
                cutoff = ?progress.cutoff, "purge cycle finished");
        }
        Err(err) => {
            m.purger.with_label_values(&["error"]).inc();
            tracing::error!(tenant = ?job.tenant_id, %err, "purge cycle failed; it resumes on retry");
        }
    }
    outcome.map(|_| ())
}

async fn purge(job: &PurgeDeleted, cx: &JobContext<PgPool>) -> Result<PurgeProgress, JobError> {
    let mut progress: PurgeProgress = cx.resume().unwrap_or_default();
    let deleted_before = *progress
        .cutoff
        .get_or_insert_with(|| cutoff(Utc::now(), job.retention_days));
    let batch_size = i64::from(job.batch_size.clamp(1, 100_000));
    while !progress.done {
        let mut tx = cx.begin().await?;
        let batch = graph::purge_batch(
            &mut tx,
            job.tenant_id.as_deref(),
            deleted_before,
            batch_size,
        )
        .await?;
        let mut next = progress.clone();
        next.purged += batch;
        next.batches += 1;
        next.done = batch.documents < batch_size;
        cx.checkpoint(&mut tx, &next).await?;
        tx.commit().await?;
        let m = metrics();
        for (kind, n) in [
            ("document", batch.documents),
            ("chunk", batch.chunks),
            ("edge", batch.edges),
        ] {
            m.purged.with_label_values(&[kind]).inc_by(n as u64);
        }
        progress = next;
    }
    Ok(progress)
}
