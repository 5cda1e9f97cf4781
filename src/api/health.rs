//! Liveness, readiness and metrics: `/health` (always answers, says what is wrong), `/readyz` (503 until the
//! schema is migrated and the database answers) and `/metrics` (Prometheus text format).

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;
use super::error::{ApiError, ErrorBody};
use crate::metrics::metrics;

pub(super) fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(readyz))
        .routes(routes!(prometheus_metrics))
}

/// Service health.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `degraded` when the database (or Redis, when jobs live there) does not answer.
    pub status: &'static str,
    /// The running version.
    pub version: &'static str,
    /// Seconds since the process started.
    pub uptime_seconds: u64,
    /// The database as this process sees it.
    pub database: DatabaseHealth,
    /// Redis as this process sees it, under `ACTIVEKG_JOBS_BACKEND=redis` (absent otherwise). While it does
    /// not answer, enqueues still succeed (they wait in PostgreSQL's outbox) but jobs in Redis do not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisHealth>,
}

/// Redis reachability, from the background check (once a second).
#[derive(Debug, Serialize, ToSchema)]
pub struct RedisHealth {
    /// Whether `PING` answered within 800 ms at the last check.
    pub reachable: bool,
    /// Round-trip time of that `PING`.
    pub latency_ms: Option<f64>,
    /// What is wrong, when unreachable, in general terms (the details are in the logs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Database reachability, from the background check (once a second, over a connection of its own).
#[derive(Debug, Serialize, ToSchema)]
pub struct DatabaseHealth {
    /// Whether `SELECT 1` answered within 800 ms at the last check.
    pub reachable: bool,
    /// Round-trip time of that query.
    pub latency_ms: Option<f64>,
    /// Whether this version's migrations are applied.
    pub migrated: bool,
    /// What is wrong, when unreachable, in general terms (the details are in the logs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Readiness.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// Always true (a process that is not ready answers 503).
    pub ready: bool,
}

/// Liveness and status: answers 200 at once while the process runs, and reports the database's state.
#[utoipa::path(get, path = "/health", tag = "system", responses((status = 200, body = Health)))]
async fn health(State(state): State<ApiState>) -> Json<Health> {
    let db = state.probe.reachability();
    let (reachable, latency_ms, error) = (
        db.reachable,
        db.latency.map(|l| l.as_secs_f64() * 1000.0),
        db.failure.map(str::to_owned),
    );
    let redis = state.redis_probe.as_ref().map(|probe| {
        let seen = probe.reachability();
        RedisHealth {
            reachable: seen.reachable,
            latency_ms: seen.latency.map(|l| l.as_secs_f64() * 1000.0),
            error: seen.failure.map(str::to_owned),
        }
    });
    let healthy = reachable && redis.as_ref().is_none_or(|r| r.reachable);
    Json(Health {
        status: if healthy { "ok" } else { "degraded" },
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        database: DatabaseHealth {
            reachable,
            latency_ms,
            migrated: state.migrated.load(Ordering::SeqCst),
            error,
        },
        redis,
    })
}

/// Readiness: 200 once migrations are applied and the database answers, else 503.
#[utoipa::path(get, path = "/readyz", tag = "system", responses(
    (status = 200, body = Ready),
    (status = 503, description = "Not ready: migrations pending or database unreachable", body = ErrorBody),
))]
async fn readyz(State(state): State<ApiState>) -> Result<Json<Ready>, ApiError> {
    if !state.migrated.load(Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "database migrations have not been applied yet",
        ));
    }
    let db = state.probe.reachability();
    if db.reachable {
        Ok(Json(Ready { ready: true }))
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!(
                "the database does not answer ({})",
                db.failure.unwrap_or("unreachable")
            ),
        ))
    }
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "system", responses(
    (status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String),
))]
async fn prometheus_metrics(State(state): State<ApiState>) -> impl IntoResponse {
    // A scrape must not fail because the database is slow: stale gauges beat no metrics.
    let sample = state.gauges.sample(
        &state.pool,
        state.redis_jobs.as_ref(),
        state.settings.jobs.orphan_timeout,
    );
    match tokio::time::timeout(Duration::from_secs(2), sample).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!(%err, "could not sample queue gauges"),
        Err(_) => tracing::debug!("sampling queue gauges timed out"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics().encode(),
    )
}
