//! A process's share of the job engine: its presence (registration, heartbeat, lease), the upkeep every
//! process runs, and one apalis worker per registered kind, plus what those workers share: the completer,
//! the in-flight attempts (so an operator can cancel one), and the wake-ups from the LISTEN hub.
//!
//! A process without any kind (an API-only one) still starts a runtime: it registers, heartbeats and does
//! upkeep, so rescue and pruning work whatever the deployment shape.
//!
//! Shutdown stops fetching, gives running attempts the grace period, hands back whatever is still running
//! (without using up its attempt, a bounded number of times) and removes the process row.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{Task, WorkerBuilder, WorkerContext};
use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::PgPool;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::backend::{BackendSettings, JobQueue, KindSignal};
use super::completer::Completer;
use super::job_store::JobStore;
use super::lease::{Identity, Lease, Presence};
use super::outcome::{Claim, Reporter};
use super::upkeep::{self, Chore};
use super::{Job, JobContext, JobError};
use crate::config::JobSettings;
use crate::domain::{AttemptError, JobId};
use crate::store::jobs as store;
use crate::store::listen::{self, Heard, Hub};
use crate::store::redis_jobs::RedisJobs;

type Starter = Box<
    dyn FnOnce(Reporter, Arc<KindSignal>, JobStore) -> (WorkerContext, BoxFuture<'static, ()>)
        + Send,
>;

/// The channels the engine listens on.
pub const CHANNELS: &[&str] = &[
    store::NOTIFY_CHANNEL,
    store::CANCEL_CHANNEL,
    store::OUTBOX_CHANNEL,
];

/// A registered kind: its name, whether its jobs live in Redis, and how to start its worker.
struct Registered {
    kind: &'static str,
    on_redis: bool,
    start: Starter,
}

/// Collects job kinds and their handlers, then starts them.
pub struct Runtime {
    pool: PgPool,
    settings: JobSettings,
    starters: Vec<Registered>,
    redis: Option<RedisJobs>,
    roles: Vec<String>,
    hub: Option<Arc<Hub>>,
    chores: Vec<Chore>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("kinds", &self.kinds())
            .field("roles", &self.roles)
            .finish()
    }
}

/// The attempts running in this process, by job, so an operator's cancel reaches the right one.
#[derive(Debug, Default)]
pub struct Attempts {
    running: Mutex<HashMap<i64, (u32, CancellationToken)>>,
}

impl Attempts {
    pub(super) fn insert(&self, id: JobId, attempt: u32, token: CancellationToken) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.0, (attempt, token));
    }

    pub(super) fn remove(&self, id: JobId, attempt: u32) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.get(&id.0).is_some_and(|(a, _)| *a == attempt) {
            running.remove(&id.0);
        }
    }

    /// Cancels attempt `attempt` of job `id` if it runs here.
    fn cancel(&self, id: i64, attempt: u32) {
        if let Some((running, token)) = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            && *running == attempt
        {
            tracing::info!(
                id,
                attempt,
                "cancelling the running attempt, as an operator asked"
            );
            token.cancel();
        }
    }
}

impl Runtime {
    /// An empty runtime.
    pub fn new(pool: PgPool, settings: JobSettings) -> Self {
        Self {
            pool,
            settings,
            starters: Vec::new(),
            redis: None,
            roles: Vec::new(),
            hub: None,
            chores: Vec::new(),
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
        let start: Starter = Box::new(move |reporter, signal, store| {
            let context = WorkerContext::new(&format!("{}/{}", reporter.worker_id, J::KIND));
            let service = HandlerService {
                handler,
                state,
                pool,
                redis: match &store {
                    JobStore::Redis(redis) => Some(redis.clone()),
                    JobStore::Postgres(_) => None,
                },
                worker: reporter.worker_id.clone(),
                _job: PhantomData,
            };
            let backend = JobQueue::<J>::new(store, reporter, signal, settings);
            let worker = WorkerBuilder::new(&context).backend(backend).build(service);
            let run = async move {
                if let Err(err) = worker.run().await {
                    tracing::error!(kind = J::KIND, %err, "job worker stopped with an error");
                }
            };
            (context, run.boxed())
        });
        self.starters.push(Registered {
            kind: J::KIND,
            on_redis: policy.on_redis(),
            start,
        });
        self
    }

    /// Keeps the jobs of the queues routed to Redis (see [`super::job_store::route_to_redis`]) in `redis`,
    /// and relays staged jobs there.
    pub fn redis(&mut self, redis: RedisJobs) -> &mut Self {
        self.redis = Some(redis);
        self
    }

    /// What this process does (`api`, `worker`, `scheduler`), as shown to operators.
    pub fn roles(&mut self, roles: &[&str]) -> &mut Self {
        self.roles = roles.iter().map(|r| (*r).to_owned()).collect();
        self
    }

    /// Uses the process's LISTEN hub (else the runtime starts its own).
    pub fn hub(&mut self, hub: Arc<Hub>) -> &mut Self {
        self.hub = Some(hub);
        self
    }

    /// Adds a periodic chore to this process's upkeep.
    pub fn chore(&mut self, chore: Chore) -> &mut Self {
        self.chores.push(chore);
        self
    }

    /// Kinds registered so far.
    pub fn kinds(&self) -> Vec<&'static str> {
        self.starters.iter().map(|r| r.kind).collect()
    }

    /// Registers this process, starts its heartbeat, its upkeep and every kind's worker.
    pub async fn start(self) -> crate::error::Result<RuntimeHandle> {
        if self.redis.is_none()
            && let Some(kind) = self.starters.iter().find(|r| r.on_redis)
        {
            return Err(crate::error::Error::Invalid(format!(
                "job kind {} is routed to Redis, but this process has no Redis connection (set REDIS_URL)",
                kind.kind
            )));
        }
        let stop = CancellationToken::new();
        let (hub, own_hub) = match self.hub {
            Some(hub) => (hub, None),
            None => {
                let (hub, task) = listen::spawn(&self.pool, CHANNELS, stop.clone());
                (hub, Some(task))
            }
        };
        let mut roles = self.roles;
        if roles.is_empty() && !self.starters.is_empty() {
            roles.push("worker".to_owned());
        }
        let identity = Identity {
            kinds: self.starters.iter().map(|r| r.kind.to_owned()).collect(),
            roles,
        };
        let presence = Presence::start(&self.pool, identity, self.settings.orphan_timeout);
        let lease = presence.lease().clone();
        let worker_id = lease.id().clone();

        let postgres = JobStore::Postgres(self.pool.clone());
        let mut completers = vec![Completer::spawn(postgres.clone(), worker_id.clone())];
        let attempts = Arc::new(Attempts::default());
        let reporter = Reporter {
            completer: completers[0].0.clone(),
            worker_id: worker_id.clone(),
            lease: lease.clone(),
            attempts: attempts.clone(),
        };
        // Results of Redis-backed kinds go to Redis through a completer of their own.
        let redis_side = self.redis.clone().map(|redis| {
            let store = JobStore::Redis(redis);
            completers.push(Completer::spawn(store.clone(), worker_id.clone()));
            let reporter = Reporter {
                completer: completers[1].0.clone(),
                ..reporter.clone()
            };
            (store, reporter)
        });
        let signals: HashMap<&'static str, Arc<KindSignal>> = self
            .starters
            .iter()
            .map(|r| (r.kind, Arc::new(KindSignal::default())))
            .collect();
        for signal in signals.values() {
            lease.wake_on_restore(signal.clone());
        }
        let dispatch = tokio::spawn(dispatch(
            hub.subscribe(),
            signals.clone(),
            attempts,
            stop.clone(),
        ));
        let mut background = vec![dispatch];
        if let Some(redis) = &self.redis {
            background.push(tokio::spawn(super::redis_side::relay(
                self.pool.clone(),
                redis.clone(),
                hub.subscribe(),
                stop.clone(),
            )));
            let on_redis: HashMap<&'static str, Arc<KindSignal>> = self
                .starters
                .iter()
                .filter(|r| r.on_redis)
                .map(|r| (r.kind, signals[r.kind].clone()))
                .collect();
            background.push(tokio::spawn(super::redis_side::wakes(
                redis.clone(),
                on_redis,
                stop.clone(),
            )));
        }
        let upkeep = tokio::spawn(upkeep::run(
            self.pool.clone(),
            self.redis.clone(),
            lease.clone(),
            self.settings.clone(),
            self.chores,
            stop.clone(),
        ));
        background.push(upkeep);
        background.extend(own_hub);
        let mut workers = Vec::new();
        for registered in self.starters {
            let (store, reporter) = match (&redis_side, registered.on_redis) {
                (Some((store, reporter)), true) => (store.clone(), reporter.clone()),
                _ => (postgres.clone(), reporter.clone()),
            };
            let (context, run) =
                (registered.start)(reporter, signals[registered.kind].clone(), store);
            workers.push((registered.kind, context, tokio::spawn(run)));
        }
        tracing::info!(process = %worker_id, kinds = ?signals.keys().collect::<Vec<_>>(), "job engine started");
        Ok(RuntimeHandle {
            stores: std::iter::once(postgres)
                .chain(redis_side.map(|(store, _)| store))
                .collect(),
            lease,
            presence,
            grace: self.settings.shutdown_grace,
            completers,
            background,
            workers,
            stop,
        })
    }
}

/// The running engine of this process.
#[derive(Debug)]
pub struct RuntimeHandle {
    /// PostgreSQL's, then Redis's when some queues live there.
    stores: Vec<JobStore>,
    lease: Lease,
    presence: Presence,
    grace: Duration,
    completers: Vec<(Completer, JoinHandle<()>)>,
    background: Vec<JoinHandle<()>>,
    workers: Vec<(&'static str, WorkerContext, JoinHandle<()>)>,
    stop: CancellationToken,
}

impl RuntimeHandle {
    /// This process's id (as stored in `jobs.locked_by`).
    pub fn worker_id(&self) -> &str {
        self.lease.id()
    }

    /// This process's lease.
    pub fn lease(&self) -> &Lease {
        &self.lease
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
        let flushed = futures::future::join_all(self.completers.iter().map(|(c, _)| c.flush()));
        if tokio::time::timeout(Duration::from_secs(10), flushed)
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
            error: "the worker shut down before the attempt finished; it was handed back"
                .to_owned(),
            worker: Some(self.lease.id().to_string()),
        };
        for store in &self.stores {
            match store.release(self.lease.id(), None, Some(&note)).await {
                Ok(released) if !released.is_empty() => {
                    tracing::info!(count = released.len(), "handed back interrupted jobs");
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(%err, "could not hand back interrupted jobs; they will be rescued as orphans")
                }
            }
        }
        self.stop.cancel();
        for task in self.background {
            let _ = task.await;
        }
        self.presence.stop().await;
        for (completer, task) in self.completers {
            drop(completer);
            let _ = task.await;
        }
        tracing::info!(process = %self.lease.id(), "job engine stopped");
    }
}

/// Wakes the worker of each kind NOTIFY names and cancels attempts operators cancelled. After a lost
/// connection (or a lagging receiver) every worker is woken, since notifications were missed.
async fn dispatch(
    mut heard: tokio::sync::broadcast::Receiver<Heard>,
    signals: HashMap<&'static str, Arc<KindSignal>>,
    attempts: Arc<Attempts>,
    stop: CancellationToken,
) {
    let wake_all = || signals.values().for_each(|s| s.notify());
    loop {
        let received = tokio::select! {
            () = stop.cancelled() => return,
            received = heard.recv() => received,
        };
        match received {
            Ok(Heard::Notice { channel, payload }) if &*channel == store::NOTIFY_CHANNEL => {
                if let Some(signal) = signals.get(&*payload) {
                    signal.notify();
                }
            }
            Ok(Heard::Notice { channel, payload }) if &*channel == store::CANCEL_CHANNEL => {
                if let Some((id, attempt)) = payload
                    .split_once(':')
                    .and_then(|(id, attempt)| Some((id.parse().ok()?, attempt.parse().ok()?)))
                {
                    attempts.cancel(id, attempt);
                }
            }
            Ok(Heard::Notice { .. }) => {}
            Ok(Heard::Connected | Heard::Lost) | Err(RecvError::Lagged(_)) => wake_all(),
            Err(RecvError::Closed) => return,
        }
    }
}

/// Calls a kind's handler with its arguments and a [`JobContext`].
struct HandlerService<J, S, H> {
    handler: H,
    state: S,
    pool: PgPool,
    redis: Option<RedisJobs>,
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
            pool: self.pool.clone(),
            redis: self.redis.clone(),
            cancel: claim.cancel,
        };
        (self.handler)(task.args, context).boxed()
    }
}
