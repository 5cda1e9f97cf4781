//! End-to-end benchmark: `cargo bench --bench pipeline`.
//!
//! What an operator sees: documents PutObject'd into an S3 bucket (moto), announced by the bucket's
//! notifications over moto's SNS to the webhook of a real `activekg serve` process with the local model,
//! timed from the first PutObject until every chunk is `ready`. Reports documents per minute, chunks per
//! second against the model alone at the service's batch size (measured in this run, before the service
//! starts), and where the time went: the sums of `activekg_pipeline_stage_seconds` by stage (fetch,
//! extract, chunk, embed, write) scraped from the service's `/metrics`, each stage as a share of all.
//!
//! The documents are a mix of Markdown, HTML, plain text, PDF and DOCX, about 700 words each, all different.
//! Needs the model (scripts/fetch-model) and starts the emulators itself (scripts/test-services).
//! Knobs: ACTIVEKG_BENCH_DOCUMENTS (default 200), EMBEDDING_MODEL_DIR (default
//! .activekg/models/all-MiniLM-L6-v2), ACTIVEKG_TEST_DATABASE_URL.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/it/emulators.rs"]
mod emulators;
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/it/fixtures.rs"]
mod fixtures;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use activekg::embedding::{Batcher, Embedder, local::LocalEmbedder};
use futures::StreamExt;
use sqlx::{Connection, PgConnection};

const KEK: &str = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=";
const TOKEN: &str = "bench-admin-token-0123456789abcdef";
const TENANT: &str = "bench";
const STAGES: [&str; 5] = ["fetch", "extract", "chunk", "embed", "write"];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Prose that differs per document and paragraph, so no chunk repeats another.
fn paragraphs(n: usize, words: usize) -> Vec<String> {
    let topics = [
        "invoices",
        "contracts",
        "shipping",
        "payroll",
        "audits",
        "pricing",
        "support",
        "hiring",
        "security",
        "backups",
    ];
    let verbs = [
        "reviews",
        "approves",
        "archives",
        "escalates",
        "reconciles",
        "forecasts",
    ];
    (0..words / 60)
        .map(|p| {
            (0..5)
                .map(|s| {
                    let i = p * 5 + s;
                    format!(
                        "In document {n}, team {} {} the {} of region {} every {} days, and section {i} records why.",
                        (n * 7 + i) % 31,
                        verbs[(n + i) % verbs.len()],
                        topics[(n * 3 + i) % topics.len()],
                        (n + i * 3) % 11,
                        (n + i) % 29 + 1
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Document `n` as (key, body, content type), in one of five formats.
fn document(n: usize) -> (String, Vec<u8>, &'static str) {
    let paragraphs = paragraphs(n, 700);
    let title = format!("Operations note {n}");
    match n % 5 {
        0 => (
            format!("notes/{n:05}.md"),
            format!("# {title}\n\n{}", paragraphs.join("\n\n")).into_bytes(),
            "text/markdown",
        ),
        1 => (
            format!("pages/{n:05}.html"),
            format!(
                "<html><head><title>{title}</title></head><body><h1>{title}</h1>{}</body></html>",
                paragraphs
                    .iter()
                    .map(|p| format!("<p>{p}</p>"))
                    .collect::<String>()
            )
            .into_bytes(),
            "text/html",
        ),
        2 => (
            format!("text/{n:05}.txt"),
            paragraphs.join("\n\n").into_bytes(),
            "text/plain",
        ),
        3 => {
            // One PDF line per sentence, so the page's text keeps its words apart.
            let lines: Vec<String> = paragraphs
                .iter()
                .flat_map(|p| p.split(". ").map(str::to_owned).collect::<Vec<_>>())
                .collect();
            let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
            (
                format!("pdf/{n:05}.pdf"),
                fixtures::pdf(&lines),
                "application/pdf",
            )
        }
        _ => {
            let paragraphs: Vec<&str> = paragraphs.iter().map(String::as_str).collect();
            (
                format!("word/{n:05}.docx"),
                fixtures::docx(&title, &paragraphs),
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            )
        }
    }
}

/// The model alone, loaded and batched as the service does at its defaults (`EMBEDDING_THREADS` 0: one
/// inference thread and one model call in flight per core): the pipeline's ceiling.
async fn model_ceiling(dir: &std::path::Path, batch: usize, threads: usize) -> f64 {
    let texts: Vec<String> = (0..batch * threads * 8)
        .map(|n| paragraphs(100_000 + n, 240).join(" "))
        .collect();
    let embedder: Arc<dyn Embedder> =
        Arc::new(LocalEmbedder::load(dir, "all-MiniLM-L6-v2", 0).expect("the model loads"));
    let batcher = Batcher::spawn(embedder, batch, threads);
    let run = |texts: Vec<String>| {
        let batcher = batcher.clone();
        async move {
            let started = Instant::now();
            let n = texts.len();
            futures::future::join_all(texts.into_iter().map(|t| {
                let b = batcher.clone();
                async move { b.embed(t).await.expect("embeds") }
            }))
            .await;
            n as f64 / started.elapsed().as_secs_f64()
        }
    };
    run(texts[..batch * threads].to_vec()).await; // warm-up
    run(texts).await
}

struct Service {
    child: tokio::process::Child,
    base: String,
    client: reqwest::Client,
}

impl Service {
    async fn start(dsn: &str, moto: &str, model: &std::path::Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_activekg"))
            .arg("serve")
            .env("ACTIVEKG_DSN", dsn)
            .env("CONNECTOR_KEK_V1", KEK)
            .env("ADMIN_TOKEN", TOKEN)
            .env("ACTIVEKG_LISTEN", format!("127.0.0.1:{port}"))
            .env("EMBEDDING_BACKEND", "local")
            .env("EMBEDDING_MODEL_DIR", model)
            .env("ACTIVEKG_SNS_CERT_BASE_URL", moto)
            .env("PUBSUB_SUBSCRIBER_ENABLED", "false")
            .env("RUST_LOG", "warn")
            .env_remove("DATABASE_URL")
            .kill_on_drop(true)
            .spawn()
            .expect("activekg serve starts");
        let service = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ready = service
                .client
                .get(format!("{}/readyz", service.base))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                return service;
            }
            assert!(
                Instant::now() < deadline,
                "activekg serve was not ready in 120 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn admin_post(&self, path: &str, body: serde_json::Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert!(
            status.is_success(),
            "POST {path}: {status} {}",
            response.text().await.unwrap_or_default()
        );
    }

    /// Sum and count of each stage's histogram, then the model's own busy time (the sum of
    /// `embedding_call_duration_seconds`).
    async fn stages(&self) -> (Vec<(f64, f64)>, f64) {
        let text = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let value = |series: &str| -> f64 {
            let prefix = format!("{series} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("/metrics has no {series}"))
        };
        let stages = STAGES
            .iter()
            .map(|s| {
                (
                    value(&format!(
                        "activekg_pipeline_stage_seconds_sum{{stage=\"{s}\"}}"
                    )),
                    value(&format!(
                        "activekg_pipeline_stage_seconds_count{{stage=\"{s}\"}}"
                    )),
                )
            })
            .collect();
        (stages, value("embedding_call_duration_seconds_sum"))
    }
}

/// The model ceiling runs in this process: like the service (see main.rs), one single-threaded model call
/// per inference thread, unless the caller sets RAYON_NUM_THREADS.
#[allow(unsafe_code)]
fn main() {
    // SAFETY: before the runtime or any other thread exists.
    unsafe { activekg::embedding::local::single_threaded_model_calls() };
    activekg::embedding::local::keep_freed_memory();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(run());
}

async fn run() {
    let model = std::env::var_os("EMBEDDING_MODEL_DIR").map_or_else(
        || PathBuf::from(".activekg/models/all-MiniLM-L6-v2"),
        PathBuf::from,
    );
    assert!(
        model.join("model.safetensors").exists(),
        "no model in {} (run scripts/fetch-model)",
        model.display()
    );
    let documents: usize = env_or("ACTIVEKG_BENCH_DOCUMENTS", 200);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let defaults = activekg::config::Settings::from_vars([
        ("ACTIVEKG_DSN", "postgres://unused@127.0.0.1:1/unused"),
        ("CONNECTOR_KEK_V1", KEK),
    ])
    .unwrap();
    assert_eq!(
        defaults.embedding.threads, 0,
        "the ceiling assumes the default threads"
    );
    let batch = defaults.embedding.batch_size as usize;
    let ceiling = model_ceiling(&model, batch, cores).await;

    let moto = emulators::moto_url();
    let admin = std::env::var("ACTIVEKG_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let mut conn = PgConnection::connect(&admin).await.unwrap();
    for sql in [
        "DROP DATABASE IF EXISTS activekg_bench_pipeline WITH (FORCE)",
        "CREATE DATABASE activekg_bench_pipeline",
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
    let dsn = format!(
        "{}/activekg_bench_pipeline",
        admin.rsplit_once('/').unwrap().0
    );
    let service = Service::start(&dsn, &moto, &model).await;
    let pool = sqlx::PgPool::connect(&dsn).await.unwrap();

    let s3 = emulators::s3_client().await;
    let bucket = emulators::unique_bucket("bench");
    emulators::s3_bucket(&s3, &bucket).await;
    service
        .admin_post(
            "/_admin/connectors/s3/register",
            serde_json::json!({"tenant_id": TENANT, "config": emulators::s3_config(&bucket)}),
        )
        .await;
    emulators::s3_events_to_webhook(
        &s3,
        &bucket,
        &["s3:ObjectCreated:*"],
        &format!("{}/_webhooks/s3", service.base),
    )
    .await;

    let objects: Vec<_> = (0..documents).map(document).collect();
    let bytes: usize = objects.iter().map(|(_, b, _)| b.len()).sum();
    let before = service.stages().await;
    let started = Instant::now();
    futures::stream::iter(objects)
        .for_each_concurrent(8, |(key, body, content_type)| {
            let (s3, bucket) = (s3.clone(), bucket.clone());
            async move {
                s3.put_object()
                    .bucket(bucket)
                    .key(key)
                    .content_type(content_type)
                    .body(body.into())
                    .send()
                    .await
                    .expect("moto stores the object");
            }
        })
        .await;
    let put = started.elapsed();
    let mut written = None;
    let (chunks, took) = loop {
        let (docs, chunks, unready, dead): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM nodes WHERE tenant_id = $1 AND entity_type = 'Document'),
                    (SELECT count(*) FROM nodes WHERE tenant_id = $1 AND entity_type = 'Chunk'),
                    (SELECT count(*) FROM nodes WHERE tenant_id = $1 AND entity_type = 'Chunk'
                       AND embedding_status <> 'ready'),
                    (SELECT count(*) FROM jobs WHERE state = 'dead')",
        )
        .bind(TENANT)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            dead, 0,
            "a job was dead-lettered: see /_admin/jobs?state=dead"
        );
        if docs as usize == documents && written.is_none() {
            written = Some(started.elapsed());
        }
        if docs as usize == documents && chunks > 0 && unready == 0 {
            break (chunks as usize, started.elapsed());
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "{docs} of {documents} documents and {} of {chunks} chunks ready after 30 min",
            chunks - unready
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let after = service.stages().await;

    println!(
        "{documents} documents ({} KiB; md, html, txt, pdf, docx), {chunks} chunks; {cores} CPUs; embedding batch {batch}",
        bytes / 1024
    );
    println!(
        "PutObject of all: {:.1} s; every document written: {:.1} s; every chunk ready: {:.1} s",
        put.as_secs_f64(),
        written.unwrap_or(took).as_secs_f64(),
        took.as_secs_f64()
    );
    let per_second = chunks as f64 / took.as_secs_f64();
    println!(
        "{:.0} documents/min, {per_second:.1} chunks/s = {:.0}% of the model alone ({ceiling:.1} chunks/s, same batch and threads)",
        documents as f64 * 60.0 / took.as_secs_f64(),
        100.0 * per_second / ceiling
    );
    let model_busy = after.1 - before.1;
    let spent: Vec<(f64, f64)> = before
        .0
        .iter()
        .zip(&after.0)
        .map(|(b, a)| (a.0 - b.0, a.1 - b.1))
        .collect();
    let total: f64 = spent.iter().map(|s| s.0).sum();
    println!(
        "\n{:<8} {:>9} {:>7} {:>8} {:>10}",
        "stage", "seconds", "share", "steps", "mean ms"
    );
    for (stage, (seconds, count)) in STAGES.iter().zip(&spent) {
        println!(
            "{stage:<8} {seconds:>9.1} {:>6.1}% {count:>8.0} {:>10.1}",
            100.0 * seconds / total,
            1000.0 * seconds / count.max(1.0)
        );
    }
    println!(
        "(time each job spent in each stage, summed over jobs; embed includes waiting for a batch)"
    );
    println!(
        "the model computed for {model_busy:.1} s of the {:.1} s ({cores} calls at a time at most): {:.0}% busy",
        took.as_secs_f64(),
        100.0 * model_busy / (took.as_secs_f64() * cores as f64)
    );
    let mut child = service.child;
    let _ = child.start_kill();
    let _ = child.wait().await;
}
