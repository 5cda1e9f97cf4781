//! Embedding benchmark: `cargo bench --bench embedding`.
//!
//! 1. The local all-MiniLM-L6-v2 (candle, CPU): chunks/s at batch 1, 8, 16 and 32, with one and with all
//!    inference threads, through the same batcher the jobs use. Chunks are real chunker output (this
//!    repository's README cut to the model's 256-token window), so most are full-length.
//! 2. The pipeline: N nodes created through the API's workflow, embedded by `embed_node` workers, timed
//!    from the create call until every node is `ready` (local model, and the model-free `hash` embedder to
//!    show the engine's own ceiling).
//!
//! Reference: sentence-transformers on torch (CPU) over the same chunks in the same run, when
//! scripts/bench-torch has installed it into target/bench-torch (benches/torch_reference.py); without it,
//! the design notes' figures (1.6 chunks/s at batch 1, 9.2 at batch 64). EMBEDDING_MODEL_DIR (default .activekg/models/all-MiniLM-L6-v2; run
//! scripts/fetch-model), ACTIVEKG_BENCH_NODES (default 200), ACTIVEKG_TEST_DATABASE_URL.

// The binary's allocator (see main.rs), so the figures are the service's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use activekg::config::{EmbeddingSettings, Settings};
use activekg::domain::TenantId;
use activekg::embedding::{
    Batcher, Embedder, Service, hash::HashEmbedder, local, local::LocalEmbedder,
};
use activekg::extract::{self, ChunkPolicy, tokens::WordPiece};
use activekg::jobs::embed_node::Caps;
use activekg::jobs::engine::Runtime;
use activekg::workflows::nodes::{self, NodeInput};
use sqlx::{Connection, PgConnection, PgPool};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn chunks() -> Vec<String> {
    let text = include_str!("../README.md");
    let chunks = extract::chunk(text, ChunkPolicy::default(), WordPiece::minilm());
    chunks
        .into_iter()
        .map(|c| c.text)
        .filter(|t| t.len() > 200)
        .collect()
}

async fn throughput(
    embedder: Arc<dyn Embedder>,
    batch: usize,
    parallel: usize,
    texts: &[String],
) -> f64 {
    let batcher = Batcher::spawn(embedder, batch, parallel);
    let n = (batch * parallel * 4).max(32);
    let run = |n: usize| {
        let batcher = batcher.clone();
        let texts: Vec<String> = texts.iter().cycle().take(n).cloned().collect();
        async move {
            let started = Instant::now();
            let all = texts.into_iter().map(|t| {
                let b = batcher.clone();
                async move { b.embed(t).await.expect("embeds") }
            });
            futures::future::join_all(all).await;
            started.elapsed()
        }
    };
    run(batch * parallel).await; // warm-up
    let took = run(n).await;
    n as f64 / took.as_secs_f64()
}

/// sentence-transformers on torch over the same chunks, when scripts/bench-torch installed it: chunks/s
/// by "threads/batch".
fn torch_reference(
    dir: &std::path::Path,
    texts: &[String],
    batches: &[usize],
    cores: usize,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-torch/bin/python");
    if !std::path::Path::new(python).exists() {
        return None;
    }
    let request = tempfile::NamedTempFile::new().unwrap();
    serde_json::to_writer(
        &request,
        &serde_json::json!({
            "model_dir": dir, "texts": texts, "batches": batches, "threads": [1, cores],
        }),
    )
    .unwrap();
    let output = std::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/torch_reference.py"
        ))
        .arg(request.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("TQDM_DISABLE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("the torch reference runs");
    assert!(output.status.success(), "the torch reference failed");
    Some(serde_json::from_slice(&output.stdout).expect("the torch reference answers JSON"))
}

/// The model's multiply-adds per chunk, counted from its config and each chunk's wordpieces (with [CLS] and
/// [SEP], cut to the model's window): the four attention projections and the feed-forward pair per token
/// and layer, and the attention scores and their weighted sum, which grow with the square of the length.
/// Embeddings, layer norms, softmax and pooling are left out, so this understates the work.
fn gflop_per_chunk(dir: &std::path::Path, texts: &[String]) -> f64 {
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let get = |key: &str| config[key].as_f64().expect("a BERT config");
    let (hidden, layers, inner) = (
        get("hidden_size"),
        get("num_hidden_layers"),
        get("intermediate_size"),
    );
    let flop: f64 = texts
        .iter()
        .map(|t| {
            let len = (WordPiece::minilm().count(t) + 2).min(local::MAX_TOKENS) as f64;
            let per_layer = 2.0
                * (len * (4.0 * hidden * hidden + 2.0 * hidden * inner) + 2.0 * len * len * hidden);
            layers * per_layer
        })
        .sum();
    flop / texts.len() as f64 / 1e9
}

async fn database() -> PgPool {
    let admin = std::env::var("ACTIVEKG_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let mut conn = PgConnection::connect(&admin).await.unwrap();
    sqlx::query("DROP DATABASE IF EXISTS activekg_bench_embedding WITH (FORCE)")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("CREATE DATABASE activekg_bench_embedding")
        .execute(&mut conn)
        .await
        .unwrap();
    let url = format!(
        "{}/activekg_bench_embedding",
        admin.rsplit_once('/').unwrap().0
    );
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(20)
        .connect(&url)
        .await
        .unwrap();
    activekg::store::migrate(&pool).await.unwrap();
    println!(
        "vector index: {:?}",
        activekg::store::embeddings::prepare(&pool).await
    );
    pool
}

fn settings(backend: &str) -> EmbeddingSettings {
    let settings = Settings::from_vars([
        ("ACTIVEKG_DSN", "postgres://unused@127.0.0.1:1/unused"),
        (
            "CONNECTOR_KEK_V1",
            "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=",
        ),
        ("EMBEDDING_BACKEND", backend),
    ])
    .unwrap();
    settings.embedding
}

async fn pipeline(
    pool: &PgPool,
    embedder: Arc<dyn Embedder>,
    texts: &[String],
    n: usize,
    backend: &str,
) -> f64 {
    sqlx::query("TRUNCATE nodes, jobs CASCADE")
        .execute(pool)
        .await
        .unwrap();
    let tenant = TenantId::parse("bench").unwrap();
    let inputs: Vec<NodeInput> = texts
        .iter()
        .cycle()
        .take(n)
        .enumerate()
        .map(|(i, t)| NodeInput {
            id: None,
            tenant_id: tenant.clone(),
            classes: vec!["Chunk".to_owned()],
            props: serde_json::Map::new(),
            // Distinct texts, so nothing is deduplicated away.
            text: Some(format!("{i} {t}")),
            payload_ref: None,
        })
        .collect();
    let job_settings = Settings::from_vars([
        ("ACTIVEKG_DSN", "postgres://unused@127.0.0.1:1/unused"),
        (
            "CONNECTOR_KEK_V1",
            "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=",
        ),
        ("CONNECTOR_WORKER_POLL_INTERVAL", "0.05"),
    ])
    .unwrap()
    .jobs;
    let registry = Arc::new(activekg::registry::Registry::new(
        pool.clone(),
        Arc::new(
            activekg::crypto::Keyring::new(&activekg::config::KeyEncryptionKeys {
                keys: [(
                    1,
                    activekg::config::Secret::new("cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4="),
                )]
                .into(),
                active_version: 1,
            })
            .unwrap(),
        ),
    ));
    let deps = activekg::jobs::Deps {
        pool: pool.clone(),
        settings: job_settings.clone(),
        registry,
        sources: Arc::default(),
        max_file_bytes: 1 << 20,
        extractor: Arc::new(activekg::extract::sandbox::Sandbox::new(
            env!("CARGO_BIN_EXE_activekg").into(),
            activekg::extract::sandbox::Limits {
                memory_mb: 1024,
                cpu_seconds: 60,
                wall: std::time::Duration::from_secs(120),
            },
        )),
        sns: Arc::new(activekg::webhooks::sns::CertFetcher::new(None)),
        embeddings: Arc::new(Service::with_embedder(settings(backend), embedder)),
        embedding_caps: Caps {
            tenant: 0,
            total: 0,
            redis: None,
        },
    };
    let mut runtime = Runtime::new(pool.clone(), job_settings);
    activekg::jobs::register(&mut runtime, &deps, Some(&["embedding".to_owned()]));
    let started = Instant::now();
    nodes::create(pool, deps.embedding_caps, inputs)
        .await
        .unwrap();
    let workers = runtime.start().await.unwrap();
    loop {
        let ready: i64 =
            sqlx::query_scalar("SELECT count(*) FROM nodes WHERE embedding_status = 'ready'")
                .fetch_one(pool)
                .await
                .unwrap();
        if ready as usize >= n {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "only {ready} of {n} nodes became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    workers.shutdown().await;
    n as f64 / took.as_secs_f64()
}

/// As the service does (see main.rs): one single-threaded model call per inference thread, unless the
/// caller sets RAYON_NUM_THREADS.
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
    let dir = std::env::var_os("EMBEDDING_MODEL_DIR").map_or_else(
        || PathBuf::from(".activekg/models/all-MiniLM-L6-v2"),
        PathBuf::from,
    );
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let texts = chunks();
    let tokens: usize = texts.iter().map(|t| WordPiece::minilm().count(t)).sum();
    println!(
        "{} chunks of README.md, {:.0} wordpieces on average; {cores} CPUs; RAYON_NUM_THREADS={}",
        texts.len(),
        tokens as f64 / texts.len() as f64,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "<unset>".to_owned())
    );
    let batches = [1, 8, 16, 32, 64];
    let torch = torch_reference(&dir, &texts, &batches, cores);
    println!(
        "\nchunks/s: local all-MiniLM-L6-v2 (candle) and sentence-transformers on torch (same chunks)"
    );
    println!(
        "{:>6} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "batch",
        "1 thread",
        format!("{cores} threads"),
        "torch 1",
        format!("torch {cores}"),
        "ratio"
    );
    let one: Arc<dyn Embedder> =
        Arc::new(LocalEmbedder::load(&dir, "all-MiniLM-L6-v2", 1).expect("the model loads"));
    let all: Arc<dyn Embedder> =
        Arc::new(LocalEmbedder::load(&dir, "all-MiniLM-L6-v2", cores).expect("the model loads"));
    let (mut ours_best, mut torch_best) = (0f64, 0f64);
    for batch in batches {
        let single = throughput(one.clone(), batch, 1, &texts).await;
        let parallel = throughput(all.clone(), batch, cores, &texts).await;
        ours_best = ours_best.max(single).max(parallel);
        let reference = |threads: usize| {
            torch
                .as_ref()
                .and_then(|t| t.get(&format!("{threads}/{batch}")))
                .and_then(serde_json::Value::as_f64)
        };
        let (t1, tn) = (reference(1), reference(cores));
        torch_best = torch_best.max(t1.unwrap_or(0.0)).max(tn.unwrap_or(0.0));
        let show = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        let ratio = tn.map_or("-".to_owned(), |t| format!("{:.2}x", parallel / t));
        println!(
            "{batch:>6} {single:>10.1} {parallel:>10.1} {:>10} {:>10} {ratio:>8}",
            show(t1),
            show(tn)
        );
    }
    if let Some(torch) = &torch {
        println!(
            "best against best: {ours_best:.1} / {torch_best:.1} chunks/s = {:.2}x torch",
            ours_best / torch_best
        );
        let ceiling = torch[&format!("ceiling/{cores}")].as_f64().unwrap();
        let work = gflop_per_chunk(&dir, &texts);
        let (ours, theirs) = (ours_best * work, torch_best * work);
        println!(
            "work: {work:.2} GFLOP a chunk (the model's matrix products over each chunk's own tokens, no padding: \
             a lower bound); the float32 matrix-multiply ceiling here (torch, {cores} threads): {ceiling:.0} GFLOP/s"
        );
        println!(
            "candle {ours:.0} GFLOP/s = {:.0}% of the ceiling; torch {theirs:.0} GFLOP/s = {:.0}%; twice torch would \
             take {:.0} GFLOP/s = {:.2}x the ceiling",
            100.0 * ours / ceiling,
            100.0 * theirs / ceiling,
            2.0 * theirs,
            2.0 * theirs / ceiling
        );
    } else {
        println!(
            "torch not installed (scripts/bench-torch); the design notes' figures: 1.6 (batch 1), 9.2 (batch 64)"
        );
    }

    let pool = database().await;
    let n = env_or("ACTIVEKG_BENCH_NODES", 200);
    let local = pipeline(&pool, all, &texts, n, "local").await;
    println!("\npipeline, {n} nodes from create to ready: local model {local:.1} nodes/s");
    let hash = pipeline(
        &pool,
        Arc::new(HashEmbedder::new("hash-v1", 384)),
        &texts,
        n * 10,
        "hash",
    )
    .await;
    println!(
        "pipeline, {} nodes from create to ready: hash embedder {hash:.0} nodes/s (the engine's ceiling)",
        n * 10
    );
}
