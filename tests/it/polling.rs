//! Polling buckets without notifications: a pass lists every page and queues each object once; the next pass
//! queues only what changed; a failed pass frees the connector and says why.

use std::time::Duration;

use activekg::domain::{Provider, TenantId};
use activekg::jobs::backfill_page;
use activekg::jobs::engine::{Runtime, RuntimeHandle};
use activekg::jobs::poll_connectors;
use activekg::jobs::{self};
use futures::StreamExt;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::emulators;
use crate::helpers::{TestDb, eventually, fast_job_settings, job_deps};

/// Workers for listing pages only: the ingest jobs they queue stay queued, to be counted.
async fn page_workers(db: &TestDb) -> (jobs::Deps, RuntimeHandle) {
    let settings = fast_job_settings();
    let deps = job_deps(&db.pool, &settings);
    let mut runtime = Runtime::new(db.pool.clone(), settings);
    runtime.register(
        backfill_page::Deps {
            pool: db.pool.clone(),
            registry: deps.registry.clone(),
            sources: deps.sources.clone(),
        },
        backfill_page::run,
    );
    (deps, runtime.start().await.unwrap())
}

async fn run_state(pool: &PgPool, run: Uuid) -> backfill_page_view::Run {
    sqlx::query_as(
        "SELECT state, pages, seen, enqueued, skipped, error FROM backfill_runs WHERE id = $1",
    )
    .bind(run)
    .fetch_one(pool)
    .await
    .unwrap()
}

mod backfill_page_view {
    #[derive(Debug, sqlx::FromRow)]
    pub struct Run {
        pub state: String,
        pub pages: i64,
        pub seen: i64,
        pub enqueued: i64,
        pub skipped: i64,
        pub error: Option<String>,
    }
}

async fn finished(pool: &PgPool, run: Uuid) -> backfill_page_view::Run {
    eventually(
        Duration::from_secs(120),
        "the poll pass to finish",
        || async {
            let state = run_state(pool, run).await;
            (state.state != "running").then_some(state)
        },
    )
    .await
}

/// (ingest jobs, distinct object keys among them) of `tenant`.
async fn ingest_jobs(pool: &PgPool, tenant: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(DISTINCT args->>'key') FROM jobs WHERE kind = 'ingest_object' AND tenant_id = $1",
    )
    .bind(tenant)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn make_due(pool: &PgPool) {
    sqlx::query("UPDATE connector_polls SET next_poll_at = now()")
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_pass_over_2500_objects_queues_each_once_and_the_next_pass_only_what_changed() {
    let client = emulators::s3_client().await;
    let bucket = emulators::unique_bucket("poll");
    emulators::s3_bucket(&client, &bucket).await;
    let keys: Vec<String> = (0..2500).map(|i| format!("kb/doc-{i:05}.txt")).collect();
    futures::stream::iter(keys.iter())
        .for_each_concurrent(32, |key| {
            let client = client.clone();
            let bucket = bucket.clone();
            async move {
                emulators::s3_put(&client, &bucket, key, b"v1", Some("text/plain")).await;
            }
        })
        .await;
    let db = TestDb::new().await;
    let (deps, workers) = page_workers(&db).await;
    let tenant = TenantId::parse("poller").unwrap();
    let mut config = emulators::s3_config(&bucket);
    config["poll_interval_seconds"] = json!(60);
    deps.registry
        .register(&tenant, Provider::S3, config)
        .await
        .unwrap();
    // A connector without polling, and a disabled polling one, are never polled.
    let quiet = TenantId::parse("quiet").unwrap();
    deps.registry
        .register(&quiet, Provider::S3, emulators::s3_config(&bucket))
        .await
        .unwrap();
    let off = TenantId::parse("off").unwrap();
    let mut polling = emulators::s3_config(&bucket);
    polling["poll_interval_seconds"] = json!(5);
    deps.registry
        .register(&off, Provider::S3, polling)
        .await
        .unwrap();
    deps.registry
        .set_enabled(&off, Provider::S3, false)
        .await
        .unwrap();

    let started = poll_connectors::start_due(&db.pool).await.unwrap();
    assert_eq!(started.len(), 1, "only the enabled polling connector");
    let first = finished(&db.pool, started[0]).await;
    assert_eq!(first.state, "completed", "{first:?}");
    assert_eq!(
        (first.pages, first.seen, first.enqueued),
        (25, 2500, 2500),
        "every page of 100 listed, every object queued: {first:?}"
    );
    assert_eq!(
        ingest_jobs(&db.pool, "poller").await,
        (2500, 2500),
        "each object queued exactly once"
    );
    let queued: Vec<String> =
        sqlx::query_scalar("SELECT args->>'key' FROM jobs WHERE kind = 'ingest_object' ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(queued, keys, "no object skipped between pages");
    assert!(
        poll_connectors::start_due(&db.pool)
            .await
            .unwrap()
            .is_empty(),
        "the next pass waits for poll_interval_seconds"
    );

    // Three new objects and one overwritten: the next pass queues those four and nothing else.
    for key in ["kb/new-1.txt", "kb/new-2.txt", "kb/new-3.txt"] {
        emulators::s3_put(&client, &bucket, key, b"fresh", Some("text/plain")).await;
    }
    emulators::s3_put(
        &client,
        &bucket,
        "kb/doc-00042.txt",
        b"v2",
        Some("text/plain"),
    )
    .await;
    make_due(&db.pool).await;
    let started = poll_connectors::start_due(&db.pool).await.unwrap();
    assert_eq!(started.len(), 1);
    let second = finished(&db.pool, started[0]).await;
    assert_eq!(second.state, "completed", "{second:?}");
    assert_eq!(second.seen, 2503);
    assert_eq!(
        second.enqueued, 4,
        "only the new and changed objects: {second:?}"
    );
    assert_eq!(
        second.skipped, 2499,
        "unchanged objects inside the overlap window are re-offered and skipped by their idempotency keys"
    );
    assert_eq!(ingest_jobs(&db.pool, "poller").await, (2504, 2503));

    let (watermark, current, passes): (Option<chrono::DateTime<chrono::Utc>>, Option<Uuid>, i64) =
        sqlx::query_as(
            "SELECT watermark, current_run, passes FROM connector_polls WHERE tenant_id = 'poller'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(watermark.is_some(), "the cursor is kept in PostgreSQL");
    assert_eq!((current, passes), (None, 2));

    // Past the overlap, objects older than the watermark are not even offered.
    sqlx::query("UPDATE connector_polls SET watermark = watermark + interval '10 minutes'")
        .execute(&db.pool)
        .await
        .unwrap();
    make_due(&db.pool).await;
    let started = poll_connectors::start_due(&db.pool).await.unwrap();
    let third = finished(&db.pool, started[0]).await;
    assert_eq!(third.seen, 2503, "the whole listing is read");
    assert_eq!(third.enqueued, 0);
    assert!(
        third.skipped <= 4,
        "only objects changed at the watermark are offered: {third:?}"
    );

    let others: i64 =
        sqlx::query_scalar("SELECT count(*) FROM backfill_runs WHERE tenant_id <> 'poller'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(others, 0);
    workers.shutdown().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_pass_that_fails_frees_its_connector_and_records_why() {
    let db = TestDb::new().await;
    let (deps, workers) = page_workers(&db).await;
    let tenant = TenantId::parse("gone").unwrap();
    let mut config = emulators::s3_config(&emulators::unique_bucket("missing"));
    config["poll_interval_seconds"] = json!(5);
    deps.registry
        .register(&tenant, Provider::S3, config)
        .await
        .unwrap();
    let started = poll_connectors::start_due(&db.pool).await.unwrap();
    let failed = finished(&db.pool, started[0]).await;
    assert_eq!(failed.state, "failed");
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.contains("not found")),
        "the run says why: {failed:?}"
    );
    let (current, error): (Option<Uuid>, Option<String>) = sqlx::query_as(
        "SELECT current_run, last_error FROM connector_polls WHERE tenant_id = 'gone'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(current, None, "the connector is free for the next pass");
    assert!(
        error.as_deref().is_some_and(|e| e.contains("not found")),
        "{error:?}"
    );
    make_due(&db.pool).await;
    assert_eq!(
        poll_connectors::start_due(&db.pool).await.unwrap().len(),
        1,
        "the next pass starts when due"
    );
    workers.shutdown().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_polling_connector_registered_through_the_api_shows_its_pass_and_cursor() {
    let app = crate::helpers::TestApp::spawn_with(
        &[],
        activekg::app::Roles {
            worker: false,
            scheduler: false,
            ..activekg::app::Roles::all()
        },
    )
    .await;
    let mut config = emulators::s3_config("polled-bucket");
    config["prefix"] = json!("kb/");
    config["poll_interval_seconds"] = json!(30);
    let response = app
        .admin_post(
            "/_admin/connectors/s3/register",
            &json!({"tenant_id": "acme", "config": config}),
        )
        .await;
    assert!(response.status().is_success(), "{}", response.status());
    config["poll_interval_seconds"] = json!(2);
    let response = app
        .admin_post(
            "/_admin/connectors/s3/register",
            &json!({"tenant_id": "fast", "config": config}),
        )
        .await;
    crate::helpers::assert_error(response, 422, "invalid_request").await;

    let started = poll_connectors::start_due(&app.db.pool).await.unwrap();
    assert_eq!(started.len(), 1);
    let polls = app.admin_json("/_admin/connectors/polls").await;
    assert_eq!(polls.as_array().unwrap().len(), 1, "{polls}");
    let poll = &polls[0];
    assert_eq!(poll["tenant_id"], "acme");
    assert_eq!(poll["passes"], 1);
    assert_eq!(poll["current_run"], started[0].to_string());
    assert!(poll["watermark"].is_null(), "no pass has completed yet");
    let run = app
        .admin_json(&format!("/_admin/connectors/backfills/{}", started[0]))
        .await;
    assert_eq!(
        run["prefix"], "kb/",
        "the pass lists the connector's prefix"
    );
    assert_eq!(run["state"], "running");
    assert_eq!(run["started_by"], "poll");
    app.stop().await;
}

/// Starts a poll pass for a fresh polling connector and returns it, with the job of its first page.
async fn one_pass(
    db: &TestDb,
    registry: &activekg::registry::Registry,
    tenant: &str,
) -> (Uuid, i64) {
    let tenant = TenantId::parse(tenant).unwrap();
    let mut config = emulators::s3_config(&emulators::unique_bucket("never"));
    config["poll_interval_seconds"] = json!(5);
    registry
        .register(&tenant, Provider::S3, config)
        .await
        .unwrap();
    let run = poll_connectors::start_due(&db.pool).await.unwrap()[0];
    let job: i64 = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE kind = 'backfill_page' AND args->>'run_id' = $1",
    )
    .bind(run.to_string())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    (run, job)
}

async fn poll_freed(pool: &PgPool, tenant: &str) -> (Option<Uuid>, Option<String>) {
    sqlx::query_as("SELECT current_run, last_error FROM connector_polls WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_pass_is_closed_when_its_page_job_ends_by_any_path() {
    let db = TestDb::new().await;
    let registry = crate::helpers::registry(&db.pool);
    let failed = activekg::metrics::metrics()
        .poller_runs
        .with_label_values(&["s3", "failed"]);
    let before = failed.get();

    // An operator cancels the page job.
    let (cancelled, job) = one_pass(&db, &registry, "cancelled").await;
    activekg::jobs::engine::admin::cancel(&db.pool, activekg::domain::JobId(job))
        .await
        .unwrap();
    let run = run_state(&db.pool, cancelled).await;
    assert_eq!(run.state, "failed");
    assert_eq!(
        poll_freed(&db.pool, "cancelled").await.0,
        None,
        "its connector is free again"
    );

    // The page job's worker dies on its last attempt and the job is taken back as dead.
    let (orphaned, job) = one_pass(&db, &registry, "orphaned").await;
    sqlx::query(
        "UPDATE jobs SET state = 'running', attempt = max_attempts, locked_by = 'ghost:1:dead',
                attempted_at = now() - interval '1 hour' WHERE id = $1",
    )
    .bind(job)
    .execute(&db.pool)
    .await
    .unwrap();
    // The page's arguments no longer decode (a job written by another version).
    let (garbled, job) = one_pass(&db, &registry, "garbled").await;
    sqlx::query("UPDATE jobs SET args = args || '{\"page\": \"not a number\"}' WHERE id = $1")
        .bind(job)
        .execute(&db.pool)
        .await
        .unwrap();
    let (_, workers) = page_workers(&db).await;
    for (run, tenant) in [(orphaned, "orphaned"), (garbled, "garbled")] {
        let closed = eventually(Duration::from_secs(15), "the pass to be closed", || async {
            let run = run_state(&db.pool, run).await;
            (run.state == "failed").then_some(run)
        })
        .await;
        let (current, error) = poll_freed(&db.pool, tenant).await;
        assert_eq!(current, None);
        assert_eq!(
            error, closed.error,
            "the connector records why its pass failed"
        );
    }
    // The next tick counts the three failed passes, exactly once.
    poll_connectors::start_due(&db.pool).await.unwrap();
    poll_connectors::start_due(&db.pool).await.unwrap();
    assert_eq!(failed.get() - before, 3);
    workers.shutdown().await;
    db.drop_db().await;
}
