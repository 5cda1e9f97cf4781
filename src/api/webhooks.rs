//! `/_webhooks/s3` (SNS deliveries of S3 notifications) and `/_webhooks/gcs` (Pub/Sub pushes of GCS
//! notifications). Each provider has one verifying extractor ([`VerifiedSns`], [`VerifiedPush`]): a handler
//! only ever sees a delivery that passed, so the handlers just route the changes through the intake
//! workflow and answer 2xx once the jobs are committed. Bodies are capped at 1 MiB; malformed ones get a
//! 400 with the reason. Answers never name tenants.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::StatusCode;
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
use crate::webhooks::oidc::OidcVerifier;
use crate::webhooks::pubsub::{Push, PushRefusal, PushVerifier};
use crate::webhooks::sns::{CertFetcher, SnsKind, SnsMessage, SnsRefusal, SnsVerifier};
use crate::webhooks::{pubsub, s3_events};
use crate::workflows::intake::{self, Intake, TopicLookup};
use crate::workflows::pubsub_topics::TopicResolver;

/// Webhook bodies larger than this are refused (SNS messages are at most 256 KiB).
const BODY_LIMIT: usize = 1024 * 1024;

/// What webhooks verify with.
#[derive(Debug)]
pub struct Verifiers {
    /// SNS deliveries.
    pub sns: SnsVerifier,
    /// Pub/Sub pushes.
    pub push: PushVerifier,
    /// Which topic a pushing subscription reads.
    pub topics: TopicResolver,
}

impl Verifiers {
    /// Built from the settings.
    pub fn new(settings: &Settings) -> Self {
        Self {
            sns: SnsVerifier {
                certs: CertFetcher::new(settings.webhooks.sns_cert_base_url.clone()),
                check_signatures: settings.webhooks.sns_verify,
                max_age: settings.webhooks.sns_max_age,
            },
            push: PushVerifier {
                oidc: settings.webhooks.pubsub_verify_oidc.then(|| {
                    OidcVerifier::new(
                        settings.webhooks.pubsub_oidc_jwks_url.clone(),
                        settings
                            .webhooks
                            .pubsub_oidc_audience
                            .clone()
                            .unwrap_or_default(),
                        settings
                            .webhooks
                            .pubsub_oidc_email
                            .clone()
                            .unwrap_or_default(),
                    )
                }),
                secret: settings.webhooks.pubsub_verify_secret.clone(),
                allow_unauthenticated: settings.webhooks.pubsub_allow_unauthenticated,
            },
            topics: TopicResolver::default(),
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
}

fn answer(provider: Provider, result: &str, jobs: usize) -> Json<WebhookAnswer> {
    metrics()
        .webhook_events
        .with_label_values(&[provider.as_str(), result])
        .inc();
    Json(WebhookAnswer {
        result: result.to_owned(),
        jobs,
    })
}

fn verified(provider: Provider, result: &str) {
    let m = metrics();
    let counter = if provider == Provider::S3 {
        &m.webhook_sns_verify
    } else {
        &m.webhook_verify
    };
    counter
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

/// The body, under the route's limit.
async fn body(request: Request, state: &ApiState) -> Result<Bytes, ApiError> {
    Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            let status = rejection.status();
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "payload_too_large"
            } else {
                "bad_request"
            };
            ApiError::new(status, code, rejection.body_text())
        })
}

/// An SNS delivery whose shape, signature and age have been checked.
#[derive(Debug)]
pub struct VerifiedSns {
    message: SnsMessage,
    kind: SnsKind,
}

impl FromRequest<ApiState> for VerifiedSns {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &ApiState) -> Result<Self, ApiError> {
        let provider = Provider::S3;
        let body = body(request, state).await?;
        match state.verifiers.sns.verify(&body, Utc::now()).await {
            Ok((message, kind, result)) => {
                verified(provider, result);
                Ok(Self { message, kind })
            }
            Err(SnsRefusal::Malformed(reason)) => Err(malformed(provider, reason)),
            Err(SnsRefusal::CertUrl(reason)) => Err(refused(
                provider,
                "cert_url_invalid",
                StatusCode::FORBIDDEN,
                "signature_invalid",
                reason,
            )),
            Err(SnsRefusal::CertUnavailable(reason)) => Err(refused(
                provider,
                "cert_unavailable",
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("cannot fetch the signing certificate ({reason}); retry later"),
            )),
            Err(SnsRefusal::Signature(reason)) => Err(refused(
                provider,
                "signature_invalid",
                StatusCode::FORBIDDEN,
                "signature_invalid",
                reason,
            )),
            Err(SnsRefusal::Stale(reason)) => Err(refused(
                provider,
                "stale",
                StatusCode::FORBIDDEN,
                "stale_message",
                reason,
            )),
        }
    }
}

/// Authentication on the push URL.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PushQuery {
    /// The shared token, when the subscription puts it in the URL rather than the `X-PubSub-Token` header.
    pub token: Option<String>,
}

/// A Pub/Sub push whose credentials have been checked.
#[derive(Debug)]
pub struct VerifiedPush(Push);

impl FromRequest<ApiState> for VerifiedPush {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &ApiState) -> Result<Self, ApiError> {
        let provider = Provider::Gcs;
        let (authorization, token) = {
            let header = |name: &str| {
                request
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let token = header("x-pubsub-token")
                .or_else(|| request.uri().query().and_then(token_parameter));
            (header("authorization"), token)
        };
        match state
            .verifiers
            .push
            .verify(authorization.as_deref(), token.as_deref())
            .await
        {
            Ok(result) => verified(provider, result),
            Err(refusal) => {
                let (result, status, code, message) = match refusal {
                    PushRefusal::Missing { result, message } => {
                        (result, StatusCode::UNAUTHORIZED, "token_missing", message)
                    }
                    PushRefusal::Invalid { result, message } => {
                        (result, StatusCode::FORBIDDEN, "token_invalid", message)
                    }
                    PushRefusal::Unavailable(reason) => (
                        "keys_unavailable",
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        reason,
                    ),
                    PushRefusal::NotConfigured => (
                        "not_configured",
                        StatusCode::UNAUTHORIZED,
                        "authentication_not_configured",
                        "this server does not accept unauthenticated pushes: set PUBSUB_VERIFY_SECRET (and put the \
                         token on the push endpoint) or PUBSUB_VERIFY_OIDC with PUBSUB_OIDC_AUDIENCE and PUBSUB_OIDC_EMAIL"
                            .to_owned(),
                    ),
                };
                return Err(refused(provider, result, status, code, message));
            }
        }
        let body = body(request, state).await?;
        pubsub::parse(&body)
            .map(Self)
            .map_err(|reason| malformed(provider, reason))
    }
}

/// The `token` query parameter.
fn token_parameter(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name == "token").then(|| {
            percent_encoding::percent_decode_str(&value.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

async fn route(
    state: &ApiState,
    provider: Provider,
    message_id: &str,
    topics: &[&str],
    lookup: Option<TopicLookup<'_>>,
    changes: &[crate::webhooks::ObjectChange],
) -> Result<Json<WebhookAnswer>, ApiError> {
    let source = format!("webhook:{provider}");
    match intake::accept(
        &state.pool,
        &state.registry,
        provider,
        message_id,
        topics,
        lookup,
        changes,
        &source,
    )
    .await?
    {
        Intake::Accepted { jobs, .. } => Ok(answer(provider, "accepted", jobs)),
        Intake::Duplicate => Ok(answer(provider, "duplicate", 0)),
        Intake::NoConnector => Ok(answer(provider, "no_connector", 0)),
        Intake::TopicRejected { .. } => {
            metrics()
                .webhook_events
                .with_label_values(&[provider.as_str(), "rejected"])
                .inc();
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "topic_rejected",
                format!(
                    "topic not in allowlist: no connector reading this bucket allows {topics:?}; add the topic to \
                     its topic_allowlist with PATCH /_admin/connectors/{provider}/config"
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
        (status = 403, description = "Bad signature, refused certificate URL, a message too old to be anything \
            but a replay, a topic not allowed, or a subscription to a topic no connector allows", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 503, description = "The signing certificate could not be fetched; SNS will retry", body = ErrorBody)))]
async fn s3_webhook(
    State(state): State<ApiState>,
    VerifiedSns { message, kind }: VerifiedSns,
) -> Result<Json<WebhookAnswer>, ApiError> {
    let provider = Provider::S3;
    match kind {
        SnsKind::SubscriptionConfirmation => {
            let subscribe_url = message.subscribe_url.clone().unwrap_or_default();
            crate::webhooks::sns::check_subscribe_url(&subscribe_url).map_err(|reason| {
                ApiError::new(StatusCode::FORBIDDEN, "subscribe_url_refused", reason)
            })?;
            // Anyone can subscribe their own topic to this URL; only topics an operator allowed get in.
            let topic = message.topic_arn.as_str();
            let allowed = state
                .settings
                .webhooks
                .sns_topic_allowlist
                .iter()
                .any(|t| t == topic)
                || state.registry.topic_allowed(provider, topic).await?;
            if !allowed {
                tracing::warn!(%topic, "SNS subscription refused: the topic is not allowed; to allow it, add it to an S3 \
                    connector's topic_allowlist (PATCH /_admin/connectors/s3/config) or to ACTIVEKG_SNS_TOPIC_ALLOWLIST");
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "topic_not_allowed",
                    "this server confirms subscriptions only for topics it allows: add the topic ARN to an S3 \
                     connector's topic_allowlist or to ACTIVEKG_SNS_TOPIC_ALLOWLIST, then let SNS resend the confirmation",
                ));
            }
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
            tracing::info!(%topic, "SNS subscription confirmation received; confirming");
            Ok(answer(provider, "subscription_confirmation", 0))
        }
        SnsKind::UnsubscribeConfirmation => {
            tracing::info!(topic = %message.topic_arn, "SNS subscription removed");
            Ok(answer(provider, "ignored", 0))
        }
        SnsKind::Notification => match s3_events::parse(&message.message)
            .map_err(|reason| malformed(provider, reason))?
        {
            None => Ok(answer(provider, "test_event", 0)),
            Some(changes) => {
                route(
                    &state,
                    provider,
                    &message.message_id,
                    &[message.topic_arn.as_str()],
                    None,
                    &changes,
                )
                .await
            }
        },
    }
}

/// Receive GCS object notifications pushed by a Pub/Sub subscription.
#[utoipa::path(post, path = "/_webhooks/gcs", tag = "webhooks", params(PushQuery),
    request_body(content = Object, description = "A Pub/Sub push envelope"),
    responses((status = 200, description = "Processed; jobs are committed", body = WebhookAnswer),
        (status = 400, description = "Not a push envelope of a GCS notification", body = ErrorBody),
        (status = 401, description = "No credential, or none configured on this server", body = ErrorBody),
        (status = 403, description = "Wrong token, invalid OIDC token, or topic not allowed", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 503, description = "Google's keys, or the subscription's topic, could not be fetched; Pub/Sub will retry", body = ErrorBody)))]
async fn gcs_webhook(
    State(state): State<ApiState>,
    VerifiedPush(push): VerifiedPush,
) -> Result<Json<WebhookAnswer>, ApiError> {
    let provider = Provider::Gcs;
    let delivery = push.delivery_id();
    let Some(change) = push.change else {
        return Ok(answer(provider, "ignored", 0));
    };
    // A push names its subscription only; allowlists name topics, so the topic is asked of Pub/Sub.
    let lookup = push
        .subscription
        .as_deref()
        .map(|subscription| TopicLookup {
            resolver: &state.verifiers.topics,
            subscription,
        });
    let topics: Vec<&str> = push.subscription.iter().map(String::as_str).collect();
    route(
        &state,
        provider,
        &delivery,
        &topics,
        lookup,
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
    let authentication = if state.verifiers.sns.check_signatures {
        "sns_signature"
    } else {
        "none"
    };
    health(
        database_up(&state),
        authentication,
        state.verifiers.sns.certs.cached(),
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
    /// The topic it reads, as Pub/Sub says (matched against topic allowlists).
    pub topic: Option<String>,
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
    /// Messages acknowledged without jobs because no connector reading their bucket allows the topic.
    pub rejected: u64,
    /// Why the last of those was refused.
    pub last_rejection: Option<String>,
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

/// How pushes are authenticated, and the OIDC key cache's size and age.
fn push_authentication(state: &ApiState) -> (&'static str, usize, Option<u64>) {
    let push = &state.verifiers.push;
    match &push.oidc {
        Some(oidc) => {
            let (keys, age) = oidc.cache_state();
            let mode = if push.secret.is_some() {
                "oidc+secret"
            } else {
                "oidc"
            };
            (mode, keys, age.map(|a| a.as_secs()))
        }
        None if push.secret.is_some() => ("secret", 0, None),
        None if push.allow_unauthenticated => ("none", 0, None),
        None => ("refused", 0, None),
    }
}

/// How changes can reach this process, for a connector test.
pub(super) fn delivery(state: &ApiState) -> crate::workflows::connector_check::Delivery {
    crate::workflows::connector_check::Delivery {
        push_authentication: push_authentication(state).0.to_owned(),
        sns_signatures: state.verifiers.sns.check_signatures,
        subscriptions: state
            .subscriptions
            .snapshot()
            .into_iter()
            .map(|s| (s.subscription, s.connected, s.last_error))
            .collect(),
    }
}

/// Status of what the GCS webhook depends on, and of this process's Pub/Sub subscribers.
#[utoipa::path(get, path = "/_webhooks/gcs/health", tag = "webhooks",
    responses((status = 200, body = GcsHealth), (status = 503, description = "Degraded", body = GcsHealth)))]
async fn gcs_health(State(state): State<ApiState>) -> (StatusCode, Json<GcsHealth>) {
    let (authentication, keys_cached, keys_age) = push_authentication(&state);
    let (status, Json(webhook)) =
        health(database_up(&state), authentication, keys_cached, keys_age);
    let subscribers = state
        .subscriptions
        .snapshot()
        .into_iter()
        .map(|s| SubscriberHealth {
            subscription: s.subscription,
            endpoint: s.endpoint,
            topic: s.topic,
            connected: s.connected,
            reconnects: s.reconnects,
            messages: s.messages,
            last_message_at: s.last_message_at,
            last_error: s.last_error,
            rejected: s.rejected,
            last_rejection: s.last_rejection,
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
