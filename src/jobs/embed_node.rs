//! `embed_node`: computes and stores a node's embedding. One pending job per node; per-tenant fairness; the
//! guide's retry defaults (5 attempts, 10 s base doubling to 300 s).
//!
//! The node's status follows the job (see the `jobs_embed_node_moved` trigger): `processing` when claimed,
//! `queued` again while a retry waits, `failed` when dead-lettered. The handler writes the successes:
//! `ready` with the vector, or `skipped` when there is no text.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::engine::{Backoff, Job, JobContext, JobError, Policy, Uniqueness};
use crate::domain::NodeId;
use crate::embedding::{self, EmbedError};
use crate::extract;
use crate::metrics::{Stage, metrics};
use crate::store::embeddings as store;

/// Queue of embedding jobs.
pub const QUEUE: &str = "embedding";

/// Why a node is (re-)embedded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbedAction {
    /// First embedding, or its text changed: skipped when the stored vector already matches text and model.
    Embed,
    /// Recompute even if the stored vector matches.
    Refresh,
}

/// Arguments: which node, for which tenant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbedNode {
    /// The node.
    pub node_id: NodeId,
    /// Its tenant.
    pub tenant_id: String,
    /// Why.
    pub action: EmbedAction,
}

impl Job for EmbedNode {
    const KIND: &'static str = "embed_node";

    fn policy() -> Policy {
        Policy {
            max_attempts: 5,
            backoff: Backoff::exponential(Duration::from_secs(10), 2.0, Duration::from_secs(300)),
            timeout: Duration::from_secs(120),
            // Attempts mostly wait for the batcher; enough of them in flight to fill model calls.
            concurrency: 64,
            uniqueness: Uniqueness::WhilePending,
            fair: true,
            ..Policy::new(QUEUE)
        }
    }

    /// One pending job per node: a second request while one waits is a no-op; one made while a job runs
    /// queues the next (the running attempt may have read the text before it changed).
    fn unique_key(&self) -> Option<String> {
        Some(self.node_id.to_string())
    }

    fn tenant_id(&self) -> Option<&str> {
        Some(&self.tenant_id)
    }
}

/// The pending-embedding caps: `EMBEDDING_TENANT_MAX_PENDING` per tenant and `EMBEDDING_MAX_PENDING` in all
/// (0 disables either). API requests over a cap are refused with 429; connector ingest waits instead.
#[derive(Debug, Clone)]
pub struct Caps {
    /// Per tenant.
    pub tenant: u32,
    /// Overall.
    pub total: u32,
    /// Where embedding jobs wait besides PostgreSQL, under `ACTIVEKG_JOBS_BACKEND=redis`.
    pub redis: Option<crate::store::redis_jobs::RedisJobs>,
}

/// How much room the caps leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Room {
    /// No cap applies.
    Unlimited,
    /// At most this many more embeddings may be queued; the text says which cap binds.
    Limited(i64, String),
}

impl Room {
    /// Whether `n` more fit.
    pub fn fits(&self, n: usize) -> bool {
        match self {
            Room::Unlimited => true,
            Room::Limited(left, _) => (n as i64) <= *left,
        }
    }
}

impl Caps {
    /// Room left for `tenant` now. Callers that then enqueue hold [`store::lock_tenant`] first.
    pub async fn room(
        &self,
        conn: &mut sqlx::PgConnection,
        tenant: &str,
    ) -> crate::error::Result<Room> {
        if self.tenant == 0 && self.total == 0 {
            return Ok(Room::Unlimited);
        }
        let bound = |cap: u32| if cap == 0 { 0 } else { i64::from(cap) };
        let mut pending =
            store::pending(&mut *conn, tenant, bound(self.tenant), bound(self.total)).await?;
        // After the outbox, so a job the relay moves meanwhile counts twice (the safe way) rather than not.
        if let Some(redis) = &self.redis {
            let (mine, all) = redis.pending(<EmbedNode as Job>::KIND, tenant).await?;
            pending.tenant += mine;
            pending.total += all;
        }
        let mut room = Room::Unlimited;
        for (cap, used, what) in [
            (
                self.tenant,
                pending.tenant,
                format!(
                    "tenant {tenant} has {} embeddings pending (EMBEDDING_TENANT_MAX_PENDING={})",
                    pending.tenant, self.tenant
                ),
            ),
            (
                self.total,
                pending.total,
                format!(
                    "{} embeddings are pending in all (EMBEDDING_MAX_PENDING={})",
                    pending.total, self.total
                ),
            ),
        ] {
            if cap == 0 {
                continue;
            }
            let left = (i64::from(cap) - used).max(0);
            if matches!(&room, Room::Limited(current, _) if *current <= left) {
                continue;
            }
            room = Room::Limited(left, what);
        }
        Ok(room)
    }
}

/// What embedding handlers need.
#[derive(Debug, Clone)]
pub struct Deps {
    /// The database.
    pub pool: PgPool,
    /// The embedder, behind its batcher.
    pub embeddings: Arc<embedding::Service>,
}

fn job_error(err: EmbedError) -> JobError {
    match err {
        EmbedError::Rejected(_) | EmbedError::Featureless => {
            JobError::permanent("rejected", err.to_string())
        }
        EmbedError::Unavailable(reason) => JobError::transient_with_code("unavailable", reason),
        EmbedError::RateLimited { after, message } => JobError::retry_after(after, message),
    }
}

/// Embeds one node.
pub async fn run(job: EmbedNode, cx: JobContext<Deps>) -> Result<(), JobError> {
    let deps = &cx.state;
    let Some(node) = store::node_text(&deps.pool, job.node_id).await? else {
        // Deleted since: nothing to embed.
        return Ok(());
    };
    if node.deleted {
        return Ok(());
    }
    store::mark_processing(
        &deps.pool,
        job.node_id,
        i32::try_from(cx.attempt).unwrap_or(i32::MAX),
    )
    .await?;
    let model = deps.embeddings.model_id();
    let tally = |result: &str| {
        metrics()
            .embedding_nodes
            .with_label_values(&[&node.tenant_id, result])
            .inc()
    };
    let Some(text) = node.text.filter(|t| !t.trim().is_empty()) else {
        let mut tx = cx.begin().await?;
        store::mark(&mut tx, job.node_id, "skipped", None).await?;
        tx.commit().await?;
        tally("skipped");
        return Ok(());
    };
    let text_hash = extract::hash_text(&text);
    if job.action == EmbedAction::Embed
        && node.model.as_deref() == Some(model)
        && node.embedded_hash.as_deref() == Some(text_hash.as_str())
    {
        // Re-run of a request whose vector is already stored (a redelivery, a requeue): nothing to compute.
        let mut tx = cx.begin().await?;
        store::mark(&mut tx, job.node_id, "ready", Some(model)).await?;
        tx.commit().await?;
        tally("ready");
        return Ok(());
    }
    let embedding = Instant::now();
    let vector = deps.embeddings.embed(text.clone()).await;
    metrics().stage(Stage::Embed, embedding.elapsed());
    let vector = match vector {
        Ok(vector) => vector,
        Err(err) => {
            if matches!(err, EmbedError::Rejected(_) | EmbedError::Featureless)
                || cx.attempt >= cx.max_attempts
            {
                tally("failed");
            }
            return Err(job_error(err));
        }
    };
    let writing = Instant::now();
    let mut tx = cx.begin().await?;
    match store::lock_text(&mut tx, job.node_id).await? {
        // Deleted while we computed.
        None => return Ok(()),
        Some(current) if current.as_deref() != Some(text.as_str()) => {
            return Err(JobError::transient_with_code(
                "text_changed",
                "the node's text changed while it was being embedded; embedding the new text",
            ));
        }
        Some(_) => {}
    }
    store::save(
        &mut tx,
        job.node_id,
        &node.tenant_id,
        model,
        &vector,
        &text_hash,
    )
    .await?;
    tx.commit().await?;
    metrics().stage(Stage::Write, writing.elapsed());
    tally("ready");
    Ok(())
}
