//! The engine with its test queue in Redis, against real processes: workers in child processes, one killed
//! with -9 mid-job, and a Redis killed with -9 and restarted under running workers.

use std::time::{Duration, Instant};

use activekg::domain::{JobId, JobState};
use activekg::jobs::engine::{self, job_store};
use activekg::store::jobs as store_jobs;
use activekg::store::redis_jobs::RedisJobs;
use sqlx::PgPool;

use crate::engine_faults::{Api, activekg_env, documents};
use crate::helpers::{TestDb, child_ready, eventually, spawn_child, spawn_role};
use crate::jobs_backends::{OwnRedis, redis_url};
use crate::kinds::{Behavior, Probe, Tally, create_probe_tables};

/// A fresh key prefix on `url`, with the test queue routed there in this process (for its enqueues).
async fn redis_at(url: &str) -> (RedisJobs, String) {
    job_store::route_to_redis(&["test"]);
    let prefix = format!("activekg_test_{}", uuid::Uuid::new_v4().simple());
    let redis = RedisJobs::connect(url, &prefix).await.unwrap();
    (redis, format!("{url} {prefix}"))
}

/// Effects recorded by tally jobs: (runs, distinct jobs).
async fn effects(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT job_id) FROM test_effects")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn enqueue_tallies(pool: &PgPool, n: u32) -> Vec<JobId> {
    let jobs: Vec<Tally> = (0..n).map(|n| Tally { n }).collect();
    let mut conn = pool.acquire().await.unwrap();
    engine::enqueue_many(&mut conn, &jobs)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id.unwrap())
        .collect()
}

async fn assert_all_completed(redis: &RedisJobs, ids: &[JobId]) {
    for id in ids {
        // After a Redis restart the first request on the old connection fails; the client reconnects.
        let record = eventually(Duration::from_secs(10), "Redis answers", || async {
            redis.get(*id).await.ok().flatten()
        })
        .await;
        assert_eq!(record.state, JobState::Completed, "job {id}: {record:?}");
        // An attempt may fail while Redis is down (its claim cannot be proven); it is retried, and its
        // effect still lands once (counted in `test_effects`).
        assert!(
            record
                .errors
                .iter()
                .all(|e| e.error.contains("Redis is unavailable")),
            "job {id}: {:?}",
            record.errors
        );
    }
}

#[tokio::test]
async fn on_redis_many_jobs_complete_exactly_once_across_two_worker_processes() {
    let db = TestDb::new().await;
    create_probe_tables(&db.pool).await;
    let (redis, child_redis) = redis_at(&redis_url()).await;
    let env = [("ACTIVEKG_CHILD_REDIS", child_redis.as_str())];
    let mut first = spawn_child("worker", &db.url, &env);
    let mut second = spawn_child("worker", &db.url, &env);
    let (a, _a_lines) = child_ready(&mut first).await;
    let (b, _b_lines) = child_ready(&mut second).await;
    let ids = enqueue_tallies(&db.pool, 500).await;
    eventually(Duration::from_secs(60), "500 jobs to run", || async {
        (effects(&db.pool).await.0 >= 500).then_some(())
    })
    .await;
    // Let the last results land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        effects(&db.pool).await,
        (500, 500),
        "every job ran exactly once"
    );
    assert_all_completed(&redis, &ids).await;
    let (by_a, by_b): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE worker = $1), count(*) FILTER (WHERE worker = $2) FROM test_effects",
    )
    .bind(&a)
    .bind(&b)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        by_a > 0 && by_b > 0,
        "both processes took work: {by_a} + {by_b}"
    );
    let (in_jobs, in_outbox): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM jobs WHERE kind = 'test_tally'), (SELECT count(*) FROM job_outbox)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (in_jobs, in_outbox),
        (0, 0),
        "the jobs went through the outbox to Redis"
    );
    first.start_kill().unwrap();
    second.start_kill().unwrap();
    redis.delete_all().await.unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn on_redis_a_job_whose_worker_is_killed_is_picked_up_again_and_completes() {
    let db = TestDb::new().await;
    let (redis, child_redis) = redis_at(&redis_url()).await;
    crate::jobs_crash::a_killed_workers_job_is_rescued_and_completes(
        &db,
        Some((&redis, &child_redis)),
    )
    .await;
    redis.delete_all().await.unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn on_redis_a_redis_killed_and_restarted_under_running_workers_loses_nothing_and_runs_nothing_twice()
 {
    let db = TestDb::new().await;
    create_probe_tables(&db.pool).await;
    let mut server = OwnRedis::start().await;
    let (redis, child_redis) = redis_at(&server.url()).await;
    let env = [("ACTIVEKG_CHILD_REDIS", child_redis.as_str())];
    let mut first = spawn_child("worker", &db.url, &env);
    let mut second = spawn_child("worker", &db.url, &env);
    let (_, _first_lines) = child_ready(&mut first).await;
    let (_, _second_lines) = child_ready(&mut second).await;
    let mut ids = enqueue_tallies(&db.pool, 1000).await;
    eventually(Duration::from_secs(30), "some jobs to run", || async {
        (effects(&db.pool).await.0 >= 50).then_some(())
    })
    .await;
    server.kill();
    // Enqueues go on while Redis is down: they wait in PostgreSQL's outbox.
    ids.extend(enqueue_tallies(&db.pool, 200).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while effects(&db.pool).await.0 < 1200 {
        if Instant::now() > deadline {
            let mut stuck = std::collections::BTreeMap::<String, Vec<String>>::new();
            for id in &ids {
                if let Ok(Some(r)) = redis.get(*id).await
                    && r.state != JobState::Completed
                {
                    stuck
                        .entry(format!("{:?}", r.state))
                        .or_default()
                        .push(format!(
                            "{id} attempt {} by {:?} at {:?} errors {:?}",
                            r.attempt, r.locked_by, r.attempted_at, r.errors
                        ));
                }
            }
            let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM job_outbox")
                .fetch_one(&db.pool)
                .await
                .unwrap();
            panic!(
                "not every job ran within 90 s: {:?} effects, {outbox} staged, unfinished: {stuck:#?}",
                effects(&db.pool).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(effects(&db.pool).await, (1200, 1200), "each job ran once");
    assert_all_completed(&redis, &ids).await;
    first.start_kill().unwrap();
    second.start_kill().unwrap();
    drop(server);
    db.drop_db().await;
}

/// The guide's backlog gauge for one tenant and provider, as `/metrics` shows it (0 when absent).
fn connector_depth(metrics: &str, provider: &str, tenant: &str) -> i64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("connector_worker_queue_depth{"))
        .filter(|l| {
            l.contains(&format!("provider=\"{provider}\""))
                && l.contains(&format!("tenant=\"{tenant}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .sum()
}

#[tokio::test]
async fn with_the_redis_backend_a_folder_is_ingested_and_embedded_and_its_backlog_shows_per_tenant()
{
    let db = TestDb::new().await;
    let folder = tempfile::tempdir().unwrap();
    for n in 0..5 {
        std::fs::write(
            folder.path().join(format!("note-{n}.txt")),
            format!("Note number {n} about bread."),
        )
        .unwrap();
    }
    let prefix = format!("activekg_test_{}", uuid::Uuid::new_v4().simple());
    let api_port = crate::helpers::free_port();
    let env = activekg_env(
        &db.url,
        &[
            ("ACTIVEKG_JOBS_BACKEND", "redis".to_owned()),
            ("REDIS_URL", redis_url()),
            ("ACTIVEKG_REDIS_PREFIX", prefix.clone()),
            ("ACTIVEKG_LOCAL_ROOTS", folder.path().display().to_string()),
            ("RUN_SCHEDULER", "false".to_owned()),
        ],
    );
    let mut api_env = env.clone();
    api_env.push(("ACTIVEKG_LISTEN", format!("127.0.0.1:{api_port}")));
    let _api = spawn_role("api", &api_env);
    let api = Api::ready(api_port).await;
    let health: serde_json::Value = serde_json::from_str(&api.get("/health").await).unwrap();
    assert_eq!(
        (
            health["status"].as_str(),
            health["redis"]["reachable"].as_bool()
        ),
        (Some("ok"), Some(true)),
        "{health}"
    );
    api.post(
        "/_admin/connectors/local/register",
        serde_json::json!({"tenant_id": "acme", "config": {"path": folder.path().display().to_string()}}),
    )
    .await;
    api.post(
        "/_admin/connectors/local/backfill",
        serde_json::json!({"tenant_id": "acme"}),
    )
    .await;

    // No worker yet: the backfill's job waits in Redis, and the operator sees it where the guide says.
    eventually(
        Duration::from_secs(20),
        "the backlog on /metrics",
        || async {
            (connector_depth(&api.get("/metrics").await, "local", "acme") == 1).then_some(())
        },
    )
    .await;
    let queues: serde_json::Value = serde_json::from_str(&api.get("/_admin/queues").await).unwrap();
    let acme = queues["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant_id"] == "acme" && t["provider"] == "local")
        .unwrap_or_else(|| panic!("acme's row: {queues}"));
    assert_eq!(acme["pending"], 1, "{queues}");
    let in_table: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE queue <> 'maintenance'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        in_table, 0,
        "connector jobs live in Redis, not the jobs table"
    );

    let worker_env: Vec<_> = env
        .iter()
        .cloned()
        .chain([("ACTIVEKG_METRICS_LISTEN", "127.0.0.1:0".to_owned())])
        .collect();
    let _worker = spawn_role("worker", &worker_env);
    let expected: Vec<String> = (0..5).map(|n| format!("note-{n}.txt")).collect();
    eventually(Duration::from_secs(60), "every note ingested and embedded", || async {
        let unembedded: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM nodes WHERE tenant_id = 'acme' AND entity_type = 'Chunk' AND embedding_status <> 'ready'",
        )
        .fetch_one(&db.pool)
        .await
        .ok()?;
        (documents(&db.pool, "acme").await == expected && unembedded == 0).then_some(())
    })
    .await;
    eventually(Duration::from_secs(20), "the backlog to drain", || async {
        let queues: serde_json::Value =
            serde_json::from_str(&api.get("/_admin/queues").await).ok()?;
        let kinds = queues["queues"].as_array()?;
        let counts = |queue: &str, kind: &str| {
            kinds.iter().find(|q| q["queue"] == queue).and_then(|q| {
                q["kinds"]
                    .as_array()?
                    .iter()
                    .find(|k| k["kind"] == kind)
                    .cloned()
            })
        };
        let ingest = counts("connector", "ingest_object")?;
        let embed = counts("embedding", "embed_node")?;
        let drained = ingest["pending"] == 0 && ingest["running"] == 0 && embed["pending"] == 0;
        (drained
            && ingest["completed_last_5m"] == 5
            && embed["completed_last_5m"].as_i64()? >= 5
            && connector_depth(&api.get("/metrics").await, "local", "acme") == 0)
            .then_some(())
    })
    .await;
    // The jobs API lists and shows them as it does jobs in PostgreSQL.
    let listed: serde_json::Value = serde_json::from_str(
        &api.get("/_admin/jobs?kind=ingest_object&state=completed")
            .await,
    )
    .unwrap();
    let listed = listed["jobs"].as_array().unwrap();
    assert_eq!(listed.len(), 5, "{listed:?}");
    let shown: serde_json::Value =
        serde_json::from_str(&api.get(&format!("/_admin/jobs/{}", listed[0]["id"])).await).unwrap();
    assert_eq!(
        (shown["state"].as_str(), shown["attempt"].as_i64()),
        (Some("completed"), Some(1)),
        "{shown}"
    );
    assert_eq!(shown["tenant_id"], "acme", "{shown}");
    RedisJobs::connect(&redis_url(), &prefix)
        .await
        .unwrap()
        .delete_all()
        .await
        .unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn on_redis_the_pending_embedding_cap_counts_jobs_in_the_outbox_and_in_redis() {
    use activekg::domain::TenantId;
    use activekg::jobs::embed_node::Caps;
    use activekg::workflows::nodes::{self as workflow, CreateError, NodeInput};
    let db = TestDb::new().await;
    job_store::route_to_redis(&["embedding"]);
    let prefix = format!("activekg_test_{}", uuid::Uuid::new_v4().simple());
    let redis = RedisJobs::connect(&redis_url(), &prefix).await.unwrap();
    let caps = Caps {
        tenant: 2,
        total: 0,
        redis: Some(redis.clone()),
    };
    let note = |tenant: &str, text: &str| NodeInput {
        id: None,
        tenant_id: TenantId::parse(tenant).unwrap(),
        classes: vec!["Note".to_owned()],
        props: serde_json::Map::new(),
        text: Some(text.to_owned()),
        payload_ref: None,
    };
    let over_cap =
        |outcome: Result<_, CreateError>| matches!(outcome, Err(CreateError::OverCap { .. }));
    workflow::create(
        &db.pool,
        caps.clone(),
        vec![note("acme", "one"), note("acme", "two")],
    )
    .await
    .unwrap();
    assert!(
        over_cap(workflow::create(&db.pool, caps.clone(), vec![note("acme", "three")]).await),
        "two embeddings on their way to Redis fill acme's cap"
    );
    store_jobs::relay(&db.pool, &redis, 100).await.unwrap();
    let (in_table, in_outbox): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM jobs WHERE kind = 'embed_node'), (SELECT count(*) FROM job_outbox)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((in_table, in_outbox), (0, 0), "both jobs are in Redis now");
    let (acme, all) = activekg::workflows::embeddings::status(&db.pool, Some(&redis), Some("acme"))
        .await
        .unwrap();
    assert_eq!(
        acme.unwrap().queue.queued,
        2,
        "the status shows Redis's queue"
    );
    assert_eq!(all.queue.queued, 2);
    assert!(
        over_cap(workflow::create(&db.pool, caps.clone(), vec![note("acme", "three")]).await),
        "two embeddings waiting in Redis fill acme's cap"
    );
    workflow::create(&db.pool, caps.clone(), vec![note("globex", "elsewhere")])
        .await
        .expect("another tenant has room");
    redis.delete_all().await.unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn on_redis_a_running_job_cancelled_by_an_operator_is_stopped_at_once_and_commits_nothing() {
    use activekg::jobs::engine::admin;
    let db = TestDb::new().await;
    create_probe_tables(&db.pool).await;
    let (redis, child_redis) = redis_at(&redis_url()).await;
    let mut conn = db.pool.acquire().await.unwrap();
    let id = engine::enqueue(
        &mut conn,
        &Probe::new("slow", Behavior::EffectAfter { ms: 15_000 }),
    )
    .await
    .unwrap()
    .id
    .unwrap();
    drop(conn);
    let mut child = spawn_child("worker", &db.url, &[("ACTIVEKG_CHILD_REDIS", &child_redis)]);
    let (_worker, _lines) = child_ready(&mut child).await;
    eventually(Duration::from_secs(10), "the job to be running", || async {
        (redis.get(id).await.unwrap()?.state == JobState::Running).then_some(())
    })
    .await;
    let stores = admin::Stores {
        pool: &db.pool,
        redis: Some(&redis),
    };
    let cancelled = admin::cancel(stores, id).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(cancelled.errors.last().unwrap().class, "cancelled");
    // Probes run one at a time: the next one starts within seconds only if the cancelled attempt was told
    // to stop, rather than left to run out its 15 s and be refused its commit.
    let mut conn = db.pool.acquire().await.unwrap();
    let next = engine::enqueue(&mut conn, &Probe::new("next", Behavior::Sleep { ms: 0 }))
        .await
        .unwrap()
        .id
        .unwrap();
    drop(conn);
    eventually(
        Duration::from_secs(5),
        "the next probe to complete",
        || async { (redis.get(next).await.unwrap()?.state == JobState::Completed).then_some(()) },
    )
    .await;
    assert_eq!(
        effects(&db.pool).await,
        (0, 0),
        "the cancelled attempt committed nothing"
    );
    assert_eq!(
        redis.get(id).await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    child.start_kill().unwrap();
    redis.delete_all().await.unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn on_redis_what_postgresql_keeps_in_step_with_a_job_follows_it_as_the_triggers_keep_it() {
    use activekg::domain::{NodeId, Provider, TenantId};
    use activekg::jobs::backfill_page::BackfillPage;
    use activekg::jobs::embed_node::Caps;
    use activekg::jobs::engine::admin;
    use activekg::store::jobs::{Completion, Finish};
    use activekg::workflows::nodes::{self as workflow, Created, NodeInput};
    let db = TestDb::new().await;
    job_store::route_to_redis(&["embedding", "connector"]);
    let prefix = format!("activekg_test_{}", uuid::Uuid::new_v4().simple());
    let redis = RedisJobs::connect(&redis_url(), &prefix)
        .await
        .unwrap()
        .mirror_moves(db.pool.clone(), activekg::jobs::MIRRORED_KINDS);
    let caps = Caps {
        tenant: 0,
        total: 0,
        redis: None,
    };
    let input = NodeInput {
        id: None,
        tenant_id: TenantId::parse("acme").unwrap(),
        classes: vec!["Note".to_owned()],
        props: serde_json::Map::new(),
        text: Some("bread".to_owned()),
        payload_ref: None,
    };
    let Created::Created { id: node, .. } = workflow::create(&db.pool, caps, vec![input])
        .await
        .unwrap()
        .remove(0)
    else {
        panic!("the node was not created");
    };
    store_jobs::relay(&db.pool, &redis, 100).await.unwrap();
    let status = || async {
        sqlx::query_as::<_, (String, i32, Option<String>)>(
            "SELECT embedding_status, embedding_attempts, embedding_error FROM nodes WHERE id = $1",
        )
        .bind(node)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let failure = crate::jobs_backends::error;
    // The handler marks `processing` itself (as on PostgreSQL); what no handler sees is mirrored.
    let processing =
        |attempt| activekg::store::embeddings::mark_processing(&db.pool, NodeId(node), attempt);
    assert_eq!(status().await.0, "queued");
    let (first, _) = redis
        .claim_fair("embed_node", "w1", 1, "", "t1")
        .await
        .unwrap();
    processing(1).await.unwrap();
    let job = JobId(first[0].id);
    let retry = Completion {
        id: job,
        attempt: 1,
        finish: Finish::Retry {
            delay: Duration::ZERO,
            error: failure(1, "model busy"),
        },
    };
    redis.finish("w1", &[retry]).await.unwrap();
    assert_eq!(
        status().await,
        ("queued".into(), 1, Some("model busy".into()))
    );

    let (second, _) = redis
        .claim_fair("embed_node", "w1", 1, "", "t2")
        .await
        .unwrap();
    processing(2).await.unwrap();
    // A late report of attempt 1 going back to waiting must not undo attempt 2's.
    store_jobs::mirror_moves(
        &db.pool,
        &[(
            "embed_node".into(),
            second[0].args.to_string(),
            "available".into(),
            1,
            "late".into(),
        )],
    )
    .await
    .unwrap();
    assert_eq!(
        status().await.0,
        "processing",
        "a late move changed nothing"
    );
    let dead = Completion {
        id: job,
        attempt: 2,
        finish: Finish::Dead {
            error: failure(2, "rejected"),
        },
    };
    redis.finish("w1", &[dead]).await.unwrap();
    assert_eq!(
        status().await,
        ("failed".into(), 2, Some("rejected".into()))
    );
    // An operator's replay queues it again.
    let stores = admin::Stores {
        pool: &db.pool,
        redis: Some(&redis),
    };
    admin::retry(stores, job).await.unwrap();
    assert_eq!(status().await.0, "queued");

    // A backfill run ends, failed, when its page job dies in Redis (its worker silent on the last attempt).
    let run = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO backfill_runs (id, tenant_id, provider, prefix) VALUES ($1, 'acme', 's3', '')",
    )
    .bind(run)
    .execute(&db.pool)
    .await
    .unwrap();
    let page = BackfillPage {
        run_id: run,
        tenant_id: "acme".into(),
        provider: Provider::S3,
        prefix: String::new(),
        page: 0,
        page_token: None,
    };
    let mut conn = db.pool.acquire().await.unwrap();
    engine::enqueue(&mut conn, &page).await.unwrap();
    drop(conn);
    store_jobs::relay(&db.pool, &redis, 100).await.unwrap();
    let (claimed, _) = redis
        .claim_fair("backfill_page", "w1", 1, "", "t3")
        .await
        .unwrap();
    let cancelled = admin::cancel(stores, JobId(claimed[0].id)).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    let (state, error): (String, Option<String>) =
        sqlx::query_as("SELECT state, error FROM backfill_runs WHERE id = $1")
            .bind(run)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(state, "failed", "{error:?}");
    assert!(error.unwrap().contains("cancelled"));
    redis.delete_all().await.unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn while_redis_is_down_health_says_degraded_and_work_is_still_accepted_then_handed_over() {
    let db = TestDb::new().await;
    let folder = tempfile::tempdir().unwrap();
    std::fs::write(folder.path().join("note.txt"), "A note.").unwrap();
    let mut server = OwnRedis::start().await;
    let api_port = crate::helpers::free_port();
    let env = activekg_env(
        &db.url,
        &[
            ("ACTIVEKG_JOBS_BACKEND", "redis".to_owned()),
            ("REDIS_URL", server.url()),
            ("ACTIVEKG_LOCAL_ROOTS", folder.path().display().to_string()),
            ("RUN_SCHEDULER", "false".to_owned()),
            ("ACTIVEKG_LISTEN", format!("127.0.0.1:{api_port}")),
        ],
    );
    let _api = spawn_role("api", &env);
    let api = Api::ready(api_port).await;
    api.post(
        "/_admin/connectors/local/register",
        serde_json::json!({"tenant_id": "acme", "config": {"path": folder.path().display().to_string()}}),
    )
    .await;
    let health =
        || async { serde_json::from_str::<serde_json::Value>(&api.get("/health").await).unwrap() };
    assert_eq!(health().await["redis"]["reachable"], true);

    server.kill();
    let seen = eventually(
        Duration::from_secs(10),
        "health to see Redis gone",
        || async {
            let h = health().await;
            (h["redis"]["reachable"] == false).then_some(h)
        },
    )
    .await;
    assert_eq!(seen["status"], "degraded", "{seen}");
    assert_eq!(seen["database"]["reachable"], true, "{seen}");
    // Work is still accepted: it waits in PostgreSQL's outbox.
    api.post(
        "/_admin/connectors/local/backfill",
        serde_json::json!({"tenant_id": "acme"}),
    )
    .await;
    let staged: i64 = sqlx::query_scalar("SELECT count(*) FROM job_outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(staged, 1, "the backfill's job waits in the outbox");

    server.restart().await;
    eventually(
        Duration::from_secs(20),
        "health ok and the job handed over",
        || async {
            let h = health().await;
            let staged: i64 = sqlx::query_scalar("SELECT count(*) FROM job_outbox")
                .fetch_one(&db.pool)
                .await
                .ok()?;
            (h["status"] == "ok" && staged == 0).then_some(())
        },
    )
    .await;
    let queues: serde_json::Value = serde_json::from_str(&api.get("/_admin/queues").await).unwrap();
    let acme = queues["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant_id"] == "acme")
        .unwrap_or_else(|| panic!("{queues}"))
        .clone();
    assert_eq!(acme["pending"], 1, "{queues}");
    db.drop_db().await;
}
