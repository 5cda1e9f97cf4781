//! `/_admin/connectors`: register, read (secrets redacted), merge-patch, delete, enable/disable connector
//! configurations, and start key rotation. Every route needs the admin token.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Admin;
use super::error::{ApiError, ErrorBody};
use super::{ApiState, optional_tenant, tenant};
use crate::domain::Provider;
use crate::jobs::backfill_page;
use crate::jobs::engine;
use crate::jobs::purge_deleted::{self, PurgeDeleted};
use crate::jobs::rotate_keys::RotateKeys;
use crate::registry::ConnectorSummary;
use crate::store::connectors::RotationScope;
use crate::workflows::connector_check;

pub(super) fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_connectors))
        .routes(routes!(rotate_keys))
        .routes(routes!(purge_deleted))
        .routes(routes!(get_connector))
        .routes(routes!(register_connector))
        .routes(routes!(patch_connector, delete_connector))
        .routes(routes!(enable_connector))
        .routes(routes!(disable_connector))
        .routes(routes!(start_backfill))
        .routes(routes!(test_connector))
        .routes(routes!(ingest_object_now))
        .routes(routes!(backfill_status))
        .routes(routes!(list_polls))
}

fn provider(raw: &str) -> Result<Provider, ApiError> {
    raw.parse().map_err(ApiError::invalid)
}

/// A connector to test, and optionally one object to look for.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestRequest {
    /// Tenant.
    pub tenant_id: String,
    /// An object key to look up (stat only; nothing is downloaded).
    #[schema(max_length = 4096)]
    pub key: Option<String>,
}

/// One check of a connector test.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CheckView {
    /// configuration, access, object or notifications.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found, or what is wrong and what to do about it.
    pub detail: String,
}

/// What a connector test found.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TestReport {
    /// Whether every check passed.
    pub ok: bool,
    /// Each check, in order.
    pub checks: Vec<CheckView>,
}

/// Test a connector now: its configuration decrypts, its store lists the prefix with its credentials, an
/// object (if named) is there, and how changes reach this server. Problems are said in words, with what
/// to do; a failed check is an answer (200, `ok: false`), not an error.
#[utoipa::path(post, path = "/_admin/connectors/{provider}/test", tag = "connectors",
    params(("provider" = ProviderName, Path, description = "The storage provider")), request_body = TestRequest,
    security(("admin_token" = [])),
    responses((status = 200, body = TestReport), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn test_connector(
    _: Admin,
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    Json(body): Json<TestRequest>,
) -> Result<Json<TestReport>, ApiError> {
    let checks = connector_check::check(
        &state.registry,
        &tenant(&body.tenant_id)?,
        provider(&raw)?,
        body.key.as_deref(),
        &super::webhooks::delivery(&state),
    )
    .await?;
    Ok(Json(TestReport {
        ok: checks.iter().all(|c| c.ok),
        checks: checks
            .into_iter()
            .map(|c| CheckView {
                name: c.name.to_owned(),
                ok: c.ok,
                detail: c.detail,
            })
            .collect(),
    }))
}

/// One object to ingest now.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestRequest {
    /// Tenant.
    pub tenant_id: String,
    /// The object's key (inside the connector's prefix).
    #[schema(min_length = 1, max_length = 4096)]
    pub key: String,
}

/// An ingest queued.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IngestQueued {
    /// The job; follow it at `GET /_admin/jobs/{job_id}?wait_seconds=30`.
    pub job_id: i64,
}

/// Ingest one object now, whatever any event said (an object whose event was lost, or one document to see
/// through the pipeline). The store's current version is read; a missing object ends as a delete.
#[utoipa::path(post, path = "/_admin/connectors/{provider}/ingest", tag = "connectors",
    params(("provider" = ProviderName, Path, description = "The storage provider")), request_body = IngestRequest,
    security(("admin_token" = [])),
    responses((status = 202, body = IngestQueued), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The connector is disabled or unreadable", body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn ingest_object_now(
    _: Admin,
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    Json(body): Json<IngestRequest>,
) -> Result<(StatusCode, Json<IngestQueued>), ApiError> {
    let job = connector_check::ingest_now(
        &state.pool,
        &state.registry,
        &tenant(&body.tenant_id)?,
        provider(&raw)?,
        &body.key,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(IngestQueued { job_id: job.0 })))
}

/// A storage provider.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // Only its schema is used: `Provider` parses the value.
pub(super) enum ProviderName {
    S3,
    Gcs,
    Local,
}

/// A connector as the API shows it: secret fields are always `"<redacted>"`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConnectorView {
    /// Tenant.
    pub tenant_id: String,
    /// Provider.
    #[schema(value_type = ProviderName)]
    pub provider: Provider,
    /// Configuration, secrets redacted.
    #[schema(value_type = Object)]
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Whether ingestion runs for it.
    pub enabled: bool,
    /// Key version its secrets are encrypted with.
    pub key_version: u32,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

impl From<ConnectorSummary> for ConnectorView {
    fn from(c: ConnectorSummary) -> Self {
        Self {
            tenant_id: c.tenant_id,
            provider: c.provider,
            config: c.config,
            enabled: c.enabled,
            key_version: c.key_version,
            created_at: c.created_at,
            updated_at: c.updated_at,
        }
    }
}

/// A tenant's configuration for one provider.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigRequest {
    /// Tenant.
    pub tenant_id: String,
    /// Provider-specific configuration. s3: bucket, prefix, region, endpoint, force_path_style,
    /// access_key_id, secret_access_key, session_token; gcs: bucket, prefix, project, credentials_json,
    /// credentials_path, hmac_secret, endpoint, subscription; local: path, prefix; all: topic_allowlist,
    /// poll_interval_seconds, enabled. Unknown fields are refused. For PATCH, given keys replace stored
    /// ones and `null` removes one.
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
}

/// Names a tenant.
#[derive(Debug, Deserialize, ToSchema, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TenantQuery {
    /// Tenant.
    pub tenant_id: String,
}

/// Optional filters for listing.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this tenant.
    pub tenant_id: Option<String>,
    /// Only this provider.
    #[param(value_type = Option<ProviderName>)]
    pub provider: Option<String>,
}

/// Connectors.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConnectorList {
    /// Connectors, by tenant then provider.
    pub connectors: Vec<ConnectorView>,
}

/// List connectors, secrets redacted.
#[utoipa::path(get, path = "/_admin/connectors", tag = "connectors", params(ListQuery), security(("admin_token" = [])),
    responses((status = 200, body = ConnectorList), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn list_connectors(
    _: Admin,
    State(state): State<ApiState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<ConnectorList>, ApiError> {
    let tenant = query.tenant_id.as_deref().map(tenant).transpose()?;
    let provider = query.provider.as_deref().map(provider).transpose()?;
    let connectors = state.registry.summaries(tenant.as_ref(), provider).await?;
    Ok(Json(ConnectorList {
        connectors: connectors.into_iter().map(ConnectorView::from).collect(),
    }))
}

/// One tenant's connector for a provider, secrets redacted.
#[utoipa::path(get, path = "/_admin/connectors/{provider}", tag = "connectors",
    params(("provider" = ProviderName, Path, description = "The storage provider"), TenantQuery), security(("admin_token" = [])),
    responses((status = 200, body = ConnectorView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn get_connector(
    _: Admin,
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    Query(query): Query<TenantQuery>,
) -> Result<Json<ConnectorView>, ApiError> {
    let summary = state
        .registry
        .summary(&tenant(&query.tenant_id)?, provider(&raw)?)
        .await?;
    Ok(Json(summary.into()))
}

/// Register a tenant's connector: the configuration is validated, secrets are encrypted with the active key.
#[utoipa::path(post, path = "/_admin/connectors/{provider}/register", tag = "connectors",
    params(("provider" = ProviderName, Path, description = "The storage provider")), request_body = ConfigRequest,
    security(("admin_token" = [])),
    responses((status = 201, body = ConnectorView), (status = 401, body = ErrorBody),
        (status = 409, description = "The tenant already has a connector for this provider", body = ErrorBody),
        (status = 422, description = "Unknown provider, unknown field or invalid value", body = ErrorBody)))]
async fn register_connector(
    _: Admin,
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    Json(body): Json<ConfigRequest>,
) -> Result<(StatusCode, Json<ConnectorView>), ApiError> {
    let summary = state
        .registry
        .register(&tenant(&body.tenant_id)?, provider(&raw)?, body.config)
        .await?;
    Ok((StatusCode::CREATED, Json(summary.into())))
}

/// Merge changes into a connector's configuration (e.g. only `topic_allowlist`); `null` removes a field.
#[utoipa::path(patch, path = "/_admin/connectors/{provider}/config", tag = "connectors",
    params(("provider" = ProviderName, Path, description = "The storage provider")), request_body = ConfigRequest,
    security(("admin_token" = [])),
    responses((status = 200, body = ConnectorView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "A stored secret does not decrypt; send a new value for it", body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn patch_connector(
    _: Admin,
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    Json(body): Json<ConfigRequest>,
) -> Result<Json<ConnectorView>, ApiError> {
    let summary = state
        .registry
        .patch(&tenant(&body.tenant_id)?, provider(&raw)?, body.config)
        .await?;
    Ok(Json(summary.into()))
}

/// Delete a connector's configuration.
#[utoipa::path(delete, path = "/_admin/connectors/{provider}/config", tag = "connectors",
    params(("provider" = ProviderName, Path, description = "The storage provider"), TenantQuery), security(("admin_token" = [])),
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn delete_connector(
    _: Admin,
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    Query(query): Query<TenantQuery>,
) -> Result<StatusCode, ApiError> {
    state
        .registry
        .delete(&tenant(&query.tenant_id)?, provider(&raw)?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Turn ingestion for a connector on.
#[utoipa::path(post, path = "/_admin/connectors/{provider}/enable", tag = "connectors",
    params(("provider" = ProviderName, Path, description = "The storage provider")), request_body = TenantQuery,
    security(("admin_token" = [])),
    responses((status = 200, body = ConnectorView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn enable_connector(
    _: Admin,
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    Json(body): Json<TenantQuery>,
) -> Result<Json<ConnectorView>, ApiError> {
    let summary = state
        .registry
        .set_enabled(&tenant(&body.tenant_id)?, provider(&raw)?, true)
        .await?;
    Ok(Json(summary.into()))
}

/// Turn ingestion for a connector off (its configuration is kept).
#[utoipa::path(post, path = "/_admin/connectors/{provider}/disable", tag = "connectors",
    params(("provider" = ProviderName, Path, description = "The storage provider")), request_body = TenantQuery,
    security(("admin_token" = [])),
    responses((status = 200, body = ConnectorView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn disable_connector(
    _: Admin,
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    Json(body): Json<TenantQuery>,
) -> Result<Json<ConnectorView>, ApiError> {
    let summary = state
        .registry
        .set_enabled(&tenant(&body.tenant_id)?, provider(&raw)?, false)
        .await?;
    Ok(Json(summary.into()))
}

fn default_batch_size() -> u32 {
    100
}

/// Which connector configurations to re-encrypt with the active key.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// Only this tenant (all when absent or null).
    pub tenant_id: Option<String>,
    /// Only this provider.
    #[schema(value_type = Option<ProviderName>)]
    pub provider: Option<String>,
    /// Rows per batch, each batch its own transaction (1-10000, default 100).
    #[serde(default = "default_batch_size")]
    #[schema(minimum = 1, maximum = 10000)]
    pub batch_size: u32,
    /// Only count the rows that would be rotated.
    #[serde(default)]
    pub dry_run: bool,
}

/// A connector configuration a rotation cannot move.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FailingRow {
    /// Tenant.
    pub tenant_id: String,
    /// Provider.
    #[schema(value_type = ProviderName)]
    pub provider: String,
    /// The secret field that does not decrypt.
    pub field: String,
    /// Why.
    pub reason: String,
    /// The key version it is sealed with.
    pub key_version: u32,
}

/// A rotation run, or what one would do.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RotateResponse {
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// The key version rows move to.
    pub active_version: u32,
    /// Rows in scope not at the active version (exact; not capped by the batch size).
    pub rows_behind: u64,
    /// Dry run only: rows whose secrets do not decrypt with any configured key, which a rotation would
    /// leave where they are (`rows_failing` in all, the first 100 listed). Fix them before rotating:
    /// restore the missing `CONNECTOR_KEK_V<n>`, or re-register the connector with its secrets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_failing: Option<u64>,
    /// Dry run only: the first 100 of those rows and why each fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing: Option<Vec<FailingRow>>,
    /// The run's job; follow it at `GET /_admin/jobs/{job_id}` (its `progress` holds counts and failures).
    pub job_id: Option<i64>,
    /// True when a run was already active: `job_id` is that run.
    pub already_running: bool,
}

/// Re-encrypt connector secrets with the active key: starts (or reports) a durable, resumable rotation run.
#[utoipa::path(post, path = "/_admin/connectors/rotate_keys", tag = "connectors", request_body = RotateRequest,
    security(("admin_token" = [])),
    responses((status = 200, description = "Dry run, or a run already active", body = RotateResponse),
        (status = 202, description = "Rotation started", body = RotateResponse),
        (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn rotate_keys(
    _: Admin,
    State(state): State<ApiState>,
    Json(body): Json<RotateRequest>,
) -> Result<(StatusCode, Json<RotateResponse>), ApiError> {
    if !(1..=10_000).contains(&body.batch_size) {
        return Err(ApiError::invalid("batch_size must be from 1 to 10000"));
    }
    let scope = RotationScope {
        tenant_id: optional_tenant(body.tenant_id.as_deref())?.map(|t| t.to_string()),
        provider: body.provider.as_deref().map(provider).transpose()?,
    };
    let rows_behind = state.registry.count_behind(&scope).await?;
    let mut response = RotateResponse {
        dry_run: body.dry_run,
        active_version: state.registry.active_key_version(),
        rows_behind,
        rows_failing: None,
        failing: None,
        job_id: None,
        already_running: false,
    };
    if body.dry_run {
        let (total, rows) = state.registry.failing_rows(&scope, 100).await?;
        response.rows_failing = Some(total);
        response.failing = Some(
            rows.into_iter()
                .map(|f| FailingRow {
                    tenant_id: f.tenant_id,
                    provider: f.provider,
                    field: f.field,
                    reason: f.reason,
                    key_version: f.key_version,
                })
                .collect(),
        );
        return Ok((StatusCode::OK, Json(response)));
    }
    let run = RotateKeys {
        scope,
        batch_size: body.batch_size,
    };
    let (status, job_id, already_running) = start_run(&state, &run).await?;
    response.job_id = job_id;
    response.already_running = already_running;
    Ok((status, Json(response)))
}

/// A tenant filter: absent means all tenants.
/// Starts a run of a kind that is one at a time per scope: 202 with the new job's id, or 200 with the id of
/// the run already active (`true`).
async fn start_run<J: engine::Job>(
    state: &ApiState,
    run: &J,
) -> Result<(StatusCode, Option<i64>, bool), ApiError> {
    let mut conn = state
        .pool
        .acquire()
        .await
        .map_err(crate::error::Error::from)?;
    let enqueued = engine::enqueue(&mut conn, run).await?;
    let status = if enqueued.inserted {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, enqueued.id.map(|id| id.0), !enqueued.inserted))
}

/// What to purge.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// Only count what would go.
    #[serde(default)]
    pub dry_run: bool,
    /// Only this tenant's documents (all tenants when absent or null).
    pub tenant_id: Option<String>,
    /// Documents per batch, each batch its own transaction (1-100000; default `PURGER_BATCH_SIZE`).
    #[schema(minimum = 1, maximum = 100000)]
    pub batch_size: Option<u32>,
}

/// Rows a purge removes.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PurgeCountsView {
    /// Soft-deleted documents past retention.
    pub documents: i64,
    /// Their chunks.
    pub chunks: i64,
    /// Edges touching either.
    pub edges: i64,
}

/// A purge run, or what one would remove.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PurgeResponse {
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// The tenant in scope (null: all).
    pub tenant_id: Option<String>,
    /// `PURGER_RETENTION_DAYS`.
    pub retention_days: u32,
    /// Dry run: documents soft-deleted before this instant are counted.
    pub cutoff: Option<DateTime<Utc>>,
    /// Dry run: exactly what a run started now would remove.
    pub would_delete: Option<PurgeCountsView>,
    /// The run's job. Wait for its result with `GET /_admin/jobs/{job_id}?wait_seconds=60`; its `progress`
    /// holds the counts removed, batch by batch.
    pub job_id: Option<i64>,
    /// True when a run over the same scope was already active: `job_id` is that run.
    pub already_running: bool,
}

/// Hard-delete documents soft-deleted more than `PURGER_RETENTION_DAYS` ago, with their chunks and edges
/// (what the 02:00 UTC schedule runs), or count them with `dry_run`.
#[utoipa::path(post, path = "/_admin/connectors/purge_deleted", tag = "connectors", request_body = PurgeRequest,
    security(("admin_token" = [])),
    responses((status = 200, description = "Dry run, or a run already active", body = PurgeResponse),
        (status = 202, description = "Purge started", body = PurgeResponse),
        (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn purge_deleted(
    _: Admin,
    State(state): State<ApiState>,
    Json(body): Json<PurgeRequest>,
) -> Result<(StatusCode, Json<PurgeResponse>), ApiError> {
    let batch_size = body.batch_size.unwrap_or(state.settings.purger.batch_size);
    if !(1..=100_000).contains(&batch_size) {
        return Err(ApiError::invalid("batch_size must be from 1 to 100000"));
    }
    let tenant_id = optional_tenant(body.tenant_id.as_deref())?.map(|t| t.to_string());
    let retention_days = state.settings.purger.retention_days;
    let mut response = PurgeResponse {
        dry_run: body.dry_run,
        tenant_id: tenant_id.clone(),
        retention_days,
        cutoff: None,
        would_delete: None,
        job_id: None,
        already_running: false,
    };
    if body.dry_run {
        let cutoff = purge_deleted::cutoff(Utc::now(), retention_days);
        let counts = purge_deleted::dry_run(&state.pool, tenant_id.as_deref(), cutoff).await?;
        response.cutoff = Some(cutoff);
        response.would_delete = Some(PurgeCountsView {
            documents: counts.documents,
            chunks: counts.chunks,
            edges: counts.edges,
        });
        return Ok((StatusCode::OK, Json(response)));
    }
    let run = PurgeDeleted {
        tenant_id,
        batch_size,
        retention_days,
        tick: None,
    };
    let (status, job_id, already_running) = start_run(&state, &run).await?;
    response.job_id = job_id;
    response.already_running = already_running;
    Ok((status, Json(response)))
}

/// What to backfill.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackfillRequest {
    /// Tenant.
    pub tenant_id: String,
    /// Most objects to queue (all when absent).
    pub limit: Option<i64>,
    /// Key prefix to list (the connector's prefix when absent; must lie within it).
    pub prefix: Option<String>,
}

/// A started backfill.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BackfillStarted {
    /// Follow it at `GET /_admin/connectors/backfills/{run_id}`.
    pub run_id: uuid::Uuid,
    /// The first page's job.
    pub job_id: i64,
}

/// A backfill run's progress.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BackfillRunView {
    /// Run id.
    pub run_id: uuid::Uuid,
    /// Tenant.
    pub tenant_id: String,
    /// Provider.
    pub provider: String,
    /// Prefix listed.
    pub prefix: String,
    /// Most objects to queue, if limited.
    pub limit: Option<i64>,
    /// `running`, `completed` or `failed`.
    pub state: String,
    /// Pages listed.
    pub pages: i64,
    /// Objects listed.
    pub seen: i64,
    /// Ingest jobs queued.
    pub enqueued: i64,
    /// Objects whose same version was already queued.
    pub skipped: i64,
    /// Objects listed that cannot be ingested (a key with NUL, a file name that is not UTF-8).
    pub failed: i64,
    /// The first 100 of those, with why.
    #[schema(value_type = Vec<Object>)]
    pub failures: serde_json::Value,
    /// `api` (a backfill) or `poll` (a poller's pass).
    pub started_by: String,
    /// A poller's pass queues only objects changed at or after this.
    pub changed_since: Option<DateTime<Utc>>,
    /// Why it failed.
    pub error: Option<String>,
    /// Started.
    pub created_at: DateTime<Utc>,
    /// Finished.
    pub finished_at: Option<DateTime<Utc>>,
}

/// Queue every object under a prefix for ingestion, one listing page per durable job.
#[utoipa::path(post, path = "/_admin/connectors/{provider}/backfill", tag = "connectors",
    params(("provider" = ProviderName, Path, description = "The storage provider")), request_body = BackfillRequest,
    security(("admin_token" = [])),
    responses((status = 202, body = BackfillStarted), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The connector is disabled or unreadable", body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn start_backfill(
    _: Admin,
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    Json(body): Json<BackfillRequest>,
) -> Result<(StatusCode, Json<BackfillStarted>), ApiError> {
    let (run_id, job) = backfill_page::start(
        &state.pool,
        &state.registry,
        &tenant(&body.tenant_id)?,
        provider(&raw)?,
        body.prefix,
        body.limit,
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(BackfillStarted {
            run_id,
            job_id: job.0,
        }),
    ))
}

/// A backfill run's progress: pages, objects seen, queued and skipped.
#[utoipa::path(get, path = "/_admin/connectors/backfills/{run_id}", tag = "connectors",
    params(("run_id" = uuid::Uuid, Path, description = "Run id")), security(("admin_token" = [])),
    responses((status = 200, body = BackfillRunView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn backfill_status(
    _: Admin,
    State(state): State<ApiState>,
    Path(run_id): Path<uuid::Uuid>,
) -> Result<Json<BackfillRunView>, ApiError> {
    let run = backfill_page::status(&state.pool, run_id).await?;
    Ok(Json(BackfillRunView {
        run_id: run.id,
        tenant_id: run.tenant_id,
        provider: run.provider,
        prefix: run.prefix,
        limit: run.max_objects,
        state: run.state,
        pages: run.pages,
        seen: run.seen,
        enqueued: run.enqueued,
        skipped: run.skipped,
        failed: run.failed,
        failures: run.failures,
        started_by: run.started_by,
        changed_since: run.changed_since,
        error: run.error,
        created_at: run.created_at,
        finished_at: run.finished_at,
    }))
}

/// A polling connector's cursor and schedule.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PollView {
    /// Tenant.
    pub tenant_id: String,
    /// Provider.
    pub provider: String,
    /// The newest object change the last completed pass saw; the next pass queues changes from 10 minutes
    /// before it.
    pub watermark: Option<DateTime<Utc>>,
    /// The pass in flight (a backfill run: `GET /_admin/connectors/backfills/{run_id}`).
    pub current_run: Option<uuid::Uuid>,
    /// When the next pass may start.
    pub next_poll_at: DateTime<Utc>,
    /// Passes started.
    pub passes: i64,
    /// When the last pass completed.
    pub last_completed_at: Option<DateTime<Utc>>,
    /// Why the last pass failed.
    pub last_error: Option<String>,
}

/// Connectors with `poll_interval_seconds`: their cursors and the pass in flight.
#[utoipa::path(get, path = "/_admin/connectors/polls", tag = "connectors", security(("admin_token" = [])),
    responses((status = 200, body = Vec<PollView>), (status = 401, body = ErrorBody)))]
async fn list_polls(
    _: Admin,
    State(state): State<ApiState>,
) -> Result<Json<Vec<PollView>>, ApiError> {
    let polls = crate::store::polls::list(&state.pool).await?;
    Ok(Json(
        polls
            .into_iter()
            .map(|p| PollView {
                tenant_id: p.tenant_id,
                provider: p.provider,
                watermark: p.watermark,
                current_run: p.current_run,
                next_poll_at: p.next_poll_at,
                passes: p.passes,
                last_completed_at: p.last_completed_at,
                last_error: p.last_error,
            })
            .collect(),
    ))
}
