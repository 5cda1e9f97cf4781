//! This process's presence in the engine: its `job_workers` row, kept fresh by a heartbeat over a connection
//! of its own, and the lease that row stands for.
//!
//! Other processes may take back this process's jobs once it has been silent for the orphan timeout `T`
//! (and they themselves were in touch all along; see `store::jobs::rescue_orphans`). So a process that has
//! not managed a heartbeat for most of `T` fences itself first: it cancels its running attempts (through
//! each attempt's cancellation token) and stops claiming, until a heartbeat succeeds again. Its effects are
//! fenced besides (an attempt's transaction checks the claim), so even a process frozen past `T` (SIGSTOP,
//! a VM pause) cannot commit work that now belongs to another.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::backend::KindSignal;
use crate::metrics::metrics;
use crate::store::jobs::{self as store, ProcessInfo};

/// The heartbeat's rhythm, all derived from the orphan timeout `T`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// How often to heartbeat (and how long one beat may take): `T/5`.
    pub beat: Duration,
    /// A silence longer than this breaks the unbroken-heartbeat clock: `T/2`.
    pub gap: Duration,
    /// Fence after this long without a successful beat: `0.6 T`, well before anyone may rescue at `T`.
    pub fence_after: Duration,
}

impl Timing {
    /// The rhythm for orphan timeout `orphan_timeout`.
    pub fn new(orphan_timeout: Duration) -> Self {
        Self {
            beat: (orphan_timeout / 5).max(Duration::from_millis(100)),
            gap: orphan_timeout / 2,
            fence_after: orphan_timeout.mul_f64(0.6),
        }
    }
}

#[derive(Debug)]
struct Inner {
    id: Arc<str>,
    fenced: AtomicBool,
    /// Cancelled when the process fences itself; replaced by a fresh one when it recovers. Every attempt's
    /// token is a child of the epoch it started in.
    epoch: Mutex<CancellationToken>,
    /// Workers to wake when the process recovers, so they claim again at once.
    wake_on_restore: Mutex<Vec<Arc<KindSignal>>>,
    /// Times this process fenced itself.
    fences: AtomicU64,
}

/// A cheap handle on this process's lease.
#[derive(Debug, Clone)]
pub struct Lease {
    inner: Arc<Inner>,
}

impl Lease {
    /// A lease that does not hold yet: the process claims nothing until its first heartbeat (which also
    /// registers it) reaches the database.
    fn new(id: Arc<str>) -> Self {
        let epoch = CancellationToken::new();
        epoch.cancel();
        Self {
            inner: Arc::new(Inner {
                id,
                fenced: AtomicBool::new(true),
                epoch: Mutex::new(epoch),
                wake_on_restore: Mutex::new(Vec::new()),
                fences: AtomicU64::new(0),
            }),
        }
    }

    /// The process id (as stored in `jobs.locked_by`).
    pub fn id(&self) -> &Arc<str> {
        &self.inner.id
    }

    /// Whether the process is fenced (out of touch with the database for most of the orphan timeout).
    pub fn is_fenced(&self) -> bool {
        self.inner.fenced.load(Ordering::SeqCst)
    }

    /// How many times the process fenced itself.
    pub fn fences(&self) -> u64 {
        self.inner.fences.load(Ordering::SeqCst)
    }

    /// A token for a new attempt: cancelled when the process fences itself (at once, if it is fenced now).
    pub fn attempt_token(&self) -> CancellationToken {
        self.inner
            .epoch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .child_token()
    }

    pub(super) fn wake_on_restore(&self, signal: Arc<KindSignal>) {
        self.inner
            .wake_on_restore
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(signal);
    }

    fn fence(&self, silent_for: Duration) {
        if self.inner.fenced.swap(true, Ordering::SeqCst) {
            return;
        }
        self.inner.fences.fetch_add(1, Ordering::SeqCst);
        metrics()
            .worker_fenced
            .with_label_values(&[] as &[&str])
            .inc();
        tracing::error!(process = %self.inner.id, ?silent_for,
            "no heartbeat reached the database for most of the orphan timeout: cancelling running attempts and \
             claiming nothing until it answers again (others may take these jobs back)");
        self.inner
            .epoch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cancel();
    }

    fn restore(&self) {
        if !self.inner.fenced.load(Ordering::SeqCst) {
            return;
        }
        *self.inner.epoch.lock().unwrap_or_else(|e| e.into_inner()) = CancellationToken::new();
        self.inner.fenced.store(false, Ordering::SeqCst);
        tracing::warn!(process = %self.inner.id, "heartbeats reach the database again: claiming jobs again");
        for signal in self
            .inner
            .wake_on_restore
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            signal.notify();
        }
    }
}

/// What a process registers as.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// Job kinds it runs.
    pub kinds: Vec<String>,
    /// What it does: `api`, `worker`, `scheduler`.
    pub roles: Vec<String>,
}

/// The registered process and its heartbeat.
#[derive(Debug)]
pub struct Presence {
    lease: Lease,
    pool: PgPool,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Presence {
    /// Starts this process's heartbeat (over a connection of its own, so a busy pool cannot starve it). The
    /// first beat registers the process; until it gets through (the database may be down at start) the
    /// lease does not hold and nothing is claimed.
    pub fn start(pool: &PgPool, identity: Identity, orphan_timeout: Duration) -> Self {
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let pid = std::process::id();
        let nonce: u32 = rand::random();
        let id: Arc<str> = format!("{host}:{pid}:{nonce:08x}").into();
        let dedicated = crate::store::dedicated_pool(pool, 1);
        let lease = Lease::new(id);
        let stop = CancellationToken::new();
        let task = tokio::spawn(heartbeat(
            dedicated.clone(),
            lease.clone(),
            host,
            identity,
            Timing::new(orphan_timeout),
            stop.clone(),
        ));
        Self {
            lease,
            pool: dedicated,
            stop,
            task,
        }
    }

    /// The lease.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Stops heartbeating and removes the process's row (call after its jobs are finished or handed back).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
        if let Err(err) = store::deregister_worker(&self.pool, self.lease.id()).await {
            tracing::warn!(%err, "could not remove the process row");
        }
        self.pool.close().await;
    }
}

async fn register(
    pool: &PgPool,
    id: &str,
    host: &str,
    identity: &Identity,
) -> crate::error::Result<()> {
    store::register_worker(
        pool,
        &ProcessInfo {
            id,
            host,
            pid: std::process::id() as i32,
            kinds: &identity.kinds,
            roles: &identity.roles,
            version: env!("CARGO_PKG_VERSION"),
        },
    )
    .await
}

async fn heartbeat(
    pool: PgPool,
    lease: Lease,
    host: String,
    identity: Identity,
    timing: Timing,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(timing.beat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Measured from when the last successful beat was *sent*: the database recorded it no earlier, so
    // fencing `fence_after` later on our clock is still well before `T` on the database's.
    let mut last_ok = Instant::now();
    let mut failures: u32 = 0;
    let mut registered = false;
    // The beat in flight, if any, with when it was sent. It runs beside the fence timer, so a beat that
    // hangs (a cut network) cannot delay the fence.
    let mut in_flight: Option<(Instant, futures::future::BoxFuture<'static, BeatResult>)> = None;
    loop {
        let fence_at = tokio::time::Instant::from_std(last_ok + timing.fence_after);
        let idle = in_flight.is_none();
        let beat = async {
            match in_flight.as_mut() {
                Some((_, beat)) => beat.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(fence_at), if !lease.is_fenced() => {
                lease.fence(last_ok.elapsed());
            }
            result = beat => {
                let (sent, _) = in_flight.take().expect("a beat was in flight");
                match result {
                    Ok(()) => {
                        last_ok = sent;
                        failures = 0;
                        registered = true;
                        lease.restore();
                    }
                    Err(why) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(25) {
                            tracing::warn!(failures, %why, "heartbeat failed");
                        }
                    }
                }
            }
            _ = ticker.tick(), if idle => {
                let (pool, lease, host, identity) =
                    (pool.clone(), lease.clone(), host.clone(), identity.clone());
                let gap = timing.gap;
                let beat = async move {
                    let attempt = async {
                        if !registered {
                            register(&pool, lease.id(), &host, &identity).await
                        } else if store::heartbeat(&pool, lease.id(), gap).await? {
                            Ok(())
                        } else {
                            tracing::warn!(process = %lease.id(), "process row was missing; registering again");
                            register(&pool, lease.id(), &host, &identity).await
                        }
                    };
                    match tokio::time::timeout(timing.beat, attempt).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(err)) => Err(err.to_string()),
                        Err(_) => Err(format!("no answer within {:?}", timing.beat)),
                    }
                };
                in_flight = Some((Instant::now(), Box::pin(beat)));
            }
        }
    }
}

type BeatResult = Result<(), String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_fences_itself_well_before_others_may_rescue_its_jobs() {
        let t = Duration::from_secs(30);
        let timing = Timing::new(t);
        assert_eq!(timing.beat, Duration::from_secs(6));
        assert_eq!(timing.gap, Duration::from_secs(15));
        assert_eq!(timing.fence_after, Duration::from_secs(18));
        // Even a beat that hangs for its whole timeout leaves the fence in place before `T`.
        assert!(timing.fence_after + timing.beat < t);
        // One failed beat does not break the unbroken-heartbeat clock; two do.
        assert!(timing.beat * 2 < timing.gap && timing.beat * 3 > timing.gap);
    }

    #[test]
    fn fencing_cancels_running_attempts_and_new_ones_until_restored() {
        let lease = Lease::new("p".into());
        assert!(
            lease.is_fenced(),
            "nothing is claimed before the first heartbeat"
        );
        lease.restore();
        let running = lease.attempt_token();
        lease.fence(Duration::from_secs(1));
        assert!(running.is_cancelled() && lease.is_fenced());
        assert!(lease.attempt_token().is_cancelled());
        lease.restore();
        assert!(!lease.is_fenced() && !lease.attempt_token().is_cancelled());
        assert_eq!(lease.fences(), 1);
    }
}
