//! The dashboard in a real headless Chromium (Debian's chromium, driven by playwright-core from npm): it
//! shows a dead job, replays it on confirmation, and sees it complete. Screenshots land in
//! `target/dashboard-screenshots/`.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::emulators;
use crate::helpers::{ADMIN_TOKEN, TestApp, eventually};

#[tokio::test]
async fn the_dashboard_shows_a_dead_job_replays_it_and_sees_it_complete_in_chromium() {
    let root = env!("CARGO_MANIFEST_DIR");
    let driver = Path::new(root).join("tests/browser/node_modules/playwright-core");
    assert!(
        driver.exists(),
        "playwright-core is missing: run `npm ci --prefix tests/browser` (.ci/run does)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: install Debian's chromium (.ci/run does)"
    );

    let app = TestApp::spawn().await;
    // A backfill of a bucket that does not exist yet: its page job is dead-lettered (not found).
    let bucket = emulators::unique_bucket("dash");
    let mut config = emulators::s3_config(&bucket);
    config["secret_access_key"] = json!("super-secret-key");
    let registered = app
        .admin_post(
            "/_admin/connectors/s3/register",
            &json!({"tenant_id": "acme", "config": config}),
        )
        .await;
    assert!(registered.status().is_success());
    let started: serde_json::Value = app
        .admin_post(
            "/_admin/connectors/s3/backfill",
            &json!({"tenant_id": "acme"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let job_id = started["job_id"].as_i64().unwrap();
    eventually(Duration::from_secs(30), "the page job to die", || async {
        let job = app.admin_json(&format!("/_admin/jobs/{job_id}")).await;
        (job["state"] == "dead").then_some(())
    })
    .await;
    // Now the replay can succeed.
    emulators::s3_bucket(&emulators::s3_client().await, &bucket).await;
    // Two sampled minutes of history for the charts (sampling itself is tested in jobs_engine).
    sqlx::query(
        "INSERT INTO job_history (minute, queue, pending, scheduled, running, completed, failed, dead)
         VALUES (date_trunc('minute', now()) - interval '3 minutes', 'connector', 40, 0, 2, 7, 3, 2),
                (date_trunc('minute', now()) - interval '2 minutes', 'connector', 25, 5, 2, 12, 1, 0)
         ON CONFLICT DO NOTHING",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    // A backlog queued for tomorrow, for the dashboard to cancel in bulk.
    let mut conn = app.db.pool.acquire().await.unwrap();
    for i in 0..3 {
        let job = activekg::jobs::ingest_object::IngestObject {
            tenant_id: "later".to_owned(),
            provider: "s3".to_owned(),
            key: format!("tomorrow/{i}.txt"),
            op: activekg::domain::ChangeOp::Upsert,
            version: None,
            event_time: None,
            source: "test".to_owned(),
        };
        let at = chrono::Utc::now() + chrono::Duration::days(1);
        activekg::jobs::engine::enqueue_at(&mut conn, &job, Some(at))
            .await
            .unwrap();
    }
    drop(conn);

    let shots = Path::new(root).join("target/dashboard-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("node")
            .arg(Path::new(root).join("tests/browser/dashboard.mjs"))
            .args([
                &app.base,
                ADMIN_TOKEN,
                &job_id.to_string(),
                shots.to_str().unwrap(),
            ])
            .env("CHROMIUM", &chromium)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser run ends within two minutes")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("DASHBOARD OK"),
        "the browser run failed:\n{stdout}\n{stderr}"
    );
    assert!(
        shots.join("overview.png").metadata().unwrap().len() > 10_000,
        "the overview screenshot was taken"
    );
    let cancelled = app
        .admin_json("/_admin/jobs?tenant_id=later&state=cancelled")
        .await;
    assert_eq!(
        cancelled["jobs"].as_array().unwrap().len(),
        3,
        "the dashboard cancelled the scheduled backlog: {cancelled}"
    );
    let job = app.admin_json(&format!("/_admin/jobs/{job_id}")).await;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(
        job["errors"].as_array().unwrap().last().unwrap()["class"],
        "replayed",
        "the replay is in the job's history"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_dashboard_is_self_contained_and_holds_no_data_without_the_token() {
    let app = TestApp::spawn().await;
    for (path, kind) in [
        ("/dashboard", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/app.css", "text/css"),
    ] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        assert!(headers["content-type"].to_str().unwrap().starts_with(kind));
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
        // The SVG namespace is a name, not an address anything is fetched from.
        let body = response
            .text()
            .await
            .unwrap()
            .replace("\"http://www.w3.org/2000/svg\"", "");
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "{path} loads nothing from elsewhere"
        );
    }
    // The data behind it needs the token.
    assert_eq!(app.get("/_admin/queues").await.status(), 401);
    app.stop().await;
}
