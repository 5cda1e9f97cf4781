//! Every `bash` block of docs/operations.md, run in order against a live service with data in it: a
//! runbook command that does not work fails the build.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::emulators;
use crate::helpers::{ADMIN_TOKEN, KEK, TestApp, eventually};

/// The fenced `bash` blocks of a Markdown document, in order.
fn bash_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```bash") => current = Some(Vec::new()),
            (Some(lines), "```") => {
                blocks.push(lines.join("\n"));
                current = None;
            }
            (Some(lines), _) => lines.push(line),
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "an unclosed code block");
    blocks
}

#[tokio::test]
async fn every_command_in_the_runbook_works_against_a_live_service() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let runbook = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let blocks = bash_blocks(&runbook);
    assert!(blocks.len() >= 15, "{} blocks", blocks.len());

    // A bucket with documents to register and backfill, and a dead job to inspect and replay.
    let client = emulators::s3_client().await;
    let bucket = emulators::unique_bucket("runbook");
    emulators::s3_bucket(&client, &bucket).await;
    for (key, body) in [
        ("docs/welcome.txt", "Welcome to the knowledge graph."),
        (
            "docs/notes.md",
            "# Notes\n\nThe runbook backfills this file.",
        ),
    ] {
        emulators::s3_put(&client, &bucket, key, body.as_bytes(), Some("text/plain")).await;
    }
    let app = TestApp::spawn().await;
    let registered = app
        .admin_post(
            "/_admin/connectors/s3/register",
            &json!({"tenant_id": "ghost", "config": emulators::s3_config(&emulators::unique_bucket("gone"))}),
        )
        .await;
    assert!(registered.status().is_success());
    let started: serde_json::Value = app
        .admin_post(
            "/_admin/connectors/s3/backfill",
            &json!({"tenant_id": "ghost"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let dead = started["job_id"].as_i64().unwrap();
    eventually(Duration::from_secs(30), "a dead job", || async {
        let job = app.admin_json(&format!("/_admin/jobs/{dead}")).await;
        (job["state"] == "dead").then_some(())
    })
    .await;

    let binary = Path::new(env!("CARGO_BIN_EXE_activekg"));
    let path = format!(
        "{}:{}",
        binary.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let host = app.base.trim_start_matches("http://").to_owned();
    for (i, block) in blocks.iter().enumerate() {
        let output = tokio::process::Command::new("bash")
            .args(["-euo", "pipefail", "-c", block])
            .env_clear()
            .env("PATH", &path)
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .env("HOST", &host)
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("ACTIVEKG_DSN", &app.db.url)
            .env("CONNECTOR_KEK_V1", KEK)
            .env("EMBEDDING_BACKEND", "hash")
            .env("TENANT", "acme")
            .env("BUCKET", &bucket)
            .env("S3_ENDPOINT", emulators::moto_url())
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "runbook block {i} failed ({}):\n{block}\n--- stdout\n{}\n--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    // The runbook's backfill ingested the bucket, and its replay ran the dead job again (it died again: its
    // bucket still does not exist).
    let documents: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM nodes WHERE tenant_id = 'acme' AND entity_type = 'Document'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(documents, 2);
    let job = app.admin_json(&format!("/_admin/jobs/{dead}")).await;
    let replays = job["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["class"] == "replayed")
        .count();
    assert!(replays >= 1, "{job}");
    app.stop().await;
}
