//! The verbs' bodies: each command runs the process's roles through `app`, or does its one-shot job (print the
//! spec, make a key, fetch the model, migrate, inspect and steer jobs) with the same code the HTTP API uses.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{Command, JobsAction};
use crate::api;
use crate::app::{self, AppError, Roles};
use crate::config::Settings;
use crate::jobs;
use crate::store;

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
        Command::Env => {
            println!("{}", crate::config::vars::markdown());
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
    app::cancel_on_signals(shutdown.clone());
    app::run_process(settings, roles, shutdown).await
}

/// Opens the database for a one-shot command (failing fast when unreachable) and runs `f` with it.
async fn with_database<F, Fut>(settings: &Settings, f: F) -> Result<(), AppError>
where
    F: FnOnce(PgPool) -> Fut,
    Fut: std::future::Future<Output = Result<(), AppError>>,
{
    let database = app::open_database(settings).await?;
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
    let redis = app::connect_redis(&settings, &pool).await?;
    let stores = admin::Stores {
        pool: &pool,
        redis: redis.as_ref(),
    };
    match action {
        JobsAction::Queues => {
            let overview = stats::overview(&pool, redis.as_ref(), settings.jobs.orphan_timeout)
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
            let (jobs, _) = admin::list(stores, &filter, None, limit)
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
            let job = admin::get(stores, JobId(id)).await.map_err(fail)?;
            println!("{job:#?}");
        }
        JobsAction::Retry { id } => {
            let job = admin::retry(stores, JobId(id)).await.map_err(fail)?;
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
            let count = admin::cancel_waiting(stores, &filter, all, admin::MAX_BULK, dry_run)
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
            let replayed = admin::replay_dead(stores, &filter, all, admin::MAX_BULK)
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
