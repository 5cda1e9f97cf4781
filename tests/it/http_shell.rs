//! The HTTP shell: health, readiness, metrics, admin auth, body limits, the JSON error shape, request ids,
//! OpenAPI and Swagger UI.

use activekg::app::Roles;
use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, TestApp, TestDb, assert_error, settings};

#[tokio::test]
async fn health_reports_version_uptime_and_a_reachable_migrated_database() {
    let app = TestApp::spawn().await;
    let response = app.get("/health").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(body["uptime_seconds"].is_u64());
    assert_eq!(body["database"]["reachable"], true);
    assert_eq!(body["database"]["migrated"], true);
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn readyz_answers_503_while_the_database_is_unreachable() {
    let db = TestDb::new().await;
    let mut unreachable = settings(
        &db,
        &[("ACTIVEKG_DSN", "postgres://postgres@127.0.0.1:9/nowhere")],
    );
    unreachable.database.pool_size = 2;
    let app = TestApp::start(db, unreachable, Roles::all()).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let message = assert_error(app.get("/readyz").await, 503, "not_ready").await;
    assert!(message.contains("migrations"), "{message}");
    let health: Value = app.get("/health").await.json().await.unwrap();
    assert_eq!(
        health["status"], "degraded",
        "health still answers, and says what is wrong: {health}"
    );
    assert_eq!(health["database"]["reachable"], false);
    assert!(health["database"]["error"].is_string());
    app.stop().await;
}

#[tokio::test]
async fn admin_routes_answer_401_without_the_token_or_with_a_wrong_one() {
    let app = TestApp::spawn().await;
    let response = app.get("/_admin/jobs").await;
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_error(response, 401, "unauthorized").await;
    let wrong = app
        .client
        .get(app.url("/_admin/jobs"))
        .bearer_auth("not-the-token-at-all-000")
        .send()
        .await
        .unwrap();
    assert_error(wrong, 401, "unauthorized").await;
    let prefix = app
        .client
        .get(app.url("/_admin/config"))
        .bearer_auth(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1])
        .send()
        .await
        .unwrap();
    assert_error(prefix, 401, "unauthorized").await;
    assert_eq!(app.admin_get("/_admin/jobs").await.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn without_admin_token_admin_routes_refuse_unless_the_dev_flag_opens_them() {
    let closed = TestApp::spawn_with(&[("ADMIN_TOKEN", "")], Roles::all()).await;
    let message = assert_error(
        closed.admin_get("/_admin/config").await,
        403,
        "admin_disabled",
    )
    .await;
    assert!(
        message.contains("ADMIN_TOKEN"),
        "the refusal says how to fix it: {message}"
    );
    closed.stop().await;

    let open = TestApp::spawn_with(
        &[
            ("ADMIN_TOKEN", ""),
            ("ACTIVEKG_ADMIN_AUTH_DISABLED", "true"),
        ],
        Roles::all(),
    )
    .await;
    assert_eq!(open.get("/_admin/config").await.status(), 200);
    open.stop().await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_with_413_in_the_json_shape() {
    let app = TestApp::spawn_with(&[("ACTIVEKG_MAX_BODY_BYTES", "2048")], Roles::all()).await;
    let big = json!({ "kind": "x".repeat(4096), "all": true });
    let message = assert_error(
        app.admin_post("/_admin/jobs/dlq/purge", &big).await,
        413,
        "payload_too_large",
    )
    .await;
    assert!(message.contains("larger"), "{message}");
    let small = json!({ "kind": "nothing-matches" });
    assert_eq!(
        app.admin_post("/_admin/jobs/dlq/purge", &small)
            .await
            .status(),
        200
    );
    app.stop().await;
}

#[tokio::test]
async fn every_error_has_the_same_json_shape() {
    let app = TestApp::spawn().await;
    let message = assert_error(app.get("/no/such/route").await, 404, "not_found").await;
    assert!(message.contains("/no/such/route"));
    let delete = app.client.delete(app.url("/health")).send().await.unwrap();
    assert_error(delete, 405, "method_not_allowed").await;
    let unknown_field = app
        .admin_post(
            "/_admin/jobs/dlq/replay",
            &json!({ "kind": "x", "colour": "red" }),
        )
        .await;
    let message = assert_error(unknown_field, 422, "invalid_request").await;
    assert!(
        message.contains("colour"),
        "the error names the unknown field: {message}"
    );
    let malformed = app
        .client
        .post(app.url("/_admin/jobs/dlq/replay"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_error(malformed, 400, "bad_request").await;
    // A JSON object without a Content-Type is taken as JSON (curl -d); anything else is not.
    let no_type = app
        .client
        .post(app.url("/_admin/jobs/dlq/replay"))
        .bearer_auth(ADMIN_TOKEN)
        .body("kind=ingest_object")
        .send()
        .await
        .unwrap();
    assert_error(no_type, 415, "unsupported_media_type").await;
    assert_error(
        app.admin_get("/_admin/jobs/not-a-number").await,
        400,
        "bad_request",
    )
    .await;
    let message = assert_error(
        app.admin_get("/_admin/jobs?limit=0").await,
        422,
        "invalid_request",
    )
    .await;
    assert!(message.contains("limit"), "{message}");
    assert_error(
        app.admin_get("/_admin/jobs/987654321").await,
        404,
        "not_found",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_a_given_one_is_kept() {
    let app = TestApp::spawn().await;
    let generated = app.get("/health").await;
    let id = generated.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let given = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "trace-me-123")
        .send()
        .await
        .unwrap();
    assert_eq!(given.headers()["x-request-id"], "trace-me-123");
    app.stop().await;
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_request_counters_and_database_gauges() {
    let app = TestApp::spawn().await;
    app.get("/health").await;
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = response.text().await.unwrap();
    assert!(
        text.contains(r#"http_requests_total{method="GET",route="/health",status="200"}"#),
        "{text}"
    );
    assert!(
        text.contains("# TYPE http_request_duration_seconds histogram"),
        "{text}"
    );
    // Sampled from the database at scrape: this app's own worker process is alive (once it has registered,
    // which follows readiness).
    crate::helpers::eventually(
        std::time::Duration::from_secs(10),
        "the worker gauge",
        || async {
            let text = app.get("/metrics").await.text().await.unwrap();
            text.contains("activekg_job_workers_alive{host=")
                .then_some(())
        },
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn the_config_endpoint_shows_effective_settings_without_secrets() {
    let app =
        TestApp::spawn_with(&[("PUBSUB_VERIFY_SECRET", "shh-very-secret")], Roles::all()).await;
    let config = app.admin_json("/_admin/config").await;
    assert_eq!(config["PURGER_RETENTION_DAYS"], "30");
    assert_eq!(config["PUBSUB_VERIFY_SECRET"], "<set>");
    assert_eq!(config["CONNECTOR_KEK_VERSIONS"], "V1");
    // What this server exposes, and to whom, is part of what it shows.
    assert_eq!(config["ACTIVEKG_DSN"], "<set: on this host>");
    assert_eq!(config["ACTIVEKG_JOBS_BACKEND"], "postgres");
    assert_eq!(config["PUBSUB_ALLOW_UNAUTHENTICATED"], "false");
    assert_eq!(config["ACTIVEKG_SNS_MAX_AGE_SECONDS"], "3600");
    assert_eq!(config["ACTIVEKG_HTTP_MAX_CONNECTIONS"], "1024");
    assert!(
        config["ACTIVEKG_LOCAL_ROOTS"]
            .as_str()
            .unwrap()
            .starts_with("<unset")
    );
    let text = config.to_string();
    for secret in [
        "shh-very-secret",
        ADMIN_TOKEN,
        crate::helpers::KEK,
        &app.db.name,
    ] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_committed_openapi_document_matches_the_code() {
    let generated = serde_json::to_string_pretty(&activekg::api::openapi()).unwrap();
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .unwrap_or_default();
    assert!(
        committed.trim_end() == generated.trim_end(),
        "openapi/openapi.json is out of date with the code. Regenerate it with:\n\n    cargo run -- openapi > openapi/openapi.json\n"
    );
    let spec: Value = serde_json::from_str(&generated).unwrap();
    for path in [
        "/health",
        "/readyz",
        "/metrics",
        "/_admin/jobs",
        "/_admin/jobs/{id}",
        "/_admin/jobs/dlq/replay",
        "/_admin/queues",
    ] {
        assert!(spec["paths"][path].is_object(), "{path} is in the spec");
    }
    assert_eq!(
        spec["components"]["securitySchemes"]["admin_token"]["scheme"],
        "bearer"
    );
    assert!(
        spec["paths"]["/_admin/jobs"]["get"]["security"].is_array(),
        "admin routes declare the bearer scheme"
    );
}

#[tokio::test]
async fn swagger_ui_and_the_spec_are_served_without_network_access() {
    let app = TestApp::spawn().await;
    let page = app.get("/docs/").await;
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("swagger-ui"));
    let bundle = app.get("/docs/swagger-ui-bundle.js").await;
    assert_eq!(bundle.status(), 200);
    assert!(
        bundle.text().await.unwrap().len() > 100_000,
        "the bundle is embedded, not fetched from a CDN"
    );
    let initializer = app
        .get("/docs/swagger-initializer.js")
        .await
        .text()
        .await
        .unwrap();
    assert!(initializer.contains("/openapi.json"), "{initializer}");
    let served: Value = app.get("/openapi.json").await.json().await.unwrap();
    let generated: Value = activekg::api::openapi();
    assert_eq!(served, generated);
    app.stop().await;
}

#[tokio::test]
async fn text_the_database_cannot_store_and_bodies_that_are_not_objects_are_refused_before_any_handler()
 {
    let app = TestApp::spawn_with(&[], Roles::all()).await;
    for path in [
        "/_admin/jobs/dlq?kind=%00",
        "/_admin/jobs?tenant_id=a%00b",
        "/_admin/connectors/s3?tenant_id=x%00",
        "/nodes?class=%00",
    ] {
        let message = assert_error(app.admin_get(path).await, 422, "invalid_request").await;
        assert!(message.contains("NUL"), "{path}: {message}");
    }
    let message = assert_error(
        app.admin_post("/nodes", &json!({"tenant_id": "acme", "classes": ["Doc"], "props": {"a": {"b": ["ok", "no\u{0}"]}}}))
            .await,
        422,
        "invalid_request",
    )
    .await;
    assert!(
        message.contains("props.a.b[1]"),
        "the field is named: {message}"
    );
    // serde would take a sequence for a struct: a rotation must not start from `[null, null]`.
    let message = assert_error(
        app.admin_post("/_admin/connectors/rotate_keys", &json!([null, null]))
            .await,
        422,
        "invalid_request",
    )
    .await;
    assert!(message.contains("JSON object"), "{message}");
    let jobs = app.admin_json("/_admin/jobs?kind=rotate_keys").await;
    assert_eq!(jobs["jobs"], json!([]), "no rotation was started");
    // The guide's `curl -d '{"dry_run": true}'` (no Content-Type: curl labels it a form) is taken as JSON.
    let dry_run = app
        .client
        .post(app.url("/_admin/connectors/rotate_keys"))
        .bearer_auth(crate::helpers::ADMIN_TOKEN)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"dry_run": true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(dry_run.status(), 200, "{}", dry_run.text().await.unwrap());
    // What is storable still goes through.
    assert_eq!(
        app.admin_get("/_admin/jobs/dlq?kind=ingest_object")
            .await
            .status(),
        200
    );
    app.stop().await;
}

#[tokio::test]
async fn no_two_schemas_of_the_spec_share_a_name() {
    let spec = activekg::api::openapi();
    let schemas = spec["components"]["schemas"].as_object().unwrap();
    // The embedding status names its own queue figures, apart from the jobs API's queue statistics.
    let embedding = &schemas["EmbeddingQueueView"]["properties"];
    assert!(embedding.get("retry_scheduled").is_some(), "{embedding}");
    assert!(schemas["QueueView"].to_string().contains("kinds"));
    assert_eq!(
        schemas["ScopeView"]["properties"]["queue"]["$ref"],
        "#/components/schemas/EmbeddingQueueView"
    );
}

#[tokio::test]
async fn json_numbers_mean_what_json_schema_says_and_every_stored_one_reads_back() {
    let app = TestApp::spawn_with(&[], Roles::all()).await;
    // JSON Schema counts 5.0 as an integer, so the spec's integer fields take it.
    let search = app
        .admin_post(
            "/search",
            &json!({"tenant_id": "acme", "query": "hello", "k": 5.0}),
        )
        .await;
    assert_eq!(search.status(), 200, "{}", search.text().await.unwrap());
    let message = assert_error(
        app.admin_post(
            "/search",
            &json!({"tenant_id": "acme", "query": "hello", "k": 5.5}),
        )
        .await,
        422,
        "invalid_request",
    )
    .await;
    assert!(message.contains('k'), "{message}");
    // The original service's `top_k` is the same field.
    let top_k = app
        .admin_post(
            "/search",
            &json!({"tenant_id": "acme", "query": "hello", "top_k": 0}),
        )
        .await;
    let message = assert_error(top_k, 422, "invalid_request").await;
    assert!(message.contains("k must be from 1 to 100"), "{message}");
    // PostgreSQL prints the largest doubles as 309-digit integers; they read back as the same numbers.
    let created = app
        .admin_post(
            "/nodes",
            &json!({"tenant_id": "acme", "classes": ["Doc"], "props": {"big": [f64::MAX, -f64::MAX, 1e300]}}),
        )
        .await;
    assert_eq!(created.status(), 201, "{}", created.text().await.unwrap());
    let page = app.admin_json("/nodes?tenant_id=acme").await;
    assert_eq!(
        page["nodes"][0]["props"]["big"],
        json!([f64::MAX, -f64::MAX, 1e300]),
        "{page}"
    );
    // A tenant filter no tenant could match is refused, as the spec's pattern says.
    for path in [
        "/_admin/jobs?tenant_id=%C3%97",
        "/_admin/jobs/dlq?tenant_id=a%20b",
    ] {
        assert_error(app.admin_get(path).await, 422, "invalid_request").await;
    }
    let message = assert_error(
        app.admin_post("/_admin/jobs/dlq/purge", &json!({"tenant_id": "a b"}))
            .await,
        422,
        "invalid_request",
    )
    .await;
    assert!(message.contains("tenant_id"), "{message}");
    app.stop().await;
}

#[tokio::test]
async fn a_process_listens_on_one_connection_for_every_room_that_waits_for_notifications() {
    let app = TestApp::spawn().await;
    let listening = || async {
        sqlx::query_scalar::<_, String>(
            "select query from pg_stat_activity where datname = $1 and query ilike 'listen %'",
        )
        .bind(&app.db.name)
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
    };
    // Listeners connect in the background once the roles start; give every one the time to.
    for _ in 0..50 {
        if !listening().await.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let listening = listening().await;
    assert_eq!(
        listening.len(),
        1,
        "the API, the workers and the config cache share one LISTEN connection: {listening:?}"
    );
    for channel in [
        activekg::store::jobs::NOTIFY_CHANNEL,
        activekg::store::jobs::CANCEL_CHANNEL,
        activekg::store::connectors::NOTIFY_CHANNEL,
    ] {
        assert!(listening[0].contains(channel), "{channel}: {listening:?}");
    }
    app.stop().await;
}
