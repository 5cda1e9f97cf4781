//! The job engine against the real PostgreSQL: backoff, dead letters, replay, cancel, idempotent and
//! transactional enqueue, dispatch latency, graceful shutdown, pruning.

use std::time::Duration;

use activekg::config::JobSettings;
use activekg::domain::{JobId, JobState};
use activekg::jobs::engine::upkeep;
use activekg::jobs::engine::{self, Runtime, RuntimeHandle, admin};
use activekg::store::jobs::{JobFilter, JobRecord};
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::helpers::{TestDb, eventually, fast_job_settings};
use crate::kinds::{Behavior, Noop, Probe, create_probe_tables, run_noop, run_probe};

async fn start_workers(pool: &PgPool, settings: JobSettings) -> RuntimeHandle {
    let mut runtime = Runtime::new(pool.clone(), settings);
    runtime.register(pool.clone(), run_probe);
    runtime.register(pool.clone(), run_noop);
    runtime.start().await.unwrap()
}

/// Enqueues `count` no-op jobs in one statement.
async fn enqueue_noops(pool: &PgPool, count: u32) {
    let backlog: Vec<Noop> = (0..count).map(|n| Noop { n }).collect();
    let mut conn = pool.acquire().await.unwrap();
    engine::enqueue_many(&mut conn, &backlog).await.unwrap();
}

/// No-op jobs not completed yet.
async fn noops_left(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE kind = 'test_noop' AND state <> 'completed'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn enqueue(pool: &PgPool, probe: &Probe) -> JobId {
    let mut conn = pool.acquire().await.unwrap();
    engine::enqueue(&mut conn, probe).await.unwrap().id.unwrap()
}

async fn job(pool: &PgPool, id: JobId) -> JobRecord {
    admin::get(pool, id).await.unwrap()
}

async fn wait_for_state(pool: &PgPool, id: JobId, state: JobState, within: Duration) -> JobRecord {
    eventually(within, &format!("job {id} to be {state}"), || async move {
        let record = job(pool, id).await;
        (record.state == state).then_some(record)
    })
    .await
}

/// (attempt, event, at) for every event a probe recorded.
async fn events(pool: &PgPool, label: &str) -> Vec<(i32, String, DateTime<Utc>)> {
    sqlx::query_as("SELECT attempt, event, at FROM test_events WHERE label = $1 ORDER BY id")
        .bind(label)
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn fixture() -> TestDb {
    let db = TestDb::new().await;
    create_probe_tables(&db.pool).await;
    db
}

#[tokio::test]
async fn a_failed_attempt_is_rescheduled_by_the_backoff_and_frees_its_slot_meanwhile() {
    let db = fixture().await;
    let failing = enqueue(
        &db.pool,
        &Probe::new(
            "failing",
            Behavior::Fail {
                times: 1,
                retry_after_ms: None,
            },
        ),
    )
    .await;
    let other = enqueue(&db.pool, &Probe::new("other", Behavior::Succeed)).await;
    // Probe has one slot: if the backoff held it, "other" could not run until the retry was over.
    let workers = start_workers(&db.pool, fast_job_settings()).await;

    wait_for_state(
        &db.pool,
        other,
        JobState::Completed,
        Duration::from_secs(10),
    )
    .await;
    let done = wait_for_state(
        &db.pool,
        failing,
        JobState::Completed,
        Duration::from_secs(10),
    )
    .await;
    workers.shutdown().await;

    let failing_events = events(&db.pool, "failing").await;
    let attempts: Vec<(i32, &str)> = failing_events
        .iter()
        .map(|(a, e, _)| (*a, e.as_str()))
        .collect();
    assert_eq!(
        attempts,
        [(1, "start"), (1, "fail"), (2, "start"), (2, "done")]
    );
    let failed_at = failing_events[1].2;
    let retried_at = failing_events[2].2;
    let gap = (retried_at - failed_at).to_std().unwrap();
    assert!(
        gap >= Duration::from_millis(1450),
        "retried after {gap:?}, before the 1.5 s backoff"
    );
    assert!(
        gap < Duration::from_millis(2500),
        "retried after {gap:?}: the backoff was not applied promptly"
    );

    let other_events = events(&db.pool, "other").await;
    assert!(
        other_events[0].2 > failed_at && other_events[0].2 < retried_at,
        "the other job ran while the failed one waited out its backoff"
    );
    assert_eq!(done.attempt, 2);
    assert_eq!(done.errors.len(), 1);
    assert_eq!(
        (done.errors[0].attempt, done.errors[0].class.as_str()),
        (1, "transient")
    );
    db.drop_db().await;
}

#[tokio::test]
async fn a_job_out_of_attempts_is_dead_with_every_attempts_error_kept() {
    let db = fixture().await;
    let id = enqueue(
        &db.pool,
        &Probe::new(
            "doomed",
            Behavior::Fail {
                times: 99,
                retry_after_ms: Some(50),
            },
        ),
    )
    .await;
    let permanent = enqueue(&db.pool, &Probe::new("hopeless", Behavior::Permanent)).await;
    let workers = start_workers(&db.pool, fast_job_settings()).await;

    let dead = wait_for_state(&db.pool, id, JobState::Dead, Duration::from_secs(10)).await;
    let hopeless =
        wait_for_state(&db.pool, permanent, JobState::Dead, Duration::from_secs(10)).await;
    workers.shutdown().await;

    assert_eq!(dead.attempt, 3);
    let history: Vec<(i32, &str, &str)> = dead
        .errors
        .iter()
        .map(|e| (e.attempt, e.class.as_str(), e.error.as_str()))
        .collect();
    assert_eq!(
        history,
        [
            (1, "retry_after", "failing attempt 1"),
            (2, "retry_after", "failing attempt 2"),
            (3, "retry_after", "failing attempt 3"),
        ]
    );
    assert!(dead.finished_at.is_some() && dead.locked_by.is_none());
    // A permanent error does not wait for the attempt budget.
    assert_eq!(hopeless.attempt, 1);
    assert_eq!(hopeless.errors[0].code.as_deref(), Some("test_permanent"));
    db.drop_db().await;
}

#[tokio::test]
async fn a_dead_job_replayed_runs_again_with_a_fresh_set_of_attempts() {
    let db = fixture().await;
    let single = enqueue(&db.pool, &Probe::new("single", Behavior::FailUntilFixed)).await;
    let bulk_a = enqueue(
        &db.pool,
        &Probe {
            tenant: Some("acme".into()),
            ..Probe::new("bulk", Behavior::FailUntilFixed)
        },
    )
    .await;
    let bulk_b = enqueue(
        &db.pool,
        &Probe {
            tenant: Some("acme".into()),
            ..Probe::new("bulk", Behavior::FailUntilFixed)
        },
    )
    .await;
    let other_tenant = enqueue(
        &db.pool,
        &Probe {
            tenant: Some("zeta".into()),
            ..Probe::new("zeta", Behavior::FailUntilFixed)
        },
    )
    .await;
    let workers = start_workers(&db.pool, fast_job_settings()).await;
    for id in [single, bulk_a, bulk_b, other_tenant] {
        wait_for_state(&db.pool, id, JobState::Dead, Duration::from_secs(10)).await;
    }
    sqlx::query("INSERT INTO test_fixed VALUES ('single'), ('bulk'), ('zeta')")
        .execute(&db.pool)
        .await
        .unwrap();

    admin::retry(&db.pool, single).await.unwrap();
    let tenant_filter = JobFilter {
        tenant_id: Some("acme".into()),
        ..JobFilter::default()
    };
    assert_eq!(
        admin::replay_dead(&db.pool, &tenant_filter, false, 100)
            .await
            .unwrap()
            .count,
        2
    );

    for id in [single, bulk_a, bulk_b] {
        let done = wait_for_state(&db.pool, id, JobState::Completed, Duration::from_secs(10)).await;
        assert_eq!(done.attempt, 1, "a replay starts a fresh set of attempts");
        let classes: Vec<&str> = done.errors.iter().map(|e| e.class.as_str()).collect();
        assert_eq!(
            classes,
            ["permanent", "replayed"],
            "the history before the replay is kept"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        job(&db.pool, other_tenant).await.state,
        JobState::Dead,
        "the filter left other tenants alone"
    );
    workers.shutdown().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_cancelled_job_never_runs_and_finished_jobs_cannot_be_cancelled() {
    let db = fixture().await;
    let later = {
        let mut conn = db.pool.acquire().await.unwrap();
        let at = Utc::now() + chrono::Duration::seconds(2);
        engine::enqueue_at(&mut conn, &Probe::new("later", Behavior::Succeed), Some(at))
            .await
            .unwrap()
            .id
            .unwrap()
    };
    let now = enqueue(&db.pool, &Probe::new("now", Behavior::Succeed)).await;
    assert_eq!(job(&db.pool, later).await.state, JobState::Scheduled);
    let cancelled = admin::cancel(&db.pool, later).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);

    let workers = start_workers(&db.pool, fast_job_settings()).await;
    wait_for_state(&db.pool, now, JobState::Completed, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    workers.shutdown().await;

    assert!(
        events(&db.pool, "later").await.is_empty(),
        "the cancelled job never started"
    );
    assert_eq!(job(&db.pool, later).await.state, JobState::Cancelled);
    let err = admin::cancel(&db.pool, now).await.unwrap_err();
    assert!(matches!(err, activekg::error::Error::Conflict(_)), "{err}");
    db.drop_db().await;
}

#[tokio::test]
async fn a_scheduled_job_can_be_moved_and_runs_within_the_poll_interval_of_its_time() {
    let db = fixture().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let far = Utc::now() + chrono::Duration::hours(1);
    let id = engine::enqueue_at(
        &mut conn,
        &Probe::new("moved", Behavior::Succeed),
        Some(far),
    )
    .await
    .unwrap()
    .id
    .unwrap();
    drop(conn);
    let workers = start_workers(&db.pool, fast_job_settings()).await;
    let soon = Utc::now() + chrono::Duration::milliseconds(800);
    admin::reschedule(&db.pool, id, soon).await.unwrap();
    let done = wait_for_state(&db.pool, id, JobState::Completed, Duration::from_secs(5)).await;
    workers.shutdown().await;
    let started = done.attempted_at.unwrap();
    assert!(started >= soon, "it did not start before its time");
    let late = (started - soon).to_std().unwrap();
    assert!(
        late < Duration::from_millis(200 + 300),
        "started {late:?} after it was due (poll interval 200 ms)"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn duplicates_in_a_batch_are_skipped_without_failing_the_rest() {
    let db = fixture().await;
    let keyed = |label: &str, key: &str| Probe {
        key: Some(key.to_owned()),
        ..Probe::new(label, Behavior::Succeed)
    };
    let mut conn = db.pool.acquire().await.unwrap();
    let existing = engine::enqueue(&mut conn, &keyed("existing", "k3"))
        .await
        .unwrap();
    let batch = [
        keyed("a", "k1"),
        keyed("b", "k2"),
        keyed("a-again", "k1"),
        keyed("c", "k3"),
        Probe::new("unkeyed", Behavior::Succeed),
    ];
    let results = engine::enqueue_many(&mut conn, &batch).await.unwrap();
    let inserted: Vec<bool> = results.iter().map(|r| r.inserted).collect();
    assert_eq!(inserted, [true, true, false, false, true]);
    assert_eq!(
        results[2].id, results[0].id,
        "a duplicate within the batch reports the first one's id"
    );
    assert_eq!(
        results[3].id, existing.id,
        "a duplicate of an existing job reports that job's id"
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'test_probe'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 4);
    db.drop_db().await;
}

#[tokio::test]
async fn a_job_enqueued_in_a_rolled_back_transaction_does_not_exist() {
    let db = fixture().await;
    let workers = start_workers(&db.pool, fast_job_settings()).await;
    let mut tx = db.pool.begin().await.unwrap();
    let ghost = engine::enqueue(&mut tx, &Probe::new("ghost", Behavior::Succeed))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let real = engine::enqueue(&mut tx, &Probe::new("real", Behavior::Succeed))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    wait_for_state(
        &db.pool,
        real.id.unwrap(),
        JobState::Completed,
        Duration::from_secs(5),
    )
    .await;
    workers.shutdown().await;
    assert!(
        activekg::store::jobs::get(&db.pool, ghost.id.unwrap())
            .await
            .unwrap()
            .is_none()
    );
    assert!(events(&db.pool, "ghost").await.is_empty());
    db.drop_db().await;
}

#[tokio::test]
async fn an_idle_worker_starts_a_new_job_on_notify_without_waiting_for_its_poll() {
    let db = fixture().await;
    let settings = JobSettings {
        poll_interval: Duration::from_secs(60),
        ..fast_job_settings()
    };
    let workers = start_workers(&db.pool, settings).await;
    // Let the first fetch come back empty so the worker is idle, waiting on NOTIFY or its 60 s poll.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::new();
    for i in 0..5 {
        let id = enqueue(
            &db.pool,
            &Probe::new(&format!("wake-{i}"), Behavior::Succeed),
        )
        .await;
        let done = wait_for_state(&db.pool, id, JobState::Completed, Duration::from_secs(5)).await;
        latencies.push(
            (done.attempted_at.unwrap() - done.enqueued_at)
                .to_std()
                .unwrap(),
        );
    }
    workers.shutdown().await;
    latencies.sort();
    assert!(
        latencies[4] < Duration::from_millis(500),
        "enqueue-to-start latencies: {latencies:?}"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn a_backlog_of_quick_jobs_is_claimed_in_growing_claims_not_batch_by_batch() {
    let db = fixture().await;
    enqueue_noops(&db.pool, 3000).await;
    let workers = start_workers(&db.pool, fast_job_settings()).await;
    eventually(Duration::from_secs(60), "the backlog to drain", || async {
        (noops_left(&db.pool).await == 0).then_some(())
    })
    .await;
    workers.shutdown().await;
    // Every claim stamps its rows with its own statement's now(): one time per claim.
    let claims: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT attempted_at) FROM jobs WHERE kind = 'test_noop'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        claims <= 60,
        "3000 quick jobs at batch size 10 took {claims} claims (300 without growing claims)"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn a_deep_backlog_of_quick_jobs_is_claimed_by_two_claims_at_once_each_job_once() {
    let db = fixture().await;
    enqueue_noops(&db.pool, 20_000).await;
    let workers = start_workers(&db.pool, fast_job_settings()).await;
    // Watch the server: how many claim statements of this database run at the same moment.
    let mut most_at_once = 0i64;
    let started = std::time::Instant::now();
    loop {
        let (claims, left): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND state = 'active' AND pid <> pg_backend_pid()
                       AND query LIKE '%FOR UPDATE SKIP LOCKED%' AND query LIKE '%UPDATE jobs j%'),
                    (SELECT count(*) FROM jobs WHERE kind = 'test_noop' AND state <> 'completed')",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        most_at_once = most_at_once.max(claims);
        if left == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the backlog did not drain: {left} left"
        );
        // Claims of this size take several milliseconds; sampling faster would only load the machine.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    workers.shutdown().await;
    let (done, reclaimed): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'completed'), count(*) FILTER (WHERE attempt <> 1)
         FROM jobs WHERE kind = 'test_noop'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (done, reclaimed),
        (20_000, 0),
        "every job completed on its first claim"
    );
    assert!(
        most_at_once >= 2,
        "one worker never had two claims running at once during a 20,000-job drain"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn claims_whose_answers_are_lost_during_a_deep_drain_still_run_every_job_once() {
    let db = fixture().await;
    enqueue_noops(&db.pool, 20_000).await;
    // The workers reach the database through a hop that loses claim answers after they committed: the
    // first claim of the drain, and later the two claims in flight at once.
    let hop = crate::reply_loss::ReplyLoss::start("127.0.0.1:5432", "SELECT ctid FROM jobs").await;
    let pool = PgPool::connect(&hop.url(&db.url)).await.unwrap();
    hop.arm(1);
    let workers = start_workers(&pool, fast_job_settings()).await;
    let started = std::time::Instant::now();
    let mut armed_twice = false;
    loop {
        let left = noops_left(&db.pool).await;
        // A quarter into the drain claims are hundreds of rows and two run at once: lose both answers.
        if left <= 15_000 && !armed_twice {
            hop.arm(2);
            armed_twice = true;
        }
        if left == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{left} jobs never finished after {} lost claim answers",
            hop.lost()
        );
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    workers.shutdown().await;
    assert_eq!(
        hop.lost(),
        3,
        "the first claim and two claims at once lost their answers"
    );
    let reclaimed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'test_noop' AND attempt <> 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        reclaimed, 0,
        "every job ran as the attempt its claim started"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn a_panicking_or_undecodable_job_is_handled_and_the_worker_keeps_going() {
    let db = fixture().await;
    let panicky = enqueue(&db.pool, &Probe::new("panicky", Behavior::Panic)).await;
    let garbage: i64 = sqlx::query_scalar(
        "INSERT INTO jobs (kind, queue, args, max_attempts) VALUES ('test_probe', 'test', '{\"nonsense\": true}', 3) RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let fine = enqueue(&db.pool, &Probe::new("fine", Behavior::Succeed)).await;
    let workers = start_workers(&db.pool, fast_job_settings()).await;

    let undecodable = wait_for_state(
        &db.pool,
        JobId(garbage),
        JobState::Dead,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(undecodable.errors[0].class, "undecodable");
    wait_for_state(&db.pool, fine, JobState::Completed, Duration::from_secs(5)).await;
    let panicked = eventually(
        Duration::from_secs(5),
        "the panic to be recorded",
        || async {
            let record = job(&db.pool, panicky).await;
            (!record.errors.is_empty()).then_some(record)
        },
    )
    .await;
    workers.shutdown().await;
    assert_eq!(panicked.errors[0].class, "panic");
    assert!(
        panicked.errors[0].error.contains("panicked on purpose"),
        "{:?}",
        panicked.errors[0]
    );
    assert_ne!(
        panicked.state,
        JobState::Dead,
        "a panic is retried like a transient failure"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn shutdown_hands_back_unfinished_jobs_and_leaves_no_locked_rows() {
    let db = fixture().await;
    for i in 0..4 {
        enqueue(
            &db.pool,
            &Probe::new(&format!("slow-{i}"), Behavior::Sleep { ms: 60_000 }),
        )
        .await;
    }
    let quick = enqueue(&db.pool, &Probe::new("quick", Behavior::Sleep { ms: 300 })).await;
    sqlx::query("UPDATE jobs SET priority = 5 WHERE id = $1")
        .bind(quick.0)
        .execute(&db.pool)
        .await
        .unwrap();
    let settings = JobSettings {
        shutdown_grace: Duration::from_millis(1500),
        ..fast_job_settings()
    };
    let workers = start_workers(&db.pool, settings).await;
    let worker_id = workers.worker_id().to_owned();
    // The quick job (highest priority) runs first and finishes inside the grace period; the next one is
    // still sleeping when the grace period ends.
    eventually(Duration::from_secs(5), "a slow job to start", || async {
        let started: i64 =
            sqlx::query_scalar("SELECT count(*) FROM test_events WHERE label LIKE 'slow-%'")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        (started > 0).then_some(())
    })
    .await;
    workers.shutdown().await;

    let running: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE state = 'running' OR locked_by IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(running, 0, "no job is left running or locked");
    assert_eq!(job(&db.pool, quick).await.state, JobState::Completed);
    let interrupted: Vec<(i32, serde_json::Value)> = sqlx::query_as(
        "SELECT attempt, errors FROM jobs WHERE args->>'label' LIKE 'slow-%' AND jsonb_array_length(errors) > 0",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        interrupted.len(),
        1,
        "exactly the one running slow job was interrupted"
    );
    assert_eq!(
        interrupted[0].0, 0,
        "an interrupted attempt is handed back without using up an attempt"
    );
    assert_eq!(interrupted[0].1[0]["class"], "interrupted");
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'available' AND attempt = 0")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(pending, 4, "every slow job is available again");
    let worker_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM job_workers WHERE id = $1")
        .bind(&worker_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(worker_rows, 0, "the worker row is removed");
    db.drop_db().await;
}

#[tokio::test]
async fn pruning_removes_only_finished_jobs_past_their_retention() {
    let db = fixture().await;
    let mut ids = Vec::new();
    for label in [
        "old-done",
        "new-done",
        "old-dead",
        "young-dead",
        "old-cancelled",
        "pending",
    ] {
        ids.push(enqueue(&db.pool, &Probe::new(label, Behavior::Succeed)).await);
    }
    let age = |label: &str, state: &str, hours: i32| {
        let pool = db.pool.clone();
        let (label, state) = (label.to_owned(), state.to_owned());
        async move {
            sqlx::query(
                "UPDATE jobs SET state = $2, finished_at = now() - make_interval(hours => $3) WHERE args->>'label' = $1",
            )
            .bind(label)
            .bind(state)
            .bind(hours)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    age("old-done", "completed", 25).await;
    age("new-done", "completed", 23).await;
    age("old-dead", "dead", 31 * 24).await;
    age("young-dead", "dead", 29 * 24).await;
    age("old-cancelled", "cancelled", 25).await;
    // More than one batch of old completed jobs, to show the batching loop finishes the job.
    sqlx::query(
        "INSERT INTO jobs (kind, queue, args, max_attempts, state, finished_at)
         SELECT 'test_noop', 'test', '{\"n\": 0}', 1, 'completed', now() - interval '2 days' FROM generate_series(1, 2500)",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let pruned = upkeep::prune_jobs(&db.pool, None, &fast_job_settings())
        .await
        .unwrap();
    assert_eq!(pruned, 2500 + 3);
    let left: Vec<String> = sqlx::query_scalar("SELECT args->>'label' FROM jobs ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, ["new-done", "young-dead", "pending"]);
    db.drop_db().await;
}

#[tokio::test]
async fn a_tenants_backlog_does_not_delay_another_tenants_first_job() {
    use crate::kinds::{FairProbe, run_fair};
    let db = fixture().await;
    let backlog: Vec<FairProbe> = (0..10_000)
        .map(|n| FairProbe {
            tenant: "busy".into(),
            n,
        })
        .collect();
    let mut conn = db.pool.acquire().await.unwrap();
    for chunk in backlog.chunks(5000) {
        engine::enqueue_many(&mut conn, chunk).await.unwrap();
    }
    drop(conn);
    let mut runtime = Runtime::new(db.pool.clone(), fast_job_settings());
    runtime.register(db.pool.clone(), run_fair);
    let workers = runtime.start().await.unwrap();
    // Let the busy tenant's backlog (about 25 s of work at 4 x 10 ms) get going.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut conn = db.pool.acquire().await.unwrap();
    let newcomer = engine::enqueue(
        &mut conn,
        &FairProbe {
            tenant: "newcomer".into(),
            n: 0,
        },
    )
    .await
    .unwrap()
    .id
    .unwrap();
    drop(conn);
    let started = wait_for_state(
        &db.pool,
        newcomer,
        JobState::Completed,
        Duration::from_secs(10),
    )
    .await;
    let waited = (started.attempted_at.unwrap() - started.enqueued_at)
        .to_std()
        .unwrap();
    let busy_left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE tenant_id = 'busy' AND state = 'available'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    workers.shutdown().await;
    assert!(
        busy_left > 5000,
        "the busy tenant still had a backlog ({busy_left})"
    );
    assert!(
        waited < Duration::from_secs(2),
        "the newcomer's first job waited {waited:?}"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn each_minute_is_sampled_once_with_its_completions_failures_dead_letters_and_depth() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    for i in 0..6 {
        engine::enqueue(&mut conn, &Probe::new(&format!("h{i}"), Behavior::Succeed))
            .await
            .unwrap();
    }
    drop(conn);
    // Last minute: two completed, one dead, one failed and waiting for its retry; two still pending.
    sqlx::query(
        "WITH m AS (SELECT date_trunc('minute', now()) - interval '1 minute' + interval '10 seconds' AS at),
              picked AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM jobs)
         UPDATE jobs j SET
           state = CASE p.n WHEN 1 THEN 'completed' WHEN 2 THEN 'completed' WHEN 3 THEN 'dead' ELSE j.state END,
           finished_at = CASE WHEN p.n <= 3 THEN m.at END,
           run_at = CASE p.n WHEN 4 THEN now() + interval '1 hour' ELSE j.run_at END,
           errors = CASE WHEN p.n IN (3, 4) THEN jsonb_build_array(jsonb_build_object(
               'attempt', 1, 'at', m.at, 'class', 'transient', 'error', 'boom')) ELSE j.errors END
         FROM picked p, m WHERE p.id = j.id",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let written = activekg::store::jobs::sample_history(&db.pool)
        .await
        .unwrap();
    assert_eq!(written, 1, "one queue had jobs");
    assert_eq!(
        activekg::store::jobs::sample_history(&db.pool)
            .await
            .unwrap(),
        0,
        "a minute is sampled once, whoever gets there first"
    );
    let rows = activekg::store::jobs::history(&db.pool, 5).await.unwrap();
    let r = &rows[0];
    assert_eq!(
        (
            r.pending,
            r.scheduled,
            r.running,
            r.completed,
            r.failed,
            r.dead
        ),
        (2, 1, 0, 2, 2, 1),
        "{r:?}"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn a_line_a_handler_logs_names_the_kind_job_attempt_and_tenant_it_belongs_to() {
    let captured = crate::helpers::Captured::default();
    let writer = captured.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    )
    .expect("this test's process has no subscriber yet");
    let db = fixture().await;
    let mut probe = Probe::new(
        "logged",
        Behavior::Fail {
            times: 1,
            retry_after_ms: Some(10),
        },
    );
    probe.tenant = Some("acme".to_owned());
    let id = enqueue(&db.pool, &probe).await;
    let workers = start_workers(&db.pool, fast_job_settings()).await;
    wait_for_state(&db.pool, id, JobState::Completed, Duration::from_secs(10)).await;
    workers.shutdown().await;

    let logged = captured.text();
    let lines: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains("probe attempt starts"))
        .collect();
    assert_eq!(lines.len(), 2, "one line per attempt: {logged}");
    for (line, attempt) in lines.iter().zip(1..) {
        for field in [
            "kind=\"test_probe\"".to_owned(),
            format!("id={}", id.0),
            format!("attempt={attempt}"),
            "tenant=\"acme\"".to_owned(),
        ] {
            assert!(line.contains(&field), "{field} missing from {line}");
        }
    }
    db.drop_db().await;
}
