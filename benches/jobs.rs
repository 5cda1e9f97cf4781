//! Job engine benchmark: `cargo bench --bench jobs`.
//!
//! No-op jobs on one PostgreSQL (the test server, fsync as configured), measured the way the peer benchmarks
//! in `tools/peers` measure graphile-worker and pg-boss, so their figures can be set side by side:
//! - drain: N jobs are bulk-inserted, then the workers start; the rate is N over the time from the first
//!   handler call to the first moment the database shows no job unfinished;
//! - latency: the workers start first, then a separate producer process (this binary again) sends single-job
//!   transactions open-loop at a fixed rate; each job carries its send time and the handler records how late
//!   it started (so the figure includes the INSERT and its commit, the wake-up and the claim). The producer
//!   also times each INSERT to its commit: no engine can start a job before that, so its p99 is the floor of
//!   the latency p99 on the machine at that moment.
//!
//! Per configuration it reports the drain rate, latency percentiles, WAL bytes per job (drain and latency
//! phases), and CPU time per job during the drain: this process's, and the whole machine's (PostgreSQL
//! included). Engines:
//! - `activekg`: our engine at the default settings (`Settings` parsed from an empty environment), for the
//!   concurrencies in ACTIVEKG_BENCH_CONCURRENCY (default 8,32);
//! - `raw loop`: a hand-written `SELECT ... FOR UPDATE SKIP LOCKED` + `UPDATE` loop (batches of
//!   ACTIVEKG_BENCH_RAW_BATCHES, default 10,100,1000), the ceiling of what a claim/complete pair costs;
//! - `activekg on Redis`: the same engine with the bench queue in Redis (`ACTIVEKG_JOBS_BACKEND=redis`'s
//!   path: enqueue into the PostgreSQL outbox, relay, claim and finish by Lua script), when Redis answers at
//!   ACTIVEKG_BENCH_REDIS_URL (default redis://127.0.0.1:6379); its WAL per job is what the outbox costs the
//!   primary, the figure that says when Redis pays off;
//! - `apalis-postgres` (ACTIVEKG_BENCH_APALIS=1): bare apalis-postgres 1.0 at batch 10;
//! - the peers, when `tools/peers` has been installed into ACTIVEKG_BENCH_PEERS (default
//!   `target/bench-peers`; `scripts/bench-peers` installs it): graphile-worker and pg-boss, in the same run.
//!
//! Passes are interleaved (ACTIVEKG_BENCH_PASSES, default 2): every configuration once, then again, so a
//! change in the machine's load shows as spread in every row rather than as a difference between rows.
//! ACTIVEKG_BENCH_JOBS (default 20000), ACTIVEKG_BENCH_RATE (200) and ACTIVEKG_BENCH_SECONDS (10) size the
//! phases. ACTIVEKG_BENCH_SETUP_SQL runs after the migrations, to try a server-side change without a rebuild;
//! ACTIVEKG_BENCH_SHOW_SLOW prints every start later than 20 ms, with when it was sent, to tell a machine's
//! hiccup (a burst at one moment) from the engine's tail. Server: ACTIVEKG_TEST_DATABASE_URL (default the local one); a database `activekg_bench` is
//! recreated there.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use activekg::config::{JobSettings, Settings};
use activekg::jobs::engine::{self, Job, JobContext, JobError, Policy, Runtime, job_store};
use activekg::store::redis_jobs::RedisJobs;
use apalis::layers::WorkerBuilderExt;
use apalis::prelude::{TaskSink, WorkerBuilder, WorkerContext};
use apalis_postgres::{Config as ApalisConfig, PostgresStorage};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection, PgPool};

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
    first_us: AtomicU64,
    latencies_us: std::sync::Mutex<Vec<u64>>,
}

impl Recorder {
    fn record(&self, sent_us: u64) {
        let now = now_us();
        let _ = self
            .first_us
            .compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
        if sent_us > 0
            && std::env::var_os("ACTIVEKG_BENCH_SHOW_SLOW").is_some()
            && now - sent_us > 20_000
        {
            eprintln!(
                "slow start: {} ms late, sent at {} us",
                (now - sent_us) / 1000,
                sent_us % 100_000_000
            );
        }
        if sent_us > 0 {
            self.latencies_us
                .lock()
                .unwrap()
                .push(now.saturating_sub(sent_us));
        }
        self.done.fetch_add(1, Ordering::SeqCst);
    }

    /// Waits until the handler saw `n` jobs, then until `unfinished` says 0; returns when that answer came.
    async fn wait_done(&self, n: usize, pool: &PgPool, unfinished: &Unfinished) -> u64 {
        let limit = Instant::now() + Duration::from_secs(600);
        while self.done.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < limit,
                "only {} of {n} jobs ran",
                self.done.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        loop {
            let left = unfinished.left(pool).await;
            if left == 0 {
                return now_us();
            }
            assert!(Instant::now() < limit, "{left} jobs never finished");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn percentiles(&self) -> [f64; 3] {
        let mut l = self.latencies_us.lock().unwrap().clone();
        l.sort_unstable();
        // Nearest rank, as the peers compute it.
        let at = |p: f64| {
            let k = ((p * l.len() as f64).ceil() as usize).clamp(1, l.len().max(1)) - 1;
            l.get(k).map_or(f64::NAN, |v| *v as f64 / 1000.0)
        };
        [at(0.5), at(0.95), at(0.99)]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Noop<const C: usize> {
    sent_us: u64,
}

impl<const C: usize> Job for Noop<C> {
    const KIND: &'static str = match C {
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

/// The same no-op, on a queue routed to Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RedisNoop<const C: usize> {
    sent_us: u64,
}

const REDIS_QUEUE: &str = "bench_redis";

impl<const C: usize> Job for RedisNoop<C> {
    const KIND: &'static str = match C {
        8 => "bench_redis_noop_c8",
        _ => "bench_redis_noop_c32",
    };

    fn policy() -> Policy {
        Policy {
            concurrency: C,
            ..Policy::new(REDIS_QUEUE)
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ApalisNoop {
    sent_us: u64,
}

/// How the bench sees that no job is left unfinished.
enum Unfinished {
    /// A count query.
    Sql(&'static str),
    /// Jobs in Redis, and in the outbox on their way there.
    Redis(RedisJobs),
}

impl Unfinished {
    async fn left(&self, pool: &PgPool) -> i64 {
        match self {
            Unfinished::Sql(sql) => sqlx::query_scalar(sqlx::AssertSqlSafe(*sql))
                .fetch_one(pool)
                .await
                .unwrap(),
            Unfinished::Redis(redis) => {
                let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM job_outbox")
                    .fetch_one(pool)
                    .await
                    .unwrap();
                let counts = redis.queue_counts().await.unwrap();
                outbox
                    + counts
                        .iter()
                        .map(|c| c.pending + c.scheduled + c.running)
                        .sum::<i64>()
            }
        }
    }
}

/// CPU time so far, in microseconds: this process's and the whole machine's (busy, all cores).
#[derive(Clone, Copy)]
struct Cpu {
    process_us: f64,
    machine_us: f64,
}

impl Cpu {
    fn now() -> Self {
        // Both files count in clock ticks (USER_HZ, 100 on Linux).
        let tick_us = 10_000.0;
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command name.
        let process = ticks(11) + ticks(12);
        let all = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let cpu: Vec<f64> = all
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|f| f.parse().unwrap_or(0.0))
            .collect();
        let busy =
            cpu.iter().sum::<f64>() - cpu.get(3).unwrap_or(&0.0) - cpu.get(4).unwrap_or(&0.0);
        Self {
            process_us: process * tick_us,
            machine_us: busy * tick_us,
        }
    }

    fn since(self, start: Cpu, jobs: usize) -> (f64, f64) {
        (
            (self.process_us - start.process_us) / jobs as f64,
            (self.machine_us - start.machine_us) / jobs as f64,
        )
    }
}

/// One measured run of one configuration.
#[derive(Clone, Default)]
struct Sample {
    drain_per_s: f64,
    latency_ms: [f64; 3],
    /// Of the latency, the producer's INSERT and its commit alone: p50, p99 (no engine starts a job sooner).
    commit_ms: [f64; 2],
    wal_drain: f64,
    wal_latency: f64,
    cpu_process_us: f64,
    cpu_machine_us: f64,
}

/// A configuration and its samples over the passes.
struct Row {
    engine: String,
    config: String,
    /// Claim size and concurrency, for comparing with the raw loop at the same ones.
    batch: Option<usize>,
    conc: Option<usize>,
    samples: Vec<Sample>,
}

#[derive(Clone)]
struct Bench {
    pool: PgPool,
    url: String,
    /// Where the Redis rows' jobs go, when Redis answers.
    redis_url: Option<String>,
    jobs: usize,
    rate: u32,
    seconds: u64,
    defaults: JobSettings,
}

/// What the producer process is asked to send.
#[derive(Serialize, Deserialize)]
struct ProducerPlan {
    url: String,
    target: String,
    rate: u32,
    seconds: u64,
}

impl Bench {
    async fn clean(&self) {
        sqlx::query("TRUNCATE jobs, job_workers, apalis.jobs, apalis.workers, bench_raw")
            .execute(&self.pool)
            .await
            .unwrap();
        sqlx::query("CHECKPOINT").execute(&self.pool).await.unwrap();
    }

    async fn wal(&self) -> f64 {
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Runs the producer process against `target`: how many jobs it sent, and its commits' p50 and p99 (ms).
    async fn produce(&self, target: &str) -> (usize, [f64; 2]) {
        let plan = ProducerPlan {
            url: self.url.clone(),
            target: target.to_owned(),
            rate: self.rate,
            seconds: self.seconds,
        };
        let out = tokio::process::Command::new(std::env::current_exe().unwrap())
            .env(
                "ACTIVEKG_BENCH_PRODUCER",
                serde_json::to_string(&plan).unwrap(),
            )
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "producer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ms = |k: &str| said[k].as_f64().unwrap_or(f64::NAN);
        (
            said["sent"].as_u64().unwrap() as usize,
            [ms("commit_p50_ms"), ms("commit_p99_ms")],
        )
    }

    /// Drain, then latency, around a running consumer; `start` starts it, `stop` stops it.
    async fn measure<Start, Fut, Stop, StopFut>(
        &self,
        recorder: Arc<Recorder>,
        unfinished: Unfinished,
        target: &str,
        start: Start,
    ) -> Sample
    where
        Start: FnOnce(Arc<Recorder>) -> Fut,
        Fut: Future<Output = Stop>,
        Stop: FnOnce() -> StopFut,
        StopFut: Future<Output = ()>,
    {
        let wal0 = self.wal().await;
        let cpu0 = Cpu::now();
        let stop = start(recorder.clone()).await;
        let end_us = recorder.wait_done(self.jobs, &self.pool, &unfinished).await;
        let (cpu_process_us, cpu_machine_us) = Cpu::now().since(cpu0, self.jobs);
        let wal1 = self.wal().await;
        let first = recorder.first_us.load(Ordering::SeqCst);
        let drain_per_s = self.jobs as f64 / ((end_us - first) as f64 / 1e6);

        recorder.done.store(0, Ordering::SeqCst);
        recorder.latencies_us.lock().unwrap().clear();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (sent, commit_ms) = self.produce(target).await;
        recorder.wait_done(sent, &self.pool, &unfinished).await;
        let wal2 = self.wal().await;
        stop().await;
        let latency_ms = recorder.percentiles();
        Sample {
            drain_per_s,
            latency_ms,
            commit_ms,
            wal_drain: (wal1 - wal0) / self.jobs as f64,
            wal_latency: (wal2 - wal1) / sent as f64,
            cpu_process_us,
            cpu_machine_us,
        }
    }

    async fn ours<const C: usize>(&self) -> Sample {
        self.clean().await;
        let backlog: Vec<Noop<C>> = (0..self.jobs).map(|_| Noop { sent_us: 0 }).collect();
        let mut conn = self.pool.acquire().await.unwrap();
        for chunk in backlog.chunks(5000) {
            engine::enqueue_many(&mut conn, chunk).await.unwrap();
        }
        drop(conn);
        let (pool, settings) = (self.pool.clone(), self.defaults.clone());
        self.measure(
            Arc::new(Recorder::default()),
            Unfinished::Sql("SELECT count(*) FROM jobs WHERE state IN ('available', 'running')"),
            &format!("activekg:{C}"),
            |recorder| async move {
                let mut runtime = Runtime::new(pool, settings);
                runtime.register(
                    recorder,
                    |job: Noop<C>, cx: JobContext<Arc<Recorder>>| async move {
                        cx.state.record(job.sent_us);
                        Ok::<(), JobError>(())
                    },
                );
                let workers = runtime.start().await.unwrap();
                move || async move { workers.shutdown().await }
            },
        )
        .await
    }

    /// Our engine with the jobs in Redis, under a key prefix of its own (deleted afterwards). The backlog
    /// is relayed before the workers start, so the drain measures claiming from Redis.
    async fn ours_on_redis<const C: usize>(&self, url: &str) -> Sample {
        self.clean().await;
        let prefix = format!("activekg_bench_{}", rand::random::<u32>());
        let redis = RedisJobs::connect(url, &prefix).await.unwrap();
        let backlog: Vec<RedisNoop<C>> = (0..self.jobs).map(|_| RedisNoop { sent_us: 0 }).collect();
        let mut conn = self.pool.acquire().await.unwrap();
        for chunk in backlog.chunks(5000) {
            engine::enqueue_many(&mut conn, chunk).await.unwrap();
        }
        drop(conn);
        while activekg::store::jobs::relay(&self.pool, &redis, 5000)
            .await
            .unwrap()
            .total()
            > 0
        {}
        let (pool, settings, jobs) = (self.pool.clone(), self.defaults.clone(), redis.clone());
        let sample = self
            .measure(
                Arc::new(Recorder::default()),
                Unfinished::Redis(redis.clone()),
                &format!("activekg_redis:{C}"),
                |recorder| async move {
                    let mut runtime = Runtime::new(pool, settings);
                    runtime.redis(jobs).register(
                        recorder,
                        |job: RedisNoop<C>, cx: JobContext<Arc<Recorder>>| async move {
                            cx.state.record(job.sent_us);
                            Ok::<(), JobError>(())
                        },
                    );
                    let workers = runtime.start().await.unwrap();
                    move || async move { workers.shutdown().await }
                },
            )
            .await;
        redis.delete_all().await.unwrap();
        sample
    }

    async fn apalis(&self, batch: usize, concurrency: usize) -> Sample {
        self.clean().await;
        let config = ApalisConfig::default().queue("bench").batch_size(batch);
        let mut storage =
            PostgresStorage::<ApalisNoop>::new(&self.pool).with_config(config.clone());
        let backlog: Vec<ApalisNoop> = (0..self.jobs).map(|_| ApalisNoop { sent_us: 0 }).collect();
        for chunk in backlog.chunks(5000) {
            storage.push_bulk(chunk.to_vec()).await.unwrap();
        }
        let pool = self.pool.clone();
        self.measure(
            Arc::new(Recorder::default()),
            Unfinished::Sql(
                "SELECT count(*) FROM apalis.jobs WHERE status IN ('Pending', 'Queued', 'Running')",
            ),
            "apalis",
            |recorder| async move {
                let context =
                    WorkerContext::new(&format!("bench-apalis-{}", rand::random::<u32>()));
                let worker = WorkerBuilder::new(&context)
                    .backend(
                        PostgresStorage::<ApalisNoop>::new(&pool)
                            .with_config(config)
                            .with_pubsub(),
                    )
                    .concurrency(concurrency)
                    .build(move |job: ApalisNoop| {
                        let recorder = recorder.clone();
                        async move {
                            recorder.record(job.sent_us);
                            Ok::<(), std::io::Error>(())
                        }
                    });
                let running = tokio::spawn(worker.run());
                move || async move {
                    let _ = context.stop();
                    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
                }
            },
        )
        .await
    }

    async fn raw(&self, batch: usize, concurrency: usize) -> Sample {
        self.clean().await;
        sqlx::query("INSERT INTO bench_raw (sent_us) SELECT 0 FROM generate_series(1, $1)")
            .bind(self.jobs as i64)
            .execute(&self.pool)
            .await
            .unwrap();
        let pool = self.pool.clone();
        self.measure(
            Arc::new(Recorder::default()),
            Unfinished::Sql("SELECT count(*) FROM bench_raw WHERE state <> 'done'"),
            "raw",
            |recorder| async move {
                let loops: Vec<_> = (0..concurrency)
                    .map(|_| tokio::spawn(raw_loop(pool.clone(), recorder.clone(), batch)))
                    .collect();
                move || async move { loops.iter().for_each(|l| l.abort()) }
            },
        )
        .await
    }
}

/// The ceiling: claim a batch, run it, mark it done; poll every 2 ms when idle.
async fn raw_loop(pool: PgPool, recorder: Arc<Recorder>, batch: usize) {
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
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        let ids: Vec<i64> = claimed.iter().map(|(id, _)| *id).collect();
        for (_, sent_us) in &claimed {
            recorder.record(*sent_us as u64);
        }
        sqlx::query("UPDATE bench_raw SET state = 'done' WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&pool)
            .await
            .unwrap();
    }
}

/// The producer process: 20 warm-up jobs, a second's pause, then `rate` sends a second for `seconds`, each
/// started on schedule whether or not the earlier ones returned (open loop). Prints how many it sent.
async fn producer(plan: ProducerPlan) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(&plan.url)
        .await
        .unwrap();
    // Enqueues of the Redis rows go through the outbox, as a process with ACTIVEKG_JOBS_BACKEND=redis does.
    job_store::route_to_redis(&[REDIS_QUEUE]);
    let send = |pool: PgPool, sent_us: u64| {
        let target = plan.target.clone();
        async move {
            match target.as_str() {
                "activekg:8" => enqueue_one::<8>(&pool, sent_us).await,
                "activekg:32" => enqueue_one::<32>(&pool, sent_us).await,
                "activekg_redis:8" => {
                    let mut conn = pool.acquire().await.unwrap();
                    engine::enqueue(&mut conn, &RedisNoop::<8> { sent_us })
                        .await
                        .unwrap();
                }
                "activekg_redis:32" => {
                    let mut conn = pool.acquire().await.unwrap();
                    engine::enqueue(&mut conn, &RedisNoop::<32> { sent_us })
                        .await
                        .unwrap();
                }
                "raw" => {
                    sqlx::query("INSERT INTO bench_raw (sent_us) VALUES ($1)")
                        .bind(sent_us as i64)
                        .execute(&pool)
                        .await
                        .unwrap();
                }
                "apalis" => {
                    PostgresStorage::<ApalisNoop>::new(&pool)
                        .with_config(ApalisConfig::default().queue("bench"))
                        .push(ApalisNoop { sent_us })
                        .await
                        .unwrap();
                }
                other => panic!("unknown producer target {other}"),
            }
        }
    };
    for _ in 0..20 {
        send(pool.clone(), 0).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let total = plan.rate as usize * plan.seconds as usize;
    let start = Instant::now();
    let mut sends = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until((start + Duration::from_secs(1) * i as u32 / plan.rate).into())
            .await;
        let send = send(pool.clone(), now_us());
        sends.push(tokio::spawn(async move {
            let began = Instant::now();
            send.await;
            began.elapsed()
        }));
    }
    let mut commits = Vec::with_capacity(total);
    for s in sends {
        commits.push(s.await.unwrap());
    }
    commits.sort();
    let at = |q: f64| commits[((commits.len() as f64 * q) as usize).min(commits.len() - 1)];
    println!(
        "{}",
        serde_json::json!({
            "sent": total + 20,
            "commit_p50_ms": at(0.50).as_secs_f64() * 1e3,
            "commit_p99_ms": at(0.99).as_secs_f64() * 1e3,
        })
    );
}

async fn enqueue_one<const C: usize>(pool: &PgPool, sent_us: u64) {
    let mut conn = pool.acquire().await.unwrap();
    engine::enqueue(&mut conn, &Noop::<C> { sent_us })
        .await
        .unwrap();
}

/// The peer benchmarks' results for one pass, as rows.
fn peers(dir: &Path, admin: &str, bench: &Bench, pass: usize) -> Vec<(String, String, Sample)> {
    let mut rows = Vec::new();
    let node = dir.join("node_modules/.bin/node");
    let runs = [
        (
            "graphile-worker",
            "bench-graphile.mjs",
            "c8,c32,c8-lq,c32-lq",
            "c8,c8-lq",
        ),
        ("pg-boss", "bench-pgboss.mjs", "b100-lc8", "b10-lc8-notify"),
    ];
    for (engine, script, drains, latencies) in runs {
        let out = std::env::temp_dir().join(format!("activekg-bench-{engine}-{pass}.json"));
        let status = std::process::Command::new(&node)
            .current_dir(dir)
            .env("PEERS_PG_DSN", admin)
            .args([script, "--phases", "drain,latency", "--runs", "1"])
            .args(["--n", &bench.jobs.to_string()])
            .args(["--drain-configs", drains, "--latency-configs", latencies])
            .args(["--rate", &bench.rate.to_string()])
            .args(["--duration", &bench.seconds.to_string()])
            .arg("--out")
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("{engine}: the peer benchmark failed ({status:?}); its rows are missing");
            continue;
        }
        let results: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        for row in results["rows"].as_array().into_iter().flatten() {
            let config = row["config"].as_str().unwrap_or("?").to_owned();
            let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
            let sample = match row["phase"].as_str() {
                Some("drain") => Sample {
                    drain_per_s: f("drain_jobs_per_s"),
                    latency_ms: [f64::NAN; 3],
                    commit_ms: [f64::NAN; 2],
                    wal_drain: f("wal_bytes_per_job_drain"),
                    wal_latency: f64::NAN,
                    cpu_process_us: f64::NAN,
                    cpu_machine_us: f64::NAN,
                },
                Some("latency") => Sample {
                    drain_per_s: f64::NAN,
                    latency_ms: [f("p50_ms"), f("p95_ms"), f("p99_ms")],
                    commit_ms: [f64::NAN; 2],
                    wal_drain: f64::NAN,
                    wal_latency: f("wal_bytes_per_job"),
                    cpu_process_us: f64::NAN,
                    cpu_machine_us: f64::NAN,
                },
                _ => continue,
            };
            let label = if row["phase"] == "drain" {
                format!("{config} (drain)")
            } else {
                format!("{config} (latency)")
            };
            rows.push((engine.to_owned(), label, sample));
        }
    }
    rows
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

fn add(
    rows: &mut Vec<Row>,
    engine: &str,
    config: &str,
    (batch, conc): (Option<usize>, Option<usize>),
    sample: Sample,
) {
    match rows
        .iter_mut()
        .find(|r| r.engine == engine && r.config == config)
    {
        Some(row) => row.samples.push(sample),
        None => rows.push(Row {
            engine: engine.to_owned(),
            config: config.to_owned(),
            batch,
            conc,
            samples: vec![sample],
        }),
    }
}

/// "median [min-max]" over the samples, or "-" when the figure does not apply.
fn spread(values: impl Iterator<Item = f64>, digits: usize) -> String {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return "-".to_owned();
    }
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    if v.len() == 1 {
        format!("{median:.digits$}")
    } else {
        format!(
            "{median:.digits$} [{:.digits$}-{:.digits$}]",
            v[0],
            v[v.len() - 1]
        )
    }
}

fn report(rows: &[Row]) {
    println!(
        "\n| engine | configuration | drain jobs/s | p50 ms | p95 ms | p99 ms | of which the enqueue's commit p50 / p99 ms | WAL B/job drain / latency | CPU us/job process / machine |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in rows {
        let s = &row.samples;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} / {} | {} / {} | {} / {} |",
            row.engine,
            row.config,
            spread(s.iter().map(|x| x.drain_per_s), 0),
            spread(s.iter().map(|x| x.latency_ms[0]), 2),
            spread(s.iter().map(|x| x.latency_ms[1]), 2),
            spread(s.iter().map(|x| x.latency_ms[2]), 2),
            spread(s.iter().map(|x| x.commit_ms[0]), 2),
            spread(s.iter().map(|x| x.commit_ms[1]), 2),
            spread(s.iter().map(|x| x.wal_drain), 0),
            spread(s.iter().map(|x| x.wal_latency), 0),
            spread(s.iter().map(|x| x.cpu_process_us), 1),
            spread(s.iter().map(|x| x.cpu_machine_us), 1),
        );
    }
    // Ratios by pass, so both figures of a ratio come from the same minutes.
    let passes = rows.iter().map(|r| r.samples.len()).max().unwrap_or(0);
    let best = |engine: &str, pass: usize| {
        rows.iter()
            .filter(|r| r.engine == engine)
            .filter_map(|r| r.samples.get(pass))
            .map(|s| s.drain_per_s)
            .filter(|x| x.is_finite())
            .fold(f64::NAN, f64::max)
    };
    println!();
    for row in rows.iter().filter(|r| r.engine == "activekg") {
        let vs_graphile: Vec<f64> = (0..passes)
            .filter_map(|p| Some(row.samples.get(p)?.drain_per_s / best("graphile-worker", p)))
            .collect();
        let mut line = format!("activekg {}:", row.config);
        if vs_graphile.iter().any(|x| x.is_finite()) {
            line += &format!(
                " {} x graphile-worker's best drain of the same pass;",
                spread(vs_graphile.into_iter(), 2)
            );
        }
        for raw in rows
            .iter()
            .filter(|r| r.engine == "raw loop" && r.conc == row.conc)
        {
            let ratio = (0..passes).filter_map(|p| {
                Some(row.samples.get(p)?.drain_per_s / raw.samples.get(p)?.drain_per_s)
            });
            line += &format!(
                " {} of the raw loop at batch {};",
                percent(ratio),
                raw.batch.unwrap_or(0)
            );
        }
        println!("{line}");
    }
}

/// For each Redis row: its drain and the primary's WAL per job against the same engine on PostgreSQL.
fn report_redis(rows: &[Row]) {
    for redis in rows.iter().filter(|r| r.engine == "activekg on Redis") {
        let Some(pg) = rows
            .iter()
            .find(|r| r.engine == "activekg" && r.config == redis.config)
        else {
            continue;
        };
        let per_pass = |f: fn(&Sample) -> f64| {
            redis
                .samples
                .iter()
                .zip(&pg.samples)
                .map(move |(r, p)| f(r) / f(p))
        };
        println!(
            "activekg on Redis {}: {} x the drain on PostgreSQL; {} x the WAL per job (drain), {} x (latency)",
            redis.config,
            spread(per_pass(|s| s.drain_per_s), 2),
            spread(per_pass(|s| s.wal_drain), 2),
            spread(per_pass(|s| s.wal_latency), 2),
        );
    }
}

fn percent(ratios: impl Iterator<Item = f64>) -> String {
    let v: Vec<f64> = ratios.map(|r| r * 100.0).collect();
    format!("{}%", spread(v.into_iter(), 0))
}

/// `url` when a Redis answers there.
async fn redis_answers(url: &str) -> Option<String> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()?;
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.ok()?;
    (pong == "PONG").then(|| url.to_owned())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    if let Ok(plan) = std::env::var("ACTIVEKG_BENCH_PRODUCER") {
        return producer(serde_json::from_str(&plan).unwrap()).await;
    }
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
    // The pool a deployment would have (ACTIVEKG_POOL_SIZE's default), plus the bench's own monitor queries.
    let defaults = Settings::from_vars(Vec::<(String, String)>::new()).unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(defaults.database.pool_size + 2)
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
    if let Ok(setup) = std::env::var("ACTIVEKG_BENCH_SETUP_SQL") {
        sqlx::raw_sql(sqlx::AssertSqlSafe(setup))
            .execute(&pool)
            .await
            .unwrap();
    }
    let settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'server_version', 'shared_buffers')",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let bench = Bench {
        pool: pool.clone(),
        url,
        jobs: env_or("ACTIVEKG_BENCH_JOBS", 20_000),
        rate: env_or("ACTIVEKG_BENCH_RATE", 200),
        seconds: env_or("ACTIVEKG_BENCH_SECONDS", 10),
        defaults: defaults.jobs.clone(),
        redis_url: redis_answers(
            &std::env::var("ACTIVEKG_BENCH_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned()),
        )
        .await,
    };
    job_store::route_to_redis(&[REDIS_QUEUE]);
    let peers_dir = std::env::var("ACTIVEKG_BENCH_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-peers"));
    let with_peers = peers_dir.join("node_modules/.bin/node").exists();
    println!(
        "no-op jobs; drain of {} jobs; latency offered at {} jobs/s for {} s from a separate process; {} CPUs; {}; activekg defaults: batch {}, poll {:?}; peers: {}; Redis: {}",
        bench.jobs,
        bench.rate,
        bench.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        bench.defaults.batch_size,
        bench.defaults.poll_interval,
        if with_peers {
            peers_dir.display().to_string()
        } else {
            "not installed (scripts/bench-peers)".to_owned()
        },
        bench.redis_url.as_deref().unwrap_or("none answers"),
    );
    let passes: usize = env_or("ACTIVEKG_BENCH_PASSES", 2);
    let concurrencies = env_list("ACTIVEKG_BENCH_CONCURRENCY", &[8, 32]);
    let raw_batches = env_list("ACTIVEKG_BENCH_RAW_BATCHES", &[10, 100, 1000]);
    let with_apalis = std::env::var("ACTIVEKG_BENCH_APALIS").is_ok_and(|v| v == "1");

    // Untimed warm-up: page cache, plans, the allocator.
    let warm = Bench {
        jobs: 2000,
        seconds: 1,
        ..bench.clone()
    };
    warm.ours::<8>().await;
    warm.raw(100, 8).await;

    let mut rows: Vec<Row> = Vec::new();
    for pass in 0..passes {
        eprintln!("pass {} of {passes}", pass + 1);
        for &conc in &concurrencies {
            let sample = match conc {
                8 => bench.ours::<8>().await,
                32 => bench.ours::<32>().await,
                other => panic!("concurrency {other} is not one of 8, 32"),
            };
            add(
                &mut rows,
                "activekg",
                &format!("defaults, conc {conc}"),
                (None, Some(conc)),
                sample,
            );
            if let Some(url) = &bench.redis_url {
                let sample = match conc {
                    8 => bench.ours_on_redis::<8>(url).await,
                    _ => bench.ours_on_redis::<32>(url).await,
                };
                add(
                    &mut rows,
                    "activekg on Redis",
                    &format!("defaults, conc {conc}"),
                    (None, Some(conc)),
                    sample,
                );
            }
            for &batch in &raw_batches {
                let sample = bench.raw(batch, conc).await;
                add(
                    &mut rows,
                    "raw loop",
                    &format!("batch {batch}, conc {conc}"),
                    (Some(batch), Some(conc)),
                    sample,
                );
            }
            if with_apalis {
                let sample = bench.apalis(10, conc).await;
                add(
                    &mut rows,
                    "apalis-postgres",
                    &format!("batch 10, conc {conc}"),
                    (Some(10), Some(conc)),
                    sample,
                );
            }
        }
        if with_peers {
            for (engine, config, sample) in peers(&peers_dir, &admin, &bench, pass) {
                add(&mut rows, &engine, &config, (None, None), sample);
            }
        }
    }
    report(&rows);
    report_redis(&rows);
    pool.close().await;
    let _ = sqlx::query("DROP DATABASE IF EXISTS activekg_bench WITH (FORCE)")
        .execute(&mut conn)
        .await;
}
