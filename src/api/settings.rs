//! `/_admin/config`: the effective configuration, so an operator can check what a replica runs with
//! without shell access. Secrets show only whether they are set.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;
use super::auth::Admin;
use super::error::ErrorBody;

pub(super) fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(effective_config))
}

/// The effective configuration by environment variable; secrets appear as `<set>` or `<unset>`.
#[utoipa::path(get, path = "/_admin/config", tag = "system", security(("admin_token" = [])),
    responses((status = 200, body = BTreeMap<String, String>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn effective_config(
    _: Admin,
    State(state): State<ApiState>,
) -> Json<BTreeMap<&'static str, String>> {
    Json(state.settings.describe())
}
