//! The GCS streaming-pull subscriber against the real Pub/Sub emulator fed by fake-gcs-server: uploads are
//! ingested; the emulator going away and coming back is a counted reconnect and no message is lost; a
//! message whose jobs do not commit is not acked, and is ingested once the database takes it.

use std::process::Stdio;
use std::time::Duration;

use activekg::app::Roles;
use serde_json::{Value, json};

use crate::emulators;
use crate::helpers::{TestApp, eventually, free_port};

const EMULATOR: &str =
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator";
const TOPIC: &str = "projects/test-proj/topics/gcs-events";

/// A Pub/Sub emulator of this test's own (it is stopped and restarted), in its own process group so that
/// stopping it stops its JVM too.
struct Emulator {
    port: u16,
    child: Option<std::process::Child>,
}

impl Emulator {
    async fn start(port: u16) -> Self {
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new(EMULATOR)
            .args(["--host=127.0.0.1", &format!("--port={port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect(
                "the Pub/Sub emulator starts (Debian package google-cloud-cli-pubsub-emulator)",
            );
        let emulator = Self {
            port,
            child: Some(child),
        };
        eventually(
            Duration::from_secs(60),
            "the Pub/Sub emulator to serve",
            || async {
                let response = reqwest::Client::new()
                    .put(emulator.url(TOPIC))
                    .json(&json!({}))
                    .send()
                    .await
                    .ok()?;
                matches!(response.status().as_u16(), 200 | 409).then_some(())
            },
        )
        .await;
        emulator
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/v1/{path}", self.port)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn subscribe(&self, subscription: &str) {
        let response = reqwest::Client::new()
            .put(self.url(subscription))
            .json(&json!({"topic": TOPIC, "ackDeadlineSeconds": 10}))
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "subscription: {}",
            response.status()
        );
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let group = format!("-{}", child.id());
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &group])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// fake-gcs-server publishing its object events to `pubsub_port`.
async fn fake_gcs(pubsub_port: u16) -> (tokio::process::Child, String) {
    emulators::gcs_url(); // installs the emulators when missing
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-services/venv");
    let found = std::process::Command::new("find")
        .args([venv, "-name", "fake-gcs-server-linux-amd64", "-type", "f"])
        .output()
        .unwrap();
    let binary = String::from_utf8(found.stdout)
        .unwrap()
        .lines()
        .next()
        .expect("fake-gcs-server is installed by scripts/test-services")
        .to_owned();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let child = tokio::process::Command::new(binary)
        .args([
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            &port.to_string(),
            "-backend",
            "memory",
            "-public-host",
            &format!("127.0.0.1:{port}"),
            "-external-url",
            &url,
            "-log-level",
            "warn",
            "-event.pubsub-project-id",
            "test-proj",
            "-event.pubsub-topic",
            "gcs-events",
            "-event.list",
            "finalize,delete",
        ])
        .env("PUBSUB_EMULATOR_HOST", format!("127.0.0.1:{pubsub_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "fake-gcs-server to serve",
        || async {
            reqwest::get(format!("{url}/storage/v1/b"))
                .await
                .ok()
                .filter(|r| r.status().is_success())
        },
    )
    .await;
    (child, url)
}

async fn upload(gcs: &str, bucket: &str, key: &str) {
    let response = reqwest::Client::new()
        .post(format!("{gcs}/upload/storage/v1/b/{bucket}/o"))
        .query(&[("uploadType", "media"), ("name", key)])
        .header("content-type", "text/plain")
        .body(format!("The document stored at {key}."))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
}

async fn bucket(gcs: &str, name: &str) {
    let response = reqwest::Client::new()
        .post(format!("{gcs}/storage/v1/b?project=test"))
        .json(&json!({ "name": name }))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
}

/// This app's subscriber state for `subscription`, once it satisfies `ready`.
async fn subscriber_state(
    app: &TestApp,
    subscription: &str,
    what: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    eventually(Duration::from_secs(90), what, || async {
        let health: Value = app.get("/_webhooks/gcs/health").await.json().await.unwrap();
        health["subscribers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["subscription"] == subscription)
            .filter(|s| ready(s))
            .cloned()
    })
    .await
}

async fn documents(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT props->>'key' FROM nodes WHERE entity_type = 'Document' AND deleted_at IS NULL ORDER BY 1",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap()
}

async fn register(app: &TestApp, config: Value) {
    let response = app
        .admin_post(
            "/_admin/connectors/gcs/register",
            &json!({"tenant_id": "acme", "config": config}),
        )
        .await;
    assert!(
        response.status().is_success(),
        "{}",
        response.text().await.unwrap()
    );
}

#[tokio::test]
async fn uploads_are_ingested_through_streaming_pull_and_survive_the_emulator_restarting() {
    let port = free_port();
    let mut emulator = Emulator::start(port).await;
    let subscription = "projects/test-proj/subscriptions/activekg-pull";
    emulator.subscribe(subscription).await;
    let (_gcs_process, gcs) = fake_gcs(port).await;
    let name = emulators::unique_bucket("pull");
    bucket(&gcs, &name).await;
    let app = TestApp::spawn_with(
        &[
            ("PUBSUB_TCP_KEEPALIVE", "1"),
            ("PUBSUB_RECONNECT_MAX_SECONDS", "2"),
        ],
        Roles::all(),
    )
    .await;
    register(
        &app,
        json!({"bucket": name, "endpoint": gcs, "project": "test", "subscription": subscription,
               "pubsub_endpoint": emulator.endpoint()}),
    )
    .await;
    let state = subscriber_state(&app, subscription, "the subscriber to connect", |s| {
        s["connected"] == true
    })
    .await;
    assert!(
        state.get("tenants").is_none(),
        "open answers name no tenants: {state}"
    );
    assert_eq!(state["reconnects"], 0);

    let before: Vec<String> = (0..5).map(|i| format!("before/{i}.txt")).collect();
    for key in &before {
        upload(&gcs, &name, key).await;
    }
    eventually(
        Duration::from_secs(60),
        "the first uploads to be ingested",
        || async { (documents(&app).await == before).then_some(()) },
    )
    .await;

    emulator.stop();
    let state = subscriber_state(&app, subscription, "the subscriber to notice", |s| {
        s["connected"] == false && s["reconnects"].as_u64() >= Some(1)
    })
    .await;
    assert!(state["last_error"].is_string(), "{state}");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("connector_pubsub_reconnect_total{source=\"gcs_subscriber\"}")),
        "the reconnect is counted: {metrics}"
    );

    // The emulator keeps nothing: once it is back, the topic and subscription are made again, as an
    // operator would after an outage that lost them.
    let emulator = Emulator::start(port).await;
    emulator.subscribe(subscription).await;
    subscriber_state(&app, subscription, "the subscriber to reconnect", |s| {
        s["connected"] == true
    })
    .await;
    let after: Vec<String> = (0..5).map(|i| format!("after/{i}.txt")).collect();
    for key in &after {
        upload(&gcs, &name, key).await;
    }
    let mut all: Vec<String> = after.iter().chain(before.iter()).cloned().collect();
    all.sort();
    eventually(
        Duration::from_secs(60),
        "every upload to be ingested",
        || async { (documents(&app).await == all).then_some(()) },
    )
    .await;
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'ingest_object'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 10, "one ingest job per upload");
    app.stop().await;
    drop(emulator);
}

#[tokio::test]
async fn a_message_whose_jobs_do_not_commit_is_not_acked_and_is_ingested_once_they_can() {
    let port = free_port();
    let emulator = Emulator::start(port).await;
    let subscription = "projects/test-proj/subscriptions/activekg-nack";
    emulator.subscribe(subscription).await;
    let (_gcs_process, gcs) = fake_gcs(port).await;
    let name = emulators::unique_bucket("nack");
    bucket(&gcs, &name).await;
    // No workers: the jobs the subscriber commits stay to be counted.
    let app = TestApp::spawn_with(
        &[("PUBSUB_TCP_KEEPALIVE", "1")],
        Roles {
            worker: false,
            ..Roles::all()
        },
    )
    .await;
    register(
        &app,
        json!({"bucket": name, "endpoint": gcs, "project": "test", "subscription": subscription,
               "pubsub_endpoint": emulator.endpoint()}),
    )
    .await;
    subscriber_state(&app, subscription, "the subscriber to connect", |s| {
        s["connected"] == true
    })
    .await;

    sqlx::raw_sql(
        "CREATE FUNCTION refuse_jobs() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'the test refuses new jobs'; END $$;
         CREATE TRIGGER refuse_jobs BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION refuse_jobs();",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    upload(&gcs, &name, "held/one.txt").await;
    let nacked = || async {
        let metrics = app.get("/metrics").await.text().await.unwrap();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("connector_pubsub_messages_total{result=\"nacked\"} "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    eventually(
        Duration::from_secs(30),
        "the message to be refused twice",
        || async { (nacked().await >= 2).then_some(()) },
    )
    .await;
    let deliveries: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(
        deliveries, 0,
        "nothing of the refused message was committed, so it was redelivered"
    );

    sqlx::raw_sql("DROP TRIGGER refuse_jobs ON jobs")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let queued = eventually(
        Duration::from_secs(30),
        "the redelivered message to be queued",
        || async {
            let keys: Vec<String> =
                sqlx::query_scalar("SELECT args->>'key' FROM jobs WHERE kind = 'ingest_object'")
                    .fetch_all(&app.db.pool)
                    .await
                    .unwrap();
            (!keys.is_empty()).then_some(keys)
        },
    )
    .await;
    assert_eq!(queued, ["held/one.txt"]);
    // Acked once committed: no further deliveries of it arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deliveries: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(deliveries, 1);
    let acked_state = subscriber_state(&app, subscription, "the state", |_| true).await;
    let handled = acked_state["messages"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let later = subscriber_state(&app, subscription, "the state", |_| true).await;
    assert_eq!(
        later["messages"].as_u64().unwrap(),
        handled,
        "the acked message is not delivered again after its ack deadline"
    );
    app.stop().await;
}
