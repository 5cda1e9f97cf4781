//! The job engine at its edges, against the real PostgreSQL: keys given back by dead and cancelled jobs,
//! cancelling a running attempt, capped snoozes and hand-backs, a refused result that must not hold back
//! the others, fair claims that do not scan backoff rows, claims that never wait on graph rows, and claims
//! that find their rows by key however large the table.

use std::time::Duration;

use activekg::config::JobSettings;
use activekg::domain::{JobId, JobState};
use activekg::jobs::engine::{self, Runtime, RuntimeHandle, admin};
use activekg::store::jobs::JobRecord;
use sqlx::{Connection, PgPool};

use crate::helpers::{TestDb, eventually, fast_job_settings};
use crate::kinds::{
    Behavior, FairProbe, Probe, Waiter, create_probe_tables, run_probe, run_waiter,
};

async fn fixture() -> TestDb {
    let db = TestDb::new().await;
    create_probe_tables(&db.pool).await;
    db
}

async fn start(pool: &PgPool, settings: JobSettings) -> RuntimeHandle {
    let mut runtime = Runtime::new(pool.clone(), settings);
    runtime.register(pool.clone(), run_probe);
    runtime.register(pool.clone(), run_waiter);
    runtime.start().await.unwrap()
}

async fn enqueue<J: engine::Job>(pool: &PgPool, job: &J) -> activekg::store::jobs::Enqueued {
    let mut conn = pool.acquire().await.unwrap();
    engine::enqueue(&mut conn, job).await.unwrap()
}

async fn state(pool: &PgPool, id: JobId, want: JobState, within: Duration) -> JobRecord {
    eventually(within, &format!("job {id} to be {want}"), || async move {
        let job = admin::get(pool, id).await.unwrap();
        (job.state == want).then_some(job)
    })
    .await
}

async fn effects(pool: &PgPool, id: JobId) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM test_effects WHERE job_id = $1")
        .bind(id.0)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn keyed(label: &str, behavior: Behavior, key: &str) -> Probe {
    Probe {
        key: Some(key.to_owned()),
        ..Probe::new(label, behavior)
    }
}

#[tokio::test]
async fn a_dead_job_gives_its_key_back_so_the_same_change_can_be_queued_again() {
    let db = fixture().await;
    let workers = start(&db.pool, fast_job_settings()).await;
    let first = enqueue(
        &db.pool,
        &keyed("object", Behavior::FailUntilFixed, "obj@v1"),
    )
    .await;
    let first = first.id.unwrap();
    let dead = state(&db.pool, first, JobState::Dead, Duration::from_secs(10)).await;
    assert_eq!(dead.unique_key, None, "a dead job holds no key");

    // The operator fixes the cause and the same change is announced again (a backfill, a redelivery).
    sqlx::query("INSERT INTO test_fixed VALUES ('object')")
        .execute(&db.pool)
        .await
        .unwrap();
    let again = enqueue(
        &db.pool,
        &keyed("object", Behavior::FailUntilFixed, "obj@v1"),
    )
    .await;
    assert!(again.inserted, "the change is queued again, not skipped");
    let again = again.id.unwrap();
    assert_ne!(again, first);
    state(
        &db.pool,
        again,
        JobState::Completed,
        Duration::from_secs(10),
    )
    .await;

    // Replaying the old dead job now would do the same work twice: it is refused, naming the holder.
    let refused = admin::retry(&db.pool, first).await.unwrap_err();
    assert!(
        matches!(&refused, activekg::error::Error::Conflict(m) if m.contains(&again.to_string())),
        "{refused}"
    );
    let bulk = admin::replay_dead(
        &db.pool,
        &activekg::store::jobs::JobFilter {
            kind: Some("test_probe".into()),
            ..Default::default()
        },
        false,
        100,
    )
    .await
    .unwrap();
    assert_eq!((bulk.count, bulk.held), (0, vec![(first, again)]));
    workers.shutdown().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_replayed_job_takes_its_key_back() {
    let db = fixture().await;
    let workers = start(&db.pool, fast_job_settings()).await;
    let id = enqueue(&db.pool, &keyed("replayed", Behavior::FailUntilFixed, "k1"))
        .await
        .id
        .unwrap();
    state(&db.pool, id, JobState::Dead, Duration::from_secs(10)).await;
    workers.shutdown().await;
    admin::retry(&db.pool, id).await.unwrap();
    assert_eq!(
        admin::get(&db.pool, id)
            .await
            .unwrap()
            .unique_key
            .as_deref(),
        Some("k1")
    );
    let duplicate = enqueue(&db.pool, &keyed("replayed", Behavior::Succeed, "k1")).await;
    assert!(
        !duplicate.inserted && duplicate.id == Some(id),
        "while the replay is pending its key is held again: {duplicate:?}"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn a_cancelled_job_gives_its_key_back() {
    let db = fixture().await;
    let id = enqueue(&db.pool, &keyed("c", Behavior::Succeed, "once"))
        .await
        .id
        .unwrap();
    admin::cancel(&db.pool, id).await.unwrap();
    assert!(
        enqueue(&db.pool, &keyed("c", Behavior::Succeed, "once"))
            .await
            .inserted
    );
    db.drop_db().await;
}

#[tokio::test]
async fn a_running_job_is_cancelled_at_once_and_its_effects_never_commit() {
    let db = fixture().await;
    let workers = start(&db.pool, fast_job_settings()).await;
    let id = enqueue(
        &db.pool,
        &Probe::new("long", Behavior::EffectAfter { ms: 3000 }),
    )
    .await
    .id
    .unwrap();
    state(&db.pool, id, JobState::Running, Duration::from_secs(10)).await;
    let cancelled = admin::cancel(&db.pool, id).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(cancelled.errors.last().unwrap().class, "cancelled");
    // The worker's slot comes back at once: the next job starts long before the cancelled one would
    // have finished.
    let next = enqueue(&db.pool, &Probe::new("next", Behavior::Succeed))
        .await
        .id
        .unwrap();
    state(&db.pool, next, JobState::Completed, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        effects(&db.pool, id).await,
        0,
        "the cancelled attempt committed nothing"
    );
    assert_eq!(
        admin::get(&db.pool, id).await.unwrap().state,
        JobState::Cancelled
    );
    workers.shutdown().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_job_that_can_never_start_is_dead_after_its_snooze_limit() {
    let db = fixture().await;
    let workers = start(&db.pool, fast_job_settings()).await;
    let id = enqueue(&db.pool, &Waiter).await.id.unwrap();
    let dead = state(&db.pool, id, JobState::Dead, Duration::from_secs(15)).await;
    let last = dead.errors.last().unwrap();
    assert_eq!(
        (last.class.as_str(), last.code.as_deref()),
        ("snoozed", Some("snooze_limit"))
    );
    assert_eq!(dead.attempt, 1, "snoozes gave their attempts back");
    workers.shutdown().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_job_interrupted_at_every_shutdown_is_dead_once_interruptions_use_up_its_attempts() {
    let db = fixture().await;
    let id = enqueue(&db.pool, &Probe::new("endless", Behavior::Hang))
        .await
        .id
        .unwrap();
    let settings = JobSettings {
        shutdown_grace: Duration::from_millis(100),
        ..fast_job_settings()
    };
    let mut shutdowns = 0;
    loop {
        assert!(
            shutdowns < 10,
            "still handed back after {shutdowns} shutdowns"
        );
        let workers = start(&db.pool, settings.clone()).await;
        // Running means claimed; a job claimed but not yet started is given back free, so wait until its
        // handler has begun this attempt.
        crate::helpers::eventually(Duration::from_secs(10), "the attempt to start", || async {
            let starts: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM test_events WHERE job_id = $1 AND event = 'start'",
            )
            .bind(id.0)
            .fetch_one(&db.pool)
            .await
            .unwrap();
            (starts > shutdowns).then_some(())
        })
        .await;
        workers.shutdown().await;
        shutdowns += 1;
        if admin::get(&db.pool, id).await.unwrap().state == JobState::Dead {
            break;
        }
    }
    // Three free hand-backs (its attempt budget), then three counted ones.
    assert_eq!(shutdowns, 6);
    let dead = admin::get(&db.pool, id).await.unwrap();
    assert!(dead.errors.iter().all(|e| e.class == "interrupted"));
    db.drop_db().await;
}

#[tokio::test]
async fn one_result_the_database_refuses_does_not_hold_back_anyone_elses() {
    let db = fixture().await;
    let refused = enqueue(&db.pool, &Probe::new("refused", Behavior::Succeed))
        .await
        .id
        .unwrap();
    // Stands in for anything that makes one row's update fail: a trigger, a constraint, a bad value.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.id = {} AND NEW.state <> 'running' THEN RAISE EXCEPTION 'refused for the test'; END IF;
         RETURN NEW; END $$;
         CREATE TRIGGER refuse BEFORE UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION refuse();",
        refused.0
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let workers = start(&db.pool, fast_job_settings()).await;
    state(
        &db.pool,
        refused,
        JobState::Running,
        Duration::from_secs(10),
    )
    .await;
    let mut others = Vec::new();
    for n in 0..20 {
        others.push(
            enqueue(
                &db.pool,
                &Probe::new(&format!("other{n}"), Behavior::Succeed),
            )
            .await
            .id
            .unwrap(),
        );
    }
    for id in &others {
        state(&db.pool, *id, JobState::Completed, Duration::from_secs(20)).await;
    }
    assert_eq!(
        admin::get(&db.pool, refused).await.unwrap().state,
        JobState::Running
    );
    sqlx::query("DROP TRIGGER refuse ON jobs")
        .execute(&db.pool)
        .await
        .unwrap();
    state(
        &db.pool,
        refused,
        JobState::Completed,
        Duration::from_secs(10),
    )
    .await;
    workers.shutdown().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_retry_delay_beyond_any_interval_is_capped_and_recorded() {
    let db = fixture().await;
    let workers = start(&db.pool, fast_job_settings()).await;
    let id = enqueue(&db.pool, &Probe::new("patient", Behavior::RetryForever))
        .await
        .id
        .unwrap();
    let waiting = state(&db.pool, id, JobState::Scheduled, Duration::from_secs(10)).await;
    let wait = waiting.run_at - chrono::Utc::now();
    assert!(
        wait > chrono::Duration::hours(23) && wait <= chrono::Duration::hours(24),
        "capped at a day: {wait}"
    );
    let after = enqueue(&db.pool, &Probe::new("after", Behavior::Succeed))
        .await
        .id
        .unwrap();
    state(
        &db.pool,
        after,
        JobState::Completed,
        Duration::from_secs(10),
    )
    .await;
    workers.shutdown().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_fair_claim_probes_a_tenant_in_backoff_instead_of_scanning_its_rows() {
    let db = fixture().await;
    // 60,000 jobs of one tenant all waiting out a backoff, one due job of another tenant after it.
    sqlx::query(
        "INSERT INTO jobs (kind, queue, args, max_attempts, run_at, tenant_id)
         SELECT 'test_fair', 'test', jsonb_build_object('tenant', 'a-backoff', 'n', g), 5,
                now() + interval '1 hour', 'a-backoff'
         FROM generate_series(1, 60000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    enqueue(
        &db.pool,
        &FairProbe {
            tenant: "b-ready".into(),
            n: 0,
        },
    )
    .await;
    sqlx::query("ANALYZE jobs").execute(&db.pool).await.unwrap();
    let read = || async {
        // Index and heap pages of the jobs table touched, as the statistics collector counts them.
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT coalesce(sum(idx_blks_hit + idx_blks_read), 0) FROM pg_statio_user_indexes
                     WHERE relname = 'jobs')::int8
                  + (SELECT coalesce(heap_blks_hit + heap_blks_read, 0) FROM pg_statio_user_tables
                     WHERE relname = 'jobs')::int8",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        n
    };
    let before = read().await;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let (claimed, _) = activekg::store::jobs::claim_fair(&mut conn, "test_fair", "w", 10, "", 1)
        .await
        .unwrap();
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pages = read().await - before;
    assert_eq!(claimed.len(), 1, "the other tenant's due job is claimed");
    assert!(
        pages < 150,
        "the claim touched {pages} pages (one claim's own writes touch about 50); a scan of the backoff \
         tenant's 60,000 index entries touches hundreds"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn claiming_an_embedding_never_waits_for_a_transaction_writing_its_node() {
    let db = TestDb::new().await;
    let node = activekg::domain::NodeId(uuid::Uuid::new_v4());
    sqlx::query(
        "INSERT INTO nodes (id, tenant_id, classes, props) VALUES ($1, 't', ARRAY['Chunk'], '{\"text\": \"x\"}')",
    )
    .bind(node.0)
    .execute(&db.pool)
    .await
    .unwrap();
    let embed = activekg::jobs::embed_node::EmbedNode {
        node_id: node,
        tenant_id: "t".into(),
        action: activekg::jobs::embed_node::EmbedAction::Embed,
    };
    enqueue(&db.pool, &embed).await;
    // An ingest rewriting the chunk holds its row...
    let mut ingest = db.pool.begin().await.unwrap();
    sqlx::query("UPDATE nodes SET props = '{\"text\": \"y\"}' WHERE id = $1")
        .bind(node.0)
        .execute(&mut *ingest)
        .await
        .unwrap();
    // ...while a worker claims the node's pending embedding: the claim must not wait for that row.
    let claim = tokio::time::timeout(
        Duration::from_secs(3),
        activekg::store::jobs::claim(&db.pool, "embed_node", "w", 10, 1),
    )
    .await
    .expect("the claim does not wait on the node's row lock")
    .unwrap();
    assert_eq!(claim.len(), 1);
    // And the ingest can queue the node's next embedding and commit (the old way, this deadlocked).
    engine::enqueue(&mut ingest, &embed).await.unwrap();
    ingest.commit().await.unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn a_worker_whose_pool_is_taken_by_its_jobs_still_heartbeats() {
    let db = fixture().await;
    // One connection in all, which the job takes for 5 s (over twice the orphan timeout).
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    let workers = start(&pool, fast_job_settings()).await;
    let rescuer = Runtime::new(db.pool.clone(), fast_job_settings())
        .start()
        .await
        .unwrap();
    let id = enqueue(
        &db.pool,
        &Probe::new("greedy", Behavior::HoldConnection { ms: 5000 }),
    )
    .await
    .id
    .unwrap();
    let done = state(&db.pool, id, JobState::Completed, Duration::from_secs(20)).await;
    assert!(
        done.errors.is_empty(),
        "neither fenced nor taken back while its pool was busy: {:?}",
        done.errors
    );
    assert_eq!(workers.lease().fences(), 0);
    workers.shutdown().await;
    rescuer.shutdown().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_fair_claim_takes_turns_between_a_tenants_providers_too() {
    let db = fixture().await;
    // One tenant: 200 due S3 jobs, then one due GCS job (the guide's two queues of that tenant).
    sqlx::query(
        "INSERT INTO jobs (kind, queue, args, max_attempts, run_at, tenant_id, provider)
         SELECT 'test_fair', 'test', jsonb_build_object('tenant', 'acme', 'n', g, 'provider', 's3'), 5,
                now() - interval '1 hour' + g * interval '1 second', 'acme', 's3'
         FROM generate_series(1, 200) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO jobs (kind, queue, args, max_attempts, run_at, tenant_id, provider)
         VALUES ('test_fair', 'test', '{\"tenant\": \"acme\", \"n\": 0, \"provider\": \"gcs\"}', 5, now(), 'acme', 'gcs')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let (claimed, _) = activekg::store::jobs::claim_fair(&mut conn, "test_fair", "w", 10, "", 1)
        .await
        .unwrap();
    let providers: Vec<&str> = claimed
        .iter()
        .map(|c| c.args["provider"].as_str().unwrap())
        .collect();
    // Each due pair gets an equal share of the batch (here 5), as tenants do.
    assert_eq!(
        providers.iter().filter(|p| **p == "s3").count(),
        5,
        "{providers:?}"
    );
    assert!(
        providers.contains(&"gcs"),
        "the GCS job does not wait behind 200 S3 jobs of the same tenant: {providers:?}"
    );
    conn.close().await.unwrap();
    db.drop_db().await;
}

/// The finished rows a busy table holds all day (kept for a day before pruning).
const A_DAY_OF_FINISHED_JOBS: &str =
    "INSERT INTO jobs (kind, queue, args, max_attempts, state, finished_at)
     SELECT 'noop', 'bench', '{}', 5, 'completed', now() FROM generate_series(1, 50000)";

#[tokio::test]
async fn results_are_written_by_each_rows_key_not_by_reading_the_workers_running_rows() {
    let db = TestDb::new().await;
    // A busy worker with thousands of rows running, beside a day of finished work, never analyzed (as the
    // table is after a restore, or before autovacuum first gets to it).
    for sql in [
        A_DAY_OF_FINISHED_JOBS,
        "INSERT INTO jobs (kind, queue, args, max_attempts, state, attempt, locked_by, attempted_at)
         SELECT 'noop', 'bench', '{}', 5, 'running', 1, 'w1', now() FROM generate_series(1, 4000)",
    ] {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
    let running: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM jobs WHERE state = 'running' ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let result = |id: i64, finish| activekg::store::jobs::Completion {
        id: JobId(id),
        attempt: 1,
        finish,
    };
    let mut completions: Vec<_> = running[..500]
        .iter()
        .map(|id| result(*id, activekg::store::jobs::Finish::Completed))
        .collect();
    completions.extend(running[500..520].iter().map(|id| {
        result(
            *id,
            activekg::store::jobs::Finish::Snooze {
                delay: Duration::from_secs(60),
            },
        )
    }));
    // A result from an attempt this worker no longer holds is still skipped.
    completions.push(activekg::store::jobs::Completion {
        id: JobId(running[600]),
        attempt: 2,
        finish: activekg::store::jobs::Finish::Completed,
    });
    let mut conn = db.pool.acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let applied = activekg::store::jobs::finish(&mut tx, "w1", &completions)
        .await
        .unwrap();
    let (seq_scans,): (i64,) =
        sqlx::query_as("SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'jobs'")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    let by_worker: i64 =
        sqlx::query_scalar("SELECT pg_stat_get_xact_numscans('jobs_running_by_worker'::regclass)")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!(applied.len(), 520);
    assert_eq!(
        (seq_scans, by_worker),
        (0, 0),
        "writing results read the whole table or the worker's running rows (seq scans, scans of \
         jobs_running_by_worker)"
    );
    tx.rollback().await.unwrap();
    drop(conn);
    db.drop_db().await;
}

#[tokio::test]
async fn a_claim_finds_its_rows_by_key_however_many_finished_rows_the_table_holds() {
    let db = TestDb::new().await;
    // A day of finished work and a backlog of due jobs, with statistics, as a busy table looks.
    for sql in [
        A_DAY_OF_FINISHED_JOBS,
        "INSERT INTO jobs (kind, queue, args, max_attempts, priority, tenant_id)
         SELECT 'noop', 'bench', '{}', 5, (i % 3)::int2, 't' || (i % 7) FROM generate_series(1, 3000) i",
        "ANALYZE jobs",
    ] {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
    let mut conn = db.pool.acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let claimed = activekg::store::jobs::claim(&mut *tx, "noop", "w1", 1000, 1)
        .await
        .unwrap();
    let (fair, _) = activekg::store::jobs::claim_fair(&mut *tx, "noop", "w1", 1000, "", 1)
        .await
        .unwrap();
    let (seq_scans,): (i64,) =
        sqlx::query_as("SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'jobs'")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!((claimed.len(), fair.len()), (1000, 1000));
    assert_eq!(
        seq_scans, 0,
        "a claim read the whole jobs table to find the rows it had picked"
    );
    // Still most urgent first: the claim returns its rows in the order it picked them.
    let priorities: Vec<i16> = {
        let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
        sqlx::query_scalar(
            "SELECT j.priority FROM unnest($1::int8[]) WITH ORDINALITY AS c(id, pos) JOIN jobs j USING (id) ORDER BY c.pos",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .unwrap()
    };
    assert!(
        priorities.windows(2).all(|w| w[0] >= w[1]),
        "{priorities:?}"
    );
}
