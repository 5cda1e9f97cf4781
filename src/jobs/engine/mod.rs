//! The durable job engine: how a job kind is declared, enqueued, run by apalis workers, retried and
//! dead-lettered. Every job kind in `jobs/` is built on this; nothing else queues work.
//!
//! Rows live in our own `jobs` table (see the README for why not apalis-postgres's), or, for the queues a
//! deployment routes there, in Redis by way of an outbox ([`job_store`]). Workers are apalis workers over
//! [`backend::JobQueue`]; the [`outcome`] layer turns each attempt's result into the row's next
//! state, which the [`completer`] writes in batches. Retries move `run_at`, so no worker slot waits out a backoff.
//! Every process holds a [`lease::Lease`] (its heartbeat) and runs the [`upkeep`] (orphan rescue, pruning);
//! a handler's effects commit only in [`JobContext::begin`]'s transaction, which proves the claim still holds.

pub mod admin;
pub mod backend;
pub mod completer;
pub mod job_store;
pub mod lease;
pub mod outcome;
pub mod pace;
mod redis_side;
pub mod runtime;
pub mod schedule;
pub mod stats;
pub mod upkeep;

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::PgConnection;

pub use crate::backoff::Backoff;
use crate::domain::JobId;
use crate::error::Result;
use crate::metrics::metrics;
use crate::store::jobs::{self as store, Enqueued, NewJob};

pub use runtime::{Runtime, RuntimeHandle};
pub use schedule::Scheduler;

/// A job kind: its arguments type, declared once with everything the engine needs to run it.
pub trait Job: Serialize + DeserializeOwned + Send + Sync + Unpin + 'static {
    /// The kind's stable name, stored in every row (never rename a shipped kind).
    const KIND: &'static str;

    /// Queue, priority, attempts, backoff, timeout, concurrency and uniqueness.
    fn policy() -> Policy;

    /// Idempotency key: a second job of this kind with the same key is skipped while the first exists (or,
    /// with [`Uniqueness::WhileActive`], while the first is pending, scheduled or running).
    fn unique_key(&self) -> Option<String> {
        None
    }

    /// The tenant the job works for, shown in per-tenant queue statistics.
    fn tenant_id(&self) -> Option<&str> {
        None
    }

    /// The storage provider the job works on, for the connector backlog gauge.
    fn provider(&self) -> Option<&str> {
        None
    }
}

/// How long an idempotency key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uniqueness {
    /// For as long as the job row exists (until pruned): "this exact change was already queued".
    Retained,
    /// Only while the job is pending, scheduled or running: "one at a time".
    WhileActive,
    /// Only until a worker claims it: "one pending job per node". A request made while the job runs
    /// queues a new one, so a change that lands during a run is never lost (the running attempt may have
    /// read the old state). A job that is retried does not take its key back, so a retry and a newer
    /// request may both be pending; handlers of such kinds must be idempotent.
    WhilePending,
}

/// A kind's execution policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Queue the kind is reported under (operators' grouping; `worker --queues` selects by it).
    pub queue: &'static str,
    /// Higher runs first among due jobs of the kind.
    pub priority: i16,
    /// Attempts before the job is dead-lettered (an attempt that kills its worker counts).
    pub max_attempts: u32,
    /// Delay before each retry.
    pub backoff: Backoff,
    /// An attempt running longer than this is abandoned and counts as a transient failure.
    pub timeout: Duration,
    /// Attempts of this kind one process runs at once.
    pub concurrency: usize,
    /// How long idempotency keys hold.
    pub uniqueness: Uniqueness,
    /// Share workers between tenants: each fetch takes the next due job of each tenant in turn, so one
    /// tenant's backlog cannot delay another tenant's first job. Each tenant's jobs then run oldest first;
    /// `priority` does not apply to fair kinds.
    pub fair: bool,
    /// Snoozes (waits that give the attempt back) allowed before the job is dead-lettered as waiting too
    /// long: without a cap a job could wait forever without using up its attempts.
    pub max_snoozes: u32,
    /// The kind resumes from its checkpoints ([`JobContext::resume`]), so they must commit with its work: it
    /// always runs from PostgreSQL, whatever queue backend the deployment chose.
    pub resumes: bool,
}

impl Policy {
    /// Whether this process keeps the kind's jobs in Redis.
    pub fn on_redis(&self) -> bool {
        !self.resumes && job_store::on_redis(self.queue)
    }
}

impl Policy {
    /// A policy with the engine's defaults for `queue`: 10 attempts, 5 s x2 backoff capped at 10 min, 5 min
    /// timeout, 4 at a time.
    pub fn new(queue: &'static str) -> Self {
        Self {
            queue,
            priority: 0,
            max_attempts: 10,
            backoff: Backoff::exponential(Duration::from_secs(5), 2.0, Duration::from_secs(600)),
            timeout: Duration::from_secs(300),
            concurrency: 4,
            uniqueness: Uniqueness::Retained,
            fair: false,
            max_snoozes: 100,
            resumes: false,
        }
    }
}

/// Why an attempt failed, and therefore what happens next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// Retrying cannot help (bad input, unsupported file, missing thing that will not appear): dead-letter now.
    Permanent {
        /// Short machine-readable reason (e.g. `parse`, `unsupported_provider`).
        code: String,
        /// What happened.
        message: String,
    },
    /// Might work later (network, lock, overloaded dependency): retry with the kind's backoff.
    Transient {
        /// Short machine-readable reason, if any.
        code: Option<String>,
        /// What happened.
        message: String,
    },
    /// The dependency said when to come back (HTTP 429 Retry-After, a rate limit): retry after that.
    RetryAfter {
        /// How long to wait.
        after: Duration,
        /// What happened.
        message: String,
    },
    /// Not a failure: the job cannot start yet (back-pressure from a downstream queue). It runs again after
    /// `after` and the attempt is given back, so waiting never exhausts the attempt budget.
    Snooze {
        /// How long to wait.
        after: Duration,
        /// Why it waits.
        reason: String,
    },
}

impl JobError {
    /// A permanent failure with a reason code.
    pub fn permanent(code: impl Into<String>, message: impl fmt::Display) -> Self {
        Self::Permanent {
            code: code.into(),
            message: message.to_string(),
        }
    }

    /// A transient failure.
    pub fn transient(message: impl fmt::Display) -> Self {
        Self::Transient {
            code: None,
            message: message.to_string(),
        }
    }

    /// A transient failure with a reason code (still dead-lettered with that code when attempts run out).
    pub fn transient_with_code(code: impl Into<String>, message: impl fmt::Display) -> Self {
        Self::Transient {
            code: Some(code.into()),
            message: message.to_string(),
        }
    }

    /// Retry after `after`.
    pub fn retry_after(after: Duration, message: impl fmt::Display) -> Self {
        Self::RetryAfter {
            after,
            message: message.to_string(),
        }
    }

    /// Wait `after` without using up an attempt.
    pub fn snooze(after: Duration, reason: impl fmt::Display) -> Self {
        Self::Snooze {
            after,
            reason: reason.to_string(),
        }
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobError::Permanent { code, message } => write!(f, "permanent ({code}): {message}"),
            JobError::Transient {
                code: Some(code),
                message,
            } => write!(f, "transient ({code}): {message}"),
            JobError::Transient {
                code: None,
                message,
            } => write!(f, "transient: {message}"),
            JobError::RetryAfter { after, message } => {
                write!(f, "retry after {after:?}: {message}")
            }
            JobError::Snooze { after, reason } => write!(f, "waiting {after:?}: {reason}"),
        }
    }
}

impl std::error::Error for JobError {}

/// Database trouble inside a job is worth retrying unless the data itself is refused.
impl From<crate::error::Error> for JobError {
    fn from(err: crate::error::Error) -> Self {
        match err {
            crate::error::Error::Invalid(m) => JobError::permanent("invalid", m),
            crate::error::Error::NotFound { what, id } => {
                JobError::permanent("not_found", format!("{what} {id} was not found"))
            }
            other => JobError::transient(other),
        }
    }
}

impl From<sqlx::Error> for JobError {
    fn from(err: sqlx::Error) -> Self {
        crate::error::Error::from(err).into()
    }
}

/// What a handler knows about the attempt it is running.
#[derive(Debug, Clone)]
pub struct JobContext<S> {
    /// The job's id.
    pub id: JobId,
    /// This attempt's number (1-based).
    pub attempt: u32,
    /// The job's attempt budget.
    pub max_attempts: u32,
    /// Shared application state given at registration.
    pub state: S,
    /// What an earlier attempt checkpointed.
    pub progress: Option<serde_json::Value>,
    /// The worker process running the attempt.
    pub worker: std::sync::Arc<str>,
    /// The engine's pool, for [`JobContext::begin`].
    pub pool: sqlx::PgPool,
    /// Where the job lives, when that is Redis (the claim is proven there, not in `pool`).
    pub redis: Option<crate::store::redis_jobs::RedisJobs>,
    /// Cancelled when this attempt must stop: the process fenced itself, or an operator cancelled the job.
    /// The engine drops the attempt at its next await either way; long loops may check it themselves.
    pub cancel: tokio_util::sync::CancellationToken,
}

impl<S> JobContext<S> {
    /// Begins the transaction an attempt's effects must commit in. It first proves, and holds until commit,
    /// that this attempt still owns the job (same attempt, same worker, still running), so an attempt whose
    /// job was taken back as an orphan, or cancelled, can never commit effects over the newer attempt's.
    ///
    /// For a job in Redis the proof is made first, in Redis, and not held: the window until the commit is
    /// covered by the lease, which cancels this attempt (rolling the transaction back) well before anyone
    /// may take the job back.
    pub async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, JobError> {
        let attempt = i32::try_from(self.attempt).unwrap_or(i32::MAX);
        if let Some(redis) = &self.redis {
            return if redis.hold(self.id, attempt, &self.worker, None).await? {
                Ok(self.pool.begin().await?)
            } else {
                Err(lost_claim())
            };
        }
        let mut tx = self.pool.begin().await?;
        if store::hold_claim(&mut tx, self.id, attempt, &self.worker).await? {
            Ok(tx)
        } else {
            Err(lost_claim())
        }
    }

    /// Whether this attempt has been asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
    /// The checkpoint an earlier attempt saved, if it reads as `P`.
    pub fn resume<P: DeserializeOwned>(&self) -> Option<P> {
        self.progress
            .clone()
            .and_then(|p| serde_json::from_value(p).ok())
    }

    /// Saves progress in the caller's transaction, so a retry resumes exactly where committed work ends.
    /// Fails (transiently) when this attempt no longer owns the job: the caller must roll back and stop.
    pub async fn checkpoint<P: Serialize>(
        &self,
        conn: &mut PgConnection,
        progress: &P,
    ) -> Result<(), JobError> {
        let value =
            serde_json::to_value(progress).map_err(|e| JobError::permanent("internal", e))?;
        let attempt = i32::try_from(self.attempt).unwrap_or(i32::MAX);
        let saved = match &self.redis {
            // Not in the caller's transaction: kinds that resume from their checkpoints stay in PostgreSQL
            // (see `Policy::resumes`); for the others it is the result shown to operators.
            Some(redis) => {
                redis
                    .hold(self.id, attempt, &self.worker, Some(&value))
                    .await?
            }
            None => store::save_progress(conn, self.id, attempt, &self.worker, &value).await?,
        };
        if saved { Ok(()) } else { Err(lost_claim()) }
    }
}

fn lost_claim() -> JobError {
    JobError::transient_with_code(
        "lost_claim",
        "this attempt no longer owns the job (it was taken back as an orphan, or cancelled); stopping",
    )
}

fn new_job<J: Job>(job: &J, run_at: Option<DateTime<Utc>>) -> Result<NewJob> {
    let policy = J::policy();
    Ok(NewJob {
        kind: J::KIND,
        queue: policy.queue,
        args: serde_json::to_value(job)
            .map_err(|e| anyhow::anyhow!("{} arguments do not serialize: {e}", J::KIND))?,
        priority: policy.priority,
        max_attempts: i32::try_from(policy.max_attempts).unwrap_or(i32::MAX),
        run_at,
        unique_key: job.unique_key(),
        unique_while_active: policy.uniqueness == Uniqueness::WhileActive,
        unique_while_pending: policy.uniqueness == Uniqueness::WhilePending,
        tenant_id: job.tenant_id().map(str::to_owned),
        provider: job.provider().map(str::to_owned),
    })
}

fn count(kind: &str, results: &[Enqueued]) {
    let inserted = results.iter().filter(|r| r.inserted).count() as u64;
    metrics()
        .jobs_enqueued
        .with_label_values(&[kind])
        .inc_by(inserted);
    metrics()
        .jobs_deduplicated
        .with_label_values(&[kind])
        .inc_by(results.len() as u64 - inserted);
}

/// Enqueues one job in the caller's transaction; it exists if and only if that transaction commits.
pub async fn enqueue<J: Job>(conn: &mut PgConnection, job: &J) -> Result<Enqueued> {
    enqueue_at(conn, job, None).await
}

/// Enqueues one job to run no earlier than `run_at`.
pub async fn enqueue_at<J: Job>(
    conn: &mut PgConnection,
    job: &J,
    run_at: Option<DateTime<Utc>>,
) -> Result<Enqueued> {
    let results = insert::<J>(conn, vec![new_job(job, run_at)?]).await?;
    count(J::KIND, &results);
    Ok(results[0])
}

/// Enqueues many jobs in one statement; duplicates by idempotency key are skipped and reported per item.
pub async fn enqueue_many<J: Job>(conn: &mut PgConnection, jobs: &[J]) -> Result<Vec<Enqueued>> {
    let rows = jobs
        .iter()
        .map(|job| new_job(job, None))
        .collect::<Result<Vec<_>>>()?;
    let results = insert::<J>(conn, rows).await?;
    count(J::KIND, &results);
    Ok(results)
}

/// Inserts jobs of kind `J` where its queue lives: the `jobs` table, or the outbox bound for Redis.
async fn insert<J: Job>(conn: &mut PgConnection, rows: Vec<NewJob>) -> Result<Vec<Enqueued>> {
    let policy = J::policy();
    if policy.on_redis() {
        let rows: Vec<(NewJob, bool)> = rows.into_iter().map(|row| (row, policy.fair)).collect();
        store::stage(conn, &rows).await
    } else {
        store::insert(conn, &rows).await
    }
}
