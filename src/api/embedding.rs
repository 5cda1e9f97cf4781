//! `/admin/embedding`: the embedding pipeline's status and the requeue operation, with the guide's paths and
//! field names. Every route needs the admin token.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::auth::Admin;
use super::error::{ApiError, ErrorBody};
use super::{ApiState, optional_tenant};
use crate::domain::{EmbeddingStatus, TenantId};
use crate::store::embeddings::{RequeueFilter, VectorIndex};
use crate::workflows::embeddings::{self as workflow, QueueFigures, Requeue, Scope};

/// Most nodes one requeue touches.
const MAX_REQUEUE: i64 = 2000;

pub(super) fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(status))
        .routes(routes!(requeue))
}

/// Names a tenant (optional).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatusQuery {
    /// The tenant to report on besides the overall figures.
    pub tenant_id: Option<String>,
}

/// Embedding jobs (the guide's `embedding:queue`, `embedding:retry` and `embedding:dlq`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EmbeddingQueueView {
    /// Due now, waiting for a worker.
    pub queued: i64,
    /// Waiting for a retry's backoff.
    pub retry_scheduled: i64,
    /// Being embedded.
    pub running: i64,
    /// Dead-lettered (inspect with `GET /_admin/jobs/dlq?kind=embed_node`).
    pub dead: i64,
}

impl From<QueueFigures> for EmbeddingQueueView {
    fn from(q: QueueFigures) -> Self {
        Self {
            queued: q.queued,
            retry_scheduled: q.retry_scheduled,
            running: q.running,
            dead: q.dead,
        }
    }
}

/// Figures for one scope.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ScopeView {
    /// Live nodes by embedding status.
    pub nodes: BTreeMap<String, i64>,
    /// Live nodes with a stored vector.
    pub with_embedding: i64,
    /// Embedding jobs.
    pub queue: EmbeddingQueueView,
}

impl From<Scope> for ScopeView {
    fn from(s: Scope) -> Self {
        Self {
            nodes: s
                .nodes
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            with_embedding: s.with_embedding,
            queue: s.queue.into(),
        }
    }
}

/// The embedding pipeline's status.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EmbeddingStatusView {
    /// The tenant asked about.
    pub tenant_id: Option<String>,
    /// That tenant's figures.
    pub tenant: Option<ScopeView>,
    /// Everyone's figures.
    pub overall: ScopeView,
    /// Backend (local, openai, hash).
    pub backend: String,
    /// Model id stored with new vectors.
    pub model: String,
    /// `hnsw` (pgvector) or `exact`, and why when exact.
    pub index: String,
    /// `EMBEDDING_TENANT_MAX_PENDING` (0: no cap).
    pub tenant_max_pending: u32,
    /// `EMBEDDING_MAX_PENDING` (0: no cap).
    pub max_pending: u32,
}

/// Nodes by embedding status and the embedding queue, for a tenant and overall.
#[utoipa::path(get, path = "/admin/embedding/status", tag = "embedding", params(StatusQuery), security(("admin_token" = [])),
    responses((status = 200, body = EmbeddingStatusView), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn status(
    _: Admin,
    State(state): State<ApiState>,
    Query(query): Query<StatusQuery>,
) -> Result<Json<EmbeddingStatusView>, ApiError> {
    let tenant = optional_tenant(query.tenant_id.as_deref())?;
    let (scope, overall) = workflow::status(
        &state.pool,
        state.redis_jobs.as_ref(),
        tenant.as_ref().map(TenantId::as_str),
    )
    .await?;
    let settings = &state.settings.embedding;
    Ok(Json(EmbeddingStatusView {
        tenant_id: tenant.map(|t| t.to_string()),
        tenant: scope.map(ScopeView::from),
        overall: overall.into(),
        backend: state.embeddings.settings().backend.as_str().to_owned(),
        model: state.embeddings.model_id().to_owned(),
        index: match state.vector_index.get() {
            Some(VectorIndex::Hnsw) => "hnsw".to_owned(),
            Some(VectorIndex::Exact(why)) => format!("exact: {why}"),
            None => "exact: not prepared yet".to_owned(),
        },
        tenant_max_pending: settings.tenant_max_pending,
        max_pending: settings.max_pending,
    }))
}

/// Which nodes to requeue.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequeueRequest {
    /// Only this tenant's nodes (default: every tenant).
    pub tenant_id: Option<String>,
    /// Only these nodes (1 to 2000).
    #[schema(min_items = 1, max_items = 2000)]
    pub node_ids: Option<Vec<Uuid>>,
    /// Only nodes in this embedding status, or `all` (the default).
    #[schema(value_type = Option<RequeueStatus>)]
    pub status: Option<String>,
    /// Only nodes without a stored vector (default false).
    #[serde(default)]
    pub only_missing_embedding: bool,
    /// First mark ready the matching nodes whose stored vector already matches their text and the current
    /// model, instead of recomputing it (default false).
    #[serde(default)]
    pub backfill_ready: bool,
    /// At most this many nodes, 1 to 2000 (default 500).
    #[schema(minimum = 1, maximum = 2000)]
    pub limit: Option<i64>,
}

/// The embedding statuses a requeue can select, or all of them.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // Only its schema is used: `EmbeddingStatus` parses the value.
enum RequeueStatus {
    Queued,
    Processing,
    Ready,
    Failed,
    Skipped,
    All,
}

/// What a requeue did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RequeueResponse {
    /// Nodes marked ready because their vector was already current.
    pub backfilled: u64,
    /// Nodes picked for a new embedding request (status reset to queued, attempts to 0).
    pub requested: u64,
    /// Embedding jobs queued for them (fewer when one was already pending).
    pub enqueued: u64,
}

/// Requeue nodes for embedding: e.g. `{"tenant_id":"default","status":"queued","only_missing_embedding":true,
/// "backfill_ready":true,"limit":2000}` repairs nodes left queued without a job.
#[utoipa::path(post, path = "/admin/embedding/requeue", tag = "embedding", request_body = RequeueRequest,
    security(("admin_token" = [])),
    responses((status = 200, body = RequeueResponse), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn requeue(
    _: Admin,
    State(state): State<ApiState>,
    Json(body): Json<RequeueRequest>,
) -> Result<Json<RequeueResponse>, ApiError> {
    let tenant_id = optional_tenant(body.tenant_id.as_deref())?.map(|t| t.to_string());
    let statuses = match body.status.as_deref() {
        None | Some("all") => None,
        Some(one) => Some(vec![
            one.parse::<EmbeddingStatus>()
                .map_err(|e| ApiError::invalid(format!("{e} or all")))?
                .as_str()
                .to_owned(),
        ]),
    };
    let limit = body.limit.unwrap_or(500);
    if !(1..=MAX_REQUEUE).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit must be from 1 to {MAX_REQUEUE}"
        )));
    }
    if body
        .node_ids
        .as_ref()
        .is_some_and(|ids| ids.is_empty() || ids.len() > MAX_REQUEUE as usize)
    {
        return Err(ApiError::invalid(format!(
            "node_ids must hold 1 to {MAX_REQUEUE} ids"
        )));
    }
    let request = Requeue {
        filter: RequeueFilter {
            tenant_id,
            node_ids: body.node_ids,
            statuses,
            only_missing_embedding: body.only_missing_embedding,
            limit,
        },
        backfill_ready: body.backfill_ready,
    };
    let outcome = workflow::requeue(&state.pool, state.embeddings.model_id(), &request).await?;
    Ok(Json(RequeueResponse {
        backfilled: outcome.backfilled,
        requested: outcome.requested,
        enqueued: outcome.enqueued,
    }))
}
