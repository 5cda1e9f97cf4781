//! A process's share of the job engine: one apalis worker per registered kind, plus the pieces they share —
//! the worker row and its heartbeat, the LISTEN connection that wakes workers, and the completer.
//!
//! Shutdown stops fetching, gives running attempts the grace period, hands back whatever is still running
//! (without using up its attempt) and removes the worker row, so nothing is lost or left locked.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{Task, WorkerBuilder, WorkerContext};
use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::backend::{BackendSettings, KindSignal, PgQueue};
use super::completer::Completer;
use super::outcome::{Claim, Reporter};
use super::{Job, JobContext, JobError};
use crate::config::JobSettings;
use crate::domain::AttemptError;
use crate::store::jobs as store;

type Starter =
    Box<dyn FnOnce(Reporter, Arc<KindSignal>) -> (WorkerContext, BoxFuture<'static, ()>) + Send>;

/// Collects job kinds and their handlers, then starts them.
pub struct Runtime {
    pool: PgPool,
    settings: JobSettings,
    starters: Vec<(&'static str, Starter)>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("kinds", &self.kinds())
            .finish()
    }
}

impl Runtime {
    /// An empty runtime.
    pub fn new(pool: PgPool, settings: JobSettings) -> Self {
        Self {
            pool,
            settings,
            starters: Vec::new(),
        }
    }

    /// Runs kind `J` with `handler`, giving it `state` in every [`JobContext`].
    pub fn register<J, S, H, Fut>(&mut self, state: S, handler: H) -> &mut Self
    where
        J: Job,
        S: Clone + Send + Sync + 'static,
        H: Fn(J, JobContext<S>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), JobError>> + Send + 'static,
    {
        let pool = self.pool.clone();
        let policy = J::policy();
        let settings = BackendSettings {
            batch_size: self.settings.batch_size as usize,
            poll_interval: self.settings.poll_interval,
            concurrency: policy.concurrency,
            fair: policy.fair,
        };
        let starter: Starter = Box::new(move |reporter, signal| {
            let context = WorkerContext::new(&format!("{}/{}", reporter.worker_id, J::KIND));
            let worker_id = reporter.worker_id.clone();
            let backend = PgQueue::<J>::new(pool, reporter, signal, settings);
            let worker = WorkerBuilder::new(&context)
                .backend(backend)
                .build(HandlerService {
                    handler,
                    state,
                    worker: worker_id,
                    _job: PhantomData,
                });
            let run = async move {
                if let Err(err) = worker.run().await {
                    tracing::error!(kind = J::KIND, %err, "job worker stopped with an error");
                }
            };
            (context, run.boxed())
        });
        self.starters.push((J::KIND, starter));
        self
    }

    /// Kinds registered so far.
    pub fn kinds(&self) -> Vec<&'static str> {
        self.starters.iter().map(|(kind, _)| *kind).collect()
    }

    /// Registers this process as a worker and starts every kind's worker.
    pub async fn start(self) -> crate::error::Result<RuntimeHandle> {
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let pid = std::process::id();
        let nonce: u32 = rand::random();
        let worker_id: Arc<str> = format!("{host}:{pid}:{nonce:08x}").into();
        let kinds: Vec<String> = self.kinds().into_iter().map(str::to_owned).collect();
        store::register_worker(
            &self.pool,
            &worker_id,
            &host,
            pid as i32,
            &kinds,
            env!("CARGO_PKG_VERSION"),
        )
        .await?;

        let (completer, completer_task) = Completer::spawn(self.pool.clone(), worker_id.clone());
        let reporter = Reporter {
            completer: completer.clone(),
            worker_id: worker_id.clone(),
        };
        let stop = CancellationToken::new();
        let signals: HashMap<&'static str, Arc<KindSignal>> = self
            .starters
            .iter()
            .map(|(kind, _)| (*kind, Arc::new(KindSignal::default())))
            .collect();
        let listener = tokio::spawn(listen(self.pool.clone(), signals.clone(), stop.clone()));
        let heartbeat = tokio::spawn(heartbeat(
            self.pool.clone(),
            worker_id.clone(),
            host,
            kinds,
            self.settings.orphan_timeout / 3,
            stop.clone(),
        ));
        let mut workers = Vec::new();
        for (kind, start) in self.starters {
            let (context, run) = start(reporter.clone(), signals[kind].clone());
            workers.push((kind, context, tokio::spawn(run)));
        }
        tracing::info!(worker = %worker_id, kinds = ?signals.keys().collect::<Vec<_>>(), "job workers started");
        Ok(RuntimeHandle {
            pool: self.pool,
            worker_id,
            grace: self.settings.shutdown_grace,
            completer,
            completer_task,
            listener,
            heartbeat,
            workers,
            stop,
        })
    }
}

/// The running workers of this process.
#[derive(Debug)]
pub struct RuntimeHandle {
    pool: PgPool,
    worker_id: Arc<str>,
    grace: Duration,
    completer: Completer,
    completer_task: JoinHandle<()>,
    listener: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
    workers: Vec<(&'static str, WorkerContext, JoinHandle<()>)>,
    stop: CancellationToken,
}

impl RuntimeHandle {
    /// This process's worker id (as stored in `jobs.locked_by`).
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Stops fetching, lets running attempts finish within the grace period, hands back the rest.
    pub async fn shutdown(self) {
        for (kind, context, _) in &self.workers {
            if let Err(err) = context.stop() {
                tracing::debug!(kind, %err, "worker was not running");
            }
        }
        let deadline = tokio::time::Instant::now() + self.grace;
        for (kind, _, mut task) in self.workers {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::warn!(kind, grace = ?self.grace, "attempts still running after the grace period; interrupting them");
                task.abort();
                let _ = task.await;
            }
        }
        // Results of finished attempts must land before we hand back what is still marked running.
        if tokio::time::timeout(Duration::from_secs(10), self.completer.flush())
            .await
            .is_err()
        {
            tracing::warn!(
                "could not record all job results before exit; their jobs will run again"
            );
        }
        let note = AttemptError {
            attempt: 0,
            at: chrono::Utc::now(),
            class: "interrupted".to_owned(),
            code: None,
            error: "the worker shut down before the attempt finished; it was handed back without using up an attempt"
                .to_owned(),
            worker: Some(self.worker_id.to_string()),
        };
        match store::release(&self.pool, &self.worker_id, None, Some(&note)).await {
            Ok(released) if !released.is_empty() => {
                tracing::info!(count = released.len(), "handed back interrupted jobs");
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(%err, "could not hand back interrupted jobs; they will be rescued as orphans")
            }
        }
        self.stop.cancel();
        let _ = self.listener.await;
        let _ = self.heartbeat.await;
        if let Err(err) = store::deregister_worker(&self.pool, &self.worker_id).await {
            tracing::warn!(%err, "could not remove the worker row");
        }
        drop(self.completer);
        let _ = self.completer_task.await;
        tracing::info!(worker = %self.worker_id, "job workers stopped");
    }
}

/// Wakes the worker of each kind NOTIFY names. After a lost connection every worker is woken, since
/// notifications sent meanwhile are gone.
async fn listen(
    pool: PgPool,
    signals: HashMap<&'static str, Arc<KindSignal>>,
    stop: CancellationToken,
) {
    let wake_all = || signals.values().for_each(|s| s.notify());
    let mut listener = loop {
        let attempt = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(store::NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        tokio::select! {
            () = stop.cancelled() => return,
            result = attempt => match result {
                Ok(listener) => break listener,
                Err(err) => {
                    tracing::warn!(%err, "could not LISTEN for new jobs; polling meanwhile");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    };
    wake_all();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            received = listener.try_recv() => match received {
                Ok(Some(note)) => {
                    if let Some(signal) = signals.get(note.payload()) {
                        signal.notify();
                    }
                }
                Ok(None) => {
                    tracing::warn!("the LISTEN connection dropped; reconnecting");
                    wake_all();
                }
                Err(err) => {
                    tracing::warn!(%err, "LISTEN failed; retrying");
                    wake_all();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

async fn heartbeat(
    pool: PgPool,
    worker_id: Arc<str>,
    host: String,
    kinds: Vec<String>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every.max(Duration::from_millis(100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match store::heartbeat(&pool, &worker_id).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(worker = %worker_id, "worker row was missing; registering again");
                let pid = std::process::id() as i32;
                if let Err(err) = store::register_worker(
                    &pool,
                    &worker_id,
                    &host,
                    pid,
                    &kinds,
                    env!("CARGO_PKG_VERSION"),
                )
                .await
                {
                    tracing::warn!(%err, "could not register the worker again");
                }
            }
            Err(err) => tracing::warn!(%err, "worker heartbeat failed"),
        }
    }
}

/// Calls a kind's handler with its arguments and a [`JobContext`].
struct HandlerService<J, S, H> {
    handler: H,
    state: S,
    worker: Arc<str>,
    _job: PhantomData<fn() -> J>,
}

impl<J, S, H, Fut> tower::Service<Task<J>> for HandlerService<J, S, H>
where
    J: Job,
    S: Clone + Send + Sync + 'static,
    H: Fn(J, JobContext<S>) -> Fut,
    Fut: Future<Output = Result<(), JobError>> + Send + 'static,
{
    type Response = ();
    type Error = JobError;
    type Future = BoxFuture<'static, Result<(), JobError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, task: Task<J>) -> Self::Future {
        let Some(claim) = task.ctx().data().get::<Claim>().cloned() else {
            return futures::future::ready(Err(JobError::permanent(
                "internal",
                "task without a claim",
            )))
            .boxed();
        };
        let context = JobContext {
            id: claim.id,
            attempt: claim.attempt,
            max_attempts: claim.max_attempts,
            state: self.state.clone(),
            progress: claim.progress,
            worker: self.worker.clone(),
        };
        (self.handler)(task.args, context).boxed()
    }
}
