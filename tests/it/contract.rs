//! The API against its own served spec under a fuzzer: schemathesis (pinned, from PyPI, installed by .ci/run
//! into target/tools) runs every check and every phase, stateful included, with a fixed seed, once with the
//! admin token and once without, against a live server holding a connector, documents, nodes and jobs.
//! Any 5xx, any answer the spec does not document, any valid request refused or invalid one accepted fails
//! the test. The few relaxations, and why, are in tests/contract/schemathesis.toml.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::emulators;
use crate::helpers::{ADMIN_TOKEN, TestApp, eventually};

/// The version .ci/run installs; a failure reproduces with the same version and seed.
const VERSION: &str = "4.32.5";
const SEED: &str = "20261204";

fn schemathesis() -> std::path::PathBuf {
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/schemathesis");
    assert!(
        tool.exists(),
        "schemathesis is missing: python3 -m venv target/tools && target/tools/bin/pip install schemathesis=={VERSION} (.ci/run does)"
    );
    tool
}

/// Runs schemathesis over the served spec and returns (passed, its report). A run that failed only because the
/// tool itself crashed (a "Runtime Error" such as CPython's "AST constructor recursion depth mismatch", seen
/// under a loaded machine, with every generated case passing) is run once more; a failed check never is.
async fn fuzz(app: &TestApp, examples: u32, token: Option<&str>) -> (bool, String) {
    let (passed, report) = fuzz_once(app, examples, token).await;
    if passed || !report.contains("Runtime Error") || report.contains('❌') {
        return (passed, report);
    }
    eprintln!("schemathesis crashed without a failing check; running it again:\n{report}");
    fuzz_once(app, examples, token).await
}

async fn fuzz_once(app: &TestApp, examples: u32, token: Option<&str>) -> (bool, String) {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/contract/schemathesis.toml");
    let reports = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(schemathesis());
    command
        .arg("--config-file")
        .arg(&config)
        .args(["run", &format!("{}/openapi.json", app.base)])
        .args([
            "--checks",
            "all",
            "--phases",
            "examples,coverage,fuzzing,stateful",
        ])
        .args(["--seed", SEED, "--max-examples", &examples.to_string()])
        .args(["--workers", "2", "--request-timeout", "30", "--no-color"])
        .args(["--generation-database", "none"])
        .current_dir(reports.path())
        .kill_on_drop(true);
    if let Some(token) = token {
        command.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let output = tokio::time::timeout(Duration::from_secs(200), command.output())
        .await
        .expect("the fuzzer finishes within its bound")
        .expect("schemathesis runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        report.contains(&format!("Schemathesis v{VERSION}")),
        "not the pinned schemathesis {VERSION}:\n{report}"
    );
    (output.status.success(), report)
}

/// A server with something of each kind in it, so the fuzzer's requests reach real rows.
async fn app_with_data() -> TestApp {
    let client = emulators::s3_client().await;
    let bucket = emulators::unique_bucket("contract");
    emulators::s3_bucket(&client, &bucket).await;
    emulators::s3_put(
        &client,
        &bucket,
        "docs/a.txt",
        b"A document for the fuzzer to find.",
        Some("text/plain"),
    )
    .await;
    let app = TestApp::spawn().await;
    let registered = app
        .admin_post(
            "/_admin/connectors/s3/register",
            &json!({"tenant_id": "fuzz", "config": emulators::s3_config(&bucket)}),
        )
        .await;
    assert!(registered.status().is_success(), "{registered:?}");
    let backfill = app
        .admin_post(
            "/_admin/connectors/s3/backfill",
            &json!({"tenant_id": "fuzz"}),
        )
        .await;
    assert!(backfill.status().is_success(), "{backfill:?}");
    let nodes = app
        .admin_post(
            "/nodes/batch",
            &json!({"nodes": [
                {"tenant_id": "fuzz", "classes": ["Note"], "text": "first note"},
                {"tenant_id": "fuzz", "classes": ["Note"], "text": "second note"},
            ]}),
        )
        .await;
    assert!(nodes.status().is_success(), "{nodes:?}");
    eventually(
        Duration::from_secs(60),
        "the document is ingested",
        || async {
            let page = app.admin_json("/nodes?tenant_id=fuzz&limit=10").await;
            (page["nodes"].as_array()?.len() >= 3).then_some(())
        },
    )
    .await;
    app
}

#[tokio::test]
async fn the_api_answers_a_fuzzer_only_as_its_spec_says_with_and_without_the_token() {
    let app = app_with_data().await;
    let (passed, report) = fuzz(&app, 40, Some(ADMIN_TOKEN)).await;
    assert!(passed, "with the admin token:\n{report}");
    let (passed, report) = fuzz(&app, 15, None).await;
    assert!(passed, "without a token:\n{report}");
    // Nothing the fuzzer sent took the server down or left it unable to answer.
    let health = app
        .client
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .unwrap();
    assert!(health.status().is_success());
}
