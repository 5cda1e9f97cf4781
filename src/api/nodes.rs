//! `/nodes` and `/search`: create nodes (their embeddings are queued in the same transaction), read them
//! with their embedding status, and find the nodes most similar to a text. Every route needs the admin token.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::auth::Admin;
use super::error::{ApiError, ErrorBody};
use super::{ApiState, optional_tenant};
use crate::domain::{EmbeddingStatus, TenantId};
use crate::embedding::EmbedError;
use crate::jobs::embed_node::Caps;
use crate::store::embeddings::{INDEXED_DIMENSIONS, VectorIndex};
use crate::store::nodes::{NodeFilter, NodeRecord};
use crate::workflows::embeddings::{self as embeddings, SearchError};
use crate::workflows::nodes::{self as workflow, CreateError, Created, NodeInput};

pub(super) fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(create_node, list_nodes))
        .routes(routes!(create_nodes))
        .routes(routes!(get_node))
        .routes(routes!(search))
}

/// A node to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeRequest {
    /// Its id; give one to make retries idempotent (an existing id is not overwritten). Default: random.
    pub id: Option<Uuid>,
    /// Tenant.
    pub tenant_id: String,
    /// Classes (1 to 64 letters, digits or `_` each); the first is its `entity_type`.
    #[schema(example = json!(["Note"]), min_items = 1, inline, value_type = Vec<ClassName>)]
    pub classes: Vec<String>,
    /// Properties.
    #[schema(value_type = Object)]
    #[serde(default)]
    pub props: serde_json::Map<String, serde_json::Value>,
    /// The text to embed (stored as `props.text`; or give `props.text`). Without text the node is `skipped`.
    pub text: Option<String>,
    /// Where its content came from.
    pub payload_ref: Option<String>,
}

impl NodeRequest {
    fn input(self) -> Result<NodeInput, String> {
        Ok(NodeInput {
            id: self.id,
            tenant_id: TenantId::parse(&self.tenant_id)?,
            classes: self.classes,
            props: self.props,
            text: self.text,
            payload_ref: self.payload_ref,
        })
    }
}

/// A class name.
#[derive(ToSchema)]
#[schema(pattern = r"^[A-Za-z0-9_]{1,64}$")]
#[allow(dead_code)] // Only its schema is used.
struct ClassName(String);

/// A node and its embedding state.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    /// Id.
    pub id: Uuid,
    /// Tenant.
    pub tenant_id: String,
    /// Classes.
    pub classes: Vec<String>,
    /// Properties (`text` is what is embedded).
    #[schema(value_type = Object)]
    pub props: serde_json::Value,
    /// Content origin.
    pub payload_ref: Option<String>,
    /// Its embedding status.
    #[schema(value_type = EmbeddingStatusName)]
    pub embedding_status: String,
    /// Why the last attempt failed.
    pub embedding_error: Option<String>,
    /// Attempts of the current embedding request.
    pub embedding_attempts: i32,
    /// Model of the stored vector.
    pub embedding_model: Option<String>,
    /// When the vector was stored.
    pub embedded_at: Option<DateTime<Utc>>,
    /// Whether a vector is stored.
    pub has_embedding: bool,
    /// Its dimension.
    pub embedding_dimensions: Option<i32>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last content change.
    pub updated_at: DateTime<Utc>,
    /// Soft-deleted at (deleted nodes are hidden unless asked for).
    pub deleted_at: Option<DateTime<Utc>>,
}

impl From<NodeRecord> for NodeView {
    fn from(n: NodeRecord) -> Self {
        Self {
            id: n.id,
            tenant_id: n.tenant_id,
            classes: n.classes,
            props: n.props,
            payload_ref: n.payload_ref,
            embedding_status: n.embedding_status,
            embedding_error: n.embedding_error,
            embedding_attempts: n.embedding_attempts,
            embedding_model: n.embedding_model,
            embedded_at: n.embedded_at,
            has_embedding: n.has_embedding,
            embedding_dimensions: n.embedding_dimensions,
            created_at: n.created_at,
            updated_at: n.updated_at,
            deleted_at: n.deleted_at,
        }
    }
}

/// What happened to one node of a request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedView {
    /// created, exists or invalid.
    pub result: String,
    /// The node (absent when invalid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    /// queued or skipped, for a created node (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding_status: Option<String>,
    /// Its embedding job (absent when none was queued).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<i64>,
    /// Why it was refused (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<Created> for CreatedView {
    fn from(c: Created) -> Self {
        match c {
            Created::Created {
                id,
                embedding_status,
                job_id,
            } => Self {
                result: "created".to_owned(),
                id: Some(id),
                embedding_status: Some(embedding_status.to_owned()),
                job_id: job_id.map(|j| j.0),
                error: None,
            },
            Created::Exists { id } => Self {
                result: "exists".to_owned(),
                id: Some(id),
                embedding_status: None,
                job_id: None,
                error: None,
            },
            Created::Invalid(reason) => Self {
                result: "invalid".to_owned(),
                id: None,
                embedding_status: None,
                job_id: None,
                error: Some(reason),
            },
        }
    }
}

fn caps(state: &ApiState) -> Caps {
    Caps {
        tenant: state.settings.embedding.tenant_max_pending,
        total: state.settings.embedding.max_pending,
        redis: state.redis_jobs.clone(),
    }
}

fn create_error(err: CreateError) -> ApiError {
    match err {
        CreateError::OverCap {
            retry_after,
            message,
        } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_pending", message)
            .retry_after(retry_after),
        CreateError::Other(err) => err.into(),
    }
}

/// Create a node; its embedding is queued in the same transaction.
#[utoipa::path(post, path = "/nodes", tag = "nodes", request_body = NodeRequest, security(("admin_token" = [])),
    responses((status = 201, body = CreatedView), (status = 401, body = ErrorBody),
        (status = 409, description = "A node with this id exists", body = ErrorBody),
        (status = 422, body = ErrorBody),
        (status = 429, description = "Too many embeddings pending for the tenant (or overall); see Retry-After", body = ErrorBody)))]
async fn create_node(
    _: Admin,
    State(state): State<ApiState>,
    Json(body): Json<NodeRequest>,
) -> Result<(StatusCode, Json<CreatedView>), ApiError> {
    let input = body.input().map_err(ApiError::invalid)?;
    let mut results = workflow::create(&state.pool, caps(&state), vec![input])
        .await
        .map_err(create_error)?;
    match results.pop() {
        Some(Created::Invalid(reason)) => Err(ApiError::invalid(reason)),
        Some(Created::Exists { id }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("node {id} exists; it was left unchanged"),
        )),
        Some(created) => Ok((StatusCode::CREATED, Json(created.into()))),
        None => Err(ApiError::invalid("no node was given")),
    }
}

/// Up to 200 nodes to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// The nodes, each shaped as the body of `POST /nodes`; one that is not a valid node gets an `invalid`
    /// result in its place instead of failing the request.
    #[schema(min_items = 1, max_items = 200)]
    pub nodes: Vec<serde_json::Value>,
}

/// One result per requested node, in order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchResponse {
    /// Results.
    pub results: Vec<CreatedView>,
    /// How many were created.
    pub created: usize,
}

/// Create up to 200 nodes; each gets its own result (an invalid node does not stop the others). If the
/// tenant's pending embeddings cannot take the batch's, nothing is created and the answer is 429.
#[utoipa::path(post, path = "/nodes/batch", tag = "nodes", request_body = BatchRequest, security(("admin_token" = [])),
    responses((status = 200, body = BatchResponse), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 429, description = "Too many embeddings pending; nothing was created; see Retry-After", body = ErrorBody)))]
async fn create_nodes(
    _: Admin,
    State(state): State<ApiState>,
    Json(body): Json<BatchRequest>,
) -> Result<Json<BatchResponse>, ApiError> {
    if body.nodes.is_empty() || body.nodes.len() > workflow::MAX_BATCH {
        return Err(ApiError::invalid(format!(
            "nodes must hold 1 to {} nodes (got {})",
            workflow::MAX_BATCH,
            body.nodes.len()
        )));
    }
    // Items are parsed one by one so a malformed item is reported in its place, not as a failed request.
    let parsed: Vec<Result<NodeInput, String>> = body
        .nodes
        .into_iter()
        .map(|raw| {
            serde_json::from_value::<NodeRequest>(raw)
                .map_err(|e| e.to_string())
                .and_then(NodeRequest::input)
        })
        .collect();
    let inputs: Vec<NodeInput> = parsed
        .iter()
        .filter_map(|p| p.as_ref().ok().cloned())
        .collect();
    let mut created = workflow::create(&state.pool, caps(&state), inputs)
        .await
        .map_err(create_error)?
        .into_iter();
    let results: Vec<CreatedView> = parsed
        .into_iter()
        .map(|p| match p {
            Ok(_) => created.next().expect("one result per parsed node").into(),
            Err(reason) => Created::Invalid(reason).into(),
        })
        .collect();
    let count = results.iter().filter(|r| r.result == "created").count();
    Ok(Json(BatchResponse {
        results,
        created: count,
    }))
}

/// Filters for listing nodes.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NodeQuery {
    /// Only this tenant.
    pub tenant_id: Option<String>,
    /// Only nodes having this class.
    pub class: Option<String>,
    /// Only nodes in this embedding status.
    #[param(value_type = Option<EmbeddingStatusName>)]
    pub embedding_status: Option<String>,
    /// Only nodes with (true) or without (false) a stored vector.
    pub has_embedding: Option<bool>,
    /// Include soft-deleted nodes.
    pub include_deleted: Option<bool>,
    /// The `next_cursor` of the previous page.
    #[param(
        pattern = r"^[0-9]{1,16}_[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    )]
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

/// A node's embedding status.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // Only its schema is used: `EmbeddingStatus` parses the value.
enum EmbeddingStatusName {
    Queued,
    Processing,
    Ready,
    Failed,
    Skipped,
}

/// A page of nodes, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodePage {
    /// Nodes.
    pub nodes: Vec<NodeView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

fn parse_cursor(raw: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let bad = || ApiError::invalid("cursor is not a cursor from a previous page");
    let (at, id) = raw.split_once('_').ok_or_else(bad)?;
    // The shape the spec states, no looser: a cursor is only ever one this server made.
    if at.is_empty() || at.len() > 16 || !at.bytes().all(|b| b.is_ascii_digit()) || id.len() != 36 {
        return Err(bad());
    }
    let micros: i64 = at.parse().map_err(|_| bad())?;
    Ok((
        DateTime::from_timestamp_micros(micros).ok_or_else(bad)?,
        id.parse().map_err(|_| bad())?,
    ))
}

/// List nodes, newest first, with their embedding status.
#[utoipa::path(get, path = "/nodes", tag = "nodes", params(NodeQuery), security(("admin_token" = [])),
    responses((status = 200, body = NodePage), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn list_nodes(
    _: Admin,
    State(state): State<ApiState>,
    Query(query): Query<NodeQuery>,
) -> Result<Json<NodePage>, ApiError> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit must be from 1 to 500"));
    }
    optional_tenant(query.tenant_id.as_deref())?;
    if let Some(status) = &query.embedding_status {
        status
            .parse::<EmbeddingStatus>()
            .map_err(ApiError::invalid)?;
    }
    let filter = NodeFilter {
        tenant_id: query.tenant_id,
        class: query.class,
        embedding_status: query.embedding_status,
        has_embedding: query.has_embedding,
        include_deleted: query.include_deleted.unwrap_or(false),
        after: query.cursor.as_deref().map(parse_cursor).transpose()?,
        // One more than asked tells whether there is a next page.
        limit: limit + 1,
    };
    let mut nodes = crate::store::nodes::list(&state.pool, &filter).await?;
    let next_cursor = if nodes.len() as i64 > limit {
        nodes.truncate(limit as usize);
        nodes
            .last()
            .map(|n| format!("{}_{}", n.created_at.timestamp_micros(), n.id))
    } else {
        None
    };
    Ok(Json(NodePage {
        nodes: nodes.into_iter().map(NodeView::from).collect(),
        next_cursor,
    }))
}

/// One node with its embedding status.
#[utoipa::path(get, path = "/nodes/{id}", tag = "nodes", params(("id" = Uuid, Path, description = "Node id")),
    security(("admin_token" = [])),
    responses((status = 200, body = NodeView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_node(
    _: Admin,
    State(state): State<ApiState>,
    Path(raw): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    let id: Uuid = raw
        .parse()
        .map_err(|_| ApiError::invalid(format!("{raw:?} is not a node id (a UUID)")))?;
    crate::store::nodes::get(&state.pool, id)
        .await?
        .map(|n| Json(n.into()))
        .ok_or_else(|| ApiError::not_found(format!("node {id} was not found")))
}

/// A similarity search.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// Tenant whose nodes are searched.
    pub tenant_id: String,
    /// The text to find similar nodes for (not only blanks; at most 1 MiB).
    #[schema(pattern = r"\S", max_length = 1048576)]
    pub query: String,
    /// How many results, 1 to 100 (default 10). `top_k`, the original service's name, is taken too.
    #[schema(minimum = 1, maximum = 100)]
    #[serde(alias = "top_k")]
    pub k: Option<i64>,
    /// Only nodes having one of these classes.
    pub classes: Option<Vec<String>>,
}

/// One result.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SearchHit {
    /// The node.
    pub id: Uuid,
    /// Its classes.
    pub classes: Vec<String>,
    /// Its properties.
    #[schema(value_type = Object)]
    pub props: serde_json::Value,
    /// Cosine similarity to the query (1 is identical).
    pub score: f64,
}

/// Results, most similar first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SearchResponse {
    /// Results.
    pub results: Vec<SearchHit>,
    /// The model the query and vectors come from.
    pub model: String,
    /// `hnsw` (pgvector index) or `exact`.
    pub index: String,
}

/// Find a tenant's live nodes most similar to a text (cosine similarity of their embeddings).
#[utoipa::path(post, path = "/search", tag = "nodes", request_body = SearchRequest, security(("admin_token" = [])),
    responses((status = 200, body = SearchResponse), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 503, description = "The embedding backend is unavailable; see Retry-After", body = ErrorBody)))]
async fn search(
    _: Admin,
    State(state): State<ApiState>,
    Json(body): Json<SearchRequest>,
) -> Result<Json<SearchResponse>, ApiError> {
    let tenant = super::tenant(&body.tenant_id)?;
    let k = body.k.unwrap_or(10);
    if !(1..=100).contains(&k) {
        return Err(ApiError::invalid("k must be from 1 to 100"));
    }
    if body.query.trim().is_empty() || body.query.len() > workflow::MAX_TEXT_BYTES {
        return Err(ApiError::invalid(
            "query must be a non-empty text of at most 1 MiB",
        ));
    }
    let index = state
        .vector_index
        .get()
        .cloned()
        .unwrap_or_else(|| VectorIndex::Exact("not prepared yet".to_owned()));
    let hits = embeddings::search(
        &state.pool,
        &state.embeddings,
        &index,
        tenant.as_str(),
        &body.query,
        k,
        body.classes.as_deref(),
    )
    .await
    .map_err(|err| match err {
        SearchError::Other(err) => err.into(),
        SearchError::Embedding(err @ (EmbedError::Rejected(_) | EmbedError::Featureless)) => {
            ApiError::invalid(err.to_string().replace("the text", "the query"))
        }
        SearchError::Embedding(EmbedError::RateLimited { after, message }) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
                .retry_after(after)
        }
        SearchError::Embedding(EmbedError::Unavailable(reason)) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the embedding backend is unavailable: {reason}"),
        )
        .retry_after(std::time::Duration::from_secs(5)),
    })?;
    Ok(Json(SearchResponse {
        results: hits
            .into_iter()
            .map(|h| SearchHit {
                id: h.id,
                classes: h.classes,
                props: h.props,
                score: h.score,
            })
            .collect(),
        model: state.embeddings.model_id().to_owned(),
        index: if index == VectorIndex::Hnsw
            && state.embeddings.settings().dimensions as usize == INDEXED_DIMENSIONS
        {
            "hnsw"
        } else {
            "exact"
        }
        .to_owned(),
    }))
}
