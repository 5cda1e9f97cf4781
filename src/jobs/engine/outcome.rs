//! The middleware every worker runs its handler inside: it holds a concurrency slot for the attempt, enforces
//! the kind's timeout, catches panics, classifies the result by the kind's policy and queues the row's next
//! state for the completer. This is the one place an attempt's result becomes retry, dead letter or done.

use std::any::Any;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use apalis::prelude::{BoxDynError, Task};
use chrono::{DateTime, Utc};
use futures::FutureExt;
use futures::future::BoxFuture;
use prometheus::{Histogram, IntCounter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::sync::PollSemaphore;
use tower::{Layer, Service};
use tracing::Instrument;

use super::completer::Completer;
use super::lease::Lease;
use super::pace::Pace;
use super::runtime::Attempts;
use super::{Job, JobError, Policy};
use crate::domain::{AttemptError, JobId};
use crate::metrics::metrics;
use crate::store::jobs::{Completion, Finish};

/// Facts about the claimed attempt, attached to each apalis task by the backend.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The job.
    pub id: JobId,
    /// This attempt (1-based).
    pub attempt: u32,
    /// Attempt budget.
    pub max_attempts: u32,
    /// When the job became due.
    pub due_at: DateTime<Utc>,
    /// When this attempt was claimed (database clock, like `due_at`).
    pub claimed_at: DateTime<Utc>,
    /// When this process received the claimed row.
    pub received: Instant,
    /// What earlier attempts checkpointed.
    pub progress: Option<serde_json::Value>,
    /// Attempts given back so far (snoozes, shutdown hand-backs).
    pub handbacks: u32,
    /// Cancelled when the process fences itself or an operator cancels the job.
    pub cancel: CancellationToken,
}

/// What the layer needs from the process: where results go, who is running, and the running attempts.
#[derive(Debug, Clone)]
pub struct Reporter {
    /// The completer.
    pub completer: Completer,
    /// This process's worker id, recorded with errors.
    pub worker_id: Arc<str>,
    /// This process's lease.
    pub lease: Lease,
    /// The attempts running here.
    pub attempts: Arc<Attempts>,
}

/// Wraps a worker's service; see the module docs.
#[derive(Debug)]
pub struct OutcomeLayer<J> {
    reporter: Reporter,
    slots: Arc<Semaphore>,
    pace: Arc<Pace>,
    _job: PhantomData<fn() -> J>,
}

impl<J> OutcomeLayer<J> {
    /// A layer whose attempts take permits from `slots` and report their durations to `pace`.
    pub fn new(reporter: Reporter, slots: Arc<Semaphore>, pace: Arc<Pace>) -> Self {
        Self {
            reporter,
            slots,
            pace,
            _job: PhantomData,
        }
    }
}

impl<J> Clone for OutcomeLayer<J> {
    fn clone(&self) -> Self {
        Self::new(self.reporter.clone(), self.slots.clone(), self.pace.clone())
    }
}

impl<S, J: Job> Layer<S> for OutcomeLayer<J> {
    type Service = OutcomeService<S, J>;

    fn layer(&self, inner: S) -> Self::Service {
        OutcomeService {
            inner,
            reporter: self.reporter.clone(),
            slots: PollSemaphore::new(self.slots.clone()),
            permit: None,
            policy: Arc::new(J::policy()),
            pace: self.pace.clone(),
            metrics: Arc::new(KindMetrics::new(J::KIND)),
            _job: PhantomData,
        }
    }
}

/// The per-attempt metrics of one kind, resolved once rather than by label on every attempt.
#[derive(Debug)]
struct KindMetrics {
    started: IntCounter,
    succeeded: IntCounter,
    duration: Histogram,
    start_latency: Histogram,
}

impl KindMetrics {
    fn new(kind: &str) -> Self {
        let m = metrics();
        Self {
            started: m.jobs_started.with_label_values(&[kind]),
            succeeded: m.jobs_succeeded.with_label_values(&[kind]),
            duration: m.job_duration.with_label_values(&[kind]),
            start_latency: m.job_start_latency.with_label_values(&[kind]),
        }
    }
}

/// See [`OutcomeLayer`].
#[derive(Debug)]
pub struct OutcomeService<S, J> {
    inner: S,
    reporter: Reporter,
    slots: PollSemaphore,
    permit: Option<OwnedSemaphorePermit>,
    policy: Arc<Policy>,
    pace: Arc<Pace>,
    metrics: Arc<KindMetrics>,
    _job: PhantomData<fn() -> J>,
}

impl<S, J> Service<Task<J>> for OutcomeService<S, J>
where
    J: Job,
    S: Service<Task<J>>,
    S::Response: Send,
    S::Error: Into<BoxDynError> + Send,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<(), BoxDynError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.permit.is_none() {
            match self.slots.poll_acquire(cx) {
                Poll::Ready(Some(permit)) => self.permit = Some(permit),
                Poll::Ready(None) => {
                    return Poll::Ready(Err("the worker's slots were closed".into()));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<J>) -> Self::Future {
        let permit = self.permit.take();
        let policy = self.policy.clone();
        let pace = self.pace.clone();
        let kind_metrics = self.metrics.clone();
        let reporter = self.reporter.clone();
        let claim = task.ctx().data().get::<Claim>().cloned();
        // Every line a handler logs names its attempt: kind, job id, attempt number and tenant.
        let span = tracing::info_span!(
            "job",
            kind = J::KIND,
            id = claim.as_ref().map(|c| c.id.0),
            attempt = claim.as_ref().map(|c| c.attempt),
            tenant = task.args.tenant_id(),
        );
        let attempt = self.inner.call(task);
        async move {
            let Some(claim) = claim else {
                return Err("a task reached the outcome layer without its claim".into());
            };
            let attempt_no = i32::try_from(claim.attempt).unwrap_or(i32::MAX);
            let report = |finish| Completion {
                id: claim.id,
                attempt: attempt_no,
                finish,
            };
            if claim.cancel.is_cancelled() {
                // Claimed, then fenced (or cancelled) before it started: it never ran, so it is handed back
                // without using up the attempt.
                reporter.attempts.remove(claim.id, claim.attempt);
                if reporter.lease.is_fenced() {
                    reporter.completer.send(report(Finish::Release)).await;
                }
                drop(permit);
                return Ok(());
            }
            kind_metrics.started.inc();
            // Due to claimed on the database's clock, plus any wait for a slot after the claim on ours.
            let to_claim = (claim.claimed_at - claim.due_at)
                .to_std()
                .unwrap_or_default();
            kind_metrics
                .start_latency
                .observe((to_claim + claim.received.elapsed()).as_secs_f64());

            let started = Instant::now();
            let run = tokio::time::timeout(policy.timeout, AssertUnwindSafe(attempt).catch_unwind());
            let result = tokio::select! {
                result = run => Some(result),
                () = claim.cancel.cancelled() => None,
            };
            reporter.attempts.remove(claim.id, claim.attempt);
            let took = started.elapsed();
            kind_metrics.duration.observe(took.as_secs_f64());
            pace.observe(took);

            let failure = match result {
                None if reporter.lease.is_fenced() => Some(Failure {
                    class: "fenced",
                    code: None,
                    message: "the worker lost touch with the database for most of the orphan timeout and \
                              stopped the attempt before anyone could take the job back"
                        .to_owned(),
                    permanent: false,
                    retry_after: Some(Duration::ZERO),
                }),
                None => {
                    // An operator cancelled the job: its row already says so, and nothing this attempt
                    // still does can commit.
                    tracing::info!(kind = J::KIND, id = %claim.id, "attempt stopped: the job was cancelled");
                    drop(permit);
                    return Ok(());
                }
                Some(Ok(Ok(Ok(_)))) => None,
                Some(Ok(Ok(Err(err)))) => match classify(err.into()) {
                    Classified::Snooze { after, reason } if claim.handbacks < policy.max_snoozes => {
                        metrics().jobs_snoozed.with_label_values(&[J::KIND]).inc();
                        tracing::debug!(kind = J::KIND, id = %claim.id, wait = ?after, %reason, "job snoozed");
                        reporter
                            .completer
                            .send(report(Finish::Snooze { delay: after }))
                            .await;
                        drop(permit);
                        return Ok(());
                    }
                    Classified::Snooze { reason, .. } => Some(Failure {
                        class: "snoozed",
                        code: Some("snooze_limit".to_owned()),
                        message: format!(
                            "the job waited {} times without running (limit {}): {reason}",
                            claim.handbacks, policy.max_snoozes
                        ),
                        permanent: true,
                        retry_after: None,
                    }),
                    Classified::Failure(failure) => Some(failure),
                },
                Some(Ok(Err(panic))) => Some(Failure {
                    class: "panic",
                    code: None,
                    message: format!("the handler panicked: {}", panic_message(&*panic)),
                    permanent: false,
                    retry_after: None,
                }),
                Some(Err(_)) => Some(Failure {
                    class: "timeout",
                    code: None,
                    message: format!(
                        "the attempt did not finish within its {:?} timeout",
                        policy.timeout
                    ),
                    permanent: false,
                    retry_after: None,
                }),
            };
            let finish = match failure {
                None => {
                    kind_metrics.succeeded.inc();
                    Finish::Completed
                }
                Some(failure) => decide::<J>(
                    &policy,
                    &claim,
                    failure,
                    &reporter.worker_id,
                    rand::random(),
                ),
            };
            reporter.completer.send(report(finish)).await;
            // The slot is released only once the result is queued, so a stalled completer slows workers
            // down instead of piling up results in memory.
            drop(permit);
            Ok(())
        }
        .instrument(span)
        .boxed()
    }
}

/// The longest retry delay honoured.
pub(crate) const MAX_RETRY_DELAY: Duration = Duration::from_secs(86_400);

/// A failed attempt, before the policy decides what follows.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Failure {
    pub(crate) class: &'static str,
    pub(crate) code: Option<String>,
    pub(crate) message: String,
    pub(crate) permanent: bool,
    pub(crate) retry_after: Option<Duration>,
}

/// What a handler's error means for the job.
#[derive(Debug)]
pub(crate) enum Classified {
    /// A failed attempt.
    Failure(Failure),
    /// Not a failure: run again later with the attempt given back.
    Snooze { after: Duration, reason: String },
}

/// Reads a handler's error: our [`JobError`] says what it is; anything else is assumed transient.
pub(crate) fn classify(err: BoxDynError) -> Classified {
    let failure = match err.downcast::<JobError>() {
        Ok(job_error) => match *job_error {
            JobError::Snooze { after, reason } => return Classified::Snooze { after, reason },
            JobError::Permanent { code, message } => Failure {
                class: "permanent",
                code: Some(code),
                message,
                permanent: true,
                retry_after: None,
            },
            JobError::Transient { code, message } => Failure {
                class: "transient",
                code,
                message,
                permanent: false,
                retry_after: None,
            },
            JobError::RetryAfter { after, message } => Failure {
                class: "retry_after",
                code: None,
                message,
                permanent: false,
                retry_after: Some(after),
            },
        },
        Err(other) => Failure {
            class: "transient",
            code: None,
            message: other.to_string(),
            permanent: false,
            retry_after: None,
        },
    };
    Classified::Failure(failure)
}

/// Applies the policy: dead letter for a permanent failure or the last attempt, else retry after the
/// backoff (or the delay the failure asked for). `unit` is the jitter draw in [0, 1).
pub(crate) fn decide<J: Job>(
    policy: &Policy,
    claim: &Claim,
    failure: Failure,
    worker: &str,
    unit: f64,
) -> Finish {
    let m = metrics();
    m.jobs_failed
        .with_label_values(&[J::KIND, failure.class])
        .inc();
    let error = AttemptError {
        attempt: i32::try_from(claim.attempt).unwrap_or(i32::MAX),
        at: Utc::now(),
        class: failure.class.to_owned(),
        code: failure.code.map(|c| clean_message(&c)),
        error: clean_message(&failure.message),
        worker: Some(worker.to_owned()),
    };
    if failure.permanent || claim.attempt >= claim.max_attempts {
        m.jobs_dead.with_label_values(&[J::KIND]).inc();
        tracing::error!(kind = J::KIND, id = %claim.id, attempt = claim.attempt, class = failure.class,
            error = %error.error, "job dead-lettered");
        Finish::Dead { error }
    } else {
        // A dependency may ask for any wait; more than a day is a mistake, not advice, and would not fit
        // the database's interval type either.
        let delay = failure
            .retry_after
            .unwrap_or_else(|| policy.backoff.delay(claim.attempt, unit))
            .min(MAX_RETRY_DELAY);
        m.jobs_retried.with_label_values(&[J::KIND]).inc();
        tracing::warn!(kind = J::KIND, id = %claim.id, attempt = claim.attempt, class = failure.class,
            retry_in = ?delay, error = %error.error, "job attempt failed; retrying");
        Finish::Retry { delay, error }
    }
}

/// Error text as stored: PostgreSQL's jsonb refuses NUL characters, and a runaway message must not bloat
/// the row, so both are dealt with here.
pub(crate) fn clean_message(message: &str) -> String {
    const MAX: usize = 4000;
    let mut clean: String = message.chars().filter(|c| *c != '\0').collect();
    if clean.len() > MAX {
        let mut cut = MAX;
        while !clean.is_char_boundary(cut) {
            cut -= 1;
        }
        clean.truncate(cut);
        clean.push_str("… (truncated)");
    }
    clean
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a non-text panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::engine::{Backoff, Uniqueness};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    struct Probe;

    impl Job for Probe {
        const KIND: &'static str = "probe";
        fn policy() -> Policy {
            Policy {
                max_attempts: 3,
                backoff: Backoff {
                    jitter: 0.0,
                    ..Backoff::exponential(Duration::from_secs(10), 2.0, Duration::from_secs(60))
                },
                uniqueness: Uniqueness::Retained,
                ..Policy::new("test")
            }
        }
    }

    fn claim(attempt: u32) -> Claim {
        Claim {
            id: JobId(1),
            attempt,
            max_attempts: 3,
            due_at: Utc::now(),
            claimed_at: Utc::now(),
            received: Instant::now(),
            progress: None,
            handbacks: 0,
            cancel: CancellationToken::new(),
        }
    }

    fn failure(err: JobError) -> Failure {
        failure_of(Box::new(err))
    }

    #[test]
    fn a_transient_failure_retries_after_the_backoff_for_its_attempt() {
        let finish = decide::<Probe>(
            &Probe::policy(),
            &claim(2),
            failure(JobError::transient("flaky")),
            "w",
            0.5,
        );
        match finish {
            Finish::Retry { delay, error } => {
                assert_eq!(delay, Duration::from_secs(20));
                assert_eq!((error.attempt, error.class.as_str()), (2, "transient"));
            }
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn retry_after_overrides_the_backoff() {
        let err = JobError::retry_after(Duration::from_secs(42), "rate limited");
        let finish = decide::<Probe>(&Probe::policy(), &claim(1), failure(err), "w", 0.5);
        assert!(matches!(finish, Finish::Retry { delay, .. } if delay == Duration::from_secs(42)));
    }

    #[test]
    fn a_permanent_failure_dead_letters_at_once_with_its_code() {
        let finish = decide::<Probe>(
            &Probe::policy(),
            &claim(1),
            failure(JobError::permanent("parse", "bad pdf")),
            "w",
            0.5,
        );
        match finish {
            Finish::Dead { error } => assert_eq!(error.code.as_deref(), Some("parse")),
            other => panic!("expected dead, got {other:?}"),
        }
    }

    #[test]
    fn the_last_attempt_dead_letters_even_a_transient_failure() {
        let finish = decide::<Probe>(
            &Probe::policy(),
            &claim(3),
            failure(JobError::transient("still down")),
            "w",
            0.5,
        );
        assert!(matches!(finish, Finish::Dead { .. }));
    }

    #[test]
    fn foreign_errors_count_as_transient() {
        let f = failure_of("connection reset".into());
        assert_eq!((f.class, f.permanent), ("transient", false));
    }

    fn failure_of(err: BoxDynError) -> Failure {
        match classify(err) {
            Classified::Failure(failure) => failure,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn a_snooze_is_not_a_failure() {
        let classified = classify(Box::new(JobError::snooze(
            Duration::from_secs(5),
            "downstream is full",
        )));
        assert!(
            matches!(classified, Classified::Snooze { after, .. } if after == Duration::from_secs(5))
        );
    }

    #[test]
    fn stored_messages_lose_nul_characters_and_are_bounded() {
        assert_eq!(clean_message("a\0b"), "ab");
        let long = "é".repeat(5000);
        let clean = clean_message(&long);
        assert!(clean.len() < 4100 && clean.ends_with("(truncated)"));
    }
}
