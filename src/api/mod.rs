//! The HTTP API: one file per resource (its DTOs, handlers and router), the OpenAPI document generated from
//! those same routers, Swagger UI at `/docs`, and the middleware every request passes through (request id,
//! tracing, metrics, body limit, the JSON error shape).
//!
//! Only this room imports axum and utoipa. Handlers stay thin: extract, call one domain function, map.

pub mod auth;
pub mod connectors;
mod contract;
mod dashboard;
pub mod embedding;
pub mod error;
pub mod health;
mod input;
pub mod jobs;
pub mod nodes;
pub mod settings;
pub mod webhooks;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::config::Settings;
use crate::jobs::engine::stats::GaugeSampler;
use crate::metrics::metrics;
use crate::registry::Registry;
use error::ApiError;

/// What handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The database.
    pub pool: PgPool,
    /// Configuration.
    pub settings: Arc<Settings>,
    /// Process start, for uptime.
    pub started: Instant,
    /// Set once migrations are applied; `/readyz` answers 503 until then.
    pub migrated: Arc<AtomicBool>,
    /// Queue gauges, refreshed on scrape.
    pub gauges: Arc<GaugeSampler>,
    /// Connector configurations.
    pub registry: Arc<Registry>,
    /// Webhook signature and token verification (with their key caches).
    pub verifiers: Arc<webhooks::Verifiers>,
    /// The embedder (loaded on first search).
    pub embeddings: Arc<crate::embedding::Service>,
    /// How search finds neighbours; set once migrations are applied.
    pub vector_index: Arc<std::sync::OnceLock<crate::store::embeddings::VectorIndex>>,
    /// This process's Pub/Sub streaming subscriptions.
    pub subscriptions: crate::workflows::subscriber::Subscriptions,
    /// Whether the database answers, checked in the background (health checks read it).
    pub probe: Arc<crate::store::probe::Probe>,
    /// The connector and embedding jobs' store under `ACTIVEKG_JOBS_BACKEND=redis`.
    pub redis_jobs: Option<crate::store::redis_jobs::RedisJobs>,
    /// Whether Redis answers, checked in the background (health reads it), under the redis backend.
    pub redis_probe: Option<Arc<crate::store::probe::Probe>>,
}

impl ApiState {
    /// State for a process that has not migrated yet.
    pub fn new(
        pool: PgPool,
        settings: Arc<Settings>,
        registry: Arc<Registry>,
        embeddings: Arc<crate::embedding::Service>,
    ) -> Self {
        Self {
            probe: crate::store::probe::Probe::spawn(&pool),
            embeddings,
            vector_index: Arc::default(),
            redis_jobs: None,
            redis_probe: None,
            subscriptions: Default::default(),
            pool,
            registry,
            started: Instant::now(),
            migrated: Arc::new(AtomicBool::new(false)),
            gauges: Arc::new(GaugeSampler::new(
                Duration::from_secs(5),
                Some(crate::jobs::connector_backlog),
            )),
            verifiers: Arc::new(webhooks::Verifiers::new(&settings)),
            settings,
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "activekg",
        description = "Keeps a knowledge graph in sync with documents in cloud storage. Admin and data routes \
                       (`/_admin/*`, `/admin/*`, `/nodes`, `/search`) need `Authorization: Bearer $ADMIN_TOKEN`. \
                       Every error is an `ErrorBody`. No text anywhere (path, query, body, including \
                       free-form `props` and `config`) may hold a NUL character: it is refused with 422."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "system", description = "Health, readiness, metrics and configuration"),
        (name = "jobs", description = "Durable jobs: inspection, retry, cancel, dead-letter queue, queue statistics"),
        (name = "connectors", description = "Connector configurations (secrets encrypted, never returned) and key rotation"),
        (name = "webhooks", description = "Storage events: S3 via SNS, GCS via Pub/Sub push"),
        (name = "nodes", description = "Graph nodes with their embedding status, and similarity search"),
        (name = "embedding", description = "The embedding pipeline: status and requeue"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The server's ADMIN_TOKEN"))
                    .build(),
            ),
        );
    }
}

fn resources() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(health::router())
        .merge(settings::router())
        .merge(jobs::router())
        .merge(connectors::router())
        .merge(webhooks::router())
        .merge(nodes::router())
        .merge(embedding::router())
}

/// The OpenAPI document, generated from the same routers that serve requests. It is JSON rather than
/// utoipa's types because the rules added last (`contract`) use keywords those types do not hold.
pub fn openapi() -> serde_json::Value {
    finished(resources().into_openapi())
}

fn finished(mut spec: utoipa::openapi::OpenApi) -> serde_json::Value {
    spec.info.version = env!("CARGO_PKG_VERSION").to_owned();
    contract::complete(spec)
}

/// The whole HTTP application.
pub fn router(state: ApiState) -> Router {
    let max_body = state.settings.api.max_body_bytes;
    let (routes, spec) = resources().split_for_parts();
    let spec = finished(spec);
    routes
        // A route layer runs after routing, so the matched route is known for the metric's label.
        .route_layer(middleware::from_fn(record_metrics))
        .merge(SwaggerUi::new("/docs").external_url_unchecked("/openapi.json", spec))
        .merge(dashboard::router())
        .fallback(not_found)
        .with_state(state)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn(move |request, next| {
            input::storable_input(max_body, request, next)
        }))
        .layer(middleware::from_fn(error::json_errors))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request| {
                let id = request
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), request_id = %id)
            }),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// What a process without the API serves: `/health`, `/readyz` and `/metrics`.
pub fn probes_router(state: ApiState) -> Router {
    let (routes, _) = health::router().split_for_parts();
    routes
        .fallback(not_found)
        .with_state(state)
        .layer(middleware::from_fn(error::json_errors))
}

/// A tenant id from a request, refused with a 422 that says what is wrong with it.
fn tenant(raw: &str) -> Result<crate::domain::TenantId, ApiError> {
    crate::domain::TenantId::parse(raw).map_err(ApiError::invalid)
}

/// An optional tenant filter: one no tenant could match is a mistake worth saying, not an empty answer.
fn optional_tenant(raw: Option<&str>) -> Result<Option<crate::domain::TenantId>, ApiError> {
    raw.map(tenant).transpose()
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    ))
}

async fn record_metrics(request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    // The matched route, not the raw path, keeps label cardinality bounded.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(String::new, |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let m = metrics();
    m.http_requests
        .with_label_values(&[&method, &route, response.status().as_str()])
        .inc();
    m.http_duration
        .with_label_values(&[&method, &route])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// How much of itself the server lets clients take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, and the most a kept-alive connection may sit idle.
    pub header_timeout: std::time::Duration,
    /// Time a client has to send a request's body.
    pub body_timeout: std::time::Duration,
    /// Time a request may take in all (long enough for `wait_seconds` of up to 120 s).
    pub request_timeout: std::time::Duration,
}

/// Serves `router` on `listener` until `shutdown`, then finishes in-flight requests (for at most 30 s).
///
/// A client that opens connections and sends nothing (or a byte at a time) holds each for at most the
/// header timeout, and never more than `max_connections` at once: the process keeps file descriptors for
/// its database and its other clients.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    limits: ServerLimits,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let router = router
        .layer(tower_http::timeout::RequestBodyDeadlineLayer::new(
            limits.body_timeout,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut refused: u64 = 0;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors (or a connection reset before accept): wait a moment
                // rather than spin.
                tracing::warn!(%err, "could not accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if refused == 1 || refused.is_multiple_of(1000) {
                tracing::warn!(
                    limit = limits.max_connections,
                    refused,
                    "too many open connections (ACTIVEKG_HTTP_MAX_CONNECTIONS): closing new ones at once"
                );
            }
            metrics()
                .http_connections_refused
                .with_label_values(&[] as &[&str])
                .inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone().map_request(
            |request: axum::http::Request<hyper::body::Incoming>| {
                request.map(axum::body::Body::new)
            },
        ));
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(std::time::Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within 30 s of shutdown");
    }
    Ok(())
}
