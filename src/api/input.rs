//! The one check every request passes before routing: text PostgreSQL cannot store (a NUL character) in the
//! path, the query or a JSON body is refused here with the field named, and a JSON body must be an object,
//! as every body in the spec is. Without it a NUL reached the database and came back as a 500, and serde's
//! sequence form of a struct (`[null, null]`) was taken as a request.
//!
//! A JSON object sent without a JSON content type (`curl -d` labels it a form) is taken as JSON, and a
//! number with no fraction (`25.0`) is an integer, as JSON Schema counts it: the spec's integer fields
//! accept what the spec says they accept.
//! Webhooks are left to their own parsers, which count what they refuse.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::domain::nul_in;

fn refuse(message: String) -> Response {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message).into_response()
}

fn decoded(text: &str) -> std::borrow::Cow<'_, [u8]> {
    percent_encoding::percent_decode_str(text).into()
}

/// Middleware: see the module docs. `max_body` is the body limit the extractors apply too.
pub(super) async fn storable_input(max_body: usize, request: Request, next: Next) -> Response {
    let uri = request.uri();
    if decoded(uri.path()).contains(&0) {
        return refuse(
            "the path contains a NUL character (%00), which this service cannot store".to_owned(),
        );
    }
    if let Some(query) = uri.query() {
        for pair in query.split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if decoded(name).contains(&0) || decoded(&value.replace('+', " ")).contains(&0) {
                let name = String::from_utf8_lossy(&decoded(name)).replace('\0', "\\0");
                return refuse(format!(
                    "query parameter {name} contains a NUL character (%00), which this service cannot store"
                ));
            }
        }
    }
    // `curl -d` without `-H Content-Type` labels a body as a form (the guide's own commands do): a body
    // that is a JSON object is taken as JSON whatever it is labelled, if it is labelled as nothing else.
    let label = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let labelled_json = label
        .as_deref()
        .is_some_and(|v| v.starts_with("application/json"));
    let unlabelled = label
        .as_deref()
        .is_none_or(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !(labelled_json || unlabelled) || uri.path().starts_with("/_webhooks/") {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, max_body).await else {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {max_body} bytes (ACTIVEKG_MAX_BODY_BYTES)"),
        )
        .into_response();
    };
    // Bodies that are not JSON at all are left to the handler's extractor, which says why.
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(mut value) if labelled_json || value.is_object() => {
            if !value.is_object() {
                return refuse("the body must be a JSON object".to_owned());
            }
            if let Some(path) = nul_in(&value) {
                return refuse(format!(
                    "{path} contains a NUL character (\\u0000), which this service cannot store"
                ));
            }
            parts.headers.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            if whole_numbers_as_integers(&mut value) {
                let rewritten = serde_json::to_vec(&value).expect("a parsed value serialises");
                parts.headers.remove(header::CONTENT_LENGTH);
                return next
                    .run(Request::from_parts(parts, Body::from(rewritten)))
                    .await;
            }
        }
        _ => {}
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Rewrites every float without a fraction that an `i64` holds exactly as that integer; says whether any was.
fn whole_numbers_as_integers(value: &mut serde_json::Value) -> bool {
    /// 2^53: above it an f64 no longer names one integer.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match value {
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() <= EXACT => {
                *n = serde_json::Number::from(f as i64);
                true
            }
            _ => false,
        },
        serde_json::Value::Array(items) => items
            .iter_mut()
            .fold(false, |any, item| whole_numbers_as_integers(item) | any),
        serde_json::Value::Object(fields) => fields
            .values_mut()
            .fold(false, |any, item| whole_numbers_as_integers(item) | any),
        _ => false,
    }
}
