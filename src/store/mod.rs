//! The only room that speaks SQL: the connection pool, migrations, and one file per table family.
//!
//! Functions take an executor or a transaction so callers decide what is atomic. No HTTP or apalis here.

pub mod backfill;
pub mod connectors;
pub mod embedded;
pub mod embeddings;
pub mod graph;
pub mod jobs;
pub mod listen;
pub mod nodes;
pub mod polls;
pub mod probe;
pub mod redis_jobs;
pub mod webhooks;

use std::str::FromStr;
use std::time::{Duration, Instant};

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

/// Our schema, from `migrations/`. Its history lives in `public._sqlx_migrations`; apalis-postgres keeps its
/// own in `apalis._sqlx_migrations`, so the two migrators never see each other's versions.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Opens a pool. Connections identify as `application_name = 'activekg'`, which the runbook's
/// `pg_stat_activity` queries filter on.
///
/// The server is asked to notice vanished clients within minutes, not TCP's two hours: a worker cut off in
/// the middle of a transaction holds its job's claim lock (see `jobs::hold_claim`), and its job can only be
/// taken back once the server has dropped that session.
pub fn pool(url: &str, size: u32) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?
        .application_name("activekg")
        .options([
            ("idle_in_transaction_session_timeout", "300s"),
            ("tcp_keepalives_idle", "60"),
            ("tcp_keepalives_interval", "10"),
            ("tcp_keepalives_count", "6"),
        ])
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));
    Ok(PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options))
}

/// A small pool of its own with `pool`'s connection settings, for work that must not wait behind the shared
/// pool (heartbeats, LISTEN) nor take connections from it.
pub fn dedicated_pool(pool: &PgPool, size: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with((*pool.connect_options()).clone())
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Whether every migration this binary knows is applied.
pub async fn migrations_applied(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await
            .or_else(|err| match &err {
                // No migrations table yet: nothing applied.
                sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => {
                    Ok(Vec::new())
                }
                _ => Err(err),
            })?;
    Ok(MIGRATOR.iter().all(|m| applied.contains(&m.version)))
}

/// Round-trips a trivial query; returns how long it took.
pub async fn ping(pool: &PgPool) -> Result<Duration, sqlx::Error> {
    let started = Instant::now();
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(started.elapsed())
}
