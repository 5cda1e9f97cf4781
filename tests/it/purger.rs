//! The purger: documents soft-deleted past retention go with their chunks and edges, batch by batch; the dry
//! run counts exactly what a run removes; the 02:00 schedule fires once per tick across processes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{KEK, TestApp, TestDb, assert_error};

/// A document with `chunks` chunks (DERIVED_FROM edges), each chunk with a vector row, plus a MENTIONS edge
/// from the document to `mentions` when given. `deleted_days_ago` soft-deletes the document and its chunks.
async fn document(
    pool: &PgPool,
    tenant: &str,
    chunks: usize,
    deleted_days_ago: Option<i64>,
    mentions: Option<Uuid>,
) -> Uuid {
    let deleted: Option<DateTime<Utc>> =
        deleted_days_ago.map(|d| Utc::now() - chrono::Duration::days(d));
    let doc = node(pool, tenant, "Document", "skipped", deleted).await;
    for _ in 0..chunks {
        let chunk = node(pool, tenant, "Chunk", "ready", deleted).await;
        sqlx::query(
            "INSERT INTO edges (src, rel, dst, tenant_id) VALUES ($1, 'DERIVED_FROM', $2, $3)",
        )
        .bind(chunk)
        .bind(doc)
        .bind(tenant)
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO node_embeddings (node_id, tenant_id, embedding, model, dimensions, text_hash)
             VALUES ($1, $2, array_fill(0.05::real, ARRAY[384]), 'hash', 384, 'h')",
        )
        .bind(chunk)
        .bind(tenant)
        .execute(pool)
        .await
        .unwrap();
    }
    if let Some(other) = mentions {
        sqlx::query("INSERT INTO edges (src, rel, dst, tenant_id) VALUES ($1, 'MENTIONS', $2, $3)")
            .bind(doc)
            .bind(other)
            .bind(tenant)
            .execute(pool)
            .await
            .unwrap();
    }
    doc
}

async fn node(
    pool: &PgPool,
    tenant: &str,
    class: &str,
    status: &str,
    deleted: Option<DateTime<Utc>>,
) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO nodes (id, tenant_id, classes, props, embedding_status, deleted_at)
         VALUES ($1, $2, ARRAY[$3], '{\"text\": \"x\"}', $4, $5)",
    )
    .bind(id)
    .bind(tenant)
    .bind(class)
    .bind(status)
    .bind(deleted)
    .execute(pool)
    .await
    .unwrap();
    id
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn purge(app: &TestApp, body: Value) -> (u16, Value) {
    let response = app
        .admin_post("/_admin/connectors/purge_deleted", &body)
        .await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn a_purge_removes_exactly_the_expired_documents_with_their_chunks_and_edges_in_batches_of_seven()
 {
    let app = TestApp::spawn().await;
    let pool = app.db.pool.clone();
    let live_topic = document(&pool, "acme", 0, None, None).await;
    let mut expired = Vec::new();
    for i in 0..50 {
        // Every fifth expired document also MENTIONS a live node: that edge goes, the live node stays.
        let mentions = (i % 5 == 0).then_some(live_topic);
        expired.push(document(&pool, "acme", 2, Some(31 + i as i64 % 20), mentions).await);
    }
    let mut kept = Vec::new();
    for _ in 0..5 {
        kept.push(document(&pool, "acme", 2, Some(29), None).await);
        kept.push(document(&pool, "acme", 2, None, None).await);
        kept.push(document(&pool, "globex", 2, Some(90), None).await);
    }
    let nodes_before = count(&pool, "SELECT count(*) FROM nodes").await;
    let edges_before = count(&pool, "SELECT count(*) FROM edges").await;

    let (status, dry) = purge(&app, json!({"dry_run": true, "tenant_id": "acme"})).await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(
        dry["would_delete"],
        json!({"documents": 50, "chunks": 100, "edges": 110}),
        "50 documents, their 100 chunks, 100 DERIVED_FROM and 10 MENTIONS edges: {dry}"
    );
    assert_eq!(dry["retention_days"], 30);
    assert!(dry["job_id"].is_null());
    assert_eq!(
        count(&pool, "SELECT count(*) FROM nodes").await,
        nodes_before,
        "a dry run deletes nothing"
    );

    let (status, started) = purge(
        &app,
        json!({"dry_run": false, "tenant_id": "acme", "batch_size": 7}),
    )
    .await;
    assert_eq!(status, 202, "{started}");
    let job_id = started["job_id"].as_i64().expect("a real run has a job");
    let job = app
        .admin_json(&format!("/_admin/jobs/{job_id}?wait_seconds=60"))
        .await;
    assert_eq!(job["state"], "completed", "{job}");
    let progress = &job["progress"];
    for field in ["documents", "chunks", "edges"] {
        assert_eq!(
            progress[field], dry["would_delete"][field],
            "the run removed what the dry run counted: {progress}"
        );
    }
    assert_eq!(
        progress["batches"], 8,
        "50 documents in batches of 7: seven full batches and one of 1"
    );

    assert_eq!(
        count(&pool, "SELECT count(*) FROM nodes").await,
        nodes_before - 150
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM edges").await,
        edges_before - 110
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes WHERE id = ANY($1)")
        .bind(&expired)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "every expired document went");
    let kept_left: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes WHERE id = ANY($1)")
        .bind(&kept)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        kept_left, 15,
        "documents inside retention, live ones and another tenant's stay"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM node_embeddings e LEFT JOIN nodes n ON n.id = e.node_id WHERE n.id IS NULL"
        )
        .await,
        0,
        "no vector outlives its chunk"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM nodes WHERE id IN (SELECT src FROM edges WHERE rel = 'DERIVED_FROM')").await,
        30,
        "the 15 kept documents keep their 2 chunks each"
    );

    let (_, again) = purge(&app, json!({"dry_run": true, "tenant_id": "acme"})).await;
    assert_eq!(
        again["would_delete"],
        json!({"documents": 0, "chunks": 0, "edges": 0})
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("connector_purger_total{result=\"success\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("connector_purger_duration_seconds_count"));
    app.stop().await;
}

#[tokio::test]
async fn a_purge_of_all_tenants_uses_the_configured_batch_size_and_a_second_request_joins_the_active_run()
 {
    let app = TestApp::spawn_with(
        &[("PURGER_BATCH_SIZE", "3"), ("PURGER_RETENTION_DAYS", "0")],
        activekg::app::Roles {
            worker: false,
            ..activekg::app::Roles::all()
        },
    )
    .await;
    let pool = app.db.pool.clone();
    for tenant in ["a", "b", "c", "d"] {
        document(&pool, tenant, 1, Some(0), None).await;
    }
    let (status, dry) = purge(&app, json!({"dry_run": true})).await;
    assert_eq!(status, 200);
    assert_eq!(dry["would_delete"]["documents"], 4, "{dry}");
    assert!(dry["tenant_id"].is_null());

    let (status, first) = purge(&app, json!({})).await;
    assert_eq!(status, 202, "{first}");
    // No worker runs in this app, so the first run is still pending: asking again joins it.
    let (status, second) = purge(&app, json!({"dry_run": false})).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["already_running"], true);
    assert_eq!(second["job_id"], first["job_id"]);
    let job = app
        .admin_json(&format!("/_admin/jobs/{}", first["job_id"]))
        .await;
    assert_eq!(job["args"]["batch_size"], 3, "PURGER_BATCH_SIZE: {job}");
    assert_eq!(job["args"]["retention_days"], 0);
    assert_eq!(job["kind"], "purge_deleted");
    app.stop().await;
}

#[tokio::test]
async fn bad_purge_requests_are_refused_with_the_field_named() {
    let app = TestApp::spawn().await;
    for (body, needle) in [
        (json!({"dry_run": true, "batch_size": 0}), "batch_size"),
        (
            json!({"dry_run": true, "batch_size": 100_001}),
            "batch_size",
        ),
        (json!({"dry_run": true, "tenant_id": ""}), "tenant"),
        (json!({"dry_run": "yes"}), "dry_run"),
        (json!({"dry_run": true, "tenant": "acme"}), "tenant"),
    ] {
        let response = app
            .admin_post("/_admin/connectors/purge_deleted", &body)
            .await;
        let message = assert_error(response, 422, "invalid_request").await;
        assert!(message.contains(needle), "{body}: {message}");
    }
    let anonymous = app
        .client
        .post(app.url("/_admin/connectors/purge_deleted"))
        .json(&json!({"dry_run": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let waiting = app.admin_get("/_admin/jobs/1?wait_seconds=121").await;
    assert_error(waiting, 422, "invalid_request").await;
    app.stop().await;
}

/// Three real `activekg scheduler` processes with the purger due every second.
#[tokio::test]
async fn the_purge_schedule_fires_one_job_per_tick_across_three_scheduler_processes() {
    let db = TestDb::new().await;
    let env = [
        ("ACTIVEKG_DSN", db.url.clone()),
        ("CONNECTOR_KEK_V1", KEK.to_owned()),
        ("PURGER_SCHEDULE", "* * * * * *".to_owned()),
        ("PURGER_BATCH_SIZE", "250".to_owned()),
        ("EMBEDDING_BACKEND", "hash".to_owned()),
        ("ACTIVEKG_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
    ];
    let mut schedulers: Vec<tokio::process::Child> = (0..3)
        .map(|_| crate::helpers::spawn_role("scheduler", &env))
        .collect();
    tokio::time::sleep(Duration::from_secs(6)).await;
    for child in &schedulers {
        crate::helpers::terminate(child);
    }
    for child in &mut schedulers {
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("schedulers stop on SIGTERM")
            .unwrap();
        assert!(status.success(), "{status}");
    }
    let ticks: Vec<(DateTime<Utc>, i64)> = sqlx::query_as(
        "SELECT (args->>'tick')::timestamptz, (args->>'batch_size')::bigint FROM jobs
          WHERE kind = 'purge_deleted' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(
        ticks.len() >= 3,
        "per-second ticks for a few seconds: {ticks:?}"
    );
    // One job per tick: never two for the same tick, though three processes fire it. (Gaps can only come
    // from all three being starved for over a second at once; the engine's own three-process test holds the
    // fired count to the ticks.)
    for pair in ticks.windows(2) {
        assert!(
            (pair[1].0 - pair[0].0).num_seconds() >= 1,
            "one job per tick, none doubled: {ticks:?}"
        );
    }
    let one_apart = ticks
        .windows(2)
        .filter(|p| (p[1].0 - p[0].0).num_seconds() == 1)
        .count();
    assert!(
        one_apart * 10 >= (ticks.len() - 1) * 8,
        "nearly every tick fired: {ticks:?}"
    );
    assert!(ticks.iter().all(|(_, batch)| *batch == 250));
    db.drop_db().await;
}
