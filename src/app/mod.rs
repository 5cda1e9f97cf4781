//! The composition root: finds the database, applies migrations, and runs the roles this process was asked
//! for (API, workers, scheduler) until one shutdown token is cancelled; then stops them in order.
//!
//! Everything is built here and handed down; no other room reads the environment or spawns the roles.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::backoff::{Backoff, Retries};
use crate::config::Settings;
use crate::crypto::Keyring;
use crate::domain::Provider;
use crate::jobs::engine::job_store::route_to_redis;
use crate::jobs::{self, engine::Runtime, engine::RuntimeHandle, engine::Scheduler};
use crate::registry::Registry;
use crate::store;
use crate::store::listen::Hub;
use crate::store::redis_jobs::RedisJobs;

mod embedded_default;

pub use embedded_default::{Database, open_database};
use embedded_default::{with_development_key, with_development_token, with_embedding_fallback};

/// Which roles a process runs.
#[derive(Debug, Clone)]
pub struct Roles {
    /// Serve the HTTP API.
    pub api: bool,
    /// Run job workers.
    pub worker: bool,
    /// A scheduler process (schedules are fired by every role when RUN_SCHEDULER=true; this only says
    /// that firing them is the process's whole point).
    pub scheduler: bool,
    /// Limit workers to these queues (all when `None`).
    pub queues: Option<Vec<String>>,
}

impl Roles {
    /// API, workers and scheduler in one process.
    pub fn all() -> Self {
        Self {
            api: true,
            worker: true,
            scheduler: true,
            queues: None,
        }
    }
}

/// Why the process could not run; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The configuration is unusable (exit 78).
    #[error("{0}")]
    Config(String),
    /// A dependency is missing or unreachable (exit 69).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else (exit 70).
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl AppError {
    /// The process exit code, after sysexits.h.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Config(_) => 78,
            AppError::Unavailable(_) => 69,
            AppError::Other(_) => 70,
        }
    }
}

/// Applies migrations, retrying while the database is unreachable (until `shutdown`); a migration that
/// fails on a reachable database is an error.
async fn migrate_when_reachable(
    pool: &PgPool,
    shutdown: &CancellationToken,
) -> Result<bool, AppError> {
    let mut retries =
        Backoff::doubling(Duration::from_millis(500), Duration::from_secs(10)).retries();
    loop {
        // Waiting for a connection can take the pool's whole acquire timeout; shutdown must not wait for it.
        let attempt = tokio::select! {
            () = shutdown.cancelled() => return Ok(false),
            attempt = store::migrate(pool) => attempt,
        };
        let wait = match attempt {
            Ok(()) => return Ok(true),
            Err(sqlx::migrate::MigrateError::Execute(sqlx::Error::Io(err))) => {
                let wait = retries.failed();
                tracing::warn!(%err, retry_in = ?wait, "database unreachable; will apply migrations when it answers");
                wait
            }
            Err(sqlx::migrate::MigrateError::Execute(sqlx::Error::PoolTimedOut)) => {
                let wait = retries.failed();
                tracing::warn!(retry_in = ?wait, "database unreachable (timed out); will apply migrations when it answers");
                wait
            }
            Err(err) => {
                return Err(AppError::Other(anyhow::anyhow!(
                    "applying migrations failed: {err}"
                )));
            }
        };
        if Retries::sleep(wait, shutdown).await {
            return Ok(false);
        }
    }
}

/// The roles that run after migrations: the job engine (in every process: its presence and upkeep, and the
/// workers when asked for), the scheduler, and (with the API) the Pub/Sub subscribers.
#[derive(Default)]
struct Background {
    engine: Option<RuntimeHandle>,
    scheduler: Option<JoinHandle<()>>,
    schedule_stop: CancellationToken,
    subscribers: Option<JoinHandle<()>>,
    subscribers_stop: CancellationToken,
}

impl Background {
    /// Starts what `roles` asks for; on error, whatever did start is still stopped by [`Background::stop`].
    async fn start(
        &mut self,
        deps: &jobs::Deps,
        settings: &Settings,
        roles: &Roles,
        hub: &Arc<Hub>,
        redis: Option<RedisJobs>,
    ) -> Result<(), AppError> {
        let pool = &deps.pool;
        let embeds = roles
            .queues
            .as_ref()
            .is_none_or(|q| q.iter().any(|q| q == jobs::embed_node::QUEUE));
        if roles.worker && embeds {
            // Load the model now: a worker that cannot embed should say so at start, not on its first job.
            deps.embeddings
                .batcher()
                .await
                .map_err(|e| AppError::Config(format!("the embedder does not start: {e}")))?;
        }
        // Every role fires schedules when RUN_SCHEDULER=true (each tick fires once across replicas), as
        // the guide's API deployment does for the purger.
        let fires_schedules = settings.jobs.run_scheduler;
        let mut names = Vec::new();
        if roles.api {
            names.push("api");
        }
        if roles.worker {
            names.push("worker");
        }
        if fires_schedules {
            names.push("scheduler");
        }
        // Every process registers, heartbeats and does the engine's upkeep (rescue, pruning), so no split
        // of roles or queues can leave it undone.
        let mut runtime = Runtime::new(pool.clone(), settings.jobs.clone());
        runtime.hub(hub.clone()).roles(&names);
        if let Some(jobs) = &redis {
            runtime.redis(jobs.clone());
        }
        jobs::chores(&mut runtime, redis);
        if roles.worker {
            jobs::register(&mut runtime, deps, roles.queues.as_deref());
        }
        let handle = runtime
            .start()
            .await
            .map_err(|e| AppError::Other(anyhow::anyhow!("starting the job engine: {e}")))?;
        self.engine = Some(handle);
        if fires_schedules {
            let mut schedules = Scheduler::new(pool.clone());
            jobs::schedule(&mut schedules, settings);
            tracing::info!(schedules = ?schedules.schedules(), "scheduler running");
            let running = schedules
                .start(self.schedule_stop.clone())
                .await
                .map_err(|e| AppError::Other(anyhow::anyhow!("starting the scheduler: {e}")))?;
            self.scheduler = Some(running);
        } else if roles.scheduler {
            tracing::warn!(
                "RUN_SCHEDULER=false: this scheduler process fires no schedules (it only does the job engine's upkeep)"
            );
        } else {
            tracing::info!("RUN_SCHEDULER=false: this process fires no schedules");
        }
        Ok(())
    }

    /// Pulls the Pub/Sub subscriptions GCS connectors name, where the API runs (as the guide's deployment
    /// expects), unless `PUBSUB_SUBSCRIBER_ENABLED=false`.
    fn start_subscribers(&mut self, deps: &jobs::Deps, settings: &Settings, state: &ApiState) {
        let settings = crate::workflows::subscriber::SubscriberSettings {
            check_every: settings.webhooks.pubsub_tcp_keepalive,
            max_backoff: settings.webhooks.pubsub_reconnect_max,
        };
        self.subscribers = Some(crate::workflows::subscriber::spawn(
            deps.pool.clone(),
            deps.registry.clone(),
            settings,
            state.subscriptions.clone(),
            self.subscribers_stop.clone(),
        ));
    }

    /// Stops the subscribers and the scheduler, then the workers (which finish or hand back their jobs).
    async fn stop(self) {
        self.subscribers_stop.cancel();
        if let Some(subscribers) = self.subscribers {
            let _ = subscribers.await;
        }
        self.schedule_stop.cancel();
        if let Some(scheduler) = self.scheduler {
            let _ = scheduler.await;
        }
        if let Some(engine) = self.engine {
            engine.shutdown().await;
        }
    }
}

/// Runs `roles` against `pool` until `shutdown`. The API (when asked for) serves on `listener` from the
/// start, answering `/readyz` with 503 until migrations are applied.
pub async fn run(
    settings: Arc<Settings>,
    pool: PgPool,
    roles: Roles,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let kek = settings.connectors.kek.as_ref().ok_or_else(|| {
        AppError::Config(
            "CONNECTOR_KEK_V1 is missing: connector secrets cannot be encrypted".to_owned(),
        )
    })?;
    let keyring = Keyring::new(kek).map_err(AppError::Config)?;
    // Before anything can enqueue: every enqueue in this process reads the routing.
    route_to_redis(if settings.jobs.redis.is_some() {
        jobs::REDIS_QUEUES
    } else {
        &[]
    });
    // Before anything reads a queue: the counts, the caps and the workers all need the jobs in Redis.
    let redis = connect_redis(&settings, &pool).await?;
    let registry = Arc::new(Registry::confined(
        pool.clone(),
        Arc::new(keyring),
        crate::connectors::config::Confinement {
            local_roots: settings.connectors.local_roots.clone(),
            endpoints: settings.connectors.endpoints.clone(),
            production: settings.database.production,
        },
    ));
    // One LISTEN connection for the process, outside the pool: job wake-ups, cancels, config changes.
    let listener_stop = CancellationToken::new();
    let mut channels = jobs::engine::runtime::CHANNELS.to_vec();
    channels.push(store::connectors::NOTIFY_CHANNEL);
    let (hub, hub_task) = store::listen::spawn(&pool, &channels, listener_stop.clone());
    let config_listener = registry.follow_changes(hub.clone(), listener_stop.clone());
    let deps = jobs::Deps {
        pool: pool.clone(),
        settings: settings.jobs.clone(),
        registry: registry.clone(),
        sources: Arc::default(),
        max_file_bytes: settings.connectors.max_file_size_bytes,
        extractor: Arc::new(extractor(&settings)?),
        sns: Arc::new(crate::webhooks::sns::CertFetcher::new(
            settings.webhooks.sns_cert_base_url.clone(),
        )),
        embeddings: Arc::new(crate::embedding::Service::new(settings.embedding.clone())),
        embedding_caps: jobs::embed_node::Caps {
            tenant: settings.embedding.tenant_max_pending,
            total: settings.embedding.max_pending,
            redis: redis.clone(),
        },
    };
    let mut state = ApiState::new(
        pool.clone(),
        settings.clone(),
        registry,
        deps.embeddings.clone(),
    );
    state.redis_probe = redis.as_ref().map(store::probe::Probe::spawn_redis);
    state.redis_jobs = redis.clone();
    let server = match (roles.api, listener) {
        (true, Some(listener)) => {
            let addr: Option<SocketAddr> = listener.local_addr().ok();
            tracing::info!(?addr, "API listening; docs at /docs");
            if settings.api.admin_token.is_none() && !settings.api.admin_auth_disabled {
                tracing::warn!(
                    "the admin API (/_admin/*) is disabled: set ADMIN_TOKEN (e.g. `export ADMIN_TOKEN=$(openssl rand -hex 32)`) \
                     or, for local development only, ACTIVEKG_ADMIN_AUTH_DISABLED=true"
                );
            }
            let router = api::router(state.clone());
            let token = shutdown.clone();
            let limits = server_limits(&settings);
            Some(tokio::spawn(async move {
                api::serve(listener, router, token, limits).await
            }))
        }
        (true, None) => {
            return Err(AppError::Other(anyhow::anyhow!(
                "the API role needs a listener"
            )));
        }
        (false, Some(listener)) => {
            let addr: Option<SocketAddr> = listener.local_addr().ok();
            tracing::info!(?addr, "serving /metrics, /health and /readyz");
            let router = api::probes_router(state.clone());
            let token = shutdown.clone();
            let limits = server_limits(&settings);
            Some(tokio::spawn(async move {
                api::serve(listener, router, token, limits).await
            }))
        }
        (false, None) => None,
    };

    let mut background = Background::default();
    let outcome = match migrate_when_reachable(&pool, &shutdown).await {
        Ok(true) => {
            let index = store::embeddings::prepare(&pool).await;
            match &index {
                store::embeddings::VectorIndex::Hnsw => {
                    tracing::info!("vector search uses pgvector's HNSW index")
                }
                store::embeddings::VectorIndex::Exact(why) => {
                    tracing::warn!(reason = %why, "vector search is exact (slower on large tenants)");
                }
            }
            let _ = state.vector_index.set(index);
            // Before readiness, so the first scrape a load balancer lets through has every series.
            preset_metrics(&deps.registry).await;
            state.migrated.store(true, Ordering::SeqCst);
            tracing::info!("database schema is up to date");
            if roles.api && settings.webhooks.pubsub_subscriber {
                background.start_subscribers(&deps, &settings, &state);
            }
            background
                .start(&deps, &settings, &roles, &hub, redis.clone())
                .await
        }
        Ok(false) => Ok(()),
        Err(err) => Err(err),
    };
    if outcome.is_ok() {
        shutdown.cancelled().await;
    } else {
        shutdown.cancel();
    }
    tracing::info!("shutting down");
    background.stop().await;
    listener_stop.cancel();
    let _ = config_listener.await;
    let _ = hub_task.await;
    if let Some(server) = server {
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(%err, "the API server stopped with an error"),
            Err(err) => tracing::warn!(%err, "the API server task failed"),
        }
    }
    outcome
}

/// Resolves the database, runs `roles` until SIGINT/SIGTERM (or `shutdown`), then closes everything.
pub async fn run_process(
    settings: Settings,
    roles: Roles,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let settings = Arc::new(settings);
    // Without the API, a process still answers /metrics, /health and /readyz, so its counters (ingest,
    // embedding, purger) can be scraped and its liveness probed.
    let (address, variable) = if roles.api {
        (settings.api.listen, "ACTIVEKG_LISTEN")
    } else {
        (settings.api.metrics_listen, "ACTIVEKG_METRICS_LISTEN")
    };
    let listener = Some(TcpListener::bind(address).await.map_err(|e| {
        AppError::Unavailable(format!("cannot listen on {address} ({variable}): {e}"))
    })?);
    let database = open_database(&settings).await?;
    let settings = with_development_key(settings)?;
    let settings = if roles.api {
        with_development_token(settings)?
    } else {
        settings
    };
    let settings = with_embedding_fallback(settings)?;
    if settings.jobs.redis_url_unused {
        tracing::warn!(
            "REDIS_URL is set but has no effect: ACTIVEKG_JOBS_BACKEND=postgres keeps every queue in PostgreSQL (set ACTIVEKG_JOBS_BACKEND=redis to use it, or unset it)"
        );
    }
    let e = &settings.embedding;
    tracing::info!(
        "embedder: {} ({}); switch with EMBEDDING_BACKEND=local|openai|hash (local needs `activekg fetch-model`)",
        e.backend.as_str(),
        e.model
    );
    let pool = store::pool(&database.url, settings.database.pool_size).map_err(|e| {
        AppError::Config(format!("ACTIVEKG_DSN is not a usable PostgreSQL URL: {e}"))
    })?;
    let result = run(settings, pool.clone(), roles, listener, shutdown).await;
    pool.close().await;
    database.close().await;
    result
}

/// Zero series for every label value known at start-up, including each configured connector's tenant, so
/// every metric the alerts and dashboards query is there from the first scrape.
async fn preset_metrics(registry: &Registry) {
    let providers: Vec<&str> = Provider::ALL.iter().map(|p| p.as_str()).collect();
    let secret_fields: Vec<(&str, &str)> = Provider::ALL
        .iter()
        .flat_map(|p| {
            crate::connectors::config::secret_fields(*p)
                .iter()
                .map(move |field| (p.as_str(), *field))
        })
        .collect();
    let tenants = match registry.summaries(None, None).await {
        Ok(connectors) => connectors
            .into_iter()
            .map(|c| (c.tenant_id, c.provider.as_str().to_owned()))
            .collect(),
        Err(err) => {
            tracing::warn!(%err, "cannot list connectors: their per-tenant metrics appear with their first event");
            Vec::new()
        }
    };
    crate::metrics::metrics().preset(&crate::metrics::Known {
        kinds: jobs::KINDS,
        providers: &providers,
        schedules: jobs::SCHEDULES,
        secret_fields: &secret_fields,
        tenants: &tenants,
    });
}

fn server_limits(settings: &Settings) -> api::ServerLimits {
    api::ServerLimits {
        max_connections: settings.api.http_max_connections as usize,
        header_timeout: settings.api.http_header_timeout,
        body_timeout: settings.api.http_body_timeout,
        request_timeout: settings.api.http_request_timeout,
    }
}

/// Extraction runs in child processes of this very binary (or of `ACTIVEKG_EXTRACTOR`).
fn extractor(settings: &Settings) -> Result<crate::extract::sandbox::Sandbox, AppError> {
    let program = match &settings.connectors.extract.program {
        Some(program) => program.clone(),
        None => std::env::current_exe().map_err(|e| {
            AppError::Unavailable(format!(
                "cannot find this binary to run extractions with ({e}); set ACTIVEKG_EXTRACTOR"
            ))
        })?,
    };
    Ok(crate::extract::sandbox::Sandbox::new(
        program,
        crate::extract::sandbox::Limits {
            memory_mb: u64::from(settings.connectors.extract.memory_mb),
            cpu_seconds: u64::from(settings.connectors.extract.cpu_seconds),
            wall: settings.connectors.extract.timeout,
        },
    ))
}

/// Cancels `token` on SIGINT or SIGTERM; a second signal exits at once.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: finishing in-flight work (send it again to exit at once)");
        token.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// The connector and embedding queues' store, when `ACTIVEKG_JOBS_BACKEND=redis` puts them in Redis.
pub async fn connect_redis(
    settings: &Settings,
    pool: &PgPool,
) -> Result<Option<RedisJobs>, AppError> {
    let Some(redis) = &settings.jobs.redis else {
        return Ok(None);
    };
    RedisJobs::connect(redis.url.expose(), &redis.prefix)
        .await
        .map(|jobs| Some(jobs.mirror_moves(pool.clone(), jobs::MIRRORED_KINDS)))
        .map_err(|e| AppError::Unavailable(format!("ACTIVEKG_JOBS_BACKEND=redis: {e}")))
}
