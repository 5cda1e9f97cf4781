//! `rotate_keys`: re-encrypts connector secrets with the active key, batch after batch, until no row in
//! scope is behind. One job is one run: each batch commits together with the run's checkpoint (cursor and
//! counts), so a retry after a crash resumes after the last committed batch and nothing is encrypted twice.
//! Rows whose secrets no longer decrypt are counted, reported in the run's result, and left untouched.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::engine::{Backoff, Job, JobContext, JobError, Policy, Uniqueness};
use crate::metrics::metrics;
use crate::registry::{Registry, RotatedRow, RotationFailure};
use crate::store::connectors::RotationScope;

/// Most failed and moved rows listed in a run's result (all are counted).
const LISTED_ROWS: usize = 100;

/// Arguments of a rotation run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotateKeys {
    /// Which rows: a tenant and/or provider, or all.
    #[serde(flatten)]
    pub scope: RotationScope,
    /// Rows per batch (one transaction each).
    pub batch_size: u32,
}

impl Job for RotateKeys {
    const KIND: &'static str = "rotate_keys";

    fn policy() -> Policy {
        Policy {
            priority: 5,
            max_attempts: 10,
            backoff: Backoff::exponential(Duration::from_secs(2), 2.0, Duration::from_secs(120)),
            // Resumable, so a timeout only costs the batch in flight.
            timeout: Duration::from_secs(3600),
            concurrency: 1,
            uniqueness: Uniqueness::WhileActive,
            resumes: true,
            ..Policy::new(super::MAINTENANCE)
        }
    }

    /// One run at a time: a second request while one is active gets that run.
    fn unique_key(&self) -> Option<String> {
        Some("rotate_keys".to_owned())
    }

    fn tenant_id(&self) -> Option<&str> {
        self.scope.tenant_id.as_deref()
    }
}

/// A run's progress, and in the end its result (visible as the job's `progress`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RotationProgress {
    /// The key version rows are being moved to.
    pub active_version: u32,
    /// Rows re-encrypted.
    pub rotated: u64,
    /// Rows with nothing to re-encrypt (version stamp moved).
    pub skipped: u64,
    /// Rows left untouched because a secret does not decrypt.
    pub errors: u64,
    /// The first of those rows, with the reason.
    pub failed: Vec<RotationFailure>,
    /// The first rows moved, each with the versions it moved between.
    #[serde(default)]
    pub moved: Vec<RotatedRow>,
    /// Batches committed.
    pub batches: u64,
    /// The last row processed, `(tenant_id, provider)`.
    pub cursor: Option<(String, String)>,
    /// True once no row in scope is left to look at.
    pub done: bool,
}

/// What rotation handlers need.
#[derive(Debug, Clone)]
pub struct Deps {
    /// The database.
    pub pool: PgPool,
    /// The connector registry.
    pub registry: Arc<Registry>,
}

/// Runs (or resumes) a rotation.
pub async fn run(job: RotateKeys, cx: JobContext<Deps>) -> Result<(), JobError> {
    let mut progress: RotationProgress = cx.resume().unwrap_or_default();
    progress.active_version = cx.state.registry.active_key_version();
    let batch_size = i64::from(job.batch_size.clamp(1, 10_000));
    while !progress.done {
        let mut tx = cx.begin().await?;
        let batch = cx
            .state
            .registry
            .rotate_batch(&mut tx, &job.scope, progress.cursor.as_ref(), batch_size)
            .await?;
        let mut next = progress.clone();
        next.rotated += batch.rotated;
        next.skipped += batch.skipped;
        next.errors += batch.failed.len() as u64;
        let room = LISTED_ROWS.saturating_sub(next.failed.len());
        next.failed.extend(batch.failed.iter().take(room).cloned());
        let room = LISTED_ROWS.saturating_sub(next.moved.len());
        next.moved.extend(batch.moved.iter().take(room).cloned());
        next.batches += 1;
        next.cursor = batch.last.clone().or(next.cursor);
        next.done = (batch.rows as i64) < batch_size;
        cx.checkpoint(&mut tx, &next).await?;
        tx.commit().await?;
        let m = metrics();
        m.rotation
            .with_label_values(&["rotated"])
            .inc_by(batch.rotated);
        m.rotation
            .with_label_values(&["skipped"])
            .inc_by(batch.skipped);
        m.rotation
            .with_label_values(&["error"])
            .inc_by(batch.failed.len() as u64);
        progress = next;
    }
    tracing::info!(
        rotated = progress.rotated,
        skipped = progress.skipped,
        errors = progress.errors,
        batches = progress.batches,
        active_version = progress.active_version,
        "key rotation finished"
    );
    Ok(())
}
