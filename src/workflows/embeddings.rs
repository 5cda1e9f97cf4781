//! Operating the embedding pipeline: its status (nodes by status, the job queue as the guide's Redis keys
//! described it), requeueing nodes, and similarity search.

use std::collections::BTreeMap;

use sqlx::PgPool;

use crate::domain::{EmbeddingStatus, NodeId};
use crate::embedding::{EmbedError, Service};
use crate::error::{Error, Result};
use crate::jobs::embed_node::{EmbedAction, EmbedNode};
use crate::jobs::engine;
use crate::jobs::engine::stats;
use crate::store::embeddings::{self as store, Hit, RequeueFilter, VectorIndex};
use crate::store::jobs::QueueCounts;
use crate::store::redis_jobs::RedisJobs;

/// The embedding queue, as the guide's Redis keys described it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueFigures {
    /// Due now, waiting for a worker (`embedding:queue`).
    pub queued: i64,
    /// Waiting for a retry's backoff (`embedding:retry`).
    pub retry_scheduled: i64,
    /// Being embedded.
    pub running: i64,
    /// Dead-lettered (`embedding:dlq`).
    pub dead: i64,
}

/// Nodes by embedding status and the embedding queue, for one scope (a tenant, or everyone).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Live nodes per status (every status present, zero when none).
    pub nodes: BTreeMap<&'static str, i64>,
    /// Live nodes with a stored vector.
    pub with_embedding: i64,
    /// Embedding jobs.
    pub queue: QueueFigures,
}

async fn scope(pool: &PgPool, tenant_id: Option<&str>, jobs: &[QueueCounts]) -> Result<Scope> {
    let mut nodes: BTreeMap<&'static str, i64> = EmbeddingStatus::ALL
        .iter()
        .map(|s| (s.as_str(), 0))
        .collect();
    let mut with_embedding = 0;
    for row in store::status_counts(pool, tenant_id).await? {
        if let Ok(status) = row.status.parse::<EmbeddingStatus>() {
            nodes.insert(status.as_str(), row.nodes);
        }
        with_embedding += row.with_embedding;
    }
    let mut queue = QueueFigures::default();
    for row in jobs.iter().filter(|r| {
        r.kind == <EmbedNode as engine::Job>::KIND
            && tenant_id.is_none_or(|t| r.tenant_id.as_deref() == Some(t))
    }) {
        queue.queued += row.pending;
        queue.retry_scheduled += row.scheduled;
        queue.running += row.running;
        queue.dead += row.dead;
    }
    Ok(Scope {
        nodes,
        with_embedding,
        queue,
    })
}

/// The tenant's figures (when given) and everyone's; the queue wherever its jobs wait (PostgreSQL, and
/// Redis when given).
pub async fn status(
    pool: &PgPool,
    redis: Option<&RedisJobs>,
    tenant_id: Option<&str>,
) -> Result<(Option<Scope>, Scope)> {
    let jobs = stats::counts(pool, redis).await?;
    let tenant = match tenant_id {
        Some(tenant) => Some(scope(pool, Some(tenant), &jobs).await?),
        None => None,
    };
    Ok((tenant, scope(pool, None, &jobs).await?))
}

/// A requeue request: which nodes, and whether to first mark ready those whose vector is already current.
#[derive(Debug, Clone)]
pub struct Requeue {
    /// Which nodes.
    pub filter: RequeueFilter,
    /// Mark ready (instead of recomputing) matching nodes whose stored vector matches their text and model.
    pub backfill_ready: bool,
}

/// What a requeue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequeueOutcome {
    /// Nodes marked ready because their vector was already current.
    pub backfilled: u64,
    /// Nodes picked for a new embedding request (reset to `queued`, attempts from zero).
    pub requested: u64,
    /// New jobs queued for them (fewer when a node already had one pending).
    pub enqueued: u64,
}

/// Requeues nodes in one transaction: backfill first (so current vectors are not recomputed), then pick and
/// queue the rest.
pub async fn requeue(pool: &PgPool, model: &str, request: &Requeue) -> Result<RequeueOutcome> {
    let mut tx = pool.begin().await?;
    let backfilled = if request.backfill_ready {
        store::backfill_ready(&mut tx, &request.filter, model).await?
    } else {
        0
    };
    let picked = store::pick_for_requeue(&mut tx, &request.filter).await?;
    let jobs: Vec<EmbedNode> = picked
        .iter()
        .map(|(id, tenant)| EmbedNode {
            node_id: NodeId(*id),
            tenant_id: tenant.clone(),
            action: EmbedAction::Embed,
        })
        .collect();
    let enqueued = engine::enqueue_many(&mut tx, &jobs).await?;
    tx.commit().await?;
    Ok(RequeueOutcome {
        backfilled,
        requested: picked.len() as u64,
        enqueued: enqueued.iter().filter(|e| e.inserted).count() as u64,
    })
}

/// Why a search failed.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// The query text could not be embedded.
    #[error(transparent)]
    Embedding(#[from] EmbedError),
    /// Anything else.
    #[error(transparent)]
    Other(#[from] Error),
}

/// The `k` nodes of `tenant_id` most similar to `query`, among vectors made by the current model.
pub async fn search(
    pool: &PgPool,
    embeddings: &Service,
    index: &VectorIndex,
    tenant_id: &str,
    query: &str,
    k: i64,
    classes: Option<&[String]>,
) -> Result<Vec<Hit>, SearchError> {
    let vector = match embeddings.embed(query.to_owned()).await {
        // Nothing is similar to a query with nothing in it (only punctuation, for the hash embedder).
        Err(EmbedError::Featureless) => return Ok(Vec::new()),
        other => other?,
    };
    Ok(store::search(
        pool,
        index,
        tenant_id,
        embeddings.model_id(),
        &vector,
        k,
        classes,
    )
    .await?)
}
