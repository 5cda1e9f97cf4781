//! Admin authentication: `Authorization: Bearer $ADMIN_TOKEN`, compared in constant time.
//!
//! Every admin handler takes [`Admin`] as an argument, so a route cannot forget it. Without ADMIN_TOKEN the
//! admin API refuses everyone (403), unless ACTIVEKG_ADMIN_AUTH_DISABLED=true opens it for development.

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use super::ApiState;
use super::error::ApiError;

/// Proof that the request carries the admin token.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<ApiState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        if state.settings.api.admin_auth_disabled {
            return Ok(Admin);
        }
        let Some(expected) = &state.settings.api.admin_token else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "admin_disabled",
                "the admin API is disabled because ADMIN_TOKEN is not set; set ADMIN_TOKEN on the server \
                 (e.g. to the output of `openssl rand -hex 32`) and send it as `Authorization: Bearer <token>`",
            ));
        };
        let presented = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        match presented {
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "admin routes need `Authorization: Bearer <ADMIN_TOKEN>`",
            )),
            Some(token) if bool::from(token.as_bytes().ct_eq(expected.expose().as_bytes())) => {
                Ok(Admin)
            }
            Some(_) => {
                tracing::warn!(path = %parts.uri.path(), "admin request with a wrong token");
                Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "the bearer token does not match ADMIN_TOKEN",
                ))
            }
        }
    }
}
