//! Webhooks end to end: moto delivering signed S3 notifications over SNS, signed fixtures for both signature
//! versions and for subscription confirmations, the Pub/Sub emulator pushing fake-gcs-server events (token
//! mode), OIDC tokens minted here against a local JWKS, and what is refused and why.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use activekg::app::Roles;
use activekg::metrics::metrics;
use axum::extract::State;
use base64::Engine as _;
use serde_json::{Value, json};

use crate::emulators;
use crate::helpers::{TestApp, assert_error, eventually};

/// An RSA key and a self-signed certificate made with openssl, and a local server that serves the
/// certificate (at any `.pem` path), publishes the key as a JWKS, and records every GET it answers.
struct Kit {
    dir: tempfile::TempDir,
    base: String,
    requests: Arc<Mutex<Vec<String>>>,
    jwks_fetches: Arc<Mutex<usize>>,
}

fn openssl(args: &[&str], input: Option<&[u8]>) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl runs");
    if let Some(input) = input {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[derive(Clone)]
struct KitState {
    cert: Arc<Vec<u8>>,
    jwks: Arc<Value>,
    requests: Arc<Mutex<Vec<String>>>,
    jwks_fetches: Arc<Mutex<usize>>,
}

async fn kit_handler(
    State(state): State<KitState>,
    uri: axum::http::Uri,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    state.requests.lock().unwrap().push(uri.to_string());
    if uri.path() == "/jwks" {
        *state.jwks_fetches.lock().unwrap() += 1;
        // Slow enough that concurrent verifications on a cold cache really overlap.
        tokio::time::sleep(Duration::from_millis(200)).await;
        return axum::Json((*state.jwks).clone()).into_response();
    }
    if uri.path().ends_with(".pem") {
        return (*state.cert).clone().into_response();
    }
    "confirmed".into_response()
}

impl Kit {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        openssl(
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                key.to_str().unwrap(),
            ],
            None,
        );
        openssl(
            &[
                "req",
                "-new",
                "-x509",
                "-key",
                key.to_str().unwrap(),
                "-subj",
                "/CN=sns.amazonaws.com",
                "-days",
                "2",
                "-out",
                cert.to_str().unwrap(),
            ],
            None,
        );
        let modulus = String::from_utf8(openssl(
            &["rsa", "-in", key.to_str().unwrap(), "-noout", "-modulus"],
            None,
        ))
        .unwrap();
        let hex = modulus.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwks = json!({"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "test-key", "n": b64.encode(n), "e": "AQAB"}]});
        let requests = Arc::new(Mutex::new(Vec::new()));
        let jwks_fetches = Arc::new(Mutex::new(0));
        let state = KitState {
            cert: Arc::new(std::fs::read(&cert).unwrap()),
            jwks: Arc::new(jwks),
            requests: requests.clone(),
            jwks_fetches: jwks_fetches.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(kit_handler).with_state(state);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            dir,
            base,
            requests,
            jwks_fetches,
        }
    }

    fn sign(&self, text: &str, digest: &str) -> String {
        let key = self.dir.path().join("key.pem");
        let signature = openssl(
            &[
                "dgst",
                &format!("-{digest}"),
                "-sign",
                key.to_str().unwrap(),
            ],
            Some(text.as_bytes()),
        );
        base64::engine::general_purpose::STANDARD.encode(signature)
    }

    fn private_key_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("key.pem")).unwrap()
    }

    /// A signed SNS Notification carrying `s3_message` from `topic`, sent now.
    fn notification(
        &self,
        topic: &str,
        message_id: &str,
        s3_message: &str,
        version: &str,
    ) -> Value {
        self.notification_at(topic, message_id, s3_message, version, chrono::Utc::now())
    }

    /// A signed SNS Notification sent at `sent`.
    fn notification_at(
        &self,
        topic: &str,
        message_id: &str,
        s3_message: &str,
        version: &str,
        sent: chrono::DateTime<chrono::Utc>,
    ) -> Value {
        let timestamp = sent.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
        let signed = format!(
            "Message\n{s3_message}\nMessageId\n{message_id}\nTimestamp\n{timestamp}\nTopicArn\n{topic}\nType\nNotification\n"
        );
        json!({
            "Type": "Notification", "MessageId": message_id, "TopicArn": topic, "Message": s3_message,
            "Timestamp": timestamp, "SignatureVersion": version,
            "Signature": self.sign(&signed, if version == "1" { "sha1" } else { "sha256" }),
            "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-kit.pem",
        })
    }

    /// A signed SubscriptionConfirmation.
    fn confirmation(&self, topic: &str, subscribe_url: &str) -> Value {
        let (message_id, token) = ("confirm-1", "tok-123");
        let timestamp = chrono::Utc::now()
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string();
        let message = format!("You have chosen to subscribe to the topic {topic}.");
        let signed = format!(
            "Message\n{message}\nMessageId\n{message_id}\nSubscribeURL\n{subscribe_url}\nTimestamp\n{timestamp}\nToken\n{token}\nTopicArn\n{topic}\nType\nSubscriptionConfirmation\n"
        );
        json!({
            "Type": "SubscriptionConfirmation", "MessageId": message_id, "Token": token, "TopicArn": topic,
            "Message": message, "SubscribeURL": subscribe_url, "Timestamp": timestamp, "SignatureVersion": "1",
            "Signature": self.sign(&signed, "sha1"),
            "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-kit.pem",
        })
    }
}

fn s3_event(bucket: &str, key: &str, event: &str) -> String {
    json!({"Records": [{"eventName": event, "eventTime": "2026-11-29T12:00:00.000Z",
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, "eTag": "abc123", "sequencer": "00A1"}}}]})
    .to_string()
}

async fn post_sns(app: &TestApp, body: &Value) -> reqwest::Response {
    app.client
        .post(app.url("/_webhooks/s3"))
        .header("content-type", "text/plain; charset=UTF-8")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

async fn register(app: &TestApp, provider: &str, tenant: &str, config: Value) {
    let response = app
        .admin_post(
            &format!("/_admin/connectors/{provider}/register"),
            &json!({"tenant_id": tenant, "config": config}),
        )
        .await;
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
}

async fn ingest_jobs(app: &TestApp) -> Vec<Value> {
    app.admin_json("/_admin/jobs?kind=ingest_object&limit=100")
        .await["jobs"]
        .as_array()
        .unwrap()
        .clone()
}

/// An app whose SNS certificate fetches go to the kit, without workers (the tests look at queued jobs).
async fn sns_app(kit: &Kit) -> TestApp {
    TestApp::spawn_with(
        &[("ACTIVEKG_SNS_CERT_BASE_URL", &kit.base)],
        Roles {
            worker: false,
            ..Roles::all()
        },
    )
    .await
}

/// SNS checks and Pub/Sub pushes are counted apart, so the guide's Pub/Sub failure query stays right.
fn verify_count(provider: &str, result: &str) -> u64 {
    let m = metrics();
    let counter = if provider == "s3" {
        &m.webhook_sns_verify
    } else {
        &m.webhook_verify
    };
    counter.with_label_values(&[provider, result]).get()
}

#[tokio::test]
async fn signed_notifications_of_both_versions_are_accepted_once_and_tampering_is_refused() {
    let kit = Kit::new().await;
    let app = sns_app(&kit).await;
    register(
        &app,
        "s3",
        "acme",
        json!({"bucket": "acme-docs", "prefix": "kb/"}),
    )
    .await;
    let topic = "arn:aws:sns:us-east-1:123456789012:activekg";

    let v1 = kit.notification(
        topic,
        "m-1",
        &s3_event("acme-docs", "kb/a+b%281%29.txt", "ObjectCreated:Put"),
        "1",
    );
    let ok_before = verify_count("s3", "signature_ok");
    let first: Value = post_sns(&app, &v1).await.json().await.unwrap();
    assert_eq!(
        (first["result"].as_str(), first["jobs"].as_u64()),
        (Some("accepted"), Some(1)),
        "{first}"
    );
    let again: Value = post_sns(&app, &v1).await.json().await.unwrap();
    assert_eq!(
        again["result"], "duplicate",
        "a redelivery is accepted once"
    );

    let v2 = kit.notification(
        topic,
        "m-2",
        &s3_event("acme-docs", "kb/gone.txt", "ObjectRemoved:Delete"),
        "2",
    );
    assert_eq!(post_sns(&app, &v2).await.status(), 200);
    assert_eq!(verify_count("s3", "signature_ok") - ok_before, 3);
    assert_eq!(
        metrics()
            .webhook_verify
            .with_label_values(&["s3", "signature_ok"])
            .get(),
        0,
        "SNS deliveries stay out of the guide's Pub/Sub metric, whose failure query would count them"
    );

    let jobs = ingest_jobs(&app).await;
    let mut seen: Vec<(String, String)> = jobs
        .iter()
        .map(|j| {
            (
                j["args"]["key"].as_str().unwrap().to_owned(),
                j["args"]["op"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("kb/a b(1).txt".to_owned(), "upsert".to_owned()),
            ("kb/gone.txt".to_owned(), "delete".to_owned())
        ]
    );

    let mut tampered = kit.notification(
        topic,
        "m-3",
        &s3_event("acme-docs", "kb/x.txt", "ObjectCreated:Put"),
        "2",
    );
    tampered["Message"] = Value::String(s3_event("acme-docs", "kb/evil.txt", "ObjectCreated:Put"));
    let bad_before = verify_count("s3", "signature_invalid");
    assert_error(post_sns(&app, &tampered).await, 403, "signature_invalid").await;
    assert_eq!(verify_count("s3", "signature_invalid") - bad_before, 1);

    let mut elsewhere = kit.notification(
        topic,
        "m-4",
        &s3_event("acme-docs", "kb/y.txt", "ObjectCreated:Put"),
        "2",
    );
    elsewhere["SigningCertURL"] = Value::String("https://evil.example/cert.pem".to_owned());
    let message = assert_error(post_sns(&app, &elsewhere).await, 403, "signature_invalid").await;
    assert!(message.contains("SigningCertURL refused"), "{message}");
    assert!(
        !kit.requests
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.contains("evil")),
        "nothing was fetched from the refused host"
    );
    assert_eq!(
        ingest_jobs(&app).await.len(),
        2,
        "refused deliveries queued nothing"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_subscription_confirmation_is_confirmed_by_a_durable_job() {
    let kit = Kit::new().await;
    let app = TestApp::spawn_with(&[("ACTIVEKG_SNS_CERT_BASE_URL", &kit.base)], Roles::all()).await;
    let topic = "arn:aws:sns:us-east-1:123456789012:activekg";
    // Subscriptions are confirmed only for topics a connector allows.
    register(
        &app,
        "s3",
        "acme",
        json!({"bucket": "acme-docs", "topic_allowlist": [topic]}),
    )
    .await;
    let url = "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn=arn:aws:sns:us-east-1:123456789012:activekg&Token=tok-123";
    let answered: Value = post_sns(&app, &kit.confirmation(topic, url))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answered["result"], "subscription_confirmation");
    eventually(Duration::from_secs(10), "the confirmation GET", || async {
        kit.requests
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.contains("Action=ConfirmSubscription") && r.contains("Token=tok-123"))
            .then_some(())
    })
    .await;
    // The GET is made before the job's result is written: wait for that too.
    eventually(
        Duration::from_secs(10),
        "the confirmation job to complete",
        || async {
            let job = app
                .admin_json("/_admin/jobs?kind=confirm_sns_subscription")
                .await;
            (job["jobs"][0]["state"] == "completed").then_some(())
        },
    )
    .await;

    let evil = kit.confirmation(
        topic,
        "https://attacker.example/?Action=ConfirmSubscription",
    );
    let message = assert_error(post_sns(&app, &evil).await, 403, "subscribe_url_refused").await;
    assert!(message.contains("SubscribeURL refused"), "{message}");
    app.stop().await;
}

#[tokio::test]
async fn a_topic_outside_the_tenants_allowlist_is_refused_and_counted() {
    let kit = Kit::new().await;
    let app = sns_app(&kit).await;
    let allowed = "arn:aws:sns:us-east-1:123456789012:allowed";
    register(
        &app,
        "s3",
        "careful",
        json!({"bucket": "careful-docs", "topic_allowlist": [allowed]}),
    )
    .await;
    let counter = metrics()
        .webhook_topic_rejected
        .with_label_values(&["s3", "careful"]);
    let before = counter.get();
    let other = kit.notification(
        "arn:aws:sns:us-east-1:123456789012:other",
        "t-1",
        &s3_event("careful-docs", "a.txt", "ObjectCreated:Put"),
        "2",
    );
    let message = assert_error(post_sns(&app, &other).await, 403, "topic_rejected").await;
    assert!(message.contains("topic_allowlist"), "{message}");
    assert_eq!(counter.get() - before, 1);
    let ok = kit.notification(
        allowed,
        "t-2",
        &s3_event("careful-docs", "a.txt", "ObjectCreated:Put"),
        "2",
    );
    assert_eq!(post_sns(&app, &ok).await.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn malformed_and_oversized_deliveries_get_a_reason_not_a_crash() {
    let app = TestApp::spawn_with(
        &[("PUBSUB_VERIFY_SECRET", "sekrit")],
        Roles {
            worker: false,
            ..Roles::all()
        },
    )
    .await;
    let post = |path: &'static str, body: Vec<u8>| {
        let request = app
            .client
            .post(app.url(path))
            .header("x-pubsub-token", "sekrit")
            .body(body);
        async move { request.send().await.unwrap() }
    };
    for body in [
        b"not json".to_vec(),
        b"{}".to_vec(),
        br#"{"Type":"Gossip","MessageId":"x"}"#.to_vec(),
    ] {
        assert_error(post("/_webhooks/s3", body).await, 400, "malformed").await;
    }
    assert_error(
        post("/_webhooks/gcs", b"[1,2]".to_vec()).await,
        400,
        "malformed",
    )
    .await;
    let huge = vec![b' '; 1024 * 1024 + 1];
    assert_error(
        post("/_webhooks/s3", huge.clone()).await,
        413,
        "payload_too_large",
    )
    .await;
    assert_error(post("/_webhooks/gcs", huge).await, 413, "payload_too_large").await;
    let health: Value = app.get("/_webhooks/gcs/health").await.json().await.unwrap();
    assert_eq!(
        (health["status"].as_str(), health["authentication"].as_str()),
        (Some("ok"), Some("secret"))
    );
    let health: Value = app.get("/_webhooks/s3/health").await.json().await.unwrap();
    assert_eq!(health["authentication"], "sns_signature");
    app.stop().await;
}

#[tokio::test]
async fn s3_events_from_moto_arrive_signed_over_sns_and_are_ingested() {
    let app = TestApp::spawn_with(
        &[("ACTIVEKG_SNS_CERT_BASE_URL", &emulators::moto_url())],
        Roles::all(),
    )
    .await;
    let client = emulators::s3_client().await;
    let bucket = emulators::unique_bucket("sns");
    emulators::s3_bucket(&client, &bucket).await;
    register(&app, "s3", "acme", emulators::s3_config(&bucket)).await;
    emulators::s3_events_to_webhook(
        &client,
        &bucket,
        &["s3:ObjectCreated:*", "s3:ObjectRemoved:*"],
        &app.url("/_webhooks/s3"),
    )
    .await;

    let ok_before = verify_count("s3", "signature_ok");
    emulators::s3_put(
        &client,
        &bucket,
        "docs/hello world.md",
        b"# Hello\n\nFrom S3 through SNS.",
        None,
    )
    .await;
    let document = eventually(Duration::from_secs(20), "the object to be ingested", || async {
        let row: Option<(String, Option<chrono::DateTime<chrono::Utc>>)> = sqlx::query_as(
            "SELECT props->>'title', deleted_at FROM nodes WHERE entity_type = 'Document' AND props->>'key' = 'docs/hello world.md'",
        )
        .fetch_optional(&app.db.pool)
        .await
        .unwrap();
        row
    })
    .await;
    assert_eq!(document.0, "Hello");
    assert!(
        verify_count("s3", "signature_ok") > ok_before,
        "moto's real signature verified"
    );

    client
        .delete_object()
        .bucket(&bucket)
        .key("docs/hello world.md")
        .send()
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "the document to be soft-deleted", || async {
        let deleted: Option<bool> = sqlx::query_scalar(
            "SELECT deleted_at IS NOT NULL FROM nodes WHERE entity_type = 'Document' AND props->>'key' = 'docs/hello world.md'",
        )
        .fetch_optional(&app.db.pool)
        .await
        .unwrap();
        (deleted == Some(true)).then_some(())
    })
    .await;
    let jobs = ingest_jobs(&app).await;
    let ops: Vec<&str> = jobs
        .iter()
        .map(|j| j["args"]["op"].as_str().unwrap())
        .collect();
    assert!(
        ops.contains(&"upsert") && ops.contains(&"delete"),
        "{ops:?}"
    );
    app.stop().await;
}

/// The Pub/Sub emulator's REST API.
async fn pubsub(method: reqwest::Method, path: &str, body: Value) -> Value {
    let port: u16 = std::env::var("ACTIVEKG_TEST_PUBSUB_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(39502);
    emulators::moto_url(); // makes sure the emulators are started
    let response = reqwest::Client::new()
        .request(method, format!("http://127.0.0.1:{port}/v1/{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "pubsub {path}: {}",
        response.status()
    );
    response.json().await.unwrap_or(Value::Null)
}

fn gcs_events_url() -> String {
    let port: u16 = std::env::var("ACTIVEKG_TEST_GCS_EVENTS_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(39503);
    emulators::moto_url();
    format!("http://127.0.0.1:{port}")
}

#[tokio::test]
async fn gcs_events_pushed_by_the_pubsub_emulator_are_verified_by_token_and_ingested() {
    let app = TestApp::spawn_with(&[("PUBSUB_VERIFY_SECRET", "sekrit-token")], Roles::all()).await;
    let gcs = gcs_events_url();
    let bucket = emulators::unique_bucket("push");
    let created = reqwest::Client::new()
        .post(format!("{gcs}/storage/v1/b?project=test"))
        .json(&json!({"name": bucket}))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success());
    let subscription = format!("projects/test-proj/subscriptions/{bucket}");
    // A standard push names only its subscription: the allowlisted topic is learned from Pub/Sub.
    let pubsub_port: u16 = std::env::var("ACTIVEKG_TEST_PUBSUB_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(39502);
    register(
        &app,
        "gcs",
        "acme",
        json!({"bucket": bucket, "endpoint": gcs, "project": "test",
               "pubsub_endpoint": format!("http://127.0.0.1:{pubsub_port}"),
               "topic_allowlist": ["projects/test-proj/topics/gcs-events"]}),
    )
    .await;
    let push = format!("{}?token=sekrit-token", app.url("/_webhooks/gcs"));
    pubsub(
        reqwest::Method::PUT,
        &subscription,
        json!({"topic": "projects/test-proj/topics/gcs-events", "pushConfig": {"pushEndpoint": push}}),
    )
    .await;

    let ok_before = verify_count("gcs", "secret_ok");
    let upload = reqwest::Client::new()
        .post(format!("{gcs}/upload/storage/v1/b/{bucket}/o"))
        .query(&[("uploadType", "media"), ("name", "notes/pushed.txt")])
        .body("Pushed through Pub/Sub.")
        .send()
        .await
        .unwrap();
    assert!(upload.status().is_success());
    eventually(Duration::from_secs(30), "the pushed object to be ingested", || async {
        sqlx::query_scalar::<_, String>("SELECT props->>'key' FROM nodes WHERE entity_type = 'Document' AND props->>'key' = 'notes/pushed.txt'")
            .fetch_optional(&app.db.pool)
            .await
            .unwrap()
    })
    .await;
    assert!(verify_count("gcs", "secret_ok") > ok_before);

    // A metadata-only update names the same generation: it is delivered and accepted, but queues no new
    // ingest, so the content is not fetched again.
    let deliveries = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM webhook_deliveries WHERE provider = 'gcs'",
        )
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
    };
    let delivered = deliveries().await;
    let patched = reqwest::Client::new()
        .patch(format!("{gcs}/storage/v1/b/{bucket}/o/notes%2Fpushed.txt"))
        .json(&json!({"metadata": {"reviewed": "yes"}}))
        .send()
        .await
        .unwrap();
    assert!(patched.status().is_success(), "{}", patched.status());
    eventually(
        Duration::from_secs(30),
        "the metadata update to be delivered",
        || async { (deliveries().await > delivered).then_some(()) },
    )
    .await;
    let upserts = ingest_jobs(&app)
        .await
        .iter()
        .filter(|j| j["args"]["op"] == "upsert")
        .count();
    assert_eq!(
        upserts, 1,
        "the metadata update of an unchanged generation queued no fetch"
    );

    let delete = reqwest::Client::new()
        .delete(format!("{gcs}/storage/v1/b/{bucket}/o/notes%2Fpushed.txt"))
        .send()
        .await
        .unwrap();
    assert!(delete.status().is_success());
    eventually(Duration::from_secs(30), "the delete to be ingested", || async {
        let deleted: bool = sqlx::query_scalar("SELECT deleted_at IS NOT NULL FROM nodes WHERE entity_type = 'Document' AND props->>'key' = 'notes/pushed.txt'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
        deleted.then_some(())
    })
    .await;
    pubsub(reqwest::Method::DELETE, &subscription, Value::Null).await;

    let envelope = json!({"message": {"attributes": {"bucketId": bucket, "objectId": "x", "eventType": "OBJECT_FINALIZE", "objectGeneration": "1"}, "messageId": "direct-1"}, "subscription": subscription});
    let without = app
        .client
        .post(app.url("/_webhooks/gcs"))
        .json(&envelope)
        .send()
        .await
        .unwrap();
    assert_error(without, 401, "token_missing").await;
    let wrong = app
        .client
        .post(app.url("/_webhooks/gcs"))
        .header("x-pubsub-token", "nope")
        .json(&envelope)
        .send()
        .await
        .unwrap();
    assert_error(wrong, 403, "token_invalid").await;
    app.stop().await;
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    email: &'a str,
    email_verified: bool,
    exp: i64,
    iat: i64,
}

const OIDC_AUDIENCE: &str = "https://kg.example/_webhooks/gcs";
const OIDC_EMAIL: &str = "pusher@test-proj.iam.gserviceaccount.com";

/// An app verifying OIDC pushes against the kit's key set (plus `extra`), without workers.
async fn oidc_app(kit: &Kit, extra: &[(&str, &str)]) -> TestApp {
    let jwks = format!("{}/jwks", kit.base);
    let mut vars = vec![
        ("PUBSUB_VERIFY_OIDC", "true"),
        ("PUBSUB_OIDC_AUDIENCE", OIDC_AUDIENCE),
        ("PUBSUB_OIDC_JWKS_URL", jwks.as_str()),
        ("PUBSUB_OIDC_EMAIL", OIDC_EMAIL),
    ];
    vars.extend_from_slice(extra);
    TestApp::spawn_with(
        &vars,
        Roles {
            worker: false,
            ..Roles::all()
        },
    )
    .await
}

fn mint(kit: &Kit, kid: &str, claims: &Claims<'_>) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&kit.private_key_pem()).unwrap();
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

#[tokio::test]
async fn oidc_tokens_verify_against_the_jwks_even_in_a_burst_on_a_cold_cache() {
    let kit = Kit::new().await;
    let (audience, email) = (OIDC_AUDIENCE, OIDC_EMAIL);
    let app = oidc_app(&kit, &[]).await;
    register(&app, "gcs", "acme", json!({"bucket": "acme-oidc"})).await;
    let now = chrono::Utc::now().timestamp();
    let good = Claims {
        iss: "https://accounts.google.com",
        aud: audience,
        email,
        email_verified: true,
        exp: now + 600,
        iat: now,
    };
    let envelope = |id: usize| {
        json!({"message": {"attributes": {"bucketId": "acme-oidc", "objectId": format!("o{id}.txt"), "eventType": "OBJECT_FINALIZE", "objectGeneration": "1"},
            "messageId": format!("oidc-{id}")}, "subscription": "projects/p/subscriptions/s"})
    };
    let send = |token: String, id: usize| {
        let request = app
            .client
            .post(app.url("/_webhooks/gcs"))
            .bearer_auth(token)
            .json(&envelope(id));
        async move { request.send().await.unwrap() }
    };
    let ok_before = verify_count("gcs", "oidc_ok");
    let burst = (0..20).map(|i| send(mint(&kit, "test-key", &good), i));
    let statuses: Vec<u16> = futures::future::join_all(burst)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every request of the burst verifies: {statuses:?}"
    );
    assert_eq!(verify_count("gcs", "oidc_ok") - ok_before, 20);
    assert_eq!(
        *kit.jwks_fetches.lock().unwrap(),
        1,
        "the burst fetched the keys once"
    );

    let wrong = |claims: Claims<'_>, kid: &str| mint(&kit, kid, &claims);
    let cases = [
        (
            "wrong audience",
            wrong(
                Claims {
                    aud: "https://other.example",
                    ..good
                },
                "test-key",
            ),
        ),
        (
            "wrong issuer",
            wrong(
                Claims {
                    iss: "https://evil.example",
                    ..good
                },
                "test-key",
            ),
        ),
        (
            "expired",
            wrong(
                Claims {
                    exp: now - 3600,
                    ..good
                },
                "test-key",
            ),
        ),
        (
            "other service account",
            wrong(
                Claims {
                    email: "someone@else.com",
                    ..good
                },
                "test-key",
            ),
        ),
        (
            "unverified email",
            wrong(
                Claims {
                    email_verified: false,
                    ..good
                },
                "test-key",
            ),
        ),
        ("unknown key", wrong(Claims { ..good }, "other-key")),
    ];
    for (what, token) in cases {
        let response = send(token, 99).await;
        assert_eq!(response.status(), 403, "{what}");
    }
    let missing = app
        .client
        .post(app.url("/_webhooks/gcs"))
        .json(&envelope(100))
        .send()
        .await
        .unwrap();
    assert_error(missing, 401, "token_missing").await;
    assert_eq!(
        *kit.jwks_fetches.lock().unwrap(),
        1,
        "an unknown key id does not trigger a fetch storm"
    );
    let health: Value = app.get("/_webhooks/gcs/health").await.json().await.unwrap();
    assert_eq!(
        (
            health["authentication"].as_str(),
            health["keys_cached"].as_u64()
        ),
        (Some("oidc"), Some(1))
    );
    app.stop().await;
}

#[tokio::test]
async fn webhook_health_answers_503_while_the_database_is_unreachable() {
    let app = TestApp::spawn_with(
        &[],
        Roles {
            worker: false,
            scheduler: false,
            ..Roles::all()
        },
    )
    .await;
    assert_eq!(app.get("/_webhooks/s3/health").await.status(), 200);
    let admin = sqlx::PgPool::connect(&crate::helpers::admin_url())
        .await
        .unwrap();
    let refuse = format!(
        "ALTER DATABASE \"{}\" WITH ALLOW_CONNECTIONS false",
        app.db.name
    );
    sqlx::query(sqlx::AssertSqlSafe(refuse))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&app.db.name)
        .execute(&admin)
        .await
        .unwrap();
    for path in ["/_webhooks/s3/health", "/_webhooks/gcs/health"] {
        // The database is checked in the background once a second; health reports the last check.
        let response = crate::helpers::eventually(
            std::time::Duration::from_secs(5),
            "health to see the database gone",
            || async {
                let response = app.get(path).await;
                (response.status() == 503).then_some(response)
            },
        )
        .await;
        let health: Value = response.json().await.unwrap();
        assert_eq!(
            (
                health["status"].as_str(),
                health["database_reachable"].as_bool()
            ),
            (Some("degraded"), Some(false))
        );
    }
    let allow = format!(
        "ALTER DATABASE \"{}\" WITH ALLOW_CONNECTIONS true",
        app.db.name
    );
    sqlx::query(sqlx::AssertSqlSafe(allow))
        .execute(&admin)
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "health to recover", || async {
        (app.get("/_webhooks/s3/health").await.status() == 200).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_subscription_to_a_topic_no_connector_allows_is_refused_and_nothing_is_fetched() {
    let kit = Kit::new().await;
    let app = sns_app(&kit).await;
    register(&app, "s3", "acme", json!({"bucket": "acme-docs"})).await;
    let stranger = "arn:aws:sns:us-east-1:999999999999:someone-elses-topic";
    let url =
        "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn=x&Token=tok-123";
    let message = assert_error(
        post_sns(&app, &kit.confirmation(stranger, url)).await,
        403,
        "topic_not_allowed",
    )
    .await;
    assert!(message.contains("topic_allowlist"), "{message}");
    assert!(
        ingest_jobs(&app).await.is_empty()
            && app
                .admin_json("/_admin/jobs?kind=confirm_sns_subscription")
                .await["jobs"]
                .as_array()
                .unwrap()
                .is_empty(),
        "no confirmation was queued"
    );
    app.stop().await;

    // A server-wide allowlist admits it.
    let app = TestApp::spawn_with(
        &[
            ("ACTIVEKG_SNS_CERT_BASE_URL", &kit.base),
            ("ACTIVEKG_SNS_TOPIC_ALLOWLIST", stranger),
        ],
        Roles {
            worker: false,
            ..Roles::all()
        },
    )
    .await;
    let answered: Value = post_sns(&app, &kit.confirmation(stranger, url))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answered["result"], "subscription_confirmation");
    app.stop().await;
}

#[tokio::test]
async fn a_validly_signed_notification_too_old_or_from_the_future_is_refused_as_a_replay() {
    let kit = Kit::new().await;
    let app = sns_app(&kit).await;
    register(&app, "s3", "acme", json!({"bucket": "acme-docs"})).await;
    let event = s3_event("acme-docs", "a.txt", "ObjectCreated:Put");
    let topic = "arn:aws:sns:us-east-1:123456789012:activekg";
    let old = kit.notification_at(
        topic,
        "old-1",
        &event,
        "2",
        chrono::Utc::now() - chrono::Duration::days(8),
    );
    let message = assert_error(post_sns(&app, &old).await, 403, "stale_message").await;
    assert!(
        message.contains("ACTIVEKG_SNS_MAX_AGE_SECONDS"),
        "{message}"
    );
    let future = kit.notification_at(
        topic,
        "future-1",
        &event,
        "2",
        chrono::Utc::now() + chrono::Duration::hours(1),
    );
    assert_error(post_sns(&app, &future).await, 403, "stale_message").await;
    let fresh = kit.notification(topic, "fresh-1", &event, "2");
    assert_eq!(post_sns(&app, &fresh).await.status(), 200);
    assert_eq!(
        ingest_jobs(&app).await.len(),
        1,
        "only the fresh one queued a job"
    );
    app.stop().await;
}

fn pubsub_endpoint() -> String {
    let port: u16 = std::env::var("ACTIVEKG_TEST_PUBSUB_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(39502);
    emulators::moto_url(); // the emulators, including Pub/Sub, are started by scripts/test-services
    format!("http://127.0.0.1:{port}")
}

fn push_envelope(bucket: &str, subscription: &str, id: &str) -> Value {
    json!({"message": {"attributes": {"bucketId": bucket, "objectId": "a.txt", "eventType": "OBJECT_FINALIZE",
        "objectGeneration": "1"}, "messageId": id}, "subscription": subscription})
}

#[tokio::test]
async fn pushes_are_refused_when_no_authentication_is_configured_unless_development_allows_them() {
    let app = TestApp::spawn_with(
        &[],
        Roles {
            worker: false,
            ..Roles::all()
        },
    )
    .await;
    register(&app, "gcs", "acme", json!({"bucket": "open-docs"})).await;
    let envelope = push_envelope("open-docs", "projects/p/subscriptions/s", "open-1");
    let refused = app
        .client
        .post(app.url("/_webhooks/gcs"))
        .json(&envelope)
        .send()
        .await
        .unwrap();
    let message = assert_error(refused, 401, "authentication_not_configured").await;
    assert!(message.contains("PUBSUB_VERIFY_SECRET"), "{message}");
    let health: Value = app.get("/_webhooks/gcs/health").await.json().await.unwrap();
    assert_eq!(health["authentication"], "refused");
    app.stop().await;

    let app = TestApp::spawn_with(
        &[("PUBSUB_ALLOW_UNAUTHENTICATED", "true")],
        Roles {
            worker: false,
            ..Roles::all()
        },
    )
    .await;
    register(&app, "gcs", "acme", json!({"bucket": "open-docs"})).await;
    let accepted = app
        .client
        .post(app.url("/_webhooks/gcs"))
        .json(&envelope)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 200);
    let answer: Value = accepted.json().await.unwrap();
    assert_eq!(answer["result"], "accepted");
    assert!(
        answer.get("tenants").is_none(),
        "answers never name tenants: {answer}"
    );
    app.stop().await;
}

#[tokio::test]
async fn with_oidc_and_a_shared_token_configured_a_push_needs_both() {
    let kit = Kit::new().await;
    let (audience, email) = (OIDC_AUDIENCE, OIDC_EMAIL);
    let app = oidc_app(&kit, &[("PUBSUB_VERIFY_SECRET", "both-please")]).await;
    register(&app, "gcs", "acme", json!({"bucket": "both-docs"})).await;
    let now = chrono::Utc::now().timestamp();
    let token = mint(
        &kit,
        "test-key",
        &Claims {
            iss: "https://accounts.google.com",
            aud: audience,
            email,
            email_verified: true,
            exp: now + 600,
            iat: now,
        },
    );
    let send = |secret: Option<&str>, id: &str| {
        let mut request = app
            .client
            .post(app.url("/_webhooks/gcs"))
            .bearer_auth(&token)
            .json(&push_envelope(
                "both-docs",
                "projects/p/subscriptions/s",
                id,
            ));
        if let Some(secret) = secret {
            request = request.header("x-pubsub-token", secret);
        }
        async move { request.send().await.unwrap() }
    };
    assert_error(send(None, "b-1").await, 401, "token_missing").await;
    assert_error(send(Some("wrong"), "b-2").await, 403, "token_invalid").await;
    assert_eq!(send(Some("both-please"), "b-3").await.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn a_standard_push_is_held_to_the_topic_its_subscription_reads() {
    let endpoint = pubsub_endpoint();
    let app = TestApp::spawn_with(
        &[("PUBSUB_VERIFY_SECRET", "topic-token")],
        Roles {
            worker: false,
            ..Roles::all()
        },
    )
    .await;
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let allowed_topic = format!("projects/test-proj/topics/allowed-{suffix}");
    let other_topic = format!("projects/test-proj/topics/other-{suffix}");
    for topic in [&allowed_topic, &other_topic] {
        pubsub(reqwest::Method::PUT, topic, json!({})).await;
    }
    let good = format!("projects/test-proj/subscriptions/good-{suffix}");
    let bad = format!("projects/test-proj/subscriptions/bad-{suffix}");
    pubsub(reqwest::Method::PUT, &good, json!({"topic": allowed_topic})).await;
    pubsub(reqwest::Method::PUT, &bad, json!({"topic": other_topic})).await;
    register(
        &app,
        "gcs",
        "acme",
        json!({"bucket": "topic-docs", "pubsub_endpoint": endpoint, "topic_allowlist": [allowed_topic]}),
    )
    .await;
    let push = |subscription: &str, id: &str| {
        let request = app
            .client
            .post(app.url("/_webhooks/gcs?token=topic-token"))
            .json(&push_envelope("topic-docs", subscription, id));
        async move { request.send().await.unwrap() }
    };
    assert_eq!(
        push(&good, "t-1").await.status(),
        200,
        "its subscription reads an allowed topic"
    );
    let message = assert_error(push(&bad, "t-2").await, 403, "topic_rejected").await;
    assert!(
        !message.contains("acme"),
        "answers never name tenants: {message}"
    );
    // A subscription Pub/Sub does not know: the topic cannot be learned now; Pub/Sub will push again.
    let unknown = format!("projects/test-proj/subscriptions/missing-{suffix}");
    assert_error(push(&unknown, "t-3").await, 503, "unavailable").await;
    app.stop().await;
}

#[tokio::test]
async fn a_pulled_message_refused_by_the_topic_allowlist_is_counted_and_shown_not_dropped_silently()
{
    let endpoint = pubsub_endpoint();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let topic = format!("projects/test-proj/topics/pulled-{suffix}");
    let subscription = format!("projects/test-proj/subscriptions/pulled-{suffix}");
    pubsub(reqwest::Method::PUT, &topic, json!({})).await;
    pubsub(
        reqwest::Method::PUT,
        &subscription,
        json!({"topic": topic, "ackDeadlineSeconds": 10}),
    )
    .await;
    let app = TestApp::spawn_with(
        &[],
        Roles {
            worker: false,
            ..Roles::all()
        },
    )
    .await;
    register(
        &app,
        "gcs",
        "acme",
        json!({"bucket": "pulled-docs", "subscription": subscription, "pubsub_endpoint": endpoint,
               "topic_allowlist": ["projects/test-proj/topics/some-other-topic"]}),
    )
    .await;
    let rejected = metrics()
        .webhook_topic_rejected
        .with_label_values(&["gcs", "acme"]);
    let before = rejected.get();
    eventually(
        Duration::from_secs(30),
        "the subscriber to connect",
        || async {
            let health: Value = app.get("/_webhooks/gcs/health").await.json().await.ok()?;
            (health["subscribers"][0]["connected"] == true).then_some(())
        },
    )
    .await;
    let attributes = json!({"bucketId": "pulled-docs", "objectId": "a.txt", "eventType": "OBJECT_FINALIZE",
        "objectGeneration": "1", "payloadFormat": "JSON_API_V1"});
    pubsub(
        reqwest::Method::POST,
        &format!("{topic}:publish"),
        json!({"messages": [{"attributes": attributes, "data": ""}]}),
    )
    .await;
    let subscriber = eventually(
        Duration::from_secs(30),
        "the refusal to be shown",
        || async {
            let health: Value = app.get("/_webhooks/gcs/health").await.json().await.ok()?;
            let subscriber = health["subscribers"][0].clone();
            (subscriber["rejected"] == 1).then_some(subscriber)
        },
    )
    .await;
    assert_eq!(subscriber["topic"].as_str(), Some(topic.as_str()));
    assert!(
        subscriber["last_rejection"]
            .as_str()
            .unwrap()
            .contains(&topic),
        "{subscriber}"
    );
    assert_eq!(
        rejected.get() - before,
        1,
        "counted in webhook_topic_rejected_total"
    );
    assert!(ingest_jobs(&app).await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_nul_character_in_any_delivered_field_is_refused_with_the_field_named_and_queues_nothing()
{
    let kit = Kit::new().await;
    let app = TestApp::spawn_with(
        &[
            ("ACTIVEKG_SNS_CERT_BASE_URL", kit.base.as_str()),
            ("PUBSUB_VERIFY_SECRET", "sekrit"),
        ],
        Roles {
            worker: false,
            ..Roles::all()
        },
    )
    .await;
    register(&app, "s3", "acme", json!({"bucket": "acme-docs"})).await;
    register(&app, "gcs", "acme", json!({"bucket": "acme-gcs"})).await;
    let topic = "arn:aws:sns:us-east-1:123456789012:activekg";

    // A signed message whose object key decodes to NUL, and one whose MessageId holds it.
    let key = kit.notification(
        topic,
        "nul-1",
        &s3_event("acme-docs", "kb/bad%00key.txt", "ObjectCreated:Put"),
        "2",
    );
    let message = assert_error(post_sns(&app, &key).await, 400, "malformed").await;
    assert!(message.contains("NUL"), "{message}");
    let id = kit.notification(
        topic,
        "nul\u{0}2",
        &s3_event("acme-docs", "kb/fine.txt", "ObjectCreated:Put"),
        "2",
    );
    let message = assert_error(post_sns(&app, &id).await, 400, "malformed").await;
    assert!(message.contains("MessageId"), "{message}");

    let push = |envelope: Value| {
        let request = app
            .client
            .post(app.url("/_webhooks/gcs"))
            .header("x-pubsub-token", "sekrit")
            .json(&envelope);
        async move { request.send().await.unwrap() }
    };
    let fine = push_envelope("acme-gcs", "projects/p/subscriptions/s", "gcs-1");
    for (pointer, named) in [
        ("/message/messageId", "messageId"),
        ("/message/attributes/objectId", "objectId"),
        ("/message/attributes/bucketId", "bucketId"),
        ("/subscription", "subscription"),
    ] {
        let mut envelope = fine.clone();
        *envelope.pointer_mut(pointer).unwrap() = json!("x\u{0}y");
        let message = assert_error(push(envelope).await, 400, "malformed").await;
        assert!(
            message.contains(named) && message.contains("NUL"),
            "{pointer}: {message}"
        );
    }
    assert!(ingest_jobs(&app).await.is_empty(), "nothing was queued");
    assert_eq!(
        push(fine).await.status(),
        200,
        "the same push without NUL is taken"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_guides_manual_test_push_without_subscription_or_message_id_is_taken_once() {
    let app = TestApp::spawn_with(
        &[("PUBSUB_VERIFY_SECRET", "sekrit")],
        Roles {
            worker: false,
            ..Roles::all()
        },
    )
    .await;
    register(&app, "gcs", "acme", json!({"bucket": "manual-docs"})).await;
    register(
        &app,
        "gcs",
        "guarded",
        json!({"bucket": "guarded-docs", "topic_allowlist": ["projects/p/topics/docs"]}),
    )
    .await;
    // As the guide writes it: a message, its attributes, the token header, and nothing else.
    let push = |bucket: &str| {
        let request = app
            .client
            .post(app.url("/_webhooks/gcs"))
            .header("x-pubsub-token", "sekrit")
            .json(&json!({"message": {"data": "e30=", "attributes": {"bucketId": bucket,
                "objectId": "manual.txt", "eventType": "OBJECT_FINALIZE", "objectGeneration": "7"}}}));
        async move { request.send().await.unwrap() }
    };
    let first = push("manual-docs").await;
    assert_eq!(first.status(), 200, "{}", first.text().await.unwrap());
    let again: Value = push("manual-docs").await.json().await.unwrap();
    assert_eq!(
        again["result"], "duplicate",
        "the same message sent twice is one delivery: {again}"
    );
    let jobs = ingest_jobs(&app).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["args"]["key"], "manual.txt");
    // Without a subscription there is no topic to hold to an allowlist: a guarded bucket refuses it.
    assert_error(push("guarded-docs").await, 403, "topic_rejected").await;
    app.stop().await;
}
