//! An apalis [`Backend`] over a kind's [`JobStore`] (the `jobs` table, or Redis): one per (process, kind).
//!
//! It claims as many due rows as it can start soon (see [`Pace`]), fetches when woken by NOTIFY, on the poll
//! interval, or (while a backlog lasts) once half of the last claim is started, and never dies on a database
//! error: it logs, waits and tries again. Rows whose arguments no longer decode are dead-lettered instead of
//! killing the worker. On shutdown, rows it claimed but did not start are handed back.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use apalis::prelude::{Backend, Task, TaskBuilder, TaskId, WorkerContext};
use apalis_core::backend::BackendConfig;
use apalis_core::backend::finalize::Ephemeral;
use futures::FutureExt;
use futures::future::BoxFuture;
use futures::task::AtomicWaker;
use tokio::sync::Semaphore;
use tokio::time::Sleep;

use super::Job;
use super::job_store::JobStore;
use super::outcome::{Claim, OutcomeLayer, Reporter};
use super::pace::{ClaimSize, Pace};
use crate::backoff::{Backoff, Retries};
use crate::domain::{AttemptError, JobId};
use crate::store::jobs::{Claimed, Completion, Finish};

/// Wakes a kind's worker when NOTIFY says it has due work.
#[derive(Debug, Default)]
pub struct KindSignal {
    pending: AtomicBool,
    waker: AtomicWaker,
}

impl KindSignal {
    /// Marks work as available and wakes the worker.
    pub fn notify(&self) {
        self.pending.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    fn take(&self) -> bool {
        self.pending.swap(false, Ordering::SeqCst)
    }

    fn register(&self, waker: &Waker) {
        self.waker.register(waker);
    }
}

/// Names a claim (see [`JobStore::claim`]): a fresh name for each claim, kept after a failed one, which is
/// then asked `again` under it, since it may have taken rows and lost only its answer.
#[derive(Debug, Clone, Copy)]
struct ClaimName {
    token: i64,
    again: bool,
}

impl ClaimName {
    fn new() -> Self {
        Self {
            token: rand::random(),
            again: false,
        }
    }
}

/// Settings a backend reads.
#[derive(Debug, Clone)]
pub struct BackendSettings {
    /// Rows claimed per fetch at first and whenever the queue runs short (claims grow while a backlog lasts).
    pub batch_size: usize,
    /// Fetch at least this often when no notification arrives.
    pub poll_interval: Duration,
    /// Attempts running at once.
    pub concurrency: usize,
    /// Claim fairly between tenants (see [`super::Policy::fair`]).
    pub fair: bool,
}

/// See the module docs.
pub struct JobQueue<J> {
    store: JobStore,
    reporter: Reporter,
    signal: Arc<KindSignal>,
    slots: Arc<Semaphore>,
    pace: Arc<Pace>,
    claim_size: ClaimSize,
    settings: BackendSettings,
    /// Claimed rows not started yet, with when they arrived.
    buffer: VecDeque<(Claimed, std::time::Instant)>,
    fetching: Option<BoxFuture<'static, crate::error::Result<Vec<Claimed>>>>,
    /// A second claim beside `fetching` while a deep backlog lasts (see [`Self::claim_beside`]).
    beside: Option<BoxFuture<'static, crate::error::Result<Vec<Claimed>>>>,
    beside_limit: usize,
    beside_name: ClaimName,
    releasing: Option<BoxFuture<'static, ()>>,
    timer: Pin<Box<Sleep>>,
    /// The last fetch filled its limit, so more work is probably waiting.
    more: bool,
    last_limit: usize,
    /// When the claim in flight started.
    fetch_started: std::time::Instant,
    /// The claim size, not the free slots or the kind's pace, set the last claim's limit.
    bound_by_size: bool,
    /// The last claims to land came back full.
    backlog: bool,
    /// Where the next fair claim starts its walk over tenants (shared with the fetch future).
    fair_cursor: Arc<std::sync::Mutex<String>>,
    /// Failed fetches in a row: after one, only the timer (then the backoff) may start the next.
    fetch_retries: Retries,
    /// Names the next claim; kept after a failed one, so asking again cannot take jobs twice over.
    claim_name: ClaimName,
    _job: PhantomData<fn() -> J>,
}

impl<J> std::fmt::Debug for JobQueue<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobQueue")
            .field("kind", &std::any::type_name::<J>())
            .field("buffered", &self.buffer.len())
            .finish()
    }
}

impl<J: Job> JobQueue<J> {
    /// A backend for kind `J` reporting to `reporter`.
    pub fn new(
        store: JobStore,
        reporter: Reporter,
        signal: Arc<KindSignal>,
        settings: BackendSettings,
    ) -> Self {
        Self {
            store,
            reporter,
            signal,
            slots: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            pace: Arc::new(Pace::default()),
            claim_size: ClaimSize::new(settings.batch_size),
            // First fetch happens at once: the timer starts expired.
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            settings,
            buffer: VecDeque::new(),
            fetching: None,
            beside: None,
            beside_limit: 0,
            beside_name: ClaimName::new(),
            releasing: None,
            more: false,
            last_limit: 0,
            bound_by_size: false,
            backlog: false,
            fetch_started: std::time::Instant::now(),
            fair_cursor: Arc::default(),
            fetch_retries: Backoff::doubling(Duration::from_millis(500), Duration::from_secs(8))
                .retries(),
            claim_name: ClaimName::new(),
            _job: PhantomData,
        }
    }

    /// Starts a claim for what the free slots and the kind's pace call for, less what is already buffered;
    /// false when that is nothing.
    fn start_fetch(&mut self) -> bool {
        // One slot is already reserved by the outcome layer's poll_ready for the task we are about to yield.
        let free = self.slots.available_permits() + 1;
        let size = self.claim_size.get();
        let target = self.pace.claim_limit(free, self.settings.concurrency, size);
        let limit = target.saturating_sub(self.buffer.len());
        if limit == 0 {
            return false;
        }
        self.bound_by_size = target >= size;
        let store = self.store.clone();
        let worker = self.reporter.worker_id.clone();
        let ClaimName { token, again } = self.claim_name;
        self.fetching = Some(if self.settings.fair {
            let cursor = self.fair_cursor.clone();
            async move {
                let after = cursor.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let (rows, resume) = store
                    .claim_fair(J::KIND, &worker, limit as i64, &after, token, again)
                    .await?;
                *cursor.lock().unwrap_or_else(|e| e.into_inner()) = resume;
                Ok(rows)
            }
            .boxed()
        } else {
            async move {
                store
                    .claim(J::KIND, &worker, limit as i64, token, again)
                    .await
            }
            .boxed()
        });
        self.more = false;
        self.last_limit = limit;
        self.fetch_started = std::time::Instant::now();
        self.timer
            .as_mut()
            .reset(tokio::time::Instant::now() + self.settings.poll_interval);
        self.claim_beside();
        true
    }

    /// Lands a claim in flight if it has finished, without waiting for it.
    fn land_fetch(&mut self, cx: &mut Context<'_>) {
        let Some(fetch) = self.fetching.as_mut() else {
            return;
        };
        match fetch.poll_unpin(cx) {
            Poll::Pending => {}
            Poll::Ready(Ok(rows)) => {
                tracing::trace!(
                    kind = J::KIND,
                    limit = self.last_limit,
                    claimed = rows.len(),
                    buffered = self.buffer.len(),
                    took = ?self.fetch_started.elapsed(),
                    "claimed jobs"
                );
                self.fetching = None;
                self.fetch_retries.succeeded();
                self.claim_name = ClaimName::new();
                self.more = rows.len() >= self.last_limit;
                self.backlog = self.more;
                self.claim_size.claimed(self.bound_by_size, self.more);
                let received = std::time::Instant::now();
                self.buffer
                    .extend(rows.into_iter().map(|row| (row, received)));
            }
            Poll::Ready(Err(err)) => {
                self.fetching = None;
                self.claim_name.again = true;
                let wait = self.fetch_retries.failed();
                let failures = self.fetch_retries.failures();
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(kind = J::KIND, %err, failures, retry_in = ?wait,
                        "could not fetch jobs; will retry");
                }
                self.timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + wait);
            }
        }
    }

    /// While a backlog lasts, the next claim starts once the buffer is down to half the last one, so its
    /// round trip overlaps the jobs still buffered instead of leaving the slots idle.
    fn prefetch(&mut self) {
        if self.fetching.is_none()
            && self.more
            && self.fetch_retries.failures() == 0
            && self.buffer.len() <= self.last_limit / 2
            && !self.reporter.lease.is_fenced()
        {
            self.start_fetch();
        }
        self.claim_beside();
    }

    /// One claim stream caps a drain: a claim of several hundred rows takes 13-24 ms on a loaded machine and
    /// lands on an empty buffer. So while claims come back full at the largest sizes, a second claim of the
    /// same size runs beside the first (PostgreSQL only: it skips the rows the first holds; fair claims keep
    /// one stream so the tenant walk stays in order). It lands like the first, and ends with the backlog; one
    /// that failed is asked again beside the next claim of the first, backlog or not, as it may hold rows.
    fn claim_beside(&mut self) {
        const FROM_SIZE: usize = 256;
        let wanted = self.beside_name.again
            || (self.last_limit >= FROM_SIZE && self.backlog && self.fetching.is_some());
        if self.beside.is_some()
            || !wanted
            || self.settings.fair
            || !matches!(self.store, JobStore::Postgres(_))
            || self.fetch_retries.failures() > 0
            || self.reporter.lease.is_fenced()
        {
            return;
        }
        if !self.beside_name.again {
            self.beside_limit = self.last_limit;
        }
        let (store, worker, limit) = (
            self.store.clone(),
            self.reporter.worker_id.clone(),
            self.beside_limit,
        );
        let ClaimName { token, again } = self.beside_name;
        self.beside = Some(
            async move {
                store
                    .claim(J::KIND, &worker, limit as i64, token, again)
                    .await
            }
            .boxed(),
        );
    }

    /// Lands the second claim if it has finished. A short one means the backlog is ending; a failed one is
    /// left to the first stream's retries.
    fn land_beside(&mut self, cx: &mut Context<'_>) {
        let Some(fetch) = self.beside.as_mut() else {
            return;
        };
        let Poll::Ready(result) = fetch.poll_unpin(cx) else {
            return;
        };
        self.beside = None;
        match result {
            Ok(rows) => {
                self.beside_name = ClaimName::new();
                if rows.len() < self.beside_limit {
                    self.backlog = false;
                }
                let received = std::time::Instant::now();
                self.buffer
                    .extend(rows.into_iter().map(|row| (row, received)));
            }
            Err(err) => {
                self.beside_name.again = true;
                tracing::debug!(kind = J::KIND, %err, "a second claim failed; it is asked again");
            }
        }
    }

    /// Turns a claimed row into an apalis task, or dead-letters it if its arguments no longer decode.
    fn to_task(&self, row: Claimed, received: std::time::Instant) -> Option<Task<J>> {
        let claim = Claim {
            id: JobId(row.id),
            attempt: u32::try_from(row.attempt).unwrap_or(0),
            max_attempts: u32::try_from(row.max_attempts).unwrap_or(1),
            due_at: row.run_at.max(row.enqueued_at),
            claimed_at: row.attempted_at,
            received,
            progress: row.progress,
            handbacks: u32::try_from(row.handbacks).unwrap_or(0),
            cancel: self.reporter.lease.attempt_token(),
        };
        match serde_json::from_value::<J>(row.args) {
            Ok(args) => Some({
                self.reporter
                    .attempts
                    .insert(claim.id, claim.attempt, claim.cancel.clone());
                TaskBuilder::new(args)
                    .task_id(TaskId::Int(row.id as u64))
                    .attempt(claim.attempt as usize)
                    .max_attempts(claim.max_attempts as usize)
                    .data(claim)
                    .build()
            }),
            Err(err) => {
                let error = AttemptError {
                    attempt: row.attempt,
                    at: chrono::Utc::now(),
                    class: "undecodable".to_owned(),
                    code: Some("bad_arguments".to_owned()),
                    error: format!("the job's arguments do not decode as {}: {err}", J::KIND),
                    worker: Some(self.reporter.worker_id.to_string()),
                };
                tracing::error!(kind = J::KIND, id = row.id, %err, "job arguments do not decode; dead-lettered");
                crate::metrics::metrics()
                    .jobs_dead
                    .with_label_values(&[J::KIND])
                    .inc();
                self.reporter.completer.send_detached(Completion {
                    id: JobId(row.id),
                    attempt: row.attempt,
                    finish: Finish::Dead { error },
                });
                None
            }
        }
    }
}

impl<J: Job> Backend for JobQueue<J> {
    type Task = Task<J>;
    type Error = std::convert::Infallible;

    fn poll_ready(
        &mut self,
        _: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Option<Result<Task<J>, Self::Error>>> {
        loop {
            self.land_fetch(cx);
            self.land_beside(cx);
            if let Some((row, received)) = self.buffer.pop_front() {
                self.prefetch();
                match self.to_task(row, received) {
                    Some(task) => return Poll::Ready(Some(Ok(task))),
                    None => continue,
                }
            }
            if self.fetching.is_some() {
                return Poll::Pending;
            }
            let timer_fired = self.timer.as_mut().poll(cx).is_ready();
            if self.reporter.lease.is_fenced() {
                // Out of touch with the database: claim nothing until a heartbeat gets through (the lease
                // wakes this worker then); the timer keeps checking meanwhile.
                if timer_fired {
                    self.timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + self.settings.poll_interval);
                    let _ = self.timer.as_mut().poll(cx);
                }
                self.signal.register(cx.waker());
                return Poll::Pending;
            }
            // After a failed fetch only the timer (now the error backoff) may trigger the next one.
            let due = timer_fired
                || (self.fetch_retries.failures() == 0 && (self.more || self.signal.take()));
            if due && self.start_fetch() {
                continue;
            }
            self.signal.register(cx.waker());
            // A notification may have landed between take() and register(); do not sleep through it.
            if self.signal.take() && self.start_fetch() {
                continue;
            }
            return Poll::Pending;
        }
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        // Claims in flight may have claimed rows: let them land so they can be handed back.
        for in_flight in [&mut self.fetching, &mut self.beside] {
            if let Some(fetch) = in_flight.as_mut() {
                let Poll::Ready(rows) = fetch.poll_unpin(cx) else {
                    return Poll::Pending;
                };
                *in_flight = None;
                let now = std::time::Instant::now();
                self.buffer
                    .extend(rows.unwrap_or_default().into_iter().map(|row| (row, now)));
            }
        }
        if self.releasing.is_none() && !self.buffer.is_empty() {
            let ids: Vec<i64> = self.buffer.drain(..).map(|(row, _)| row.id).collect();
            let store = self.store.clone();
            let worker = self.reporter.worker_id.clone();
            self.releasing = Some(
                async move {
                    if let Err(err) = store.release(&worker, Some(&ids), None).await {
                        tracing::warn!(kind = J::KIND, %err, count = ids.len(),
                            "could not hand back claimed jobs at shutdown; they will be rescued as orphans");
                    }
                }
                .boxed(),
            );
        }
        if let Some(release) = self.releasing.as_mut() {
            if release.poll_unpin(cx).is_pending() {
                return Poll::Pending;
            }
            self.releasing = None;
        }
        Poll::Ready(Ok(()))
    }
}

impl<J: Job> BackendConfig for JobQueue<J> {
    type Args = J;
    type Id = i64;
    type Kind = Ephemeral;
    type Config = BackendSettings;
    type Layer = OutcomeLayer<J>;

    fn config(&self) -> &Self::Config {
        &self.settings
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Self::Layer {
        OutcomeLayer::new(self.reporter.clone(), self.slots.clone(), self.pace.clone())
    }
}
