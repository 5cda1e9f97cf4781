//! The job store's conformance suite: the same scenarios against PostgreSQL's `jobs` table and against the
//! Redis backend (jobs staged in PostgreSQL's outbox, handed over by the relay, claimed and finished by the
//! Lua scripts), each against the real server. Plus what only Redis needs: a backlog beyond Lua's unpack
//! limit, a relay that dies mid-hand-over, and a Redis killed with -9 and restarted.

use std::time::Duration;

use std::collections::BTreeMap;

use activekg::domain::{AttemptError, JobId, JobState};
use activekg::jobs::engine::job_store::JobStore;
use activekg::jobs::engine::{admin, stats};
use activekg::store::jobs::{
    self as store, Claimed, Completion, Enqueued, Finish, JobFilter, NewJob, Rescued,
};
use activekg::store::redis_jobs::RedisJobs;
use serde_json::json;

use crate::helpers::{TestDb, free_port};

pub fn redis_url() -> String {
    std::env::var("ACTIVEKG_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// One backend under test, on a database of its own (and, for Redis, a key prefix of its own).
struct Side {
    db: TestDb,
    redis: Option<RedisJobs>,
}

impl Side {
    async fn new(redis: bool) -> Self {
        let db = TestDb::new().await;
        let redis = if redis {
            let prefix = format!("activekg_test_{}", uuid::Uuid::new_v4().simple());
            Some(RedisJobs::connect(&redis_url(), &prefix).await.expect(
                "tests need Redis: set ACTIVEKG_TEST_REDIS_URL or run one on 127.0.0.1:6379",
            ))
        } else {
            None
        };
        Self { db, redis }
    }

    fn name(&self) -> &'static str {
        if self.redis.is_some() {
            "redis"
        } else {
            "postgres"
        }
    }

    /// Enqueues in a transaction as the engine does: into `jobs`, or staged and relayed to Redis.
    async fn enqueue(&self, jobs: &[NewJob]) -> Vec<Enqueued> {
        let mut tx = self.db.pool.begin().await.unwrap();
        let done = match &self.redis {
            None => store::insert(&mut tx, jobs).await.unwrap(),
            Some(_) => {
                let staged: Vec<(NewJob, bool)> = jobs
                    .iter()
                    .map(|j| (j.clone(), j.kind.starts_with("fair")))
                    .collect();
                store::stage(&mut tx, &staged).await.unwrap()
            }
        };
        tx.commit().await.unwrap();
        if let Some(redis) = &self.redis {
            while store::relay(&self.db.pool, redis, 500)
                .await
                .unwrap()
                .total()
                > 0
            {}
        }
        done
    }

    async fn claim(&self, kind: &str, worker: &str, limit: i64) -> Vec<Claimed> {
        match &self.redis {
            None => store::claim(&self.db.pool, kind, worker, limit, 1).await,
            Some(r) => r.claim(kind, worker, limit, &token()).await,
        }
        .unwrap()
    }

    async fn claim_fair(
        &self,
        kind: &str,
        worker: &str,
        limit: i64,
        after: &str,
    ) -> (Vec<Claimed>, String) {
        match &self.redis {
            None => store::claim_fair(&self.db.pool, kind, worker, limit, after, 1).await,
            Some(r) => r.claim_fair(kind, worker, limit, after, &token()).await,
        }
        .unwrap()
    }

    async fn finish(&self, worker: &str, completions: &[Completion]) -> Vec<JobId> {
        let mut applied = match &self.redis {
            None => {
                store::finish(
                    &mut self.db.pool.acquire().await.unwrap(),
                    worker,
                    completions,
                )
                .await
            }
            Some(r) => r.finish(worker, completions).await,
        }
        .unwrap();
        applied.sort_by_key(|id| id.0);
        applied
    }

    async fn release(
        &self,
        worker: &str,
        ids: Option<&[i64]>,
        note: Option<&AttemptError>,
    ) -> Vec<JobId> {
        let mut released: Vec<JobId> = match &self.redis {
            None => store::release(&self.db.pool, worker, ids, note).await,
            Some(r) => r.release(worker, ids, note).await,
        }
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
        released.sort_by_key(|id| id.0);
        released
    }

    async fn hold(&self, id: JobId, attempt: i32, worker: &str) -> bool {
        match &self.redis {
            None => {
                let mut tx = self.db.pool.begin().await.unwrap();
                store::hold_claim(&mut tx, id, attempt, worker)
                    .await
                    .unwrap()
            }
            Some(r) => r.hold(id, attempt, worker, None).await.unwrap(),
        }
    }

    /// Rescues with the engine's witness rule: PostgreSQL's registry says who is silent.
    async fn rescue(&self, rescuer: &str, silent_for: Duration) -> Vec<Rescued> {
        let mut rescued = match &self.redis {
            None => {
                let mut conn = self.db.pool.acquire().await.unwrap();
                store::rescue_orphans(&mut conn, rescuer, silent_for, 1000)
                    .await
                    .unwrap()
            }
            Some(r) => {
                let holders = r.holders().await.unwrap();
                let silent = store::silent_workers(&self.db.pool, rescuer, silent_for, &holders)
                    .await
                    .unwrap();
                let mut rescued = Vec::new();
                for worker in silent {
                    rescued.extend(r.rescue(&worker, silent_for, rescuer, 1000).await.unwrap());
                }
                rescued
            }
        };
        rescued.sort_by_key(|r| r.id.0);
        rescued
    }

    async fn get(&self, id: JobId) -> store::JobRecord {
        match &self.redis {
            None => store::get(&self.db.pool, id).await,
            Some(r) => r.get(id).await,
        }
        .unwrap()
        .unwrap_or_else(|| panic!("{}: job {id:?} is missing", self.name()))
    }

    /// Moves the claimed attempts' start back by `by`, as if they had run that long.
    async fn backdate_attempts(&self, claimed: &[Claimed], by: Duration) {
        let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
        match &self.redis {
            None => {
                sqlx::query("UPDATE jobs SET attempted_at = attempted_at - make_interval(secs => $2) WHERE id = ANY($1)")
                    .bind(&ids)
                    .bind(by.as_secs_f64())
                    .execute(&self.db.pool)
                    .await
                    .unwrap();
            }
            Some(r) => {
                let client = redis::Client::open(redis_url()).unwrap();
                let mut conn = client.get_multiplexed_async_connection().await.unwrap();
                for c in claimed {
                    let at = c.attempted_at.timestamp_millis() - by.as_millis() as i64;
                    let _: () = redis::cmd("HSET")
                        .arg(format!("{}:job:{}", r.prefix(), c.id))
                        .arg("attempted_at")
                        .arg(at)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                }
            }
        }
    }

    /// Removes the test's Redis keys and database.
    async fn done(self) {
        if let Some(redis) = &self.redis {
            redis.delete_all().await.unwrap();
        }
        self.db.drop_db().await;
    }
}

/// Runs `scenario` against PostgreSQL, then against Redis.
async fn on_both<F, Fut>(scenario: F)
where
    F: Fn(Side) -> Fut,
    Fut: std::future::Future<Output = Side>,
{
    for redis in [false, true] {
        let side = Side::new(redis).await;
        scenario(side).await.done().await;
    }
}

/// A fresh claim name.
fn token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn job(kind: &'static str, n: i64) -> NewJob {
    NewJob {
        kind,
        queue: "test",
        args: json!({ "n": n, "big": 12345678901234567_i64, "text": "é \"quoted\"" }),
        priority: 0,
        max_attempts: 3,
        run_at: None,
        unique_key: None,
        unique_while_active: false,
        unique_while_pending: false,
        tenant_id: None,
        provider: None,
    }
}

/// A transient failure of `attempt` by worker `w1`.
pub fn error(attempt: i32, what: &str) -> AttemptError {
    AttemptError {
        attempt,
        at: chrono::Utc::now(),
        class: "transient".into(),
        code: None,
        error: what.into(),
        worker: Some("w1".into()),
    }
}

fn done(c: &Claimed) -> Completion {
    Completion {
        id: JobId(c.id),
        attempt: c.attempt,
        finish: Finish::Completed,
    }
}

fn ns(claimed: &[Claimed]) -> Vec<i64> {
    claimed
        .iter()
        .map(|c| c.args["n"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn either_backend_claims_the_most_urgent_due_job_first_and_each_job_for_one_worker_only() {
    on_both(|side| async move {
        let mut jobs: Vec<NewJob> = (0..6).map(|n| job("plain", n)).collect();
        jobs[4].priority = 5;
        jobs[2].priority = 1;
        jobs[5].run_at = Some(chrono::Utc::now() + chrono::Duration::hours(1));
        side.enqueue(&jobs).await;
        let first = side.claim("plain", "w1", 3).await;
        assert_eq!(ns(&first), [4, 2, 0], "{}: priority, then age", side.name());
        assert_eq!(first[0].attempt, 1, "{}", side.name());
        assert_eq!(
            first[0].args,
            jobs[4].args,
            "{}: arguments arrive as sent",
            side.name()
        );
        let second = side.claim("plain", "w2", 10).await;
        assert_eq!(
            ns(&second),
            [1, 3],
            "{}: the rest, never the future job",
            side.name()
        );
        assert!(
            side.claim("plain", "w3", 10).await.is_empty(),
            "{}",
            side.name()
        );
        assert_eq!(side.get(JobId(first[0].id)).await.state, JobState::Running);
        assert_eq!(
            side.get(JobId(first[0].id)).await.locked_by.as_deref(),
            Some("w1")
        );
        side
    })
    .await;
}

#[tokio::test]
async fn either_backend_lets_only_the_holder_of_an_attempt_end_it() {
    on_both(|side| async move {
        side.enqueue(&[job("plain", 1)]).await;
        let c = side.claim("plain", "w1", 1).await.remove(0);
        let id = JobId(c.id);
        assert!(side.hold(id, c.attempt, "w1").await, "{}", side.name());
        assert!(!side.hold(id, c.attempt, "w2").await, "{}", side.name());
        assert!(!side.hold(id, c.attempt + 1, "w1").await, "{}", side.name());
        assert!(
            side.finish("w2", &[done(&c)]).await.is_empty(),
            "{}: another worker",
            side.name()
        );
        let stale = Completion {
            attempt: c.attempt - 1,
            ..done(&c)
        };
        assert!(
            side.finish("w1", &[stale]).await.is_empty(),
            "{}: an old attempt",
            side.name()
        );
        assert_eq!(
            side.finish("w1", &[done(&c)]).await,
            [id],
            "{}",
            side.name()
        );
        assert!(
            side.finish("w1", &[done(&c)]).await.is_empty(),
            "{}: only once",
            side.name()
        );
        let record = side.get(id).await;
        assert_eq!(record.state, JobState::Completed, "{}", side.name());
        assert!(
            record.finished_at.is_some() && record.locked_by.is_none(),
            "{}",
            side.name()
        );
        side
    })
    .await;
}

#[tokio::test]
async fn either_backend_retries_after_the_delay_and_dead_letters_with_every_attempts_error() {
    on_both(|side| async move {
        side.enqueue(&[job("plain", 1)]).await;
        for attempt in 1..=3 {
            let c = side.claim("plain", "w1", 1).await;
            assert_eq!(c.len(), 1, "{}: attempt {attempt} is due", side.name());
            assert_eq!(c[0].attempt, attempt, "{}", side.name());
            let finish = if attempt < 3 {
                Finish::Retry {
                    delay: Duration::from_millis(600),
                    error: error(attempt, "boom"),
                }
            } else {
                Finish::Dead {
                    error: error(attempt, "out of attempts"),
                }
            };
            let id = JobId(c[0].id);
            assert_eq!(
                side.finish(
                    "w1",
                    &[Completion {
                        id,
                        attempt,
                        finish
                    }]
                )
                .await,
                [id]
            );
            if attempt < 3 {
                let record = side.get(id).await;
                assert_eq!(
                    record.state,
                    JobState::Scheduled,
                    "{}: backing off",
                    side.name()
                );
                assert!(
                    side.claim("plain", "w1", 1).await.is_empty(),
                    "{}: not before the delay",
                    side.name()
                );
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
        }
        let dead = side.claim("plain", "w1", 1).await;
        assert!(dead.is_empty(), "{}", side.name());
        side
    })
    .await;
    on_both(|side| async move {
        side.enqueue(&[job("plain", 7)]).await;
        let c = side.claim("plain", "w1", 1).await.remove(0);
        let id = JobId(c.id);
        side.finish(
            "w1",
            &[Completion {
                id,
                attempt: 1,
                finish: Finish::Retry {
                    delay: Duration::ZERO,
                    error: error(1, "first"),
                },
            }],
        )
        .await;
        let c = side.claim("plain", "w1", 1).await.remove(0);
        side.finish(
            "w1",
            &[Completion {
                id,
                attempt: c.attempt,
                finish: Finish::Dead {
                    error: error(2, "second \"quoted\""),
                },
            }],
        )
        .await;
        let record = side.get(id).await;
        assert_eq!(record.state, JobState::Dead, "{}", side.name());
        let errors: Vec<&str> = record.errors.iter().map(|e| e.error.as_str()).collect();
        assert_eq!(
            errors,
            ["first", "second \"quoted\""],
            "{}: the whole history",
            side.name()
        );
        assert_eq!(record.attempt, 2, "{}", side.name());
        side
    })
    .await;
}

#[tokio::test]
async fn either_backend_folds_duplicates_by_idempotency_key_until_the_key_is_given_back() {
    on_both(|side| async move {
        let keyed = |n, key: &str, active: bool| NewJob {
            unique_key: Some(key.into()),
            unique_while_active: active,
            ..job("plain", n)
        };
        let first = side
            .enqueue(&[
                keyed(1, "a", true),
                keyed(2, "a", true),
                keyed(3, "b", false),
            ])
            .await;
        assert!(
            first[0].inserted && !first[1].inserted && first[2].inserted,
            "{}: {first:?}",
            side.name()
        );
        assert_eq!(
            first[1].id,
            first[0].id,
            "{}: names the job holding the key",
            side.name()
        );
        side.enqueue(&[keyed(4, "a", true)]).await;
        let claimed = side.claim("plain", "w1", 10).await;
        assert_eq!(
            ns(&claimed),
            [1, 3],
            "{}: the later duplicate folded too",
            side.name()
        );
        let applied = side
            .finish("w1", &claimed.iter().map(done).collect::<Vec<_>>())
            .await;
        assert_eq!(applied.len(), 2);
        // "a" is unique while active, so finishing gives it back; "b" holds its key while the job exists.
        side.enqueue(&[keyed(5, "a", true), keyed(6, "b", false)])
            .await;
        assert_eq!(
            ns(&side.claim("plain", "w1", 10).await),
            [5],
            "{}",
            side.name()
        );
        side
    })
    .await;
}

#[tokio::test]
async fn either_backend_shares_a_fair_claim_between_tenants_and_resumes_the_walk() {
    on_both(|side| async move {
        let mut jobs = Vec::new();
        for (tenant, count) in [("t1", 6), ("t2", 1), ("t3", 2)] {
            for n in 0..count {
                jobs.push(NewJob {
                    tenant_id: Some(tenant.into()),
                    provider: Some("s3".into()),
                    ..job("fair_kind", n)
                });
            }
        }
        side.enqueue(&jobs).await;
        let (claimed, resume) = side.claim_fair("fair_kind", "w1", 3, "").await;
        let mut by_tenant = std::collections::BTreeMap::<String, usize>::new();
        for c in &claimed {
            let record = side.get(JobId(c.id)).await;
            *by_tenant.entry(record.tenant_id.unwrap()).or_default() += 1;
        }
        assert_eq!(
            by_tenant.into_iter().collect::<Vec<_>>(),
            [
                ("t1".to_owned(), 1),
                ("t2".to_owned(), 1),
                ("t3".to_owned(), 1)
            ],
            "{}: one each, however long t1's backlog",
            side.name()
        );
        assert_eq!(resume, "", "{}: the walk saw every tenant", side.name());
        let (rest, _) = side.claim_fair("fair_kind", "w1", 100, "").await;
        assert_eq!(rest.len(), 6, "{}", side.name());
        side
    })
    .await;
}

#[tokio::test]
async fn either_backend_hands_back_unstarted_jobs_freely_and_interrupted_ones_a_bounded_number_of_times()
 {
    on_both(|side| async move {
        side.enqueue(&[NewJob {
            max_attempts: 1,
            ..job("plain", 1)
        }])
        .await;
        let c = side.claim("plain", "w1", 1).await.remove(0);
        let id = JobId(c.id);
        assert_eq!(
            side.release("w2", None, None).await,
            [],
            "{}: not w2's",
            side.name()
        );
        assert_eq!(
            side.release("w1", Some(&[c.id]), None).await,
            [id],
            "{}",
            side.name()
        );
        let record = side.get(id).await;
        assert_eq!(
            (record.state, record.attempt),
            (JobState::Pending, 0),
            "{}: as if never claimed",
            side.name()
        );
        // Interruptions: given back while hand-backs < attempts (1 here); the next one counts, and on the
        // last attempt that dead-letters the job.
        let note = |n| AttemptError {
            class: "interrupted".into(),
            ..error(n, "shutdown")
        };
        side.claim("plain", "w1", 1).await;
        assert_eq!(
            side.release("w1", None, Some(&note(1))).await,
            [id],
            "{}",
            side.name()
        );
        assert_eq!(
            side.get(id).await.state,
            JobState::Pending,
            "{}: handed back once",
            side.name()
        );
        side.claim("plain", "w1", 1).await;
        assert_eq!(
            side.release("w1", None, Some(&note(1))).await,
            [id],
            "{}",
            side.name()
        );
        let record = side.get(id).await;
        assert_eq!(
            record.state,
            JobState::Dead,
            "{}: the second interruption counted",
            side.name()
        );
        assert_eq!(record.errors.len(), 2, "{}", side.name());
        side
    })
    .await;
}

#[tokio::test]
async fn either_backend_rescues_a_silent_workers_jobs_only_when_the_rescuer_kept_in_touch() {
    on_both(|side| async move {
        side.enqueue(&[
            job("plain", 1),
            NewJob {
                max_attempts: 1,
                ..job("plain", 2)
            },
        ])
        .await;
        let claimed = side.claim("plain", "gone", 10).await;
        assert_eq!(claimed.len(), 2);
        let info = |id| store::ProcessInfo {
            id,
            host: "h",
            pid: 1,
            kinds: &[],
            roles: &[],
            version: "t",
        };
        store::register_worker(&side.db.pool, &info("gone"))
            .await
            .unwrap();
        store::register_worker(&side.db.pool, &info("rescuer"))
            .await
            .unwrap();
        let silent = Duration::from_secs(60);
        assert!(
            side.rescue("rescuer", silent).await.is_empty(),
            "{}: the rescuer is new itself",
            side.name()
        );
        sqlx::query(
            "UPDATE job_workers SET alive_since = now() - interval '1 hour' WHERE id = 'rescuer'",
        )
        .execute(&side.db.pool)
        .await
        .unwrap();
        assert!(
            side.rescue("rescuer", silent).await.is_empty(),
            "{}: gone still heartbeats",
            side.name()
        );
        sqlx::query(
            "UPDATE job_workers SET last_seen = now() - interval '2 minutes' WHERE id = 'gone'",
        )
        .execute(&side.db.pool)
        .await
        .unwrap();
        assert!(
            side.rescue("rescuer", silent).await.is_empty(),
            "{}: attempts younger than the window",
            side.name()
        );
        side.backdate_attempts(&claimed, Duration::from_secs(120))
            .await;
        let rescued = side.rescue("rescuer", silent).await;
        let ids: Vec<(i64, bool)> = rescued.iter().map(|r| (r.id.0, r.dead)).collect();
        assert_eq!(
            ids,
            [(claimed[0].id, false), (claimed[1].id, true)],
            "{}",
            side.name()
        );
        let requeued = side.get(JobId(claimed[0].id)).await;
        assert_eq!(requeued.state, JobState::Pending, "{}", side.name());
        assert_eq!(requeued.errors[0].class, "crash", "{}", side.name());
        assert!(
            requeued.errors[0].error.contains("rescuer"),
            "{}",
            side.name()
        );
        assert_eq!(
            side.get(JobId(claimed[1].id)).await.state,
            JobState::Dead,
            "{}",
            side.name()
        );
        let again = side.claim("plain", "w2", 10).await;
        assert_eq!(again.len(), 1);
        assert_eq!(
            again[0].attempt,
            2,
            "{}: the lost attempt counted",
            side.name()
        );
        assert!(
            side.rescue("rescuer", silent).await.is_empty(),
            "{}: nothing twice",
            side.name()
        );
        side
    })
    .await;
}

/// The overview's counts, keyed by (kind, tenant, provider): pending, scheduled, running, dead, completed and
/// dead-lettered in the last five minutes.
async fn counts(side: &Side) -> BTreeMap<(String, String, String), [i64; 6]> {
    let overview = stats::overview(&side.db.pool, side.redis.as_ref(), Duration::from_secs(30))
        .await
        .unwrap();
    let mut by = BTreeMap::new();
    for queue in &overview.queues {
        for (kind, c) in &queue.kinds {
            by.insert(
                (kind.clone(), "*".to_owned(), "*".to_owned()),
                [
                    c.pending,
                    c.scheduled,
                    c.running,
                    c.dead,
                    c.completed_last_5m,
                    c.dead_last_5m,
                ],
            );
        }
    }
    for t in &overview.tenants {
        let c = &t.counts;
        let key = (
            "*".to_owned(),
            t.tenant_id.clone(),
            t.provider.clone().unwrap_or_default(),
        );
        let row = by.entry(key).or_insert([0; 6]);
        for (total, n) in row.iter_mut().zip([
            c.pending,
            c.scheduled,
            c.running,
            c.dead,
            c.completed_last_5m,
            c.dead_last_5m,
        ]) {
            *total += n;
        }
    }
    by
}

fn tenant_job(n: i64, tenant: &str, provider: &str) -> NewJob {
    NewJob {
        tenant_id: Some(tenant.into()),
        provider: Some(provider.into()),
        ..job("fair", n)
    }
}

#[tokio::test]
async fn either_backend_counts_waiting_running_dead_and_recent_jobs_per_kind_and_tenant() {
    on_both(|side| async move {
        let later = NewJob {
            run_at: Some(chrono::Utc::now() + chrono::Duration::hours(1)),
            ..tenant_job(4, "t1", "s3")
        };
        side.enqueue(&[
            tenant_job(1, "t1", "s3"),
            tenant_job(2, "t1", "s3"),
            tenant_job(3, "t2", "gcs"),
            later,
            job("plain", 5),
            job("plain", 6),
        ])
        .await;
        // One plain job completes, one is running; one of t1's dies.
        let plain = side.claim("plain", "w1", 2).await;
        side.finish("w1", &[done(&plain[0])]).await;
        let (fair, _) = side.claim_fair("fair", "w1", 1, "").await;
        assert_eq!(ns(&fair), [1], "{}", side.name());
        let dead = Completion {
            id: JobId(fair[0].id),
            attempt: 1,
            finish: Finish::Dead {
                error: error(1, "no"),
            },
        };
        side.finish("w1", &[dead]).await;
        let expected = |t1_pending: i64| {
            BTreeMap::from([
                (
                    ("fair".into(), "*".into(), "*".into()),
                    [t1_pending + 1, 1, 0, 1, 0, 1],
                ),
                (("plain".into(), "*".into(), "*".into()), [0, 0, 1, 0, 1, 0]),
                (
                    ("*".into(), "t1".into(), "s3".into()),
                    [t1_pending, 1, 0, 1, 0, 1],
                ),
                (("*".into(), "t2".into(), "gcs".into()), [1, 0, 0, 0, 0, 0]),
            ])
        };
        assert_eq!(counts(&side).await, expected(1), "{}", side.name());
        let oldest = stats::overview(&side.db.pool, side.redis.as_ref(), Duration::from_secs(30))
            .await
            .unwrap()
            .queues[0]
            .kinds["fair"]
            .oldest_pending_age_seconds;
        assert!(
            oldest.is_some_and(|age| (0.0..60.0).contains(&age)),
            "{}: {oldest:?}",
            side.name()
        );
        if let Some(redis) = &side.redis {
            // A job staged for Redis and not handed over yet is waiting as well, and counts once after.
            let mut tx = side.db.pool.begin().await.unwrap();
            store::stage(&mut tx, &[(tenant_job(7, "t1", "s3"), true)])
                .await
                .unwrap();
            tx.commit().await.unwrap();
            assert_eq!(counts(&side).await, expected(2), "staged");
            store::relay(&side.db.pool, redis, 100).await.unwrap();
            assert_eq!(counts(&side).await, expected(2), "relayed");
            // Pruning the dead job takes it out of the dead count.
            assert_eq!(
                redis
                    .prune(Duration::from_secs(3600), Duration::ZERO, 100)
                    .await
                    .unwrap(),
                1
            );
            let after = counts(&side).await;
            assert_eq!(
                after[&("fair".into(), "*".into(), "*".into())],
                [3, 1, 0, 0, 0, 1]
            );
        }
        side
    })
    .await;
}

impl Side {
    fn stores(&self) -> admin::Stores<'_> {
        admin::Stores {
            pool: &self.db.pool,
            redis: self.redis.as_ref(),
        }
    }

    /// Claims `kind`'s next job and dead-letters it.
    async fn kill_next(&self, kind: &str) -> JobId {
        let c = self.claim(kind, "w1", 1).await.remove(0);
        let id = JobId(c.id);
        let dead = Completion {
            id,
            attempt: c.attempt,
            finish: Finish::Dead {
                error: error(c.attempt, "gave up"),
            },
        };
        assert_eq!(self.finish("w1", &[dead]).await, [id], "{}", self.name());
        id
    }
}

fn plain_only() -> JobFilter {
    JobFilter {
        kind: Some("plain".into()),
        ..JobFilter::default()
    }
}

#[tokio::test]
async fn either_backend_lists_shows_retries_cancels_reschedules_replays_and_purges_for_operators() {
    on_both(|side| async move {
        let name = side.name();
        let keyed = NewJob {
            unique_key: Some("k".into()),
            unique_while_active: true,
            ..job("plain", 1)
        };
        let ids: Vec<JobId> = side
            .enqueue(&[keyed.clone(), job("plain", 2), job("plain", 3)])
            .await
            .iter()
            .map(|e| e.id.unwrap())
            .collect();
        let first = side.kill_next("plain").await;
        assert_eq!(first, ids[0], "{name}");
        let shown = admin::get(side.stores(), first).await.unwrap();
        assert_eq!(
            (shown.state, shown.attempt, shown.errors.len()),
            (JobState::Dead, 1, 1),
            "{name}"
        );
        let dead = JobFilter {
            state: Some(JobState::Dead),
            ..plain_only()
        };
        let (page, _) = admin::list(side.stores(), &dead, None, 10).await.unwrap();
        assert_eq!(
            page.iter().map(|j| j.id).collect::<Vec<_>>(),
            [first],
            "{name}"
        );
        let (page, next) = admin::list(side.stores(), &plain_only(), None, 2)
            .await
            .unwrap();
        assert_eq!(
            page.iter().map(|j| j.id).collect::<Vec<_>>(),
            [ids[2], ids[1]],
            "{name}: newest first"
        );
        let (page, next) = admin::list(side.stores(), &plain_only(), next, 2)
            .await
            .unwrap();
        assert_eq!(
            (page.iter().map(|j| j.id).collect::<Vec<_>>(), next),
            (vec![first], None),
            "{name}"
        );

        // Cancel and reschedule apply to waiting jobs only.
        let cancelled = admin::cancel(side.stores(), ids[1]).await.unwrap();
        assert_eq!(cancelled.state, JobState::Cancelled, "{name}");
        let refused = admin::cancel(side.stores(), ids[1])
            .await
            .unwrap_err()
            .to_string();
        assert!(refused.contains("is cancelled"), "{name}: {refused}");
        let later = chrono::Utc::now() + chrono::Duration::hours(1);
        let moved = admin::reschedule(side.stores(), ids[2], later)
            .await
            .unwrap();
        assert_eq!(moved.state, JobState::Scheduled, "{name}");

        // Retry replays a dead job with fresh attempts; it runs again (the only due job now).
        let retried = admin::retry(side.stores(), first).await.unwrap();
        assert_eq!(
            (retried.state, retried.attempt),
            (JobState::Pending, 0),
            "{name}"
        );
        assert_eq!(retried.errors.last().unwrap().class, "replayed", "{name}");
        assert_eq!(side.kill_next("plain").await, first, "{name}");
        // Its key was taken back and given back at death; a new job takes it, and a replay must not
        // do the same work twice.
        let again = side.enqueue(&[keyed]).await[0].id.unwrap();
        let refused = admin::retry(side.stores(), first)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains(&format!("job {again} holds its idempotency key")),
            "{name}: {refused}"
        );
        let replayed = admin::replay_dead(side.stores(), &plain_only(), false, 100)
            .await
            .unwrap();
        assert_eq!(
            (replayed.count, replayed.held),
            (0, vec![(first, again)]),
            "{name}"
        );

        // Waiting jobs are counted, then cancelled, in bulk: the rescheduled one and the new keyed one.
        let waiting = admin::cancel_waiting(side.stores(), &plain_only(), false, 100, true)
            .await
            .unwrap();
        assert_eq!(waiting, 2, "{name}");
        assert_eq!(
            admin::cancel_waiting(side.stores(), &plain_only(), false, 100, false)
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            admin::get(side.stores(), ids[2]).await.unwrap().state,
            JobState::Cancelled,
            "{name}"
        );
        assert!(side.claim("plain", "w1", 10).await.is_empty(), "{name}");

        // Purge deletes dead jobs; an unknown id is not found anywhere.
        assert_eq!(
            admin::purge_dead(side.stores(), &dead, false, 100)
                .await
                .unwrap(),
            1,
            "{name}"
        );
        let gone = admin::get(side.stores(), first).await.unwrap_err();
        assert!(
            matches!(gone, activekg::error::Error::NotFound { .. }),
            "{name}: {gone}"
        );
        if side.redis.is_some() {
            // A job still in the outbox (Redis away, or the relay not there yet) is shown as waiting.
            let mut tx = side.db.pool.begin().await.unwrap();
            let staged = store::stage(&mut tx, &[(job("plain", 9), false)])
                .await
                .unwrap()[0]
                .id
                .unwrap();
            tx.commit().await.unwrap();
            let shown = admin::get(side.stores(), staged).await.unwrap();
            assert_eq!((shown.state, shown.attempt), (JobState::Pending, 0));
            let (page, _) = admin::list(side.stores(), &plain_only(), None, 10)
                .await
                .unwrap();
            assert_eq!(page[0].id, staged, "newest first, with the staged job");
            assert_eq!(page.iter().filter(|j| j.id == staged).count(), 1);
        }
        side
    })
    .await;
}

#[tokio::test]
async fn redis_counts_each_minutes_completions_failures_and_dead_letters_for_the_history() {
    use chrono::{DurationRound, TimeDelta};
    let side = Side::new(true).await;
    let redis = side.redis.clone().unwrap();
    let minute =
        |t: chrono::DateTime<chrono::Utc>| t.duration_trunc(TimeDelta::minutes(1)).unwrap();
    let first = minute(chrono::Utc::now());
    side.enqueue(&(1..=5).map(|n| job("plain", n)).collect::<Vec<_>>())
        .await;
    let c = side.claim("plain", "w1", 4).await;
    let retry = Finish::Retry {
        delay: Duration::from_secs(600),
        error: error(1, "again"),
    };
    let finishes = [
        Finish::Completed,
        Finish::Completed,
        retry,
        Finish::Dead {
            error: error(1, "no"),
        },
    ];
    let completions: Vec<Completion> = c
        .iter()
        .zip(finishes)
        .map(|(c, finish)| Completion {
            id: JobId(c.id),
            attempt: c.attempt,
            finish,
        })
        .collect();
    side.finish("w1", &completions).await;
    let last = minute(chrono::Utc::now());
    // The actions may straddle a minute: add up the minutes they span.
    let mut total = [0_i64; 6];
    let mut at = first;
    while at <= last {
        for row in redis.history(at).await.unwrap() {
            assert_eq!(row.queue, "test");
            for (t, n) in total.iter_mut().zip([
                row.pending,
                row.scheduled,
                row.running,
                row.completed,
                row.failed,
                row.dead,
            ]) {
                *t += n;
            }
        }
        at += TimeDelta::minutes(1);
    }
    let snapshots = (last - first).num_minutes() + 1;
    assert_eq!(
        total,
        [snapshots, snapshots, 0, 2, 2, 1],
        "pending 1 and scheduled 1 per minute read; 2 completed, 2 failed attempts, 1 dead"
    );
    // Recorded beside PostgreSQL's samples, the dashboard's history reads it.
    let rows = redis.history(last).await.unwrap();
    store::record_history(&side.db.pool, &rows).await.unwrap();
    let history = stats::history(&side.db.pool, 5).await.unwrap();
    assert!(
        history
            .iter()
            .any(|r| r.queue == "test" && r.minute == last),
        "{history:?}"
    );
    side.done().await;
}

#[tokio::test]
async fn a_sparse_listing_in_redis_walks_a_bounded_stretch_and_hands_back_a_cursor_to_go_on() {
    let side = Side::new(true).await;
    let redis = side.redis.clone().unwrap();
    let mut jobs = vec![job("other", 0)];
    jobs.extend((1..=10).map(|n| job("plain", n)));
    let wanted = side.enqueue(&jobs).await[0].id.unwrap();
    let other = JobFilter {
        kind: Some("other".into()),
        ..JobFilter::default()
    };
    let mut cursor = None;
    let mut walks = 0;
    let found = loop {
        let (page, lowest) = redis.list(&other, cursor, 5, 4).await.unwrap();
        walks += 1;
        if !page.is_empty() {
            break page;
        }
        cursor =
            Some(lowest.expect(
                "a walk that found nothing and did not reach the end says where it stopped",
            ));
    };
    assert_eq!(found.iter().map(|j| j.id).collect::<Vec<_>>(), [wanted]);
    assert_eq!(walks, 3, "eleven jobs, four per walk");
    side.done().await;
}

#[tokio::test]
async fn redis_claims_from_a_backlog_far_beyond_luas_unpack_limit_with_any_attempt_budget() {
    let side = Side::new(true).await;
    let jobs: Vec<NewJob> = (0..20_000)
        .map(|n| NewJob {
            max_attempts: 40,
            ..job("plain", n)
        })
        .collect();
    for chunk in jobs.chunks(5_000) {
        side.enqueue(chunk).await;
    }
    let redis = side.redis.as_ref().unwrap();
    let claimed = redis.claim("plain", "w1", 10_000, &token()).await.unwrap();
    assert_eq!(claimed.len(), 10_000);
    assert_eq!(ns(&claimed)[..3], [0, 1, 2]);
    let applied = redis
        .finish("w1", &claimed.iter().map(done).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(applied.len(), 10_000);
    // Forty attempts, each retried after the delay it was given (not apalis-redis's 25 and linear delays).
    side.enqueue(&[NewJob {
        max_attempts: 40,
        ..job("budget", 0)
    }])
    .await;
    let mut last = None;
    for attempt in 1..=40 {
        let c = loop {
            let c = redis.claim("budget", "w1", 1, &token()).await.unwrap();
            if !c.is_empty() {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        assert_eq!(c[0].attempt, attempt);
        let finish = if attempt < 40 {
            Finish::Retry {
                delay: Duration::from_millis(1),
                error: error(attempt, "again"),
            }
        } else {
            Finish::Dead {
                error: error(attempt, "last"),
            }
        };
        redis
            .finish(
                "w1",
                &[Completion {
                    id: JobId(c[0].id),
                    attempt,
                    finish,
                }],
            )
            .await
            .unwrap();
        last = Some(JobId(c[0].id));
    }
    let record = side.get(last.unwrap()).await;
    assert_eq!(
        (record.state, record.attempt, record.errors.len()),
        (JobState::Dead, 40, 40)
    );
    let delay = Duration::from_secs(90);
    let c = redis
        .claim("plain", "w1", 1, &token())
        .await
        .unwrap()
        .remove(0);
    redis
        .finish(
            "w1",
            &[Completion {
                id: JobId(c.id),
                attempt: c.attempt,
                finish: Finish::Retry {
                    delay,
                    error: error(1, "later"),
                },
            }],
        )
        .await
        .unwrap();
    let due = side.get(JobId(c.id)).await.run_at - chrono::Utc::now();
    assert!(
        (85..=90).contains(&due.num_seconds()),
        "retried {due} from now, not after the 90 s asked"
    );
    side.done().await;
}

#[tokio::test]
async fn either_backend_answers_a_claim_asked_again_under_its_name_with_what_it_took_and_takes_nothing_more()
 {
    on_both(|side| async move {
        side.enqueue(&(0..5).map(|n| job("plain", n)).collect::<Vec<_>>())
            .await;
        let store = match &side.redis {
            None => JobStore::Postgres(side.db.pool.clone()),
            Some(redis) => JobStore::Redis(redis.clone()),
        };
        let name = rand::random::<i64>();
        let first = store.claim("plain", "w1", 2, name, false).await.unwrap();
        assert_eq!(ns(&first), [0, 1], "{}", side.name());
        // Its answer was lost; the worker asks again under the same name (with another limit, even).
        let again = store.claim("plain", "w1", 3, name, true).await.unwrap();
        assert_eq!(ns(&again), [0, 1], "{}: the same jobs", side.name());
        assert_eq!(again[0].attempt, 1, "{}: the same attempt", side.name());
        store.finish("w1", &[done(&again[0])]).await.unwrap();
        assert_eq!(
            ns(&store.claim("plain", "w1", 3, name, true).await.unwrap()),
            [1],
            "{}: only what it still holds",
            side.name()
        );
        assert_eq!(
            ns(&store.claim("plain", "w2", 10, name, true).await.unwrap()),
            [2, 3, 4],
            "{}: the same name from another worker answers nothing of w1's and claims afresh",
            side.name()
        );
        // A fair claim asked again answers the same way, and leaves the walk where it was.
        let fair: Vec<NewJob> = (0..3)
            .map(|n| NewJob {
                tenant_id: Some(format!("t{n}")),
                provider: Some("s3".into()),
                ..job("fair_kind", n)
            })
            .collect();
        side.enqueue(&fair).await;
        let name = rand::random::<i64>();
        let (first, _) = store
            .claim_fair("fair_kind", "w1", 2, "", name, false)
            .await
            .unwrap();
        assert_eq!(first.len(), 2, "{}", side.name());
        let (again, resume) = store
            .claim_fair("fair_kind", "w1", 3, "t0/s3", name, true)
            .await
            .unwrap();
        assert_eq!(
            ns(&again),
            ns(&first),
            "{}: a fair claim asked again answers what it took",
            side.name()
        );
        assert_eq!(
            again.iter().map(|c| c.attempt).collect::<Vec<_>>(),
            [1, 1],
            "{}",
            side.name()
        );
        if side.redis.is_none() {
            assert_eq!(resume, "t0/s3", "the walk stays where it was");
        }
        side
    })
    .await;
}

#[tokio::test]
async fn a_relay_that_dies_between_sending_and_deleting_sends_again_without_doubling_a_job() {
    let side = Side::new(true).await;
    let redis = side.redis.clone().unwrap();
    let mut tx = side.db.pool.begin().await.unwrap();
    store::stage(
        &mut tx,
        &[(job("plain", 1), false), (job("plain", 2), false)],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    // The first pass's hand-over reaches Redis, but its transaction never commits (the relay died).
    let rows: Vec<store::Outgoing> = sqlx::query_as(
        "SELECT id, kind, queue, args, priority, max_attempts, run_at, enqueued_at, unique_key,
                unique_while_active, unique_while_pending, tenant_id, provider, fair FROM job_outbox",
    )
    .fetch_all(&side.db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    redis.enqueue(&rows).await.unwrap();
    let report = store::relay(&side.db.pool, &redis, 100).await.unwrap();
    assert_eq!((report.sent, report.resent), (0, 2));
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM job_outbox")
        .fetch_one(&side.db.pool)
        .await
        .unwrap();
    assert_eq!(outbox, 0);
    assert_eq!(
        redis
            .claim("plain", "w1", 10, &token())
            .await
            .unwrap()
            .len(),
        2
    );
    side.done().await;
}

/// A Redis of the test's own, persisting every write (`appendfsync always`), as the README asks of production.
/// Killed with -9 when dropped.
pub struct OwnRedis {
    dir: tempfile::TempDir,
    port: u16,
    child: std::process::Child,
}

impl OwnRedis {
    fn spawn(dir: &std::path::Path, port: u16) -> std::process::Child {
        std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is on the machine")
    }

    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Self::spawn(dir.path(), port);
        let server = Self { dir, port, child };
        server.ready().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn ready(&self) {
        crate::helpers::eventually(Duration::from_secs(20), "redis-server answers", || async {
            let client = redis::Client::open(self.url()).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .ok()
        })
        .await;
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn restart(&mut self) {
        self.child = Self::spawn(self.dir.path(), self.port);
        self.ready().await;
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn jobs_in_redis_survive_a_kill_9_and_restart_of_redis_and_only_their_holder_ends_them() {
    let db = TestDb::new().await;
    let mut server = OwnRedis::start().await;
    let redis = RedisJobs::connect(&server.url(), "activekg").await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let staged: Vec<(NewJob, bool)> = (0..50).map(|n| (job("plain", n), false)).collect();
    store::stage(&mut tx, &staged).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(store::relay(&db.pool, &redis, 100).await.unwrap().sent, 50);
    let held = redis.claim("plain", "w1", 10, &token()).await.unwrap();
    let finished = redis.claim("plain", "w1", 5, &token()).await.unwrap();
    redis
        .finish("w1", &finished.iter().map(done).collect::<Vec<_>>())
        .await
        .unwrap();

    server.kill();
    let during = redis.claim("plain", "w1", 1, &token()).await;
    assert!(
        matches!(during, Err(activekg::error::Error::Unavailable(_))),
        "a Redis that is down reads as unavailable: {during:?}"
    );
    server.restart().await;

    // The same client reconnects by itself.
    let record =
        crate::helpers::eventually(Duration::from_secs(20), "the client reconnects", || async {
            redis.get(JobId(held[0].id)).await.ok().flatten()
        })
        .await;
    assert_eq!(
        (record.state, record.locked_by.as_deref()),
        (JobState::Running, Some("w1"))
    );
    assert_eq!(
        redis
            .get(JobId(finished[0].id))
            .await
            .unwrap()
            .unwrap()
            .state,
        JobState::Completed
    );
    assert!(
        redis
            .finish("w2", &[done(&held[0])])
            .await
            .unwrap()
            .is_empty(),
        "still w1's"
    );
    assert_eq!(
        redis
            .finish("w1", &held.iter().map(done).collect::<Vec<_>>())
            .await
            .unwrap()
            .len(),
        10
    );
    let rest = redis.claim("plain", "w2", 100, &token()).await.unwrap();
    assert_eq!(rest.len(), 35, "nothing lost, nothing handed out twice");
    drop(server);
    db.drop_db().await;
}
