//! The storage emulators tests talk to: moto (S3) and fake-gcs-server (GCS), started by
//! `scripts/test-services` when they are not already answering, and helpers to create buckets and objects.

use std::sync::Once;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};

fn port(var: &str, default: u16) -> u16 {
    std::env::var(var)
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(default)
}

fn answers(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Starts the emulators once per test process if any is down (the script serializes concurrent callers).
fn ensure_started() {
    static START: Once = Once::new();
    START.call_once(|| {
        if answers(moto_port()) && answers(gcs_port()) {
            return;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-services");
        let status = std::process::Command::new(script)
            .arg("start")
            .status()
            .expect("scripts/test-services runs");
        assert!(
            status.success(),
            "scripts/test-services start failed (see target/test-services/*.log)"
        );
    });
}

fn moto_port() -> u16 {
    port("ACTIVEKG_TEST_MOTO_PORT", 39500)
}

fn gcs_port() -> u16 {
    port("ACTIVEKG_TEST_GCS_PORT", 39501)
}

/// moto's endpoint.
pub fn moto_url() -> String {
    ensure_started();
    format!("http://127.0.0.1:{}", moto_port())
}

/// Sends `bucket`'s `events` (e.g. `s3:ObjectCreated:*`) to `webhook` as AWS does: through a new moto SNS
/// topic with an HTTP subscription, which moto confirms and signs. Returns the topic's ARN.
pub async fn s3_events_to_webhook(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    events: &[&str],
    webhook: &str,
) -> String {
    let sns = |form: Vec<(&'static str, String)>| async move {
        let response = reqwest::Client::new()
            .post(moto_url())
            .header(
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/sns/aws4_request",
            )
            .form(&form)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "moto SNS answered {form:?}");
        response.text().await.unwrap()
    };
    let created = sns(vec![
        ("Action", "CreateTopic".into()),
        ("Name", format!("t-{bucket}")),
    ])
    .await;
    let topic = created
        .split("<TopicArn>")
        .nth(1)
        .and_then(|s| s.split("</TopicArn>").next())
        .expect("CreateTopic returns an ARN")
        .to_owned();
    sns(vec![
        ("Action", "Subscribe".into()),
        ("TopicArn", topic.clone()),
        ("Protocol", "http".into()),
        ("Endpoint", webhook.to_owned()),
    ])
    .await;
    let mut notify = aws_sdk_s3::types::TopicConfiguration::builder().topic_arn(&topic);
    for event in events {
        notify = notify.events(aws_sdk_s3::types::Event::from(*event));
    }
    client
        .put_bucket_notification_configuration()
        .bucket(bucket)
        .notification_configuration(
            aws_sdk_s3::types::NotificationConfiguration::builder()
                .topic_configurations(notify.build().unwrap())
                .build(),
        )
        .send()
        .await
        .unwrap();
    topic
}

/// fake-gcs-server's endpoint.
pub fn gcs_url() -> String {
    ensure_started();
    format!("http://127.0.0.1:{}", gcs_port())
}

/// A bucket name no other test uses.
pub fn unique_bucket(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// An S3 client for moto.
pub async fn s3_client() -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .endpoint_url(moto_url())
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// Creates an S3 bucket in moto.
pub async fn s3_bucket(client: &aws_sdk_s3::Client, bucket: &str) {
    client
        .create_bucket()
        .bucket(bucket)
        .send()
        .await
        .expect("moto creates the bucket");
}

/// Puts an S3 object.
pub async fn s3_put(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    body: &[u8],
    content_type: Option<&str>,
) {
    client
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(body.to_vec().into())
        .set_content_type(content_type.map(str::to_owned))
        .send()
        .await
        .expect("moto stores the object");
}

/// The connector config for a moto bucket.
pub fn s3_config(bucket: &str) -> serde_json::Value {
    serde_json::json!({
        "bucket": bucket, "endpoint": moto_url(), "force_path_style": true, "region": "us-east-1",
        "access_key_id": "test", "secret_access_key": "test"
    })
}

/// Creates a GCS bucket in fake-gcs-server.
pub async fn gcs_bucket(bucket: &str) {
    let response = reqwest::Client::new()
        .post(format!("{}/storage/v1/b?project=test", gcs_url()))
        .json(&serde_json::json!({ "name": bucket }))
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "fake-gcs creates the bucket: {}",
        response.status()
    );
}

/// Uploads a GCS object.
pub async fn gcs_put(bucket: &str, key: &str, body: &[u8], content_type: Option<&str>) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/upload/storage/v1/b/{bucket}/o", gcs_url()))
        .query(&[("uploadType", "media"), ("name", key)])
        .body(body.to_vec());
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = request.send().await.unwrap();
    assert!(
        response.status().is_success(),
        "fake-gcs stores the object: {}",
        response.status()
    );
}

/// The connector config for a fake-gcs bucket.
pub fn gcs_config(bucket: &str) -> serde_json::Value {
    serde_json::json!({ "bucket": bucket, "endpoint": gcs_url(), "project": "test" })
}
