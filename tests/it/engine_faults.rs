//! The job engine meeting faults the way an operator does, with real processes: several worker processes
//! sharing a queue, a worker frozen with SIGSTOP, a worker cut off from the database, a claim's answer lost
//! after it committed, PostgreSQL restarted under running workers, and workers killed with SIGKILL every few
//! seconds during a large ingest.

use std::time::Duration;

use activekg::domain::{JobId, JobState};
use activekg::jobs::engine::{self, Runtime, admin};
use sqlx::PgPool;

use crate::helpers::{TestDb, child_ready, eventually, fast_job_settings, spawn_child};
use crate::kinds::{Behavior, Probe, Tally, create_probe_tables};

fn signal(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().expect("the child is running").to_string();
    let sent = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .unwrap();
    assert!(sent.success(), "SIG{signal} was delivered");
}

async fn effects(pool: &PgPool, id: JobId) -> Vec<(i32, String)> {
    sqlx::query_as("SELECT attempt, worker FROM test_effects WHERE job_id = $1 ORDER BY id")
        .bind(id.0)
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn wait_state(
    pool: &PgPool,
    id: JobId,
    want: JobState,
    within: Duration,
) -> activekg::store::jobs::JobRecord {
    eventually(within, &format!("job {id} to be {want}"), || async move {
        let job = admin::get(pool, id).await.unwrap();
        (job.state == want).then_some(job)
    })
    .await
}

#[tokio::test]
async fn many_jobs_complete_exactly_once_across_two_worker_processes() {
    let db = TestDb::new().await;
    create_probe_tables(&db.pool).await;
    let mut first = spawn_child("worker", &db.url, &[]);
    let mut second = spawn_child("worker", &db.url, &[]);
    let (a, _a_lines) = child_ready(&mut first).await;
    let (b, _b_lines) = child_ready(&mut second).await;
    let jobs: Vec<Tally> = (0..500).map(|n| Tally { n }).collect();
    let mut conn = db.pool.acquire().await.unwrap();
    engine::enqueue_many(&mut conn, &jobs).await.unwrap();
    drop(conn);
    eventually(Duration::from_secs(60), "500 jobs to complete", || async {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE kind = 'test_tally' AND state = 'completed'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        (done == 500).then_some(())
    })
    .await;
    let (runs, distinct, by_a, by_b): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT job_id), count(*) FILTER (WHERE worker = $1),
                count(*) FILTER (WHERE worker = $2)
         FROM test_effects",
    )
    .bind(&a)
    .bind(&b)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((runs, distinct), (500, 500), "every job ran exactly once");
    assert!(
        by_a > 0 && by_b > 0 && by_a + by_b == 500,
        "both processes took work: {by_a} + {by_b}"
    );
    first.start_kill().unwrap();
    second.start_kill().unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn a_frozen_workers_effects_never_land_after_its_job_ran_elsewhere() {
    let db = TestDb::new().await;
    create_probe_tables(&db.pool).await;
    let mut frozen = spawn_child("worker", &db.url, &[]);
    let (frozen_id, _frozen_lines) = child_ready(&mut frozen).await;
    let id = {
        let mut conn = db.pool.acquire().await.unwrap();
        engine::enqueue(
            &mut conn,
            &Probe::new("frozen", Behavior::EffectAfter { ms: 1500 }),
        )
        .await
        .unwrap()
        .id
        .unwrap()
    };
    eventually(
        Duration::from_secs(10),
        "the first worker to run the job",
        || async {
            let job = admin::get(&db.pool, id).await.unwrap();
            (job.locked_by.as_deref() == Some(frozen_id.as_str())).then_some(())
        },
    )
    .await;
    // Frozen mid-attempt, before its effect: as a VM pause or SIGSTOP would.
    signal(&frozen, "STOP");

    let mut healthy = spawn_child("worker", &db.url, &[]);
    let (healthy_id, _healthy_lines) = child_ready(&mut healthy).await;
    let done = wait_state(&db.pool, id, JobState::Completed, Duration::from_secs(30)).await;
    assert_eq!(
        done.errors[0].class, "crash",
        "taken back from the frozen worker"
    );
    assert_eq!(effects(&db.pool, id).await, [(2, healthy_id.clone())]);

    // The frozen worker wakes up past its sleep and would commit its effect now.
    signal(&frozen, "CONT");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        effects(&db.pool, id).await,
        [(2, healthy_id)],
        "the woken attempt committed nothing: its claim was gone"
    );
    assert_eq!(
        admin::get(&db.pool, id).await.unwrap().state,
        JobState::Completed
    );
    frozen.start_kill().unwrap();
    healthy.start_kill().unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn a_worker_cut_off_from_the_database_stops_its_attempts_before_anyone_may_take_them_back() {
    let db = TestDb::new().await;
    create_probe_tables(&db.pool).await;
    let split = crate::netsplit::Netsplit::start("127.0.0.1:5432").await;
    // Orphan timeout 8 s: cut right after a heartbeat at the latest, the worker fences itself within 3.2-4.8 s,
    // and nobody may take its job back before 6.4 s.
    let settings = [("ACTIVEKG_CHILD_ORPHAN_TIMEOUT_MS", "8000")];
    let rescuer = Runtime::new(
        db.pool.clone(),
        activekg::config::JobSettings {
            orphan_timeout: Duration::from_secs(8),
            ..fast_job_settings()
        },
    )
    .start()
    .await
    .unwrap();
    let mut cut_off = spawn_child("worker", &split.url(&db.url), &settings);
    let (cut_off_id, _lines) = child_ready(&mut cut_off).await;
    let id = {
        let mut conn = db.pool.acquire().await.unwrap();
        engine::enqueue(
            &mut conn,
            &Probe::new("cut", Behavior::EffectAfter { ms: 30_000 }),
        )
        .await
        .unwrap()
        .id
        .unwrap()
    };
    eventually(
        Duration::from_secs(10),
        "the worker to run the job",
        || async {
            let job = admin::get(&db.pool, id).await.unwrap();
            (job.locked_by.as_deref() == Some(cut_off_id.as_str())).then_some(())
        },
    )
    .await;
    split.cut();
    // Heal after the worker must have fenced itself and before anyone may rescue: the only way the attempt
    // ends is the worker's own fence, which it reports once it can.
    tokio::time::sleep(Duration::from_millis(5600)).await;
    split.heal();
    let fenced = eventually(
        Duration::from_secs(10),
        "the fenced attempt to be reported",
        || async {
            let job = admin::get(&db.pool, id).await.unwrap();
            job.errors.first().cloned().map(|e| (e, job))
        },
    )
    .await;
    let (error, job) = fenced;
    assert_eq!(error.class, "fenced", "{job:?}");
    assert_eq!(error.worker.as_deref(), Some(cut_off_id.as_str()));
    assert!(
        job.errors.iter().all(|e| e.class != "crash"),
        "nobody took the job back: the worker stopped it itself ({job:?})"
    );
    assert!(effects(&db.pool, id).await.is_empty());
    admin::cancel(&db.pool, id).await.unwrap();
    rescuer.shutdown().await;
    cut_off.start_kill().unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn jobs_whose_claim_committed_but_whose_answer_was_lost_still_run_once_on_the_live_worker() {
    let db = TestDb::new().await;
    create_probe_tables(&db.pool).await;
    let hop = crate::reply_loss::ReplyLoss::start("127.0.0.1:5432", "SELECT ctid FROM jobs").await;
    let mut ids = Vec::new();
    {
        let mut conn = db.pool.acquire().await.unwrap();
        for n in 0..3 {
            let probe = Probe::new(&format!("lost-{n}"), Behavior::EffectAfter { ms: 0 });
            ids.push(
                engine::enqueue(&mut conn, &probe)
                    .await
                    .unwrap()
                    .id
                    .unwrap(),
            );
        }
    }
    hop.arm(1);
    let mut worker = spawn_child("worker", &hop.url(&db.url), &[]);
    let (worker_id, _lines) = child_ready(&mut worker).await;
    eventually(
        Duration::from_secs(10),
        "a claim's answer to be lost",
        || async { (hop.lost() == 1).then_some(()) },
    )
    .await;
    // The worker lives and heartbeats on, so no rescue will ever take those rows back: it must find them.
    for id in ids {
        let job = wait_state(&db.pool, id, JobState::Completed, Duration::from_secs(15)).await;
        assert_eq!(
            job.attempt, 1,
            "the lost claim's attempt is the one that ran: {job:?}"
        );
        assert!(job.errors.is_empty(), "{job:?}");
        assert_eq!(effects(&db.pool, id).await, vec![(1, worker_id.clone())]);
    }
    worker.start_kill().unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn an_api_only_process_still_takes_back_the_jobs_of_dead_workers() {
    let db = TestDb::new().await;
    create_probe_tables(&db.pool).await;
    let mut worker = spawn_child("worker", &db.url, &[]);
    let (worker_id, _lines) = child_ready(&mut worker).await;
    let id = {
        let mut conn = db.pool.acquire().await.unwrap();
        engine::enqueue(&mut conn, &Probe::new("orphan", Behavior::HangFirstAttempt))
            .await
            .unwrap()
            .id
            .unwrap()
    };
    wait_state(&db.pool, id, JobState::Running, Duration::from_secs(10)).await;
    worker.start_kill().unwrap();
    worker.wait().await.unwrap();
    // No workers left at all: a process that runs none (as `activekg api` does) does the upkeep.
    let api_only = Runtime::new(db.pool.clone(), fast_job_settings())
        .start()
        .await
        .unwrap();
    let rescued = wait_state(&db.pool, id, JobState::Pending, Duration::from_secs(15)).await;
    assert_eq!(
        rescued.errors[0].worker.as_deref(),
        Some(worker_id.as_str())
    );
    assert!(
        rescued.errors[0].error.contains(api_only.worker_id()),
        "{}",
        rescued.errors[0].error
    );
    api_only.shutdown().await;
    db.drop_db().await;
}

/// The environment of an `activekg` process on `dsn` with the test key and token, a 4 s orphan timeout,
/// and a 10 s fallback poll (so only NOTIFY can wake a worker quickly).
pub fn activekg_env(dsn: &str, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("ACTIVEKG_DSN", dsn.to_owned()),
        ("CONNECTOR_KEK_V1", crate::helpers::KEK.to_owned()),
        ("ADMIN_TOKEN", crate::helpers::ADMIN_TOKEN.to_owned()),
        ("EMBEDDING_BACKEND", "hash".to_owned()),
        ("ACTIVEKG_JOBS_ORPHAN_TIMEOUT_SECONDS", "4".to_owned()),
        ("CONNECTOR_WORKER_POLL_INTERVAL", "10".to_owned()),
        ("PUBSUB_SUBSCRIBER_ENABLED", "false".to_owned()),
        ("RUST_LOG", "warn".to_owned()),
    ];
    env.extend(extra.iter().cloned());
    env
}

/// A client of an `activekg api` process.
pub struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    pub async fn ready(port: u16) -> Self {
        let api = Self {
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        eventually(Duration::from_secs(60), "the API to be ready", || async {
            let response = api
                .client
                .get(format!("{}/readyz", api.base))
                .send()
                .await
                .ok()?;
            (response.status() == 200).then_some(())
        })
        .await;
        api
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(crate::helpers::ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(status.is_success(), "POST {path}: {status} {body}");
        body
    }

    /// The body of a successful admin GET, as text.
    pub async fn get(&self, path: &str) -> String {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(crate::helpers::ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert!(status.is_success(), "GET {path}: {status} {body}");
        body
    }
}

/// Live documents of `tenant`, by key.
pub async fn documents(pool: &PgPool, tenant: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT props->>'key' FROM nodes WHERE tenant_id = $1 AND entity_type = 'Document'
           AND deleted_at IS NULL ORDER BY 1",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await
    .unwrap_or_default()
}

#[tokio::test]
async fn a_postgresql_restart_under_running_workers_rescues_no_live_workers_job_and_runs_nothing_twice()
 {
    use activekg::store::embedded;
    let dir = tempfile::tempdir().unwrap();
    let pg_port = crate::helpers::free_port();
    let cluster = embedded::start_private(dir.path(), pg_port).await.unwrap();
    let dsn = cluster.url("activekg");

    let s3 = crate::emulators::s3_client().await;
    let bucket = crate::emulators::unique_bucket("restart");
    crate::emulators::s3_bucket(&s3, &bucket).await;
    let gate = crate::gate::Gate::start(&crate::emulators::moto_url()).await;
    let slow_text = "A long contract that takes a while to download. ".repeat(120);
    crate::emulators::s3_put(
        &s3,
        &bucket,
        "slow.txt",
        slow_text.as_bytes(),
        Some("text/plain"),
    )
    .await;
    for n in 0..5 {
        let body = format!("Quick note number {n}.");
        crate::emulators::s3_put(
            &s3,
            &bucket,
            &format!("quick-{n}.txt"),
            body.as_bytes(),
            Some("text/plain"),
        )
        .await;
    }

    // The guide's two deployments: the API firing schedules, and workers (two replicas).
    let api_port = crate::helpers::free_port();
    let _api = crate::helpers::spawn_role(
        "api",
        &activekg_env(
            &dsn,
            &[
                ("ACTIVEKG_LISTEN", format!("127.0.0.1:{api_port}")),
                ("RUN_SCHEDULER", "true".to_owned()),
            ],
        ),
    );
    // The workers reach the database through a hop that stays cut a little longer after the outage, so
    // the API process is back (and could rescue) while the workers are still silent.
    let split = crate::netsplit::Netsplit::start(&format!("127.0.0.1:{pg_port}")).await;
    let worker_env = activekg_env(
        &split.url(&dsn),
        &[
            ("ACTIVEKG_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
            ("RUN_SCHEDULER", "false".to_owned()),
        ],
    );
    let _workers = [
        crate::helpers::spawn_role("worker", &worker_env),
        crate::helpers::spawn_role("worker", &worker_env),
    ];
    let api = Api::ready(api_port).await;
    let mut config = crate::emulators::s3_config(&bucket);
    config["endpoint"] = gate.url.clone().into();
    api.post(
        "/_admin/connectors/s3/register",
        serde_json::json!({"tenant_id": "acme", "config": config}),
    )
    .await;
    let slow_path = format!("/{bucket}/slow.txt");
    let slow = gate.trickle(&slow_path, 1);
    api.post(
        "/_admin/connectors/s3/backfill",
        serde_json::json!({"tenant_id": "acme"}),
    )
    .await;
    slow.wait_held(1).await;

    // PostgreSQL goes away for longer than the orphan timeout, under a job that is mid-download; when it
    // is back, the workers are heard from 3 s after everyone else (still within one orphan timeout).
    cluster.stop().await.unwrap();
    split.cut();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cluster = embedded::start_private(dir.path(), pg_port).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    split.heal();
    slow.release();

    let pool = PgPool::connect(&dsn).await.unwrap();
    let mut expected: Vec<String> = (0..5).map(|n| format!("quick-{n}.txt")).collect();
    expected.push("slow.txt".to_owned());
    expected.sort();
    eventually(
        Duration::from_secs(60),
        "every object to be ingested after the restart",
        || async { (documents(&pool, "acme").await == expected).then_some(()) },
    )
    .await;
    let crashes: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT e FROM jobs, jsonb_array_elements(errors) e WHERE e->>'class' = 'crash'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        crashes.is_empty(),
        "no live worker's job was taken back: {crashes:?}"
    );
    let (most_at_once, reads) = gate.reads(&slow_path);
    assert_eq!(
        most_at_once, 1,
        "the object was never read by two attempts at once ({reads} reads)"
    );

    // The workers' LISTEN connection is back: new work starts long before the 10 s fallback poll.
    crate::emulators::s3_put(
        &s3,
        &bucket,
        "after.txt",
        b"Written after the restart.",
        Some("text/plain"),
    )
    .await;
    let asked = std::time::Instant::now();
    api.post(
        "/_admin/connectors/s3/backfill",
        serde_json::json!({"tenant_id": "acme", "prefix": "after"}),
    )
    .await;
    eventually(
        Duration::from_secs(15),
        "the new object to be ingested",
        || async {
            documents(&pool, "acme")
                .await
                .contains(&"after.txt".to_owned())
                .then_some(())
        },
    )
    .await;
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "woken by NOTIFY, not the 30 s poll"
    );
    pool.close().await;
    drop(_workers);
    drop(_api);
    cluster.stop().await.unwrap();
}

/// A text of about `words` words, different for every `n`.
fn essay(n: usize, words: usize) -> String {
    let topics = [
        "invoices",
        "contracts",
        "shipping",
        "payroll",
        "audits",
        "pricing",
        "support",
    ];
    let mut text = String::new();
    for i in 0..words / 12 {
        text.push_str(&format!(
            "Section {i} of document {n} explains how {} are handled by team {} in region {}. ",
            topics[(n + i) % topics.len()],
            (n * 7 + i) % 31,
            (n + i * 3) % 11
        ));
    }
    text
}

#[tokio::test]
async fn workers_killed_every_few_seconds_lose_nothing_and_duplicate_nothing_in_a_thousand_object_ingest()
 {
    const OBJECTS: usize = 1000;
    let folder = tempfile::tempdir().unwrap();
    for n in 0..OBJECTS {
        let dir = folder.path().join(format!("batch-{}", n % 10));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("doc-{n:04}.txt")), essay(n, 500)).unwrap();
    }
    // The API (and the schedules) in this process; three separate worker processes.
    let app = crate::helpers::TestApp::spawn_with(
        &[("ACTIVEKG_JOBS_ORPHAN_TIMEOUT_SECONDS", "3")],
        activekg::app::Roles {
            worker: false,
            ..activekg::app::Roles::all()
        },
    )
    .await;
    let env = activekg_env(
        &app.db.url,
        &[
            ("ACTIVEKG_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
            ("ACTIVEKG_JOBS_ORPHAN_TIMEOUT_SECONDS", "3".to_owned()),
            ("CONNECTOR_WORKER_POLL_INTERVAL", "0.5".to_owned()),
            ("RUN_SCHEDULER", "false".to_owned()),
        ],
    );
    let mut workers: Vec<tokio::process::Child> = (0..3)
        .map(|_| crate::helpers::spawn_role("worker", &env))
        .collect();
    let registered = app
        .admin_post(
            "/_admin/connectors/local/register",
            &serde_json::json!({"tenant_id": "chaos", "config": {"path": folder.path()}}),
        )
        .await;
    assert_eq!(
        registered.status(),
        201,
        "{}",
        registered.text().await.unwrap()
    );
    let started = app
        .admin_post(
            "/_admin/connectors/local/backfill",
            &serde_json::json!({"tenant_id": "chaos"}),
        )
        .await;
    assert!(started.status().is_success());

    let pool = &app.db.pool;
    let settled = || async {
        let (documents, unready, active): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM nodes WHERE tenant_id = 'chaos' AND entity_type = 'Document' AND deleted_at IS NULL),
                    (SELECT count(*) FROM nodes WHERE tenant_id = 'chaos' AND entity_type = 'Chunk' AND embedding_status <> 'ready'),
                    (SELECT count(*) FROM jobs WHERE state IN ('available', 'running'))",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        documents == OBJECTS as i64 && unready == 0 && active == 0
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let mut kills = 0;
    while !settled().await {
        assert!(
            std::time::Instant::now() < deadline,
            "the ingest did not finish in 300 s"
        );
        tokio::time::sleep(Duration::from_millis(1500 + rand::random::<u64>() % 1500)).await;
        let victim = rand::random::<u32>() as usize % workers.len();
        workers[victim].start_kill().unwrap();
        workers[victim].wait().await.unwrap();
        workers[victim] = crate::helpers::spawn_role("worker", &env);
        kills += 1;
    }
    let (documents, keys, chunks, dead, rescued, mismatched): (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM nodes WHERE tenant_id = 'chaos' AND entity_type = 'Document'),
                (SELECT count(DISTINCT props->>'key') FROM nodes WHERE tenant_id = 'chaos' AND entity_type = 'Document'),
                (SELECT count(*) FROM nodes WHERE tenant_id = 'chaos' AND entity_type = 'Chunk'),
                (SELECT count(*) FROM jobs WHERE state = 'dead'),
                (SELECT count(*) FROM jobs, jsonb_array_elements(errors) e WHERE e->>'class' = 'crash'),
                (SELECT count(*) FROM nodes d WHERE d.tenant_id = 'chaos' AND d.entity_type = 'Document'
                   AND (d.props->>'chunk_count')::int <>
                       (SELECT count(*) FROM edges e JOIN nodes c ON c.id = e.src
                        WHERE e.dst = d.id AND e.rel = 'DERIVED_FROM' AND c.deleted_at IS NULL))",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(
        kills >= 3,
        "the workers were killed during the ingest ({kills} times)"
    );
    assert_eq!(
        (documents, keys),
        (OBJECTS as i64, OBJECTS as i64),
        "no object lost or duplicated"
    );
    assert!(
        chunks >= 2 * OBJECTS as i64,
        "every object has its chunks ({chunks})"
    );
    assert_eq!(dead, 0, "no job was dead-lettered");
    assert_eq!(mismatched, 0, "every document has exactly its chunks");
    eprintln!("{kills} kills, {rescued} attempts taken back from killed workers, {chunks} chunks");
    for mut worker in workers {
        let _ = worker.start_kill();
        let _ = worker.wait().await;
    }
    app.stop().await;
}

/// One gauge's value in a Prometheus text scrape.
fn gauge(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.split_once(' ').is_some_and(|(n, _)| n == name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn the_guides_two_deployments_take_back_a_killed_workers_job_and_run_the_purger() {
    let db = TestDb::new().await;
    let s3 = crate::emulators::s3_client().await;
    let bucket = crate::emulators::unique_bucket("split");
    crate::emulators::s3_bucket(&s3, &bucket).await;
    let gate = crate::gate::Gate::start(&crate::emulators::moto_url()).await;
    let text = "Terms and conditions, at length. ".repeat(150);
    crate::emulators::s3_put(
        &s3,
        &bucket,
        "terms.txt",
        text.as_bytes(),
        Some("text/plain"),
    )
    .await;

    // activekg-api with RUN_SCHEDULER=true (the purger every two seconds here), and activekg-worker.
    let api_port = crate::helpers::free_port();
    let _api = crate::helpers::spawn_role(
        "api",
        &activekg_env(
            &db.url,
            &[
                ("ACTIVEKG_LISTEN", format!("127.0.0.1:{api_port}")),
                ("RUN_SCHEDULER", "true".to_owned()),
                ("PURGER_SCHEDULE", "*/2 * * * * *".to_owned()),
            ],
        ),
    );
    let worker_env = activekg_env(
        &db.url,
        &[
            ("ACTIVEKG_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
            ("RUN_SCHEDULER", "false".to_owned()),
            ("CONNECTOR_WORKER_POLL_INTERVAL", "0.5".to_owned()),
        ],
    );
    let mut worker = crate::helpers::spawn_role("worker", &worker_env);
    let api = Api::ready(api_port).await;
    let mut config = crate::emulators::s3_config(&bucket);
    config["endpoint"] = gate.url.clone().into();
    api.post(
        "/_admin/connectors/s3/register",
        serde_json::json!({"tenant_id": "split", "config": config}),
    )
    .await;
    let slow = gate.trickle(&format!("/{bucket}/terms.txt"), 1);
    api.post(
        "/_admin/connectors/s3/backfill",
        serde_json::json!({"tenant_id": "split"}),
    )
    .await;
    slow.wait_held(1).await;
    worker.start_kill().unwrap();
    worker.wait().await.unwrap();
    slow.release();
    let _replacement = crate::helpers::spawn_role("worker", &worker_env);

    eventually(
        Duration::from_secs(60),
        "the killed worker's object to be ingested",
        || async { (documents(&db.pool, "split").await == ["terms.txt"]).then_some(()) },
    )
    .await;
    let taken_back: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs, jsonb_array_elements(errors) e
         WHERE kind = 'ingest_object' AND state = 'completed' AND e->>'class' = 'crash'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(taken_back, 1, "the killed worker's attempt was taken back");
    eventually(
        Duration::from_secs(30),
        "the API's schedule to fire the purger, run by the worker",
        || async {
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM jobs WHERE kind = 'purge_deleted' AND state = 'completed'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            (done > 0).then_some(())
        },
    )
    .await;
    let scrape = reqwest::get(format!("{}/metrics", api.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        gauge(&scrape, "activekg_schedulers_alive"),
        Some(1.0),
        "one process fires schedules"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn with_no_process_firing_schedules_the_scheduler_gauge_says_zero() {
    let app = crate::helpers::TestApp::spawn_with(
        &[("RUN_SCHEDULER", "false")],
        activekg::app::Roles::all(),
    )
    .await;
    let scrape = app.get("/metrics").await.text().await.unwrap();
    assert_eq!(
        gauge(&scrape, "activekg_schedulers_alive"),
        Some(0.0),
        "{scrape}"
    );
    assert!(
        gauge(&scrape, "activekg_job_workers_alive{host=").is_none()
            || scrape.contains("activekg_job_workers_alive{"),
    );
    app.stop().await;
}
