//! Job kinds that exist only in tests: they record each attempt in `test_events` and behave as told.

use std::time::Duration;

use activekg::jobs::engine::{Backoff, Job, JobContext, JobError, Policy, Uniqueness};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// How a probe attempt behaves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Behavior {
    /// Succeed at once.
    Succeed,
    /// Fail transiently on the first `times` attempts (asking for `retry_after_ms` if given), then succeed.
    Fail {
        times: u32,
        retry_after_ms: Option<u64>,
    },
    /// Fail permanently.
    Permanent,
    /// Fail permanently until the test marks the label fixed in `test_fixed`, then succeed.
    FailUntilFixed,
    /// Sleep, then succeed.
    Sleep { ms: u64 },
    /// Block forever on the first attempt; succeed on later ones.
    HangFirstAttempt,
    /// Kill the whole process (a worker-killing job).
    Abort,
    /// Panic.
    Panic,
    /// Block forever, on every attempt.
    Hang,
    /// Sleep, then record an effect in the attempt's fenced transaction (`JobContext::begin`), then succeed.
    EffectAfter { ms: u64 },
    /// Fail with a retry delay no database interval can hold.
    RetryForever,
    /// Hold a connection of the worker's pool for a while (a slow query, a long transaction).
    HoldConnection { ms: u64 },
}

/// The test kind: one slot, three attempts, 1.5 s backoff without jitter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    pub label: String,
    pub behavior: Behavior,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub tenant: Option<String>,
}

impl Probe {
    pub fn new(label: &str, behavior: Behavior) -> Self {
        Self {
            label: label.to_owned(),
            behavior,
            key: None,
            tenant: None,
        }
    }
}

impl Job for Probe {
    const KIND: &'static str = "test_probe";

    fn policy() -> Policy {
        Policy {
            max_attempts: 3,
            backoff: Backoff {
                jitter: 0.0,
                ..Backoff::exponential(Duration::from_millis(1500), 2.0, Duration::from_secs(10))
            },
            timeout: Duration::from_secs(20),
            concurrency: 1,
            uniqueness: Uniqueness::Retained,
            ..Policy::new("test")
        }
    }

    fn unique_key(&self) -> Option<String> {
        self.key.clone()
    }

    fn tenant_id(&self) -> Option<&str> {
        self.tenant.as_deref()
    }
}

/// A kind that does nothing, eight at a time (throughput and latency checks).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Noop {
    pub n: u32,
}

impl Job for Noop {
    const KIND: &'static str = "test_noop";

    fn policy() -> Policy {
        Policy {
            concurrency: 8,
            ..Policy::new("test")
        }
    }
}

/// What a scheduled test job carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tick {
    pub tick: chrono::DateTime<chrono::Utc>,
}

impl Job for Tick {
    const KIND: &'static str = "test_tick";

    fn policy() -> Policy {
        Policy::new("test")
    }
}

/// Creates the tables probes write to.
pub async fn create_probe_tables(pool: &PgPool) {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS test_events (
             id bigserial PRIMARY KEY, job_id bigint NOT NULL, label text NOT NULL, attempt int NOT NULL,
             event text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("CREATE TABLE IF NOT EXISTS test_fixed (label text PRIMARY KEY)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS test_effects (
             id bigserial PRIMARY KEY, job_id bigint NOT NULL, attempt int NOT NULL, worker text NOT NULL,
             at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// Records that this attempt's effect committed, in the attempt's fenced transaction.
async fn record_effect(cx: &JobContext<PgPool>) -> Result<(), JobError> {
    let mut tx = cx.begin().await?;
    sqlx::query("INSERT INTO test_effects (job_id, attempt, worker) VALUES ($1, $2, $3)")
        .bind(cx.id.0)
        .bind(cx.attempt as i32)
        .bind(&*cx.worker)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// A kind that records one effect per run, eight at a time (exactly-once checks across processes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tally {
    pub n: u32,
}

impl Job for Tally {
    const KIND: &'static str = "test_tally";

    fn policy() -> Policy {
        Policy {
            concurrency: 8,
            ..Policy::new("test")
        }
    }
}

pub async fn run_tally(_: Tally, cx: JobContext<PgPool>) -> Result<(), JobError> {
    record_effect(&cx).await
}

/// A kind that can never start: it waits (snoozes) on every attempt, three times at most.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Waiter;

impl Job for Waiter {
    const KIND: &'static str = "test_waiter";

    fn policy() -> Policy {
        Policy {
            max_snoozes: 3,
            ..Policy::new("test")
        }
    }
}

pub async fn run_waiter(_: Waiter, _: JobContext<PgPool>) -> Result<(), JobError> {
    Err(JobError::snooze(
        Duration::ZERO,
        "the thing it waits for never comes",
    ))
}

async fn record(pool: &PgPool, cx: &JobContext<PgPool>, label: &str, event: &str) {
    sqlx::query("INSERT INTO test_events (job_id, label, attempt, event) VALUES ($1, $2, $3, $4)")
        .bind(cx.id.0)
        .bind(label)
        .bind(cx.attempt as i32)
        .bind(event)
        .execute(pool)
        .await
        .unwrap();
}

/// The probe handler.
pub async fn run_probe(job: Probe, cx: JobContext<PgPool>) -> Result<(), JobError> {
    let pool = cx.state.clone();
    tracing::info!(label = %job.label, "probe attempt starts");
    record(&pool, &cx, &job.label, "start").await;
    let result = match job.behavior {
        Behavior::Succeed => Ok(()),
        Behavior::Fail {
            times,
            retry_after_ms,
        } if cx.attempt <= times => Err(match retry_after_ms {
            Some(ms) => JobError::retry_after(
                Duration::from_millis(ms),
                format!("failing attempt {}", cx.attempt),
            ),
            None => JobError::transient(format!("failing attempt {}", cx.attempt)),
        }),
        Behavior::Fail { .. } => Ok(()),
        Behavior::Permanent => Err(JobError::permanent(
            "test_permanent",
            "this input can never work",
        )),
        Behavior::FailUntilFixed => {
            let fixed: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM test_fixed WHERE label = $1)")
                    .bind(&job.label)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            if fixed {
                Ok(())
            } else {
                Err(JobError::permanent(
                    "not_fixed",
                    "the test has not fixed this yet",
                ))
            }
        }
        Behavior::Sleep { ms } => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(())
        }
        Behavior::HangFirstAttempt if cx.attempt == 1 => {
            std::future::pending::<()>().await;
            Ok(())
        }
        Behavior::HangFirstAttempt => Ok(()),
        Behavior::Abort => std::process::abort(),
        Behavior::Panic => panic!("probe {} panicked on purpose", job.label),
        Behavior::Hang => std::future::pending().await,
        Behavior::EffectAfter { ms } => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            record_effect(&cx).await
        }
        Behavior::HoldConnection { ms } => {
            let conn = pool.acquire().await?;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            drop(conn);
            Ok(())
        }
        Behavior::RetryForever => Err(JobError::retry_after(
            Duration::MAX,
            "come back in a few billion years",
        )),
    };
    record(
        &pool,
        &cx,
        &job.label,
        if result.is_ok() { "done" } else { "fail" },
    )
    .await;
    result
}

pub async fn run_noop(_: Noop, _: JobContext<PgPool>) -> Result<(), JobError> {
    Ok(())
}

/// A kind shared fairly between tenants: each attempt takes 10 ms, four at a time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FairProbe {
    pub tenant: String,
    pub n: u32,
}

impl Job for FairProbe {
    const KIND: &'static str = "test_fair";

    fn policy() -> Policy {
        Policy {
            concurrency: 4,
            fair: true,
            ..Policy::new("test")
        }
    }

    fn tenant_id(&self) -> Option<&str> {
        Some(&self.tenant)
    }
}

pub async fn run_fair(_: FairProbe, _: JobContext<PgPool>) -> Result<(), JobError> {
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
