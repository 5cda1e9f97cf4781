//! The job-state admin API over HTTP: listing with filters and cursors, one job's detail, retry, cancel,
//! reschedule, the dead-letter queue, and queue statistics.

use activekg::jobs::engine;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{TestApp, assert_error};
use crate::kinds::{Behavior, Probe};

/// Enqueues probes that this app has no worker for, so they stay where the test puts them.
async fn enqueue(pool: &PgPool, probes: &[Probe]) -> Vec<i64> {
    let mut conn = pool.acquire().await.unwrap();
    engine::enqueue_many(&mut conn, probes)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id.unwrap().0)
        .collect()
}

fn tenant_probe(label: &str, tenant: &str) -> Probe {
    Probe {
        tenant: Some(tenant.to_owned()),
        ..Probe::new(label, Behavior::Succeed)
    }
}

async fn kill(pool: &PgPool, ids: &[i64]) {
    sqlx::query(
        "UPDATE jobs SET state = 'dead', attempt = 3, finished_at = now(),
                errors = '[{\"attempt\": 3, \"at\": \"2026-11-29T00:00:00Z\", \"class\": \"transient\", \"error\": \"boom\"}]'
         WHERE id = ANY($1)",
    )
    .bind(ids)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn jobs_can_be_listed_by_filter_and_paged_with_a_cursor() {
    let app = TestApp::spawn().await;
    let probes: Vec<Probe> = (0..7)
        .map(|i| tenant_probe(&format!("p{i}"), if i % 2 == 0 { "acme" } else { "zeta" }))
        .collect();
    let ids = enqueue(&app.db.pool, &probes).await;

    let first: Value = app
        .admin_json("/_admin/jobs?kind=test_probe&tenant_id=acme&limit=3")
        .await;
    let page1: Vec<i64> = first["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert_eq!(page1, [ids[6], ids[4], ids[2]], "newest first, only acme");
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = app
        .admin_json(&format!(
            "/_admin/jobs?kind=test_probe&tenant_id=acme&limit=3&cursor={cursor}"
        ))
        .await;
    let page2: Vec<i64> = second["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert_eq!(page2, [ids[0]]);
    assert!(
        second["next_cursor"].is_null(),
        "the last page has no cursor"
    );

    let pending = app
        .admin_json("/_admin/jobs?state=pending&queue=test")
        .await;
    assert_eq!(pending["jobs"].as_array().unwrap().len(), 7);
    let none = app.admin_json("/_admin/jobs?state=dead&queue=test").await;
    assert!(none["jobs"].as_array().unwrap().is_empty());
    let message = assert_error(
        app.admin_get("/_admin/jobs?state=queued").await,
        422,
        "invalid_request",
    )
    .await;
    assert!(
        message.contains("pending"),
        "the error lists the valid states: {message}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_job_shows_its_arguments_attempts_and_timestamps() {
    let app = TestApp::spawn().await;
    let id = enqueue(&app.db.pool, &[tenant_probe("detail", "acme")]).await[0];
    kill(&app.db.pool, &[id]).await;
    let job = app.admin_json(&format!("/_admin/jobs/{id}")).await;
    assert_eq!(job["kind"], "test_probe");
    assert_eq!(job["state"], "dead");
    assert_eq!(job["args"]["label"], "detail");
    assert_eq!(job["tenant_id"], "acme");
    assert_eq!(job["attempt"], 3);
    assert_eq!(job["max_attempts"], 3);
    assert_eq!(job["errors"][0]["error"], "boom");
    for field in ["enqueued_at", "run_at", "finished_at"] {
        assert!(job[field].is_string(), "{field} is set: {job}");
    }
    app.stop().await;
}

#[tokio::test]
async fn retry_cancel_and_reschedule_follow_the_jobs_state() {
    let app = TestApp::spawn().await;
    let id = enqueue(&app.db.pool, &[Probe::new("movable", Behavior::Succeed)]).await[0];

    let later = "2099-01-01T00:00:00Z";
    let moved: Value = app
        .admin_post(
            &format!("/_admin/jobs/{id}/reschedule"),
            &json!({ "run_at": later }),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(moved["state"], "scheduled");
    assert_eq!(moved["run_at"], "2099-01-01T00:00:00Z");
    let bad = app
        .admin_post(
            &format!("/_admin/jobs/{id}/reschedule"),
            &json!({ "run_at": "tomorrow" }),
        )
        .await;
    assert_error(bad, 422, "invalid_request").await;

    let cancelled: Value = app
        .admin_post(&format!("/_admin/jobs/{id}/cancel"), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["state"], "cancelled");
    let again = app
        .admin_post(&format!("/_admin/jobs/{id}/cancel"), &json!({}))
        .await;
    let message = assert_error(again, 409, "conflict").await;
    assert!(message.contains("cancelled"), "{message}");

    let retried: Value = app
        .admin_post(&format!("/_admin/jobs/{id}/retry"), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        retried["state"], "pending",
        "a cancelled job can be brought back"
    );
    assert_error(
        app.admin_post("/_admin/jobs/424242/retry", &json!({}))
            .await,
        404,
        "not_found",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn the_dead_letter_queue_lists_replays_and_purges_by_filter() {
    let app = TestApp::spawn().await;
    let ids = enqueue(
        &app.db.pool,
        &[
            tenant_probe("a", "acme"),
            tenant_probe("b", "acme"),
            tenant_probe("c", "zeta"),
            tenant_probe("alive", "zeta"),
        ],
    )
    .await;
    kill(&app.db.pool, &ids[..3]).await;

    let dlq = app.admin_json("/_admin/jobs/dlq").await;
    assert_eq!(
        dlq["jobs"].as_array().unwrap().len(),
        3,
        "only dead jobs are listed"
    );

    let refused = app.admin_post("/_admin/jobs/dlq/replay", &json!({})).await;
    let message = assert_error(refused, 422, "invalid_request").await;
    assert!(
        message.contains("\"all\": true"),
        "an empty filter needs confirmation: {message}"
    );

    let replayed: Value = app
        .admin_post("/_admin/jobs/dlq/replay", &json!({ "tenant_id": "acme" }))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(replayed["count"], 2);
    let a = app.admin_json(&format!("/_admin/jobs/{}", ids[0])).await;
    assert_eq!(
        (a["state"].as_str(), a["attempt"].as_i64()),
        (Some("pending"), Some(0))
    );

    let purged: Value = app
        .admin_post(
            "/_admin/jobs/dlq/purge",
            &json!({ "ids": [ids[2], ids[3]] }),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        purged["count"], 1,
        "only the dead one of the two ids is purged"
    );
    assert_error(
        app.admin_get(&format!("/_admin/jobs/{}", ids[2])).await,
        404,
        "not_found",
    )
    .await;
    assert_eq!(
        app.admin_json(&format!("/_admin/jobs/{}", ids[3])).await["state"],
        "pending"
    );
    app.stop().await;
}

#[tokio::test]
async fn queue_statistics_show_depths_per_queue_kind_and_tenant_and_live_workers() {
    let app = TestApp::spawn().await;
    let ids = enqueue(
        &app.db.pool,
        &[
            tenant_probe("1", "acme"),
            tenant_probe("2", "acme"),
            tenant_probe("3", "zeta"),
        ],
    )
    .await;
    kill(&app.db.pool, &ids[2..]).await;
    sqlx::query("UPDATE jobs SET run_at = now() - interval '90 seconds' WHERE id = $1")
        .bind(ids[0])
        .execute(&app.db.pool)
        .await
        .unwrap();

    let stats = app.admin_json("/_admin/queues").await;
    let test_queue = stats["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "test")
        .unwrap();
    assert_eq!(
        (test_queue["pending"].as_i64(), test_queue["dead"].as_i64()),
        (Some(2), Some(1))
    );
    let age = test_queue["oldest_pending_age_seconds"].as_f64().unwrap();
    assert!((89.0..120.0).contains(&age), "oldest pending age {age}");
    assert_eq!(test_queue["kinds"][0]["kind"], "test_probe");
    let acme = stats["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant_id"] == "acme")
        .unwrap();
    assert_eq!(acme["pending"], 2);
    let workers = stats["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "this app's own worker process");
    assert_eq!(workers[0]["alive"], true);

    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(
            r#"activekg_job_queue_depth{kind="test_probe",queue="test",state="pending"} 2"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"activekg_job_queue_tenant_depth{queue="test",tenant="acme"} 2"#),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_waiting_backlog_is_cancelled_in_bulk_after_a_dry_run_count_and_running_or_other_jobs_are_left()
 {
    let app = TestApp::spawn_with(
        &[],
        activekg::app::Roles {
            worker: false,
            ..activekg::app::Roles::all()
        },
    )
    .await;
    let mut conn = app.db.pool.acquire().await.unwrap();
    let job = |tenant: &str, key: String| activekg::jobs::ingest_object::IngestObject {
        tenant_id: tenant.to_owned(),
        provider: "s3".to_owned(),
        key,
        op: activekg::domain::ChangeOp::Upsert,
        version: None,
        event_time: None,
        source: "test".to_owned(),
    };
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    for i in 0..25 {
        let run_at = (i % 2 == 0).then_some(later);
        activekg::jobs::engine::enqueue_at(&mut conn, &job("noisy", format!("k/{i}")), run_at)
            .await
            .unwrap();
    }
    activekg::jobs::engine::enqueue_at(&mut conn, &job("quiet", "k/0".to_owned()), None)
        .await
        .unwrap();
    // One of the noisy tenant's jobs is running on a live worker: a bulk cancel leaves it to finish.
    activekg::jobs::engine::enqueue_at(&mut conn, &job("noisy", "k/running".to_owned()), None)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO job_workers (id, host, pid, kinds, version) VALUES ('live-w', 'h', 1, '{ingest_object}', 't')",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE jobs SET state = 'running', locked_by = 'live-w', attempt = 1, attempted_at = now()
          WHERE args->>'key' = 'k/running'",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);

    let message = assert_error(
        app.admin_post("/_admin/jobs/cancel", &json!({})).await,
        422,
        "invalid_request",
    )
    .await;
    assert!(message.contains("every waiting job"), "{message}");
    assert_error(
        app.admin_post(
            "/_admin/jobs/cancel",
            &json!({"tenant_id": "noisy", "state": "dead"}),
        )
        .await,
        422,
        "invalid_request",
    )
    .await;
    let dry: Value = app
        .admin_post(
            "/_admin/jobs/cancel",
            &json!({"tenant_id": "noisy", "dry_run": true}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(dry, json!({"count": 25, "dry_run": true}));
    let scheduled: Value = app
        .admin_post(
            "/_admin/jobs/cancel",
            &json!({"tenant_id": "noisy", "state": "scheduled"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        scheduled["count"], 13,
        "only the ones due later: {scheduled}"
    );
    let rest: Value = app
        .admin_post("/_admin/jobs/cancel", &json!({"tenant_id": "noisy"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(rest["count"], 12);
    let cancelled = app
        .admin_json("/_admin/jobs?tenant_id=noisy&state=cancelled&limit=100")
        .await;
    assert_eq!(cancelled["jobs"].as_array().unwrap().len(), 25);
    assert!(
        cancelled["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["unique_key"].is_null()),
        "cancelled jobs give up their keys, so the same change can be queued again"
    );
    let running = app
        .admin_json("/_admin/jobs?tenant_id=noisy&state=running")
        .await;
    assert_eq!(
        running["jobs"][0]["args"]["key"], "k/running",
        "the running job is left to finish: {running}"
    );
    let quiet = app.admin_json("/_admin/jobs?tenant_id=quiet").await;
    assert_eq!(
        quiet["jobs"][0]["state"], "pending",
        "another tenant's job is untouched"
    );
    app.stop().await;
}
