//! The integration tests: one binary, each test on its own database, against the real PostgreSQL.

// Helpers are `pub` for sibling modules; this binary exports nothing.
#![allow(unreachable_pub)]

mod helpers;
mod kinds;

mod children;
mod cli;
mod connectors_api;
mod connectors_conformance;
mod contract;
mod dashboard;
mod deploy;
mod embedded;
mod embeddings;
mod emulators;
mod engine_edges;
mod engine_faults;
mod exposure;
mod extract;
mod fixtures;
mod gate;
mod hostile;
mod http_shell;
mod ingestion;
mod jobs_admin_api;
mod jobs_backends;
mod jobs_crash;
mod jobs_engine;
mod jobs_redis;
mod jobs_schedule;
mod migrations;
mod netsplit;
mod observability;
mod ordering;
mod polling;
mod purger;
mod reply_loss;
mod rotation;
mod runbook;
mod server_limits;
mod subscriber;
mod webhooks;
