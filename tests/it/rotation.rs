//! Key rotation as a durable, resumable run, and the config cache across processes.

use std::time::Duration;

use activekg::crypto::{self, Keyring, Sealed};
use activekg::domain::{JobId, JobState, Provider, TenantId};
use activekg::jobs::engine::{self, Runtime, Scheduler, admin};
use activekg::jobs::rotate_keys::{self, RotateKeys, RotationProgress};
use activekg::jobs::{self};
use activekg::registry::Registry;
use activekg::store::connectors::RotationScope;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use crate::helpers::{
    KEK, TestApp, TestDb, child_ready, eventually, fast_job_settings, job_deps, keyring,
    spawn_child,
};

/// A second key, version 2.
pub const KEK_V2: &str = "5mHtEP6IXbNDdmbmm2HkIW9r8LdmXV-Qx_tsXShOZUA=";
const FIELDS: &[&str] = &["access_key_id", "secret_access_key", "session_token"];

fn secret_for(i: usize) -> String {
    format!("secret-number-{i}")
}

/// Inserts `n` S3 connectors (tenants t0000..) whose secrets are sealed by `ring`.
async fn seed(pool: &PgPool, ring: &Keyring, n: usize, prefix: &str) {
    let mut tenants = Vec::new();
    let mut docs = Vec::new();
    for i in 0..n {
        let mut doc = json!({"bucket": "acme-docs", "access_key_id": format!("AKIA{i}"), "secret_access_key": secret_for(i)})
            .as_object()
            .unwrap()
            .clone();
        crypto::seal_fields(&mut doc, FIELDS, ring);
        tenants.push(format!("{prefix}{i:04}"));
        docs.push(Value::Object(doc));
    }
    sqlx::query(
        "INSERT INTO connector_configs (tenant_id, provider, config, key_version)
         SELECT t, 's3', c, $3 FROM unnest($1::text[], $2::jsonb[]) AS x(t, c)",
    )
    .bind(&tenants)
    .bind(&docs)
    .bind(ring.active_version() as i32)
    .execute(pool)
    .await
    .unwrap();
}

/// Every row of `prefix` is at `version` and opens, with a keyring holding only that version, to what `seed`
/// sealed (so nothing was encrypted twice).
async fn assert_all_rotated(pool: &PgPool, prefix: &str, n: usize, version: u32, key: &str) {
    let rows: Vec<(String, i32, Value)> = sqlx::query_as(
        "SELECT tenant_id, key_version, config FROM connector_configs WHERE tenant_id LIKE $1 ORDER BY tenant_id",
    )
    .bind(format!("{prefix}%"))
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), n);
    let only = keyring(&[(version, key)], version);
    for (i, (tenant, row_version, config)) in rows.into_iter().enumerate() {
        assert_eq!(
            row_version as u32, version,
            "{tenant} is at version {row_version}"
        );
        let mut doc = config.as_object().unwrap().clone();
        assert_eq!(
            Sealed::from_value(&doc["secret_access_key"])
                .unwrap()
                .kek_version,
            version
        );
        crypto::open_fields(&mut doc, FIELDS, &only).unwrap_or_else(|e| panic!("{tenant}: {e}"));
        assert_eq!(
            doc["secret_access_key"],
            secret_for(i),
            "{tenant} decrypts to its original secret"
        );
    }
}

fn rotating_registry(pool: &PgPool) -> Arc<Registry> {
    Arc::new(Registry::new(
        pool.clone(),
        Arc::new(keyring(&[(1, KEK), (2, KEK_V2)], 2)),
    ))
}

async fn start_rotation_workers(pool: &PgPool, registry: Arc<Registry>) -> engine::RuntimeHandle {
    let mut runtime = Runtime::new(pool.clone(), fast_job_settings());
    runtime.register(
        rotate_keys::Deps {
            pool: pool.clone(),
            registry,
        },
        rotate_keys::run,
    );
    runtime.start().await.unwrap()
}

async fn wait_done(pool: &PgPool, id: JobId, within: Duration) -> RotationProgress {
    let record = eventually(within, "the rotation run to complete", || async {
        let record = admin::get(pool, id).await.unwrap();
        (record.state == JobState::Completed).then_some(record)
    })
    .await;
    serde_json::from_value(record.progress.expect("the run records its result")).unwrap()
}

#[tokio::test]
async fn rotating_a_thousand_configs_in_batches_of_a_hundred_moves_every_row_to_the_new_key() {
    let db = TestDb::new().await;
    seed(&db.pool, &keyring(&[(1, KEK)], 1), 1000, "t").await;
    let registry = rotating_registry(&db.pool);
    assert_eq!(
        registry
            .count_behind(&RotationScope::default())
            .await
            .unwrap(),
        1000
    );
    let workers = start_rotation_workers(&db.pool, registry.clone()).await;
    let mut conn = db.pool.acquire().await.unwrap();
    let run = engine::enqueue(
        &mut conn,
        &RotateKeys {
            scope: RotationScope::default(),
            batch_size: 100,
        },
    )
    .await
    .unwrap();
    drop(conn);
    let result = wait_done(&db.pool, run.id.unwrap(), Duration::from_secs(60)).await;
    workers.shutdown().await;

    assert_eq!(
        (result.rotated, result.errors, result.batches),
        (1000, 0, 11),
        "{result:?}"
    );
    assert_eq!(result.active_version, 2);
    assert_eq!(
        result.moved.len(),
        100,
        "the result lists the first hundred rows moved"
    );
    assert!(
        result
            .moved
            .iter()
            .all(|m| (m.from_version, m.to_version) == (1, 2))
    );
    assert_all_rotated(&db.pool, "t", 1000, 2, KEK_V2).await;
    assert_eq!(
        registry
            .count_behind(&RotationScope::default())
            .await
            .unwrap(),
        0
    );
    db.drop_db().await;
}

#[tokio::test]
async fn a_row_whose_key_is_gone_is_reported_and_left_untouched() {
    let db = TestDb::new().await;
    seed(&db.pool, &keyring(&[(1, KEK)], 1), 20, "ok").await;
    // One row sealed with a key version that is not configured, one with other material under version 1.
    seed(&db.pool, &keyring(&[(7, KEK_V2)], 7), 1, "gone").await;
    seed(&db.pool, &keyring(&[(1, KEK_V2)], 1), 1, "wrong").await;
    let before: Vec<Value> = sqlx::query_scalar("SELECT config FROM connector_configs WHERE tenant_id IN ('gone0000', 'wrong0000') ORDER BY tenant_id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let registry = rotating_registry(&db.pool);
    let workers = start_rotation_workers(&db.pool, registry).await;
    let mut conn = db.pool.acquire().await.unwrap();
    let run = engine::enqueue(
        &mut conn,
        &RotateKeys {
            scope: RotationScope::default(),
            batch_size: 7,
        },
    )
    .await
    .unwrap();
    drop(conn);
    let result = wait_done(&db.pool, run.id.unwrap(), Duration::from_secs(30)).await;
    workers.shutdown().await;

    assert_eq!((result.rotated, result.errors), (20, 2), "{result:?}");
    let failed: Vec<(&str, &str)> = result
        .failed
        .iter()
        .map(|f| (f.tenant_id.as_str(), f.field.as_str()))
        .collect();
    assert_eq!(
        failed,
        [
            ("gone0000", "access_key_id"),
            ("wrong0000", "access_key_id")
        ]
    );
    assert!(
        result.failed[0].reason.contains("CONNECTOR_KEK_V7"),
        "{:?}",
        result.failed[0]
    );
    let stays: Vec<u32> = result.failed.iter().map(|f| f.key_version).collect();
    assert_eq!(
        stays,
        [7, 1],
        "each failed row says the version it stays at"
    );
    let moved: Vec<(&str, u32, u32)> = result
        .moved
        .iter()
        .map(|m| (m.tenant_id.as_str(), m.from_version, m.to_version))
        .collect();
    let expected: Vec<(String, u32, u32)> = (0..20).map(|i| (format!("ok{i:04}"), 1, 2)).collect();
    assert_eq!(
        moved,
        expected
            .iter()
            .map(|(t, f, to)| (t.as_str(), *f, *to))
            .collect::<Vec<_>>(),
        "each moved row is recorded with the versions it moved between"
    );
    let after: Vec<Value> = sqlx::query_scalar("SELECT config FROM connector_configs WHERE tenant_id IN ('gone0000', 'wrong0000') ORDER BY tenant_id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(before, after, "rows that do not decrypt are not rewritten");
    assert_all_rotated(&db.pool, "ok", 20, 2, KEK_V2).await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_rotation_whose_worker_is_killed_resumes_and_finishes_without_double_encryption() {
    let db = TestDb::new().await;
    seed(&db.pool, &keyring(&[(1, KEK)], 1), 3000, "k").await;
    let mut conn = db.pool.acquire().await.unwrap();
    let run = engine::enqueue(
        &mut conn,
        &RotateKeys {
            scope: RotationScope::default(),
            batch_size: 10,
        },
    )
    .await
    .unwrap();
    drop(conn);
    let id = run.id.unwrap();

    let mut child = spawn_child("rotator", &db.url, &[]);
    let _lines = child_ready(&mut child).await;
    let at_kill: RotationProgress = eventually(
        Duration::from_secs(30),
        "the child to be part-way through",
        || async {
            let progress: Option<RotationProgress> = admin::get(&db.pool, id)
                .await
                .unwrap()
                .progress
                .and_then(|p| serde_json::from_value(p).ok());
            progress.filter(|p| p.rotated >= 300)
        },
    )
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    assert!(
        !at_kill.done && at_kill.rotated < 3000,
        "killed mid-run: {at_kill:?}"
    );

    // A healthy replica as `serve` runs it (rotation plus the maintenance that rescues the orphaned run),
    // with the same keys as the killed one.
    let settings = fast_job_settings();
    let deps = jobs::Deps {
        registry: rotating_registry(&db.pool),
        ..job_deps(&db.pool, &settings)
    };
    let mut runtime = Runtime::new(db.pool.clone(), settings.clone());
    jobs::register(&mut runtime, &deps, None);
    let workers = runtime.start().await.unwrap();
    let mut scheduler = Scheduler::new(db.pool.clone());
    let mut all = crate::helpers::settings(&db, &[]);
    all.jobs = settings.clone();
    jobs::schedule(&mut scheduler, &all);
    let stop = CancellationToken::new();
    let schedules = scheduler.start(stop.clone()).await.unwrap();

    let result = wait_done(&db.pool, id, Duration::from_secs(60)).await;
    stop.cancel();
    schedules.await.unwrap();
    workers.shutdown().await;
    assert_eq!(
        result.rotated, 3000,
        "each row counted once across both attempts: {result:?}"
    );
    assert_eq!(admin::get(&db.pool, id).await.unwrap().attempt, 2);
    assert_all_rotated(&db.pool, "k", 3000, 2, KEK_V2).await;
    db.drop_db().await;
}

#[tokio::test]
async fn the_rotation_endpoint_counts_exactly_on_a_dry_run_and_starts_one_run_at_a_time() {
    let app = TestApp::spawn_with(
        &[
            ("CONNECTOR_KEK_V2", KEK_V2),
            ("CONNECTOR_KEK_ACTIVE_VERSION", "2"),
        ],
        activekg::app::Roles {
            worker: false,
            ..activekg::app::Roles::all()
        },
    )
    .await;
    seed(&app.db.pool, &keyring(&[(1, KEK)], 1), 1000, "d").await;
    seed(&app.db.pool, &keyring(&[(1, KEK)], 1), 5, "other").await;
    let dry: Value = app
        .admin_post(
            "/_admin/connectors/rotate_keys",
            &json!({"tenant_id": null, "batch_size": 100, "dry_run": true}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        dry["rows_behind"], 1005,
        "exact, not capped at the batch size"
    );
    assert_eq!(dry["active_version"], 2);
    assert!(dry["job_id"].is_null());
    let one: Value = app
        .admin_post(
            "/_admin/connectors/rotate_keys",
            &json!({"tenant_id": "other0003", "dry_run": true}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["rows_behind"], 1);

    let started = app
        .admin_post(
            "/_admin/connectors/rotate_keys",
            &json!({"batch_size": 100}),
        )
        .await;
    assert_eq!(started.status(), 202);
    let started: Value = started.json().await.unwrap();
    let again: Value = app
        .admin_post("/_admin/connectors/rotate_keys", &json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        again["job_id"], started["job_id"],
        "a second request while one runs gets that run"
    );
    assert_eq!(again["already_running"], true);
    let job = app
        .admin_json(&format!("/_admin/jobs/{}", started["job_id"]))
        .await;
    assert_eq!(job["kind"], "rotate_keys");
    app.stop().await;
}

#[tokio::test]
async fn a_config_change_in_one_process_is_seen_by_another_processs_cache_within_a_second() {
    let db = TestDb::new().await;
    let (a, b) = (
        crate::helpers::registry(&db.pool),
        crate::helpers::registry(&db.pool),
    );
    let stop = CancellationToken::new();
    // Two processes: a LISTEN connection each.
    let listeners = [
        a.follow_changes(crate::helpers::hub(&db.pool, &stop), stop.clone()),
        b.follow_changes(crate::helpers::hub(&db.pool, &stop), stop.clone()),
    ];
    eventually(
        Duration::from_secs(5),
        "both cache listeners to connect",
        || async { (a.listening() && b.listening()).then_some(()) },
    )
    .await;
    let tenant = TenantId::parse("acme").unwrap();
    a.register(
        &tenant,
        Provider::Gcs,
        json!({"bucket": "acme-gcs", "topic_allowlist": ["projects/p/topics/old"]}),
    )
    .await
    .unwrap();
    let cached = b.load(&tenant, Provider::Gcs).await.unwrap().unwrap();
    assert_eq!(cached.config.topic_allowlist(), ["projects/p/topics/old"]);

    a.patch(
        &tenant,
        Provider::Gcs,
        json!({"topic_allowlist": ["projects/p/topics/new"]}),
    )
    .await
    .unwrap();
    let changed_at = std::time::Instant::now();
    eventually(
        Duration::from_secs(1),
        "the other process's cache to see the change",
        || async {
            let current = b.load(&tenant, Provider::Gcs).await.unwrap().unwrap();
            (current.config.topic_allowlist() == ["projects/p/topics/new"]).then_some(())
        },
    )
    .await;
    assert!(changed_at.elapsed() < Duration::from_secs(1));

    a.delete(&tenant, Provider::Gcs).await.unwrap();
    eventually(
        Duration::from_secs(1),
        "the deletion to reach the other cache",
        || async {
            b.load(&tenant, Provider::Gcs)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    stop.cancel();
    for listener in listeners {
        listener.await.unwrap();
    }
    db.drop_db().await;
}

#[tokio::test]
async fn a_lost_cache_listener_reconnects_and_is_counted() {
    let db = TestDb::new().await;
    let registry = crate::helpers::registry(&db.pool);
    let stop = CancellationToken::new();
    let listener = registry.follow_changes(crate::helpers::hub(&db.pool, &stop), stop.clone());
    eventually(
        Duration::from_secs(5),
        "the listener to connect",
        || async { registry.listening().then_some(()) },
    )
    .await;
    let counter = activekg::metrics::metrics()
        .pubsub_reconnects
        .with_label_values(&["config_cache"]);
    let before = counter.get();
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN %activekg_connector_configs%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(killed, 1);
    eventually(
        Duration::from_secs(5),
        "the reconnect to be counted",
        || async { (counter.get() > before).then_some(()) },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "the listener to be back",
        || async { registry.listening().then_some(()) },
    )
    .await;
    stop.cancel();
    listener.await.unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn a_dry_run_lists_the_rows_a_rotation_would_fail_on_and_changes_nothing() {
    let app = TestApp::spawn_with(
        &[
            ("CONNECTOR_KEK_V2", KEK_V2),
            ("CONNECTOR_KEK_ACTIVE_VERSION", "2"),
        ],
        activekg::app::Roles {
            worker: false,
            ..activekg::app::Roles::all()
        },
    )
    .await;
    seed(&app.db.pool, &keyring(&[(1, KEK)], 1), 600, "fine").await;
    // Sealed with a key this server does not have, and with other material under a version it has.
    seed(&app.db.pool, &keyring(&[(7, KEK_V2)], 7), 1, "gone").await;
    seed(&app.db.pool, &keyring(&[(1, KEK_V2)], 1), 1, "wrong").await;
    let before: Vec<(String, Value, i32)> = sqlx::query_as(
        "SELECT tenant_id, config, key_version FROM connector_configs ORDER BY tenant_id",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    let dry: Value = app
        .admin_post("/_admin/connectors/rotate_keys", &json!({"dry_run": true}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (dry["rows_behind"].as_u64(), dry["rows_failing"].as_u64()),
        (Some(602), Some(2)),
        "{dry}"
    );
    let failing: Vec<(&str, &str, &str, u64)> = dry["failing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["tenant_id"].as_str().unwrap(),
                f["provider"].as_str().unwrap(),
                f["field"].as_str().unwrap(),
                f["key_version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        failing,
        [
            ("gone0000", "s3", "access_key_id", 7),
            ("wrong0000", "s3", "access_key_id", 1)
        ]
    );
    assert!(
        dry["failing"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("CONNECTOR_KEK_V7"),
        "{dry}"
    );
    let after: Vec<(String, Value, i32)> = sqlx::query_as(
        "SELECT tenant_id, config, key_version FROM connector_configs ORDER BY tenant_id",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert!(before == after, "a dry run changes nothing");
    // A real run's answer does not carry the dry run's list.
    let started: Value = app
        .admin_post("/_admin/connectors/rotate_keys", &json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert!(started.get("failing").is_none(), "{started}");
    app.stop().await;
}
