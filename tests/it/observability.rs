//! The operations pack: alert rules pass promtool and their unit tests, dashboard queries are valid PromQL,
//! every metric they name is one the service exports, and worker processes serve their metrics too.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::helpers::{KEK, TestDb, eventually, free_port};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(root())
        .output()
        .expect("promtool runs: install Debian's prometheus package (.ci/run does)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    text
}

const ALERTS: &str = "observability/alerts/connector_alerts.yml";
const DASHBOARD: &str = "observability/dashboards/connector_overview.json";

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let checked = promtool(&["check", "rules", ALERTS]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&[
        "test",
        "rules",
        "observability/alerts/connector_alerts_test.yml",
    ]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    let rules = std::fs::read_to_string(root().join(ALERTS)).unwrap();
    for alert in [
        "WebhookVerificationFailuresHigh",
        "WebhookTopicRejected",
        "ConnectorQueueDepthHigh",
        "IngestErrorRateHigh",
        "IngestStalled",
        "PurgerErrors",
        "PubSubReconnectsHigh",
        "RotationErrors",
        "ConfigDecryptFailures",
    ] {
        assert!(
            rules.contains(&format!("- alert: {alert}\n")),
            "the guide's alert {alert} is defined"
        );
    }
}

fn dashboard_queries() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join(DASHBOARD)).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    queries
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "{queries:?}");
    // promtool checks PromQL inside rule files: each query becomes a recording rule.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, query) in queries.iter().enumerate() {
        // Grafana's variables are not PromQL; give them a value.
        let query = query.replace("$tenant", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&query).unwrap()
        ));
    }
    let file: PathBuf = std::env::temp_dir().join(format!(
        "activekg-dashboard-{}.yml",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&file, rules).unwrap();
    let checked = promtool(&["check", "rules", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
    assert!(
        checked.contains(&format!("{} rules found", queries.len())),
        "{checked}"
    );
    let text = std::fs::read_to_string(root().join(DASHBOARD)).unwrap();
    for panel in [
        "Ingestion rate by provider",
        "Ingest errors by provider",
        "heatmap",
        "Webhook verification success rate",
        "Purger history",
        "p50 / p95 / p99",
    ] {
        assert!(text.contains(panel), "the guide's panel {panel:?} is there");
    }
}

/// Metric names in `text`: our prefixes, without the series suffixes histograms add.
fn referenced_metrics(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = ["activekg_", "connector_", "webhook_", "embedding_", "http_"]
            .iter()
            .any(|p| text[i..].starts_with(p))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
        if starts {
            let end = text[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(text.len(), |e| i + e);
            let mut name = &text[i..end];
            for suffix in ["_bucket", "_count", "_sum"] {
                if let Some(base) = name.strip_suffix(suffix)
                    && (base.ends_with("_seconds") || base.ends_with("_size"))
                {
                    name = base;
                }
            }
            names.insert(name.to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

#[tokio::test]
async fn every_metric_the_alerts_and_dashboard_use_is_exported_by_the_service() {
    let alerts: String = std::fs::read_to_string(root().join(ALERTS))
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut used = referenced_metrics(&alerts);
    for query in dashboard_queries() {
        used.extend(referenced_metrics(&query));
    }
    // Names in annotations (runbook anchors) are not metrics.
    used.retain(|n| !n.contains("_alerts"));
    assert!(used.len() >= 20, "{used:?}");
    let exported: BTreeSet<String> = activekg::metrics::metrics()
        .names()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "used but not exported: {missing:?}\nexported: {exported:?}"
    );

    // And they are what a scrape of a real process returns: every family with a value so far is listed,
    // under exactly these names.
    let app = crate::helpers::TestApp::spawn().await;
    app.get("/health").await;
    let scraped = app.get("/metrics").await.text().await.unwrap();
    for line in scraped.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(
            exported.contains(name),
            "{name} is scraped but not declared"
        );
    }
    for always in [
        "http_requests_total",
        "connector_purger_duration_seconds",
        "embedding_call_duration_seconds",
    ] {
        assert!(
            scraped.contains(&format!("# TYPE {always} ")),
            "{always} in {scraped}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_fresh_server_exports_every_metric_with_zero_series_for_the_label_values_known_in_advance()
 {
    let app = crate::helpers::TestApp::spawn().await;
    let scraped = app.get("/metrics").await.text().await.unwrap();
    for name in activekg::metrics::metrics().names() {
        assert!(
            scraped.contains(&format!("# TYPE {name} ")),
            "{name} is not declared on the first scrape"
        );
    }
    // The series alerts and panels query exist at zero before their first event.
    for series in [
        r#"connector_rotation_total{result="error"} 0"#,
        r#"activekg_jobs_dead_total{kind="ingest_object"} 0"#,
        r#"activekg_jobs_failed_total{class="crash",kind="embed_node"} 0"#,
        r#"connector_pubsub_reconnect_total{source="gcs_subscriber"} 0"#,
        r#"connector_config_decrypt_failures_total{field="secret_access_key",provider="s3"} 0"#,
        r#"connector_worker_errors_total{error_type="parse"} 0"#,
        r#"webhook_pubsub_verify_total{provider="gcs",result="token_invalid"} 0"#,
        r#"webhook_sns_verify_total{provider="s3",result="signature_ok"} 0"#,
        r#"connector_ingest_duration_seconds_count{provider="gcs"} 0"#,
        r#"activekg_pipeline_stage_seconds_count{stage="embed"} 0"#,
        r#"connector_pubsub_messages_total{result="rejected"} 0"#,
        r#"activekg_worker_fenced_total 0"#,
    ] {
        assert!(
            scraped.contains(series),
            "{series} missing from the first scrape"
        );
    }
    // A tenant's series appear when its connector is registered, before anything is ingested.
    let registered = app
        .admin_post(
            "/_admin/connectors/s3/register",
            &serde_json::json!({"tenant_id": "acme", "config": {"bucket": "acme-docs"}}),
        )
        .await;
    assert_eq!(registered.status(), 201);
    let scraped = app.get("/metrics").await.text().await.unwrap();
    for series in [
        r#"connector_ingest_errors_total{provider="s3",tenant="acme"} 0"#,
        r#"webhook_topic_rejected_total{provider="s3",tenant="acme"} 0"#,
    ] {
        assert!(
            scraped.contains(series),
            "{series} missing after registering"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_worker_process_serves_metrics_health_and_readiness_on_its_own_port() {
    let db = TestDb::new().await;
    let port = free_port();
    let mut worker = crate::helpers::spawn_role(
        "worker",
        &[
            ("ACTIVEKG_DSN", db.url.clone()),
            ("CONNECTOR_KEK_V1", KEK.to_owned()),
            ("EMBEDDING_BACKEND", "hash".to_owned()),
            ("ACTIVEKG_METRICS_LISTEN", format!("127.0.0.1:{port}")),
        ],
    );
    let base = format!("http://127.0.0.1:{port}");
    let metrics = eventually(Duration::from_secs(30), "the worker's /metrics", || async {
        let response = reqwest::get(format!("{base}/metrics")).await.ok()?;
        let text = response.text().await.ok()?;
        text.contains("activekg_job_workers_alive{host=")
            .then_some(text)
    })
    .await;
    assert!(metrics.contains("# TYPE embedding_call_duration_seconds histogram"));
    assert_eq!(
        reqwest::get(format!("{base}/readyz"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(format!("{base}/health"))
            .await
            .unwrap()
            .status(),
        200
    );
    let admin = reqwest::get(format!("{base}/_admin/queues")).await.unwrap();
    assert_eq!(admin.status(), 404, "a worker serves no admin API");
    crate::helpers::terminate(&worker);
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    db.drop_db().await;
}
