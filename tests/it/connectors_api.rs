//! Connector configurations over HTTP: register, read back redacted, merge-patch, delete, enable/disable,
//! validation errors, and no secret ever leaving the process (responses, logs, Debug output).

use activekg::crypto::Sealed;
use activekg::domain::{Provider, TenantId};
use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, TestApp, assert_error, registry};

const SECRET_KEY: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
const ACCESS_KEY: &str = "AKIAIOSFODNN7EXAMPLE";
const GCS_KEY: &str =
    r#"{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----SECRETMATERIAL"}"#;

fn s3_config() -> Value {
    json!({
        "bucket": "acme-docs", "prefix": "kb/", "region": "us-east-1",
        "access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY,
        "topic_allowlist": ["arn:aws:sns:us-east-1:123456789012:activekg"], "enabled": true
    })
}

async fn register(app: &TestApp, provider: &str, tenant: &str, config: Value) -> reqwest::Response {
    app.admin_post(
        &format!("/_admin/connectors/{provider}/register"),
        &json!({"tenant_id": tenant, "config": config}),
    )
    .await
}

async fn patch(app: &TestApp, provider: &str, tenant: &str, config: Value) -> reqwest::Response {
    app.client
        .patch(app.url(&format!("/_admin/connectors/{provider}/config")))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"tenant_id": tenant, "config": config}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_registered_connector_is_stored_encrypted_and_read_back_redacted() {
    let app = TestApp::spawn().await;
    let created = register(&app, "s3", "acme-corp", s3_config()).await;
    assert_eq!(created.status(), 201);
    let view: Value = created.json().await.unwrap();
    assert_eq!(view["config"]["bucket"], "acme-docs");
    assert_eq!(view["config"]["secret_access_key"], "<redacted>");
    assert_eq!(view["config"]["access_key_id"], "<redacted>");
    assert!(
        view["config"].get("enabled").is_none(),
        "enabled is a column, not config"
    );
    assert_eq!(
        (view["enabled"].as_bool(), view["key_version"].as_u64()),
        (Some(true), Some(1))
    );

    let stored: Value =
        sqlx::query_scalar("SELECT config FROM connector_configs WHERE tenant_id = 'acme-corp'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert!(
        !stored.to_string().contains(SECRET_KEY),
        "the secret is not stored in the clear: {stored}"
    );
    let sealed = Sealed::from_value(&stored["secret_access_key"]).expect("stored sealed");
    assert_eq!(sealed.kek_version, 1);
    assert_eq!(
        stored["bucket"], "acme-docs",
        "non-secret fields stay queryable"
    );

    // A worker reads it decrypted and typed.
    let connector = registry(&app.db.pool)
        .load(&TenantId::parse("acme-corp").unwrap(), Provider::S3)
        .await
        .unwrap()
        .unwrap();
    match connector.config.as_ref() {
        activekg::connectors::ConnectorConfig::S3(s3) => {
            assert_eq!(s3.secret_access_key.as_ref().unwrap().expose(), SECRET_KEY);
            assert_eq!(s3.access_key_id.as_ref().unwrap().expose(), ACCESS_KEY);
        }
        other => panic!("expected s3, got {other:?}"),
    }

    let one = app
        .admin_json("/_admin/connectors/s3?tenant_id=acme-corp")
        .await;
    assert_eq!(one["config"]["secret_access_key"], "<redacted>");
    let all = app.admin_json("/_admin/connectors").await;
    assert_eq!(all["connectors"].as_array().unwrap().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn patch_merges_given_fields_and_null_removes_one() {
    let app = TestApp::spawn().await;
    register(&app, "s3", "acme", s3_config()).await;
    let topics = json!(["arn:aws:sns:us-east-1:123456789012:other"]);
    let patched = patch(
        &app,
        "s3",
        "acme",
        json!({"topic_allowlist": topics, "region": null}),
    )
    .await;
    assert_eq!(patched.status(), 200);
    let view: Value = patched.json().await.unwrap();
    assert_eq!(view["config"]["topic_allowlist"], topics);
    assert!(
        view["config"].get("region").is_none(),
        "null removed the field"
    );
    assert_eq!(
        view["config"]["prefix"], "kb/",
        "fields not in the patch are kept"
    );
    let connector = registry(&app.db.pool)
        .load(&TenantId::parse("acme").unwrap(), Provider::S3)
        .await
        .unwrap()
        .unwrap();
    let activekg::connectors::ConnectorConfig::S3(s3) = connector.config.as_ref() else {
        panic!()
    };
    assert_eq!(
        s3.secret_access_key.as_ref().unwrap().expose(),
        SECRET_KEY,
        "untouched secrets survive a patch"
    );

    let invalid = patch(&app, "s3", "acme", json!({"access_key_id": null})).await;
    let message = assert_error(invalid, 422, "invalid_request").await;
    assert!(message.contains("go together"), "{message}");
    assert_error(
        patch(&app, "s3", "nobody", json!({"prefix": "x"})).await,
        404,
        "not_found",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn delete_removes_a_connector_and_disable_keeps_it_switched_off() {
    let app = TestApp::spawn().await;
    register(
        &app,
        "gcs",
        "acme",
        json!({"bucket": "acme-gcs", "credentials_json": GCS_KEY}),
    )
    .await;
    let off: Value = app
        .admin_post(
            "/_admin/connectors/gcs/disable",
            &json!({"tenant_id": "acme"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(off["enabled"], false);
    let on: Value = app
        .admin_post(
            "/_admin/connectors/gcs/enable",
            &json!({"tenant_id": "acme"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(on["enabled"], true);

    let delete = |tenant: &'static str| {
        let request = app
            .client
            .delete(app.url(&format!("/_admin/connectors/gcs/config?tenant_id={tenant}")))
            .bearer_auth(ADMIN_TOKEN);
        async move { request.send().await.unwrap() }
    };
    assert_eq!(delete("acme").await.status(), 204);
    assert_error(
        app.admin_get("/_admin/connectors/gcs?tenant_id=acme").await,
        404,
        "not_found",
    )
    .await;
    assert_error(delete("acme").await, 404, "not_found").await;
    app.stop().await;
}

#[tokio::test]
async fn bad_requests_get_a_clear_422_or_409_and_nothing_is_written() {
    let app = TestApp::spawn().await;
    let message = assert_error(
        register(&app, "azure", "acme", json!({"bucket": "b"})).await,
        422,
        "invalid_request",
    )
    .await;
    assert!(message.contains("s3, gcs or local"), "{message}");
    let message = assert_error(
        register(
            &app,
            "gcs",
            "acme",
            json!({"bucket": "acme-gcs", "colour": "red"}),
        )
        .await,
        422,
        "invalid_request",
    )
    .await;
    assert!(
        message.contains("unknown field `colour`"),
        "the unknown field is named: {message}"
    );
    let message = assert_error(
        register(&app, "s3", "bad tenant!", s3_config()).await,
        422,
        "invalid_request",
    )
    .await;
    assert!(message.contains("tenant_id"), "{message}");
    assert_error(
        register(&app, "local", "acme", json!({"path": "relative"})).await,
        422,
        "invalid_request",
    )
    .await;
    assert_error(
        register(&app, "s3", "acme", json!("not an object")).await,
        422,
        "invalid_request",
    )
    .await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM connector_configs")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "refused registrations write nothing");

    assert_eq!(
        register(&app, "local", "acme", json!({"path": "/srv/docs"}))
            .await
            .status(),
        201
    );
    let message = assert_error(
        register(&app, "local", "acme", json!({"path": "/srv/other"})).await,
        409,
        "conflict",
    )
    .await;
    assert!(
        message.contains("PATCH"),
        "the conflict says what to do: {message}"
    );
    let message = assert_error(
        app.admin_post("/_admin/connectors/rotate_keys", &json!({"batch_size": 0}))
            .await,
        422,
        "invalid_request",
    )
    .await;
    assert!(message.contains("batch_size"));
    app.stop().await;
}

#[tokio::test]
async fn no_secret_appears_in_any_response_log_line_or_debug_output() {
    // Every log line, at every level, from the test's own thread (the app runs on it).
    let logs = crate::helpers::Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let app = TestApp::spawn().await;
    let mut bodies = Vec::new();
    for response in [
        register(&app, "s3", "acme", s3_config()).await,
        register(
            &app,
            "gcs",
            "acme",
            json!({"bucket": "acme-gcs", "credentials_json": GCS_KEY}),
        )
        .await,
        patch(
            &app,
            "s3",
            "acme",
            json!({"secret_access_key": format!("{SECRET_KEY}-2")}),
        )
        .await,
        patch(&app, "s3", "acme", json!({"access_key_id": null})).await,
        app.admin_get("/_admin/connectors").await,
        app.admin_get("/_admin/connectors/gcs?tenant_id=acme").await,
        app.admin_post("/_admin/connectors/rotate_keys", &json!({"dry_run": true}))
            .await,
        app.admin_get("/_admin/jobs").await,
        app.get("/metrics").await,
    ] {
        bodies.push(response.text().await.unwrap());
    }
    let registry = registry(&app.db.pool);
    let loaded = registry
        .load(&TenantId::parse("acme").unwrap(), Provider::Gcs)
        .await
        .unwrap()
        .unwrap();
    let debug = format!(
        "{loaded:?} {registry:?} {:?}",
        registry.summaries(None, None).await.unwrap()
    );
    app.stop().await;

    let logs = logs.text();
    assert!(
        logs.contains("connector registered"),
        "the capture saw the app's logs"
    );
    for secret in [
        SECRET_KEY,
        ACCESS_KEY,
        "SECRETMATERIAL",
        crate::helpers::KEK,
    ] {
        for (what, text) in [
            ("a response", bodies.join("\n")),
            ("the logs", logs.clone()),
            ("Debug output", debug.clone()),
        ] {
            assert!(!text.contains(secret), "{secret} appeared in {what}");
        }
    }
}

#[tokio::test]
async fn a_backfill_is_started_and_followed_through_the_api() {
    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    for i in 0..5 {
        std::fs::write(
            dir.path().join(format!("note-{i}.txt")),
            format!("Note number {i}."),
        )
        .unwrap();
    }
    register(
        &app,
        "local",
        "acme",
        json!({"path": dir.path().display().to_string()}),
    )
    .await;
    let refused = app
        .admin_post(
            "/_admin/connectors/local/backfill",
            &json!({"tenant_id": "acme", "limit": 0}),
        )
        .await;
    assert_error(refused, 422, "invalid_request").await;
    assert_error(
        app.admin_post(
            "/_admin/connectors/s3/backfill",
            &json!({"tenant_id": "acme"}),
        )
        .await,
        404,
        "not_found",
    )
    .await;

    let started = app
        .admin_post(
            "/_admin/connectors/local/backfill",
            &json!({"tenant_id": "acme", "limit": 3}),
        )
        .await;
    assert_eq!(started.status(), 202);
    let started: Value = started.json().await.unwrap();
    let run = crate::helpers::eventually(
        std::time::Duration::from_secs(15),
        "the backfill to complete",
        || async {
            let run = app
                .admin_json(&format!(
                    "/_admin/connectors/backfills/{}",
                    started["run_id"].as_str().unwrap()
                ))
                .await;
            (run["state"] == "completed").then_some(run)
        },
    )
    .await;
    assert_eq!(
        (
            run["seen"].as_i64(),
            run["enqueued"].as_i64(),
            run["limit"].as_i64()
        ),
        (Some(5), Some(3), Some(3)),
        "{run}"
    );
    let ingests = app.admin_json("/_admin/jobs?kind=ingest_object").await;
    assert_eq!(
        ingests["jobs"].as_array().unwrap().len(),
        3,
        "the limit caps what is queued"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_connector_test_says_in_words_what_works_and_what_does_not_and_one_object_can_be_ingested_now()
 {
    let s3 = crate::emulators::s3_client().await;
    let bucket = crate::emulators::unique_bucket("check");
    crate::emulators::s3_bucket(&s3, &bucket).await;
    crate::emulators::s3_put(
        &s3,
        &bucket,
        "kb/one.txt",
        b"One document, ingested on request.",
        Some("text/plain"),
    )
    .await;
    let app = TestApp::spawn().await;
    let mut config = crate::emulators::s3_config(&bucket);
    config["prefix"] = json!("kb/");
    let registered = app
        .admin_post(
            "/_admin/connectors/s3/register",
            &json!({"tenant_id": "acme", "config": config}),
        )
        .await;
    assert_eq!(registered.status(), 201);
    let mut missing = crate::emulators::s3_config(&crate::emulators::unique_bucket("nowhere"));
    missing["poll_interval_seconds"] = json!(60);
    let registered = app
        .admin_post(
            "/_admin/connectors/s3/register",
            &json!({"tenant_id": "ghost", "config": missing}),
        )
        .await;
    assert_eq!(registered.status(), 201);

    let report: Value = app
        .admin_post(
            "/_admin/connectors/s3/test",
            &json!({"tenant_id": "acme", "key": "kb/one.txt"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let details: Vec<(&str, &str)> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["detail"].as_str().unwrap()))
        .collect();
    assert_eq!(
        details.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        ["configuration", "access", "object", "notifications"]
    );
    assert!(details[1].1.contains("1 object(s)"), "{details:?}");
    assert!(details[2].1.contains("34 bytes"), "{details:?}");
    assert!(details[3].1.contains("/_webhooks/s3"), "{details:?}");

    let broken: Value = app
        .admin_post(
            "/_admin/connectors/s3/test",
            &json!({"tenant_id": "ghost", "key": "kb/x"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(broken["ok"], false, "{broken}");
    let access = &broken["checks"][1];
    assert_eq!(access["ok"], false, "{broken}");
    assert!(
        access["detail"].as_str().unwrap().contains("bucket"),
        "{broken}"
    );
    assert!(
        broken["checks"][3]["detail"]
            .as_str()
            .unwrap()
            .contains("polled every 60 s"),
        "{broken}"
    );
    assert_error(
        app.admin_post("/_admin/connectors/gcs/test", &json!({"tenant_id": "acme"}))
            .await,
        404,
        "not_found",
    )
    .await;

    // Ingest now: the one object goes through the whole pipeline; a key outside the prefix is refused.
    let message = assert_error(
        app.admin_post(
            "/_admin/connectors/s3/ingest",
            &json!({"tenant_id": "acme", "key": "other/x.txt"}),
        )
        .await,
        422,
        "invalid_request",
    )
    .await;
    assert!(message.contains("prefix"), "{message}");
    let queued = app
        .admin_post(
            "/_admin/connectors/s3/ingest",
            &json!({"tenant_id": "acme", "key": "kb/one.txt"}),
        )
        .await;
    assert_eq!(queued.status(), 202);
    let job_id = queued.json::<Value>().await.unwrap()["job_id"]
        .as_i64()
        .unwrap();
    let job = app
        .admin_json(&format!("/_admin/jobs/{job_id}?wait_seconds=30"))
        .await;
    assert_eq!(job["state"], "completed", "{job}");
    let page = app.admin_json("/nodes?tenant_id=acme&class=Document").await;
    assert_eq!(page["nodes"][0]["props"]["key"], "kb/one.txt", "{page}");
    app.stop().await;
}
