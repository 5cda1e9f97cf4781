//! When this test binary is re-run as a child process (see `helpers::spawn_child`), this "test" becomes the
//! child's main: a job worker or a scheduler against the parent's database, until killed or done.

use std::time::Duration;

use activekg::jobs::engine::schedule::CronExpr;
use activekg::jobs::engine::{Runtime, Scheduler};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::helpers::fast_job_settings;
use crate::kinds::{Tick, run_probe, run_tally};

#[tokio::test]
#[ignore = "only runs as a child process started by another test"]
async fn child_process_entry() {
    let (Ok(role), Ok(db)) = (
        std::env::var("ACTIVEKG_CHILD_ROLE"),
        std::env::var("ACTIVEKG_CHILD_DB"),
    ) else {
        return;
    };
    crate::helpers::init_tracing();
    let pool = PgPool::connect(&db).await.unwrap();
    match role.as_str() {
        "worker" => {
            let mut settings = fast_job_settings();
            if let Ok(ms) = std::env::var("ACTIVEKG_CHILD_ORPHAN_TIMEOUT_MS") {
                settings.orphan_timeout = Duration::from_millis(ms.parse().unwrap());
            }
            let mut runtime = Runtime::new(pool.clone(), settings);
            // "<url> <prefix>": the test queue lives in that Redis.
            if let Ok(redis) = std::env::var("ACTIVEKG_CHILD_REDIS") {
                let (url, prefix) = redis.split_once(' ').unwrap();
                activekg::jobs::engine::job_store::route_to_redis(&["test"]);
                runtime.redis(
                    activekg::store::redis_jobs::RedisJobs::connect(url, prefix)
                        .await
                        .unwrap(),
                );
            }
            runtime.register(pool.clone(), run_probe);
            runtime.register(pool.clone(), run_tally);
            let handle = runtime.start().await.unwrap();
            println!("READY {}", handle.worker_id());
            // Runs until the parent kills us (or a job aborts the process).
            std::future::pending::<()>().await;
        }
        "scheduler" => {
            let seconds: u64 = std::env::var("ACTIVEKG_CHILD_SECONDS")
                .unwrap()
                .parse()
                .unwrap();
            let mut scheduler = Scheduler::new(pool.clone());
            let every_second: CronExpr = "* * * * * *".parse().unwrap();
            scheduler.add("test.every_second", every_second, |tick| Tick { tick });
            let stop = CancellationToken::new();
            let started_at = chrono::Utc::now();
            let running = scheduler.start(stop.clone()).await.unwrap();
            println!("READY {}", started_at.to_rfc3339());
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            stop.cancel();
            running.await.unwrap();
            let fired = activekg::metrics::metrics()
                .schedule_ticks_fired
                .with_label_values(&["test.every_second"])
                .get();
            println!("FIRED {fired}");
        }
        "rotator" => {
            let registry = std::sync::Arc::new(activekg::registry::Registry::new(
                pool.clone(),
                std::sync::Arc::new(crate::helpers::keyring(
                    &[(1, crate::helpers::KEK), (2, crate::rotation::KEK_V2)],
                    2,
                )),
            ));
            let mut runtime = Runtime::new(pool.clone(), fast_job_settings());
            let deps = activekg::jobs::rotate_keys::Deps {
                pool: pool.clone(),
                registry,
            };
            runtime.register(deps, activekg::jobs::rotate_keys::run);
            let handle = runtime.start().await.unwrap();
            println!("READY {}", handle.worker_id());
            std::future::pending::<()>().await;
        }
        other => panic!("unknown child role {other}"),
    }
}
