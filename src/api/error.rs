//! The one place errors become HTTP: every 4xx/5xx leaves as `{"error": {"code", "message", "request_id"}}`.
//!
//! Domain errors map to statuses here; 5xx details are logged, not shown. Responses produced outside our
//! handlers (axum's extractor rejections, 404 and 405 from routing, 413 from the body limit) are rewritten
//! into the same shape by [`json_errors`], so a client only ever parses one error format.

use axum::Json;
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::Error;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code (e.g. `not_found`, `unauthorized`, `payload_too_large`).
    pub code: String,
    /// Human-readable explanation that says what to do.
    pub message: String,
    /// The request's id (also in the `x-request-id` header), for finding it in the logs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// An error on its way to becoming a response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<std::time::Duration>,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Adds a `Retry-After` header (whole seconds, rounded up).
    pub fn retry_after(mut self, after: std::time::Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// 422: the request's values are not acceptable.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::NotFound { .. } => Self::not_found(err.to_string()),
            Error::Invalid(message) => Self::invalid(message),
            Error::Conflict(message) => Self::new(StatusCode::CONFLICT, "conflict", message),
            Error::Unavailable(message) => {
                tracing::warn!(%message, "request failed: dependency unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "a dependency (the database) is unavailable; retry shortly",
                )
            }
            Error::Internal(err) => {
                tracing::error!(error = ?err, "request failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "an internal error occurred; it has been logged with this request's id",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(ErrorBody {
                error: ErrorDetail {
                    code: self.code.to_owned(),
                    message: self.message,
                    request_id: None,
                },
            }),
        )
            .into_response();
        if let Some(after) = self.retry_after {
            let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The default code for a status we did not produce ourselves.
fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::CONFLICT => "conflict",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "error",
    }
}

/// Middleware: gives every error response the JSON shape and the request id. Our own JSON errors get the id
/// added; anything else (plain-text rejections, empty 405s) is rewritten, keeping its text as the message.
pub async fn json_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let is_json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let mut value: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(value) if is_json => value,
        _ => {
            let text = String::from_utf8_lossy(&bytes).trim().to_owned();
            let message = match (status, text.is_empty()) {
                (StatusCode::PAYLOAD_TOO_LARGE, _) => {
                    "the request body is larger than this endpoint accepts".to_owned()
                }
                (StatusCode::METHOD_NOT_ALLOWED, true) => {
                    "this route does not accept that method".to_owned()
                }
                (_, true) => status.canonical_reason().unwrap_or("error").to_owned(),
                (_, false) => text,
            };
            serde_json::json!({"error": {"code": code_for(status), "message": message}})
        }
    };
    if let (Some(id), Some(error)) = (
        request_id,
        value.get_mut("error").and_then(|e| e.as_object_mut()),
    ) {
        error.insert("request_id".to_owned(), serde_json::Value::String(id));
    }
    let body = serde_json::to_vec(&value).unwrap_or_default();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}
