//! Job engine benchmark: `cargo bench --bench jobs`.
//!
//! No-op jobs on the local PostgreSQL (fsync as configured, on by default), at batch sizes 10 and 100 and
//! concurrency 1, 8 and 32, for three engines in the same run:
//! - `activekg`: our engine (apalis workers over our `jobs` table);
//! - `apalis-postgres`: bare apalis-postgres 1.0 (default config but the batch size, NOTIFY via `with_pubsub`);
//! - `raw loop`: a hand-written `SELECT ... FOR UPDATE SKIP LOCKED` + `UPDATE` loop, the ceiling.
//!
//! Each cell reports drain throughput (a backlog of ACTIVEKG_BENCH_JOBS jobs, default 10000) and the
//! enqueue-to-start latency of single-job transactions offered at ACTIVEKG_BENCH_RATE jobs/s (default 200)
//! for ACTIVEKG_BENCH_SECONDS (default 3). ACTIVEKG_BENCH_BATCHES and ACTIVEKG_BENCH_CONCURRENCY (comma
//! lists) and ACTIVEKG_BENCH_SKIP_APALIS narrow the run. Server: ACTIVEKG_TEST_DATABASE_URL (default the local
//! one); a database `activekg_bench` is recreated there.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use activekg::config::JobSettings;
use activekg::jobs::engine::{self, Job, JobContext, JobError, Policy, Runtime};
use apalis::layers::WorkerBuilderExt;
use apalis::prelude::{TaskSink, WorkerBuilder, WorkerContext};
use apalis_postgres::{Config as ApalisConfig, PostgresStorage};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use tokio::sync::Mutex;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// What every engine's handler records.
#[derive(Default)]
struct Recorder {
    done: AtomicUsize,
    latencies_us: Mutex<Vec<u64>>,
}

impl Recorder {
    async fn record(&self, sent_us: u64) {
        self.latencies_us
            .lock()
            .await
            .push(now_us().saturating_sub(sent_us));
        self.done.fetch_add(1, Ordering::SeqCst);
    }

    async fn wait_for(&self, n: usize, limit: Duration) -> Duration {
        let started = Instant::now();
        while self.done.load(Ordering::SeqCst) < n {
            assert!(
                started.elapsed() < limit,
                "only {} of {n} jobs ran within {limit:?}",
                self.done.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        started.elapsed()
    }

    async fn reset(&self) {
        self.done.store(0, Ordering::SeqCst);
        self.latencies_us.lock().await.clear();
    }

    async fn percentiles(&self) -> (f64, f64, f64) {
        let mut l = self.latencies_us.lock().await.clone();
        l.sort_unstable();
        let at = |p: f64| l[((l.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0;
        (at(0.5), at(0.95), at(0.99))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Noop<const C: usize> {
    sent_us: u64,
}

impl<const C: usize> Job for Noop<C> {
    const KIND: &'static str = match C {
        1 => "bench_noop_c1",
        8 => "bench_noop_c8",
        _ => "bench_noop_c32",
    };

    fn policy() -> Policy {
        Policy {
            concurrency: C,
            ..Policy::new("bench")
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ApalisNoop {
    sent_us: u64,
}

struct Cell {
    engine: &'static str,
    batch: usize,
    concurrency: usize,
    drain_per_s: f64,
    latency_ms: (f64, f64, f64),
}

struct Bench {
    pool: PgPool,
    jobs: usize,
    rate: u32,
    seconds: u64,
}

impl Bench {
    async fn clean(&self) {
        sqlx::query("TRUNCATE jobs, job_workers, apalis.jobs, apalis.workers, bench_raw")
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// Offers `rate` single-job transactions per second for `seconds`, via `enqueue`.
    async fn offer<F, Fut>(&self, mut enqueue: F) -> usize
    where
        F: FnMut(u64) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let total = self.rate as usize * self.seconds as usize;
        let mut ticker = tokio::time::interval(Duration::from_secs(1) / self.rate);
        for _ in 0..total {
            ticker.tick().await;
            enqueue(now_us()).await;
        }
        total
    }

    async fn ours<const C: usize>(&self, batch: usize) -> Cell {
        self.clean().await;
        let recorder = Arc::new(Recorder::default());
        let settings = JobSettings {
            batch_size: batch as u32,
            poll_interval: Duration::from_secs(1),
            orphan_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            keep_completed: Duration::from_secs(3600),
            keep_dead: Duration::from_secs(3600),
        };
        let backlog: Vec<Noop<C>> = (0..self.jobs).map(|_| Noop { sent_us: 0 }).collect();
        let mut conn = self.pool.acquire().await.unwrap();
        for chunk in backlog.chunks(5000) {
            engine::enqueue_many(&mut conn, chunk).await.unwrap();
        }
        drop(conn);
        let mut runtime = Runtime::new(self.pool.clone(), settings);
        runtime.register(
            recorder.clone(),
            |job: Noop<C>, cx: JobContext<Arc<Recorder>>| async move {
                cx.state.record(job.sent_us).await;
                Ok::<(), JobError>(())
            },
        );
        let workers = runtime.start().await.unwrap();
        let drained = recorder.wait_for(self.jobs, Duration::from_secs(600)).await;
        recorder.reset().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pool = self.pool.clone();
        let offered = self
            .offer(|sent_us| {
                let pool = pool.clone();
                async move {
                    let mut conn = pool.acquire().await.unwrap();
                    engine::enqueue(&mut conn, &Noop::<C> { sent_us })
                        .await
                        .unwrap();
                }
            })
            .await;
        recorder.wait_for(offered, Duration::from_secs(120)).await;
        workers.shutdown().await;
        Cell {
            engine: "activekg",
            batch,
            concurrency: C,
            drain_per_s: self.jobs as f64 / drained.as_secs_f64(),
            latency_ms: recorder.percentiles().await,
        }
    }

    async fn apalis(&self, batch: usize, concurrency: usize) -> Cell {
        self.clean().await;
        let recorder = Arc::new(Recorder::default());
        let config = ApalisConfig::default().queue("bench").batch_size(batch);
        let mut storage =
            PostgresStorage::<ApalisNoop>::new(&self.pool).with_config(config.clone());
        let backlog: Vec<ApalisNoop> = (0..self.jobs).map(|_| ApalisNoop { sent_us: 0 }).collect();
        for chunk in backlog.chunks(5000) {
            storage.push_bulk(chunk.to_vec()).await.unwrap();
        }
        let context = WorkerContext::new(&format!("bench-apalis-{}", rand::random::<u32>()));
        let worker_recorder = recorder.clone();
        let worker = WorkerBuilder::new(&context)
            .backend(
                PostgresStorage::<ApalisNoop>::new(&self.pool)
                    .with_config(config)
                    .with_pubsub(),
            )
            .concurrency(concurrency)
            .build(move |job: ApalisNoop| {
                let recorder = worker_recorder.clone();
                async move {
                    recorder.record(job.sent_us).await;
                    Ok::<(), std::io::Error>(())
                }
            });
        let running = tokio::spawn(worker.run());
        let drained = recorder.wait_for(self.jobs, Duration::from_secs(600)).await;
        recorder.reset().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let offered = self
            .offer(|sent_us| {
                let mut storage = storage.clone();
                async move { storage.push(ApalisNoop { sent_us }).await.unwrap() }
            })
            .await;
        recorder.wait_for(offered, Duration::from_secs(120)).await;
        let _ = context.stop();
        let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
        Cell {
            engine: "apalis-postgres",
            batch,
            concurrency,
            drain_per_s: self.jobs as f64 / drained.as_secs_f64(),
            latency_ms: recorder.percentiles().await,
        }
    }

    async fn raw(&self, batch: usize, concurrency: usize) -> Cell {
        self.clean().await;
        let recorder = Arc::new(Recorder::default());
        sqlx::query("INSERT INTO bench_raw (sent_us) SELECT 0 FROM generate_series(1, $1)")
            .bind(self.jobs as i64)
            .execute(&self.pool)
            .await
            .unwrap();
        let stop = Arc::new(tokio::sync::Notify::new());
        let mut loops = Vec::new();
        for _ in 0..concurrency {
            let (pool, recorder, stop) = (self.pool.clone(), recorder.clone(), stop.clone());
            loops.push(tokio::spawn(async move {
                loop {
                    let claimed: Vec<(i64, i64)> = sqlx::query_as(
                        "WITH next AS (SELECT id FROM bench_raw WHERE state = 'available' ORDER BY id LIMIT $1
                                       FOR UPDATE SKIP LOCKED)
                         UPDATE bench_raw b SET state = 'running' FROM next WHERE b.id = next.id
                         RETURNING b.id, b.sent_us",
                    )
                    .bind(batch as i64)
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                    if claimed.is_empty() {
                        tokio::select! {
                            () = stop.notified() => return,
                            () = tokio::time::sleep(Duration::from_millis(2)) => continue,
                        }
                    }
                    let ids: Vec<i64> = claimed.iter().map(|(id, _)| *id).collect();
                    for (_, sent_us) in &claimed {
                        recorder.record(*sent_us as u64).await;
                    }
                    sqlx::query("UPDATE bench_raw SET state = 'done' WHERE id = ANY($1)")
                        .bind(&ids)
                        .execute(&pool)
                        .await
                        .unwrap();
                }
            }));
        }
        let drained = recorder.wait_for(self.jobs, Duration::from_secs(600)).await;
        recorder.reset().await;
        let pool = self.pool.clone();
        let offered = self
            .offer(|sent_us| {
                let pool = pool.clone();
                async move {
                    sqlx::query("INSERT INTO bench_raw (sent_us) VALUES ($1)")
                        .bind(sent_us as i64)
                        .execute(&pool)
                        .await
                        .unwrap();
                }
            })
            .await;
        recorder.wait_for(offered, Duration::from_secs(120)).await;
        stop.notify_waiters();
        for l in loops {
            l.abort();
        }
        Cell {
            engine: "raw loop",
            batch,
            concurrency,
            drain_per_s: self.jobs as f64 / drained.as_secs_f64(),
            latency_ms: recorder.percentiles().await,
        }
    }
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name).map_or_else(
        |_| default.to_vec(),
        |v| {
            v.split(',')
                .map(|n| n.trim().parse().expect("a comma-separated list of numbers"))
                .collect()
        },
    )
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let admin = std::env::var("ACTIVEKG_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let mut conn = PgConnection::connect(&admin).await.unwrap();
    sqlx::query("DROP DATABASE IF EXISTS activekg_bench WITH (FORCE)")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("CREATE DATABASE activekg_bench")
        .execute(&mut conn)
        .await
        .unwrap();
    let url = format!("{}/activekg_bench", admin.rsplit_once('/').unwrap().0);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(60)
        .connect(&url)
        .await
        .unwrap();
    activekg::store::migrate(&pool).await.unwrap();
    // Both migrators in one database: ours in public._sqlx_migrations, apalis-postgres's in apalis.
    PostgresStorage::setup(&pool).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE bench_raw (id bigserial PRIMARY KEY, state text NOT NULL DEFAULT 'available', sent_us bigint NOT NULL);
         CREATE INDEX bench_raw_available ON bench_raw (id) WHERE state = 'available'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let fsync: String = sqlx::query_scalar("SHOW fsync")
        .fetch_one(&pool)
        .await
        .unwrap();
    let bench = Bench {
        pool: pool.clone(),
        jobs: env_or("ACTIVEKG_BENCH_JOBS", 10_000),
        rate: env_or("ACTIVEKG_BENCH_RATE", 200),
        seconds: env_or("ACTIVEKG_BENCH_SECONDS", 3),
    };
    println!(
        "no-op jobs; drain of {} queued jobs; latency offered at {} jobs/s for {} s (one job per transaction); fsync={fsync}; {} CPUs",
        bench.jobs,
        bench.rate,
        bench.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<16} {:>5} {:>4} {:>12} {:>9} {:>9} {:>9} {:>9}",
        "engine", "batch", "conc", "drain jobs/s", "p50 ms", "p95 ms", "p99 ms", "vs raw"
    );
    let batches: Vec<usize> = env_list("ACTIVEKG_BENCH_BATCHES", &[10, 100]);
    let concurrencies: Vec<usize> = env_list("ACTIVEKG_BENCH_CONCURRENCY", &[1, 8, 32]);
    let skip_apalis = std::env::var("ACTIVEKG_BENCH_SKIP_APALIS").is_ok();
    for &batch in &batches {
        for &concurrency in &concurrencies {
            let raw = bench.raw(batch, concurrency).await;
            let ours = match concurrency {
                1 => bench.ours::<1>(batch).await,
                8 => bench.ours::<8>(batch).await,
                32 => bench.ours::<32>(batch).await,
                other => panic!("concurrency {other} is not one of 1, 8, 32"),
            };
            let mut cells = vec![ours];
            if !skip_apalis {
                cells.push(bench.apalis(batch, concurrency).await);
            }
            cells.push(raw);
            let raw = cells.last().unwrap().drain_per_s;
            for cell in &cells {
                println!(
                    "{:<16} {:>5} {:>4} {:>12.0} {:>9.2} {:>9.2} {:>9.2} {:>8.0}%",
                    cell.engine,
                    cell.batch,
                    cell.concurrency,
                    cell.drain_per_s,
                    cell.latency_ms.0,
                    cell.latency_ms.1,
                    cell.latency_ms.2,
                    100.0 * cell.drain_per_s / raw
                );
            }
        }
    }
    pool.close().await;
    let _ = sqlx::query(AssertSqlSafe(
        "DROP DATABASE IF EXISTS activekg_bench WITH (FORCE)".to_owned(),
    ))
    .execute(&mut conn)
    .await;
}
