//! activekg keeps a knowledge graph in sync with documents in cloud storage. Every step is a durable job in
//! PostgreSQL, run by apalis workers, behind an OpenAPI-documented admin API.
//!
//! The map, top to bottom (dependencies point down only):
//!
//! - [`cli`]: the command line (`serve`, `api`, `worker`, `scheduler`, `migrate`, `openapi`, admin verbs) and
//!   the verbs' bodies.
//! - [`app`]: composition root: migrations, and the roles (API, workers, scheduler) of a process; what the
//!   zero-configuration default fills in (database, development secrets, model-free embedder).
//! - [`api`]: HTTP resources, OpenAPI and Swagger UI, auth, the one JSON error shape.
//! - [`workflows`]: flows across rooms: verified storage events (pushed, or pulled from Pub/Sub) to committed
//!   ingest jobs; nodes under the embedding caps; embedding status, requeue and search.
//! - [`jobs`]: the durable job engine ([`jobs::engine`]) and one file per job kind.
//! - [`registry`]: tenants' connector configurations: validated, sealed at rest, redacted, cached.
//! - [`store`]: all SQL: the pool, migrations, and queries per table family; the embedded database default.
//! - [`connectors`]: per-provider configuration and the object sources (S3, GCS, local folder).
//! - [`embedding`]: text to vectors: local all-MiniLM-L6-v2 (candle), OpenAI-compatible APIs, feature
//!   hashing; the batcher that groups concurrent requests into model calls.
//! - [`extract`]: text from PDF, DOCX, HTML, Markdown, text, JSON, CSV; chunks sized to the model's window.
//! - [`webhooks`]: SNS and Pub/Sub push parsing and verification (signatures, tokens, OIDC).
//! - [`crypto`]: the versioned Fernet keyring, sealed fields, rotation as a pure function.
//! - [`domain`]: pure types: ids, providers, states.
//! - [`config`], [`error`], [`metrics`], [`backoff`]: settings from the environment, the error taxonomy, every
//!   metric, the one shape of waiting between tries.

#![warn(missing_docs)]

pub mod api;
pub mod app;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod connectors;
pub mod crypto;
pub mod domain;
pub mod embedding;
pub mod error;
pub mod extract;
pub mod jobs;
pub mod metrics;
pub mod registry;
pub mod store;
pub mod webhooks;
pub mod workflows;
