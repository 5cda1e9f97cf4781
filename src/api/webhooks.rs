//! `/_webhooks/s3` (SNS deliveries of S3 notifications) and `/_webhooks/gcs` (Pub/Sub pushes of GCS
//! notifications): authenticate, parse, and hand the changes to the intake workflow; answer 2xx only once the
//! jobs are committed. Bodies are capped at 1 MiB. Malformed bodies get a 400 with the reason.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;
use super::error::{ApiError, ErrorBody};
use crate::config::Settings;
use crate::domain::Provider;
use crate::jobs::confirm_sns_subscription::ConfirmSnsSubscription;
use crate::jobs::engine;
use crate::metrics::metrics;
use crate::webhooks::oidc::{OidcError, OidcVerifier};
use crate::webhooks::sns::{CertError, CertFetcher, SnsKind, SnsMessage};
use crate::webhooks::{pubsub, s3_events};
use crate::workflows::intake::{self, Intake};

/// Webhook bodies larger than this are refused (SNS messages are at most 256 KiB).
const BODY_LIMIT: usize = 1024 * 1024;

/// What webhooks verify with.
#[derive(Debug)]
pub struct Verifiers {
    /// SNS signing certificates.
    pub sns: CertFetcher,
    /// Google OIDC tokens, when `PUBSUB_VERIFY_OIDC=true`.
    pub oidc: Option<OidcVerifier>,
}

impl Verifiers {
    /// Built from the settings.
    pub fn new(settings: &Settings) -> Self {
        Self {
            sns: CertFetcher::new(settings.sns_cert_base_url.clone()),
            oidc: settings.pubsub_verify_oidc.then(|| {
                OidcVerifier::new(
                    settings.pubsub_oidc_jwks_url.clone(),
                    settings.pubsub_oidc_audience.clone().unwrap_or_default(),
                    settings.pubsub_oidc_email.clone(),
                )
            }),
        }
    }
}

pub(super) fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(s3_webhook))
        .routes(routes!(gcs_webhook))
        .routes(routes!(s3_health))
        .routes(routes!(gcs_health))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
}

/// What a webhook did with a delivery.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WebhookAnswer {
    /// accepted, duplicate, ignored, no_connector, test_event or subscription_confirmation.
    pub result: String,
    /// Ingest jobs queued.
    pub jobs: usize,
    /// Tenants they are for.
    pub tenants: Vec<String>,
}

fn answer(
    provider: Provider,
    result: &str,
    jobs: usize,
    tenants: Vec<String>,
) -> Json<WebhookAnswer> {
    metrics()
        .webhook_events
        .with_label_values(&[provider.as_str(), result])
        .inc();
    Json(WebhookAnswer {
        result: result.to_owned(),
        jobs,
        tenants,
    })
}

fn verified(provider: Provider, result: &str) {
    metrics()
        .webhook_verify
        .with_label_values(&[provider.as_str(), result])
        .inc();
}

fn refused(
    provider: Provider,
    result: &str,
    status: StatusCode,
    code: &'static str,
    message: String,
) -> ApiError {
    verified(provider, result);
    tracing::warn!(%provider, result, %message, "webhook verification failed");
    ApiError::new(status, code, message)
}

fn malformed(provider: Provider, reason: String) -> ApiError {
    metrics()
        .webhook_events
        .with_label_values(&[provider.as_str(), "malformed"])
        .inc();
    ApiError::new(StatusCode::BAD_REQUEST, "malformed", reason)
}

async fn route(
    state: &ApiState,
    provider: Provider,
    message_id: &str,
    topics: &[&str],
    changes: &[crate::webhooks::ObjectChange],
) -> Result<Json<WebhookAnswer>, ApiError> {
    let source = format!("webhook:{provider}");
    match intake::accept(
        &state.pool,
        &state.registry,
        provider,
        message_id,
        topics,
        changes,
        &source,
    )
    .await?
    {
        Intake::Accepted { jobs, tenants } => Ok(answer(provider, "accepted", jobs, tenants)),
        Intake::Duplicate => Ok(answer(provider, "duplicate", 0, Vec::new())),
        Intake::NoConnector => Ok(answer(provider, "no_connector", 0, Vec::new())),
        Intake::TopicRejected { tenants } => {
            metrics()
                .webhook_events
                .with_label_values(&[provider.as_str(), "rejected"])
                .inc();
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "topic_rejected",
                format!(
                    "topic not in allowlist: the {provider} connector of tenant(s) {} does not allow {topics:?}; \
                     add it to topic_allowlist with PATCH /_admin/connectors/{provider}/config",
                    tenants.join(", ")
                ),
            ))
        }
    }
}

/// Receive S3 event notifications delivered by SNS (an HTTP(S) subscription; the JSON arrives as text/plain).
#[utoipa::path(post, path = "/_webhooks/s3", tag = "webhooks",
    request_body(content = String, content_type = "text/plain", description = "An SNS message (JSON)"),
    responses((status = 200, description = "Processed; jobs are committed", body = WebhookAnswer),
        (status = 400, description = "Not an SNS message or not an S3 notification", body = ErrorBody),
        (status = 403, description = "Bad signature, refused certificate URL, or topic not allowed", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 503, description = "The signing certificate could not be fetched; SNS will retry", body = ErrorBody)))]
async fn s3_webhook(
    State(state): State<ApiState>,
    body: Bytes,
) -> Result<Json<WebhookAnswer>, ApiError> {
    let provider = Provider::S3;
    let message = SnsMessage::parse(&body).map_err(|reason| malformed(provider, reason))?;
    let kind = message
        .kind()
        .map_err(|reason| malformed(provider, reason))?;
    if state.settings.sns_verify {
        let key = match state
            .verifiers
            .sns
            .public_key(&message.signing_cert_url)
            .await
        {
            Ok(key) => key,
            Err(CertError::Refused(reason)) => {
                return Err(refused(
                    provider,
                    "cert_url_invalid",
                    StatusCode::FORBIDDEN,
                    "signature_invalid",
                    reason,
                ));
            }
            Err(CertError::Unavailable(reason)) => {
                return Err(refused(
                    provider,
                    "cert_unavailable",
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    format!("cannot fetch the signing certificate ({reason}); retry later"),
                ));
            }
        };
        message.verify(&key).map_err(|reason| {
            refused(
                provider,
                "signature_invalid",
                StatusCode::FORBIDDEN,
                "signature_invalid",
                reason,
            )
        })?;
        verified(provider, "signature_ok");
    } else {
        verified(provider, "skipped");
    }
    match kind {
        SnsKind::SubscriptionConfirmation => {
            let subscribe_url = message.subscribe_url.clone().unwrap_or_default();
            crate::webhooks::sns::check_subscribe_url(&subscribe_url).map_err(|reason| {
                ApiError::new(StatusCode::FORBIDDEN, "subscribe_url_refused", reason)
            })?;
            let mut conn = state
                .pool
                .acquire()
                .await
                .map_err(crate::error::Error::from)?;
            let confirm = ConfirmSnsSubscription {
                topic_arn: message.topic_arn.clone(),
                subscribe_url,
                message_id: message.message_id.clone(),
            };
            engine::enqueue(&mut conn, &confirm).await?;
            tracing::info!(topic = %message.topic_arn, "SNS subscription confirmation received; confirming");
            Ok(answer(provider, "subscription_confirmation", 0, Vec::new()))
        }
        SnsKind::UnsubscribeConfirmation => {
            tracing::info!(topic = %message.topic_arn, "SNS subscription removed");
            Ok(answer(provider, "ignored", 0, Vec::new()))
        }
        SnsKind::Notification => match s3_events::parse(&message.message)
            .map_err(|reason| malformed(provider, reason))?
        {
            None => Ok(answer(provider, "test_event", 0, Vec::new())),
            Some(changes) => {
                route(
                    &state,
                    provider,
                    &message.message_id,
                    &[message.topic_arn.as_str()],
                    &changes,
                )
                .await
            }
        },
    }
}

/// Authentication and routing hints on the push URL.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PushQuery {
    /// The shared token, when the subscription puts it in the URL rather than the `X-PubSub-Token` header.
    pub token: Option<String>,
    /// The topic the subscription reads (matched against tenants' `topic_allowlist`).
    pub topic: Option<String>,
}

/// Receive GCS object notifications pushed by a Pub/Sub subscription.
#[utoipa::path(post, path = "/_webhooks/gcs", tag = "webhooks", params(PushQuery),
    request_body(content = Object, description = "A Pub/Sub push envelope"),
    responses((status = 200, description = "Processed; jobs are committed", body = WebhookAnswer),
        (status = 400, description = "Not a push envelope of a GCS notification", body = ErrorBody),
        (status = 401, description = "No token", body = ErrorBody),
        (status = 403, description = "Wrong token, invalid OIDC token, or topic not allowed", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 503, description = "Google's keys could not be fetched; Pub/Sub will retry", body = ErrorBody)))]
async fn gcs_webhook(
    State(state): State<ApiState>,
    Query(query): Query<PushQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<WebhookAnswer>, ApiError> {
    let provider = Provider::Gcs;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(oidc) = &state.verifiers.oidc {
        match oidc.verify(header("authorization")).await {
            Ok(()) => verified(provider, "oidc_ok"),
            Err(OidcError::Missing) => {
                return Err(refused(provider, "token_missing", StatusCode::UNAUTHORIZED, "token_missing",
                    "the push carries no OIDC bearer token: enable authentication on the push subscription".to_owned()));
            }
            Err(OidcError::Invalid(reason)) => {
                return Err(refused(
                    provider,
                    "signature_invalid",
                    StatusCode::FORBIDDEN,
                    "token_invalid",
                    reason,
                ));
            }
            Err(OidcError::Unavailable(reason)) => {
                return Err(refused(
                    provider,
                    "keys_unavailable",
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    reason,
                ));
            }
        }
    } else if let Some(secret) = &state.settings.pubsub_verify_secret {
        match header("x-pubsub-token").or(query.token.as_deref()) {
            None => {
                return Err(refused(
                    provider,
                    "token_missing",
                    StatusCode::UNAUTHORIZED,
                    "token_missing",
                    "no X-PubSub-Token header or token query parameter".to_owned(),
                ));
            }
            Some(token) if pubsub::token_matches(token, secret.expose()) => {
                verified(provider, "secret_ok")
            }
            Some(_) => {
                return Err(refused(
                    provider,
                    "signature_invalid",
                    StatusCode::FORBIDDEN,
                    "token_invalid",
                    "the token does not match PUBSUB_VERIFY_SECRET".to_owned(),
                ));
            }
        }
    } else {
        verified(provider, "skipped");
    }
    let push = pubsub::parse(&body).map_err(|reason| malformed(provider, reason))?;
    let delivery = push.delivery_id();
    let Some(change) = push.change else {
        return Ok(answer(provider, "ignored", 0, Vec::new()));
    };
    let mut topics: Vec<&str> = vec![push.subscription.as_str()];
    topics.extend(header("x-goog-topic"));
    topics.extend(query.topic.as_deref());
    route(
        &state,
        provider,
        &delivery,
        &topics,
        std::slice::from_ref(&change),
    )
    .await
}

/// What a webhook depends on.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WebhookHealth {
    /// `ok`, or `degraded` when the database does not answer (deliveries would be refused with 5xx).
    pub status: String,
    /// How deliveries are authenticated: sns_signature, oidc, secret, or none.
    pub authentication: String,
    /// Whether the database answers.
    pub database_reachable: bool,
    /// Signing certificates (SNS) or keys (OIDC) cached.
    pub keys_cached: usize,
    /// Seconds since the OIDC keys were fetched.
    pub keys_age_seconds: Option<u64>,
}

fn database_up(state: &ApiState) -> bool {
    state.probe.reachability().reachable
}

/// 503 when degraded, so a load balancer or probe stops sending deliveries that would fail.
fn health(
    up: bool,
    authentication: &str,
    keys_cached: usize,
    keys_age_seconds: Option<u64>,
) -> (StatusCode, Json<WebhookHealth>) {
    let status = if up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(WebhookHealth {
            status: if up { "ok" } else { "degraded" }.to_owned(),
            authentication: authentication.to_owned(),
            database_reachable: up,
            keys_cached,
            keys_age_seconds,
        }),
    )
}

/// Status of what the S3 webhook depends on.
#[utoipa::path(get, path = "/_webhooks/s3/health", tag = "webhooks",
    responses((status = 200, body = WebhookHealth), (status = 503, description = "Degraded", body = WebhookHealth)))]
async fn s3_health(State(state): State<ApiState>) -> (StatusCode, Json<WebhookHealth>) {
    let authentication = if state.settings.sns_verify {
        "sns_signature"
    } else {
        "none"
    };
    health(
        database_up(&state),
        authentication,
        state.verifiers.sns.cached(),
        None,
    )
}

/// One Pub/Sub streaming-pull subscription of this process.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubscriberHealth {
    /// `projects/<p>/subscriptions/<s>`.
    pub subscription: String,
    /// The Pub/Sub endpoint, when not Google's.
    pub endpoint: Option<String>,
    /// Tenants whose GCS connectors name it.
    pub tenants: Vec<String>,
    /// Whether the stream is up (its last connection check passed).
    pub connected: bool,
    /// Reconnects since the process started.
    pub reconnects: u64,
    /// Messages handled.
    pub messages: u64,
    /// When the last message arrived.
    pub last_message_at: Option<DateTime<Utc>>,
    /// Why the last connection ended.
    pub last_error: Option<String>,
}

/// What the GCS webhook and the Pub/Sub subscriber depend on.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GcsHealth {
    /// The push webhook's dependencies.
    #[serde(flatten)]
    pub webhook: WebhookHealth,
    /// Streaming-pull subscriptions run by this process (connectors with a `subscription`).
    pub subscribers: Vec<SubscriberHealth>,
}

/// Status of what the GCS webhook depends on, and of this process's Pub/Sub subscribers.
#[utoipa::path(get, path = "/_webhooks/gcs/health", tag = "webhooks",
    responses((status = 200, body = GcsHealth), (status = 503, description = "Degraded", body = GcsHealth)))]
async fn gcs_health(State(state): State<ApiState>) -> (StatusCode, Json<GcsHealth>) {
    let (authentication, keys_cached, keys_age) = match &state.verifiers.oidc {
        Some(oidc) => {
            let (keys, age) = oidc.cache_state().await;
            ("oidc", keys, age.map(|a| a.as_secs()))
        }
        None if state.settings.pubsub_verify_secret.is_some() => ("secret", 0, None),
        None => ("none", 0, None),
    };
    let (status, Json(webhook)) =
        health(database_up(&state), authentication, keys_cached, keys_age);
    let subscribers = state
        .subscriptions
        .snapshot()
        .into_iter()
        .map(|s| SubscriberHealth {
            subscription: s.subscription,
            endpoint: s.endpoint,
            tenants: s.tenants,
            connected: s.connected,
            reconnects: s.reconnects,
            messages: s.messages,
            last_message_at: s.last_message_at,
            last_error: s.last_error,
        })
        .collect();
    (
        status,
        Json(GcsHealth {
            webhook,
            subscribers,
        }),
    )
}
