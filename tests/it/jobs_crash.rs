//! Crash safety with real processes: a worker killed with SIGKILL mid-job, and a job that kills every
//! worker that runs it.

use std::time::{Duration, Instant};

use activekg::domain::{JobId, JobState};
use activekg::jobs::engine::{self, Runtime, admin};
use activekg::store::redis_jobs::RedisJobs;

use crate::helpers::{TestDb, child_ready, eventually, fast_job_settings, spawn_child};
use crate::kinds::{Behavior, Probe, create_probe_tables, run_probe};

#[tokio::test]
async fn a_job_whose_worker_is_killed_is_picked_up_again_and_completes() {
    let db = TestDb::new().await;
    a_killed_workers_job_is_rescued_and_completes(&db, None).await;
    db.drop_db().await;
}

/// Kills a worker process mid-job with SIGKILL; a healthy replica must take the job back and complete it,
/// with the killed attempt counted. `redis` runs the test queue there (its store, and the child's
/// `ACTIVEKG_CHILD_REDIS`), with the queue routed to it in this process.
pub async fn a_killed_workers_job_is_rescued_and_completes(
    db: &TestDb,
    redis: Option<(&RedisJobs, &str)>,
) {
    create_probe_tables(&db.pool).await;
    let stores = admin::Stores {
        pool: &db.pool,
        redis: redis.map(|(r, _)| r),
    };
    let child_env: Vec<(&str, &str)> = redis
        .map(|(_, child)| ("ACTIVEKG_CHILD_REDIS", child))
        .into_iter()
        .collect();
    let mut conn = db.pool.acquire().await.unwrap();
    let id = engine::enqueue(&mut conn, &Probe::new("victim", Behavior::HangFirstAttempt))
        .await
        .unwrap()
        .id
        .unwrap();
    drop(conn);

    let mut child = spawn_child("worker", &db.url, &child_env);
    let (child_worker, _lines) = child_ready(&mut child).await;
    eventually(
        Duration::from_secs(10),
        "the child to be running the job",
        || async {
            let record = admin::get(stores, id).await.unwrap();
            (record.state == JobState::Running
                && record.locked_by.as_deref() == Some(child_worker.as_str()))
            .then_some(())
        },
    )
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let killed_at = Instant::now();

    // A healthy replica: workers for the kind; its engine does the upkeep (rescue) itself.
    let settings = fast_job_settings();
    let mut runtime = Runtime::new(db.pool.clone(), settings.clone());
    if let Some((redis, _)) = redis {
        runtime.redis(redis.clone());
    }
    runtime.register(db.pool.clone(), run_probe);
    let workers = runtime.start().await.unwrap();

    let done = eventually(
        Duration::from_secs(30),
        "the job to complete after the rescue",
        || async {
            let record = admin::get(stores, id).await.unwrap();
            (record.state == JobState::Completed).then_some(record)
        },
    )
    .await;
    let recovered_in = killed_at.elapsed();
    workers.shutdown().await;

    assert_eq!(done.attempt, 2, "the killed attempt counted");
    assert_eq!(done.errors.len(), 1);
    assert_eq!(done.errors[0].class, "crash");
    assert_eq!(
        done.errors[0].worker.as_deref(),
        Some(child_worker.as_str())
    );
    // Orphan timeout 2 s: the replica must itself be in touch for 2 s before it may rescue, then looks
    // every 0.7 s. Well inside the 60 s the default settings promise.
    assert!(
        recovered_in < Duration::from_secs(10),
        "recovered after {recovered_in:?}"
    );
}

#[tokio::test]
async fn a_job_that_kills_every_worker_is_dead_after_its_attempts() {
    let db = TestDb::new().await;
    create_probe_tables(&db.pool).await;
    let mut conn = db.pool.acquire().await.unwrap();
    let id = engine::enqueue(&mut conn, &Probe::new("killer", Behavior::Abort))
        .await
        .unwrap()
        .id
        .unwrap();
    drop(conn);
    // A process without workers still rescues orphans (every process does the engine's upkeep).
    let rescuer = Runtime::new(db.pool.clone(), fast_job_settings())
        .start()
        .await
        .unwrap();

    let mut workers_killed = 0;
    let dead = loop {
        assert!(
            workers_killed < 6,
            "the job was still not dead after killing {workers_killed} workers"
        );
        let mut child = spawn_child("worker", &db.url, &[]);
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("the job kills its worker")
            .unwrap();
        assert!(!status.success(), "the worker died");
        workers_killed += 1;
        let record = eventually(
            Duration::from_secs(15),
            "the rescuer to take the job back",
            || async {
                let record = admin::get(&db.pool, JobId(id.0)).await.unwrap();
                (record.state != JobState::Running).then_some(record)
            },
        )
        .await;
        if record.state == JobState::Dead {
            break record;
        }
        assert_eq!(
            record.state,
            JobState::Pending,
            "a rescued job runs again at once"
        );
    };
    rescuer.shutdown().await;
    assert_eq!(workers_killed, 3, "max_attempts is 3");
    assert_eq!(dead.attempt, 3);
    let classes: Vec<&str> = dead.errors.iter().map(|e| e.class.as_str()).collect();
    assert_eq!(classes, ["crash", "crash", "crash"]);
    db.drop_db().await;
}
