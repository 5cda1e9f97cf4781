//! Ingestion end to end against the emulators: backfills of mixed documents into the graph, updates in
//! place, deletes, duplicate events, dead letters with reasons, metrics, and tenant fairness.

use std::time::Duration;

use activekg::domain::{ChangeOp, JobState, NodeId, Provider, TenantId};
use activekg::jobs::backfill_page;
use activekg::jobs::engine::{self, Runtime, RuntimeHandle, admin};
use activekg::jobs::ingest_object::IngestObject;
use activekg::jobs::{self};
use activekg::metrics::metrics;
use activekg::store::jobs::JobFilter;
use serde_json::Value;
use sqlx::PgPool;

use crate::emulators;
use crate::fixtures;
use crate::helpers::{TestDb, eventually, fast_job_settings, job_deps};

/// A database with a registered connector and workers for the connector queue.
struct Fixture {
    db: TestDb,
    deps: jobs::Deps,
    workers: Option<RuntimeHandle>,
    tenant: TenantId,
}

impl Fixture {
    async fn new(provider: Provider, config: Value, max_file_bytes: u64) -> Self {
        let db = TestDb::new().await;
        let settings = fast_job_settings();
        let deps = jobs::Deps {
            max_file_bytes,
            ..job_deps(&db.pool, &settings)
        };
        // A tenant per test keeps this test's metric labels its own.
        let tenant = TenantId::parse(&format!(
            "t{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        ))
        .unwrap();
        deps.registry
            .register(&tenant, provider, config)
            .await
            .unwrap();
        let mut runtime = Runtime::new(db.pool.clone(), settings);
        jobs::register(&mut runtime, &deps, Some(&["connector".to_owned()]));
        let workers = Some(runtime.start().await.unwrap());
        Self {
            db,
            deps,
            workers,
            tenant,
        }
    }

    fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    /// Backfills the whole bucket or folder and waits for the jobs it queued; the run's id.
    async fn backfill_all(&self, provider: Provider) -> uuid::Uuid {
        let (run, _) = backfill_page::start(
            self.pool(),
            &self.deps.registry,
            &self.tenant,
            provider,
            None,
            None,
        )
        .await
        .unwrap();
        self.settle(Duration::from_secs(30)).await;
        run
    }

    /// Waits until no connector job is pending, scheduled or running.
    async fn settle(&self, within: Duration) {
        eventually(within, "connector jobs to settle", || async {
            let active: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM jobs WHERE queue = 'connector' AND state IN ('available', 'running')",
            )
            .fetch_one(self.pool())
            .await
            .unwrap();
            (active == 0).then_some(())
        })
        .await;
    }

    async fn enqueue(&self, job: &IngestObject) -> bool {
        let mut conn = self.pool().acquire().await.unwrap();
        engine::enqueue(&mut conn, job).await.unwrap().inserted
    }

    fn change(
        &self,
        provider: Provider,
        key: &str,
        op: ChangeOp,
        version: Option<&str>,
    ) -> IngestObject {
        IngestObject {
            tenant_id: self.tenant.to_string(),
            provider: provider.to_string(),
            key: key.to_owned(),
            op,
            version: version.map(str::to_owned),
            event_time: None,
            source: "test".to_owned(),
        }
    }

    async fn stop(mut self) {
        if let Some(workers) = self.workers.take() {
            workers.shutdown().await;
        }
        self.db.drop_db().await;
    }
}

/// (documents, chunks, DERIVED_FROM edges) alive for a tenant.
async fn graph_counts(pool: &PgPool, tenant: &TenantId) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM nodes WHERE tenant_id = $1 AND entity_type = 'Document' AND deleted_at IS NULL),
                (SELECT count(*) FROM nodes WHERE tenant_id = $1 AND entity_type = 'Chunk' AND deleted_at IS NULL),
                (SELECT count(*) FROM edges WHERE tenant_id = $1 AND rel = 'DERIVED_FROM')",
    )
    .bind(tenant.as_str())
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The 200 objects of the mixed backfill: 195 good documents in seven formats, a corrupt PDF, an oversize
/// file, and three objects that are no documents (a folder marker, an image, an archive).
fn mixed_objects() -> Vec<(String, Vec<u8>, Option<&'static str>)> {
    let mut objects = Vec::new();
    for i in 0..195 {
        let words = format!(
            "Document {i} talks about topic {} and invoice number {}.",
            i % 13,
            1000 + i
        );
        let (key, body, content_type): (String, Vec<u8>, Option<&str>) = match i % 7 {
            0 => (format!("kb/{i:03}.txt"), words.into_bytes(), Some("text/plain")),
            1 => (format!("kb/{i:03}.md"), format!("# Note {i}\n\n{words}\n").into_bytes(), None),
            2 => (format!("kb/{i:03}.html"), format!("<html><head><title>Page {i}</title><script>x()</script></head><body><p>{words}</p></body></html>").into_bytes(), Some("text/html")),
            3 => (format!("kb/{i:03}.pdf"), fixtures::pdf(&[&words]), Some("application/pdf")),
            4 => (format!("kb/{i:03}.docx"), fixtures::docx(&format!("Memo {i}"), &[&words]), None),
            5 => (format!("kb/{i:03}.json"), serde_json::to_vec(&serde_json::json!({"id": i, "summary": words})).unwrap(), None),
            _ => (format!("kb/{i:03}.csv"), format!("id,summary\n{i},{words}\n").into_bytes(), None),
        };
        objects.push((key, body, content_type));
    }
    objects.push((
        "kb/zz-corrupt.pdf".to_owned(),
        fixtures::corrupt_pdf(),
        Some("application/pdf"),
    ));
    objects.push(("kb/photos/".to_owned(), Vec::new(), None));
    objects.push((
        "kb/photos/zz-cat.png".to_owned(),
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec(),
        Some("image/png"),
    ));
    objects.push((
        "kb/zz-backup.tar.gz".to_owned(),
        vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3],
        Some("application/octet-stream"),
    ));
    objects.push((
        "kb/zz-huge.txt".to_owned(),
        "too big ".repeat(40_000).into_bytes(),
        Some("text/plain"),
    ));
    objects
}

async fn backfill_mixed(fixture: &Fixture, provider: Provider) {
    let (run_id, _) = backfill_page::start(
        fixture.pool(),
        &fixture.deps.registry,
        &fixture.tenant,
        provider,
        Some("kb/".to_owned()),
        None,
    )
    .await
    .unwrap();
    fixture.settle(Duration::from_secs(120)).await;

    let run = backfill_page::status(fixture.pool(), run_id).await.unwrap();
    assert_eq!(
        (run.state.as_str(), run.seen, run.enqueued, run.pages),
        ("completed", 200, 200, 2),
        "{run:?}"
    );

    let (documents, chunks, edges) = graph_counts(fixture.pool(), &fixture.tenant).await;
    assert_eq!(documents, 195, "every good object is one document");
    assert!(chunks >= 195, "every document has chunks");
    assert_eq!(edges, chunks, "every chunk is linked to its document");
    let without_chunks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM nodes d WHERE d.tenant_id = $1 AND d.entity_type = 'Document'
           AND NOT EXISTS (SELECT 1 FROM edges e WHERE e.dst = d.id AND e.rel = 'DERIVED_FROM')",
    )
    .bind(fixture.tenant.as_str())
    .fetch_one(fixture.pool())
    .await
    .unwrap();
    assert_eq!(without_chunks, 0);
    let embeds: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE kind = 'embed_node' AND tenant_id = $1",
    )
    .bind(fixture.tenant.as_str())
    .fetch_one(fixture.pool())
    .await
    .unwrap();
    assert_eq!(
        embeds, chunks,
        "each new chunk is queued for embedding in the same transaction"
    );

    let dead = admin::list(
        fixture.pool(),
        &JobFilter {
            state: Some(JobState::Dead),
            kind: Some("ingest_object".to_owned()),
            ..JobFilter::default()
        },
        None,
        10,
    )
    .await
    .unwrap()
    .0;
    let mut reasons: Vec<(String, String, String)> = dead
        .iter()
        .map(|j| {
            let error = j.errors.last().unwrap();
            (
                j.args["key"].as_str().unwrap().to_owned(),
                error.code.clone().unwrap_or_default(),
                error.error.clone(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(
        (reasons[0].0.as_str(), reasons[0].1.as_str()),
        ("kb/zz-corrupt.pdf", "parse")
    );
    assert!(reasons[0].2.contains("corrupt Pdf"), "{}", reasons[0].2);
    assert_eq!(
        (reasons[1].0.as_str(), reasons[1].1.as_str()),
        ("kb/zz-huge.txt", "too_large")
    );
    assert!(
        reasons[1].2.contains("320000 bytes") && reasons[1].2.contains("262144"),
        "{}",
        reasons[1].2
    );

    // The guide's counters reconcile with the graph and the dead letters.
    let m = metrics();
    let labels = [provider.as_str(), fixture.tenant.as_str()];
    assert_eq!(
        m.ingest
            .with_label_values(&[labels[0], labels[1], "created"])
            .get(),
        195
    );
    // What is no document completes as skipped, saying why, and never reaches the dead letters.
    assert_eq!(
        m.ingest
            .with_label_values(&[labels[0], labels[1], "skipped"])
            .get(),
        3
    );
    let completed = admin::list(
        fixture.pool(),
        &JobFilter {
            state: Some(JobState::Completed),
            kind: Some("ingest_object".to_owned()),
            ..JobFilter::default()
        },
        None,
        500,
    )
    .await
    .unwrap()
    .0;
    let mut skipped: Vec<(String, String)> = completed
        .iter()
        .filter_map(|j| {
            let why = j.progress.as_ref()?.get("skipped")?.as_str()?.to_owned();
            Some((j.args["key"].as_str().unwrap().to_owned(), why))
        })
        .collect();
    skipped.sort();
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert_eq!(skipped[0].0, "kb/photos/");
    assert!(skipped[0].1.contains("folder marker"), "{skipped:?}");
    assert_eq!(skipped[1].0, "kb/photos/zz-cat.png");
    assert!(skipped[1].1.contains("image/png"), "{skipped:?}");
    assert_eq!(skipped[2].0, "kb/zz-backup.tar.gz");
    assert!(skipped[2].1.contains("not a document type"), "{skipped:?}");
    assert_eq!(m.ingest_errors.with_label_values(&labels).get(), 2);
    // Each document's time is accounted to the stages it went through (no embedding workers run here).
    let stage = |s: activekg::metrics::Stage| {
        let h = m.pipeline_stage.with_label_values(&[s.label()]);
        (h.get_sample_count(), h.get_sample_sum())
    };
    use activekg::metrics::Stage;
    for s in [Stage::Fetch, Stage::Extract, Stage::Chunk, Stage::Write] {
        let (count, sum) = stage(s);
        assert!(
            count >= 195 && sum > 0.0,
            "{s:?}: {count} steps, {sum} s for 195 documents"
        );
    }
    assert_eq!(stage(Stage::Embed).0, 0, "no embedding ran");
}

#[tokio::test]
async fn two_hundred_mixed_objects_backfilled_from_s3_become_documents_or_clear_dead_letters() {
    let client = emulators::s3_client().await;
    let bucket = emulators::unique_bucket("mixed");
    emulators::s3_bucket(&client, &bucket).await;
    for (key, body, content_type) in mixed_objects() {
        emulators::s3_put(&client, &bucket, &key, &body, content_type).await;
    }
    let fixture = Fixture::new(Provider::S3, emulators::s3_config(&bucket), 256 * 1024).await;
    backfill_mixed(&fixture, Provider::S3).await;
    fixture.stop().await;
}

#[tokio::test]
async fn two_hundred_mixed_objects_backfilled_from_gcs_become_documents_or_clear_dead_letters() {
    let bucket = emulators::unique_bucket("mixed");
    emulators::gcs_bucket(&bucket).await;
    for (key, body, content_type) in mixed_objects() {
        emulators::gcs_put(&bucket, &key, &body, content_type).await;
    }
    let fixture = Fixture::new(Provider::Gcs, emulators::gcs_config(&bucket), 256 * 1024).await;
    backfill_mixed(&fixture, Provider::Gcs).await;
    fixture.stop().await;
}

#[tokio::test]
async fn a_changed_object_updates_its_document_in_place_and_reembeds_only_changed_chunks() {
    let bucket = emulators::unique_bucket("change");
    emulators::gcs_bucket(&bucket).await;
    let fixture = Fixture::new(Provider::Gcs, emulators::gcs_config(&bucket), 10 << 20).await;
    let first: String = (0..60)
        .map(|i| format!("Stable sentence number {i} stays the same in every version. "))
        .collect();
    emulators::gcs_put(
        &bucket,
        "notes/plan.txt",
        first.as_bytes(),
        Some("text/plain"),
    )
    .await;
    fixture
        .enqueue(&fixture.change(Provider::Gcs, "notes/plan.txt", ChangeOp::Upsert, Some("1")))
        .await;
    fixture.settle(Duration::from_secs(30)).await;
    let document = NodeId::document(&fixture.tenant, Provider::Gcs, "notes/plan.txt");
    assert!(
        graph_counts(fixture.pool(), &fixture.tenant).await.1 >= 2,
        "a multi-chunk document"
    );
    // As if the embedding workers had done their part.
    sqlx::query("UPDATE nodes SET embedding_status = 'ready' WHERE entity_type = 'Chunk'")
        .execute(fixture.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE jobs SET state = 'completed', finished_at = now(), unique_key = NULL WHERE kind = 'embed_node'")
        .execute(fixture.pool())
        .await
        .unwrap();

    let second = format!("{first}A new closing sentence was added in the second version.");
    emulators::gcs_put(
        &bucket,
        "notes/plan.txt",
        second.as_bytes(),
        Some("text/plain"),
    )
    .await;
    fixture
        .enqueue(&fixture.change(Provider::Gcs, "notes/plan.txt", ChangeOp::Upsert, Some("2")))
        .await;
    fixture.settle(Duration::from_secs(30)).await;

    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'dead'")
        .fetch_one(fixture.pool())
        .await
        .unwrap();
    assert_eq!(failed, 0, "re-ingesting never hits a unique violation");
    let props: Value = sqlx::query_scalar("SELECT props FROM nodes WHERE id = $1")
        .bind(document.0)
        .fetch_one(fixture.pool())
        .await
        .unwrap();
    assert!(props["content_hash"].is_string());
    let (documents, chunks_after, edges) = graph_counts(fixture.pool(), &fixture.tenant).await;
    assert_eq!(documents, 1, "the same document, updated in place");
    assert_eq!(edges, chunks_after);
    let last_chunk: String = sqlx::query_scalar(
        "SELECT n.props->>'text' FROM nodes n JOIN edges e ON e.src = n.id AND e.dst = $1 ORDER BY (n.props->>'index')::int DESC LIMIT 1",
    )
    .bind(document.0)
    .fetch_one(fixture.pool())
    .await
    .unwrap();
    assert!(last_chunk.contains("closing sentence"), "{last_chunk}");
    let requeued: Vec<String> = sqlx::query_scalar(
        "SELECT n.props->>'index' FROM nodes n WHERE n.entity_type = 'Chunk' AND n.embedding_status = 'queued' ORDER BY 1",
    )
    .fetch_all(fixture.pool())
    .await
    .unwrap();
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE kind = 'embed_node' AND state = 'available'",
    )
    .fetch_one(fixture.pool())
    .await
    .unwrap();
    assert_eq!(
        requeued,
        [(chunks_after - 1).to_string()],
        "only the changed (last) chunk is re-embedded"
    );
    assert_eq!(pending, 1, "with one new embedding job");
    fixture.stop().await;
}

#[tokio::test]
async fn a_deleted_object_is_soft_deleted_with_its_chunks_and_the_same_event_twice_changes_nothing()
{
    let client = emulators::s3_client().await;
    let bucket = emulators::unique_bucket("delete");
    emulators::s3_bucket(&client, &bucket).await;
    let fixture = Fixture::new(Provider::S3, emulators::s3_config(&bucket), 10 << 20).await;
    emulators::s3_put(
        &client,
        &bucket,
        "a.md",
        b"# Title\n\nSome text to keep.",
        None,
    )
    .await;
    let event = fixture.change(Provider::S3, "a.md", ChangeOp::Upsert, Some("etag-1"));
    assert!(fixture.enqueue(&event).await);
    assert!(
        !fixture.enqueue(&event).await,
        "the same event is queued once"
    );
    fixture.settle(Duration::from_secs(30)).await;
    let document = NodeId::document(&fixture.tenant, Provider::S3, "a.md");
    let stamp = |pool: PgPool| async move {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>("SELECT max(updated_at) FROM nodes")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let before = stamp(fixture.pool().clone()).await;
    // A redelivery without a version (so not deduplicated) re-runs the ingest: nothing changes.
    fixture
        .enqueue(&fixture.change(Provider::S3, "a.md", ChangeOp::Upsert, None))
        .await;
    fixture.settle(Duration::from_secs(30)).await;
    assert_eq!(
        stamp(fixture.pool().clone()).await,
        before,
        "an unchanged object is not rewritten"
    );
    assert_eq!(graph_counts(fixture.pool(), &fixture.tenant).await.0, 1);

    client
        .delete_object()
        .bucket(&bucket)
        .key("a.md")
        .send()
        .await
        .unwrap();
    fixture
        .enqueue(&fixture.change(Provider::S3, "a.md", ChangeOp::Delete, Some("delete-1")))
        .await;
    fixture.settle(Duration::from_secs(30)).await;
    let alive: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM nodes WHERE deleted_at IS NULL AND (id = $1 OR id IN (SELECT src FROM edges WHERE dst = $1))",
    )
    .bind(document.0)
    .fetch_one(fixture.pool())
    .await
    .unwrap();
    assert_eq!(alive, 0, "the document and its chunks are soft-deleted");
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes WHERE tenant_id = $1")
        .bind(fixture.tenant.as_str())
        .fetch_one(fixture.pool())
        .await
        .unwrap();
    assert!(kept >= 2, "soft, not hard: the purger removes them later");
    // Deleting again is a no-op.
    fixture
        .enqueue(&fixture.change(Provider::S3, "a.md", ChangeOp::Delete, Some("delete-2")))
        .await;
    fixture.settle(Duration::from_secs(30)).await;
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'dead'")
        .fetch_one(fixture.pool())
        .await
        .unwrap();
    assert_eq!(dead, 0);
    fixture.stop().await;
}

#[tokio::test]
async fn a_local_folder_is_ingested_like_a_bucket() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("handbook")).unwrap();
    std::fs::write(
        dir.path().join("handbook/intro.md"),
        "# Intro\n\nWelcome aboard.",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("handbook/policy.docx"),
        fixtures::docx("Policy", &["Be kind."]),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("handbook/leave.pdf"),
        fixtures::pdf(&["Leave policy: 25 days."]),
    )
    .unwrap();
    let config = serde_json::json!({ "path": dir.path().display().to_string() });
    let fixture = Fixture::new(Provider::Local, config, 10 << 20).await;
    fixture.backfill_all(Provider::Local).await;
    let titles: Vec<String> = sqlx::query_scalar(
        "SELECT props->>'title' FROM nodes WHERE tenant_id = $1 AND entity_type = 'Document' ORDER BY 1",
    )
    .bind(fixture.tenant.as_str())
    .fetch_all(fixture.pool())
    .await
    .unwrap();
    assert_eq!(titles, ["Intro", "Policy", "leave.pdf"]);
    let text: String = sqlx::query_scalar("SELECT string_agg(props->>'text', ' ') FROM nodes WHERE tenant_id = $1 AND entity_type = 'Chunk'")
        .bind(fixture.tenant.as_str())
        .fetch_one(fixture.pool())
        .await
        .unwrap();
    assert!(
        text.contains("25 days") && text.contains("Be kind"),
        "{text}"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn a_missing_connector_is_retried_then_dead_lettered_as_no_config() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(
        Provider::Local,
        serde_json::json!({ "path": dir.path().display().to_string() }),
        1 << 20,
    )
    .await;
    let mut orphan = fixture.change(Provider::S3, "x.txt", ChangeOp::Upsert, Some("1"));
    orphan.tenant_id = "nobody-here".to_owned();
    fixture.enqueue(&orphan).await;
    let mut unknown = fixture.change(Provider::S3, "y.txt", ChangeOp::Upsert, Some("1"));
    unknown.provider = "azure".to_owned();
    fixture.enqueue(&unknown).await;

    let retried = eventually(
        Duration::from_secs(10),
        "the first attempt to fail",
        || async {
            let jobs = admin::list(
                fixture.pool(),
                &JobFilter {
                    tenant_id: Some("nobody-here".to_owned()),
                    ..JobFilter::default()
                },
                None,
                1,
            )
            .await
            .unwrap()
            .0;
            jobs.into_iter().next().filter(|j| !j.errors.is_empty())
        },
    )
    .await;
    assert_eq!(
        retried.state,
        JobState::Scheduled,
        "a missing config is retried with backoff"
    );
    assert_eq!(retried.errors[0].code.as_deref(), Some("no_config"));
    // Skip to the last attempt instead of waiting out the backoff.
    sqlx::query("UPDATE jobs SET attempt = max_attempts - 1, run_at = now() WHERE id = $1")
        .bind(retried.id.0)
        .execute(fixture.pool())
        .await
        .unwrap();
    fixture.settle(Duration::from_secs(20)).await;
    let dead = admin::get(fixture.pool(), retried.id).await.unwrap();
    assert_eq!(
        (dead.state, dead.errors.last().unwrap().code.as_deref()),
        (JobState::Dead, Some("no_config"))
    );

    let unsupported = admin::list(
        fixture.pool(),
        &JobFilter {
            state: Some(JobState::Dead),
            ..JobFilter::default()
        },
        None,
        10,
    )
    .await
    .unwrap()
    .0
    .into_iter()
    .find(|j| j.args["provider"] == "azure")
    .expect("the unknown provider is dead-lettered at once");
    assert_eq!(
        unsupported.errors[0].code.as_deref(),
        Some("unsupported_provider")
    );
    assert_eq!(unsupported.attempt, 1);
    assert!(
        metrics()
            .worker_errors
            .with_label_values(&["unsupported_provider"])
            .get()
            >= 1
    );
    assert!(
        metrics()
            .worker_errors
            .with_label_values(&["no_config"])
            .get()
            >= 2
    );
    fixture.stop().await;
}

#[tokio::test]
async fn after_the_cause_of_a_dead_letter_is_fixed_a_backfill_ingests_the_same_objects_again() {
    let dir = tempfile::tempdir().unwrap();
    let big = "A report that is longer than the limit allows. ".repeat(40);
    std::fs::write(dir.path().join("report.txt"), &big).unwrap();
    let config = serde_json::json!({ "path": dir.path().display().to_string() });
    // CONNECTOR_MAX_FILE_SIZE_MB set too low: the object dies as too_large.
    let mut fixture = Fixture::new(Provider::Local, config, 1000).await;
    let backfill = |fixture: &Fixture| {
        let (pool, registry, tenant) = (
            fixture.pool().clone(),
            fixture.deps.registry.clone(),
            fixture.tenant.clone(),
        );
        async move {
            let (run, _) =
                backfill_page::start(&pool, &registry, &tenant, Provider::Local, None, None)
                    .await
                    .unwrap();
            run
        }
    };
    backfill(&fixture).await;
    fixture.settle(Duration::from_secs(30)).await;
    let dead: Vec<String> = sqlx::query_scalar(
        "SELECT errors -> -1 ->> 'code' FROM jobs WHERE kind = 'ingest_object' AND state = 'dead'",
    )
    .fetch_all(fixture.pool())
    .await
    .unwrap();
    assert_eq!(dead, ["too_large"]);

    // The operator raises the limit and restarts the workers, then backfills again.
    fixture.workers.take().unwrap().shutdown().await;
    fixture.deps.max_file_bytes = 10 << 20;
    let mut runtime = Runtime::new(fixture.pool().clone(), fast_job_settings());
    jobs::register(&mut runtime, &fixture.deps, Some(&["connector".to_owned()]));
    fixture.workers = Some(runtime.start().await.unwrap());
    let run = backfill(&fixture).await;
    fixture.settle(Duration::from_secs(30)).await;
    let status = backfill_page::status(fixture.pool(), run).await.unwrap();
    assert_eq!(
        (status.enqueued, status.skipped),
        (1, 0),
        "the object that died is queued again, not skipped as already seen"
    );
    assert_eq!(graph_counts(fixture.pool(), &fixture.tenant).await.0, 1);
    fixture.stop().await;
}

#[tokio::test]
async fn objects_whose_names_cannot_be_keys_are_recorded_as_their_own_failures_not_the_pages() {
    // GCS lets a name hold NUL (PostgreSQL cannot store it); a folder can hold a file name that is not UTF-8.
    let bucket = emulators::unique_bucket("odd");
    emulators::gcs_bucket(&bucket).await;
    emulators::gcs_put(
        &bucket,
        "fine.txt",
        b"An ordinary note.",
        Some("text/plain"),
    )
    .await;
    emulators::gcs_put(
        &bucket,
        "bad\0name.txt",
        b"Unstorable name.",
        Some("text/plain"),
    )
    .await;
    let fixture = Fixture::new(Provider::Gcs, emulators::gcs_config(&bucket), 10 << 20).await;
    let run = fixture.backfill_all(Provider::Gcs).await;
    let status = backfill_page::status(fixture.pool(), run).await.unwrap();
    assert_eq!(
        status.state, "completed",
        "the page went through: {status:?}"
    );
    assert_eq!((status.enqueued, status.failed), (1, 1));
    assert!(
        status.failures[0]["reason"]
            .as_str()
            .unwrap()
            .contains("NUL"),
        "{:?}",
        status.failures
    );
    assert_eq!(graph_counts(fixture.pool(), &fixture.tenant).await.0, 1);
    fixture.stop().await;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fine.txt"), "Another ordinary note.").unwrap();
    let odd = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"caf\xe9.txt");
    std::fs::write(dir.path().join(odd), "Latin-1 name.").unwrap();
    let config = serde_json::json!({ "path": dir.path().display().to_string() });
    let fixture = Fixture::new(Provider::Local, config, 10 << 20).await;
    let run = fixture.backfill_all(Provider::Local).await;
    let status = backfill_page::status(fixture.pool(), run).await.unwrap();
    assert_eq!(
        (status.state.as_str(), status.enqueued, status.failed),
        ("completed", 1, 1)
    );
    assert!(
        status.failures[0]["reason"]
            .as_str()
            .unwrap()
            .contains("UTF-8")
    );
    fixture.stop().await;
}
