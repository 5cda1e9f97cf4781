//! Whether the database (and Redis, when jobs live there) answers, as this process sees it: checked in the
//! background over a connection of its own, once a second, and read from memory by health checks. A flood
//! of `/health` requests costs no pool connection, and health answers at once even while a store hangs.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sqlx::PgPool;

/// The last check's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Reachability {
    /// Whether `SELECT 1` answered within the probe timeout.
    pub reachable: bool,
    /// How long it took.
    pub latency: Option<Duration>,
    /// What went wrong, in words that reveal nothing about the deployment (details are logged).
    pub failure: Option<&'static str>,
    /// When the check finished; `None` before the first one.
    pub checked_at: Option<Instant>,
}

/// See the module docs.
#[derive(Debug)]
pub struct Probe {
    last: Mutex<Reachability>,
}

/// Checks this often.
const EVERY: Duration = Duration::from_secs(1);
/// A check slower than this counts as a failure.
const TIMEOUT: Duration = Duration::from_millis(800);

impl Probe {
    /// Starts checking `pool`'s database; the checks stop when the probe is dropped.
    pub fn spawn(pool: &PgPool) -> Arc<Self> {
        let pool = super::dedicated_pool(pool, 1);
        Self::start("the database", move || {
            let pool = pool.clone();
            async move {
                sqlx::query("SELECT 1")
                    .execute(&pool)
                    .await
                    .map(drop)
                    .map_err(|err| (describe(&err), err.to_string()))
            }
        })
    }

    /// Starts checking Redis (`PING` over the jobs' own connection, which reconnects by itself).
    pub fn spawn_redis(redis: &crate::store::redis_jobs::RedisJobs) -> Arc<Self> {
        let redis = redis.clone();
        Self::start("Redis", move || {
            let redis = redis.clone();
            async move {
                redis
                    .ping()
                    .await
                    .map_err(|err| ("unreachable", err.to_string()))
            }
        })
    }

    fn start<F, Fut>(what: &'static str, ping: F) -> Arc<Self>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), (&'static str, String)>> + Send + 'static,
    {
        let probe = Arc::new(Self {
            last: Mutex::new(Reachability {
                reachable: false,
                latency: None,
                failure: Some("not checked yet"),
                checked_at: None,
            }),
        });
        tokio::spawn(check(Arc::downgrade(&probe), what, ping));
        probe
    }

    /// The last check, unless it is stale (the checker itself is stuck), in which case unreachable.
    pub fn reachability(&self) -> Reachability {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match last.checked_at {
            Some(at) if at.elapsed() > EVERY * 5 => Reachability {
                reachable: false,
                failure: Some("no answer"),
                ..last
            },
            _ => last,
        }
    }
}

async fn check<F, Fut>(probe: Weak<Probe>, what: &'static str, ping: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), (&'static str, String)>>,
{
    let mut ticker = tokio::time::interval(EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_reachable = true;
    loop {
        ticker.tick().await;
        let Some(probe) = probe.upgrade() else {
            return;
        };
        let started = Instant::now();
        let outcome = match tokio::time::timeout(TIMEOUT, ping()).await {
            Ok(Ok(())) => Reachability {
                reachable: true,
                latency: Some(started.elapsed()),
                failure: None,
                checked_at: Some(Instant::now()),
            },
            Ok(Err((failure, err))) => {
                if was_reachable {
                    tracing::warn!(%err, "{what} does not answer");
                }
                Reachability {
                    reachable: false,
                    latency: None,
                    failure: Some(failure),
                    checked_at: Some(Instant::now()),
                }
            }
            Err(_) => {
                if was_reachable {
                    tracing::warn!(timeout = ?TIMEOUT, "{what} does not answer in time");
                }
                Reachability {
                    reachable: false,
                    latency: None,
                    failure: Some("no answer in time"),
                    checked_at: Some(Instant::now()),
                }
            }
        };
        if outcome.reachable && !was_reachable {
            tracing::info!("{what} answers again");
        }
        was_reachable = outcome.reachable;
        *probe.last.lock().unwrap_or_else(|e| e.into_inner()) = outcome;
    }
}

fn describe(err: &sqlx::Error) -> &'static str {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => "unreachable",
        sqlx::Error::Tls(_) => "TLS failed",
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01" | "28000") => "refused our credentials",
            Some("3D000") => "the database does not exist",
            Some("57P03") => "starting up or shutting down",
            _ => "answers with an error",
        },
        _ => "unreachable",
    }
}
