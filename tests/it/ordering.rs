//! Per-object ordering: jobs for one object finish in any order, and the graph ends at the store's latest
//! state. Each test holds one storage response in the gate (a slow read), lets a newer change through
//! meanwhile, then releases the old one.

use std::time::Duration;

use activekg::domain::{ChangeOp, JobId, JobState, NodeId, Provider, TenantId};
use activekg::jobs::engine::{self, Runtime, RuntimeHandle, admin};
use activekg::jobs::ingest_object::IngestObject;
use activekg::jobs::{self};
use axum::http::Method;
use sqlx::PgPool;

use crate::emulators;
use crate::gate::Gate;
use crate::helpers::{TestDb, fast_job_settings, job_deps};

struct Object {
    db: TestDb,
    workers: Option<RuntimeHandle>,
    s3: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    tenant: TenantId,
    gate: Gate,
}

impl Object {
    async fn new() -> Self {
        let db = TestDb::new().await;
        let settings = fast_job_settings();
        let deps = job_deps(&db.pool, &settings);
        let s3 = emulators::s3_client().await;
        let bucket = emulators::unique_bucket("order");
        emulators::s3_bucket(&s3, &bucket).await;
        let gate = Gate::start(&emulators::moto_url()).await;
        let mut config = emulators::s3_config(&bucket);
        config["endpoint"] = gate.url.clone().into();
        let tenant = TenantId::parse("ordered").unwrap();
        deps.registry
            .register(&tenant, Provider::S3, config)
            .await
            .unwrap();
        let mut runtime = Runtime::new(db.pool.clone(), settings);
        jobs::register(&mut runtime, &deps, Some(&["connector".to_owned()]));
        let workers = Some(runtime.start().await.unwrap());
        Self {
            db,
            workers,
            s3,
            bucket,
            key: "doc.txt".to_owned(),
            tenant,
            gate,
        }
    }

    fn path(&self) -> String {
        format!("/{}/{}", self.bucket, self.key)
    }

    async fn put(&self, text: &str) -> String {
        emulators::s3_put(
            &self.s3,
            &self.bucket,
            &self.key,
            text.as_bytes(),
            Some("text/plain"),
        )
        .await;
        self.etag().await
    }

    async fn etag(&self) -> String {
        let head = self
            .s3
            .head_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .send()
            .await
            .unwrap();
        head.e_tag().unwrap().trim_matches('"').to_owned()
    }

    async fn delete(&self) {
        self.s3
            .delete_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .send()
            .await
            .unwrap();
    }

    async fn event(&self, op: ChangeOp, version: &str) -> JobId {
        let job = IngestObject {
            tenant_id: self.tenant.to_string(),
            provider: "s3".to_owned(),
            key: self.key.clone(),
            op,
            version: Some(version.to_owned()),
            event_time: None,
            source: "test".to_owned(),
        };
        let mut conn = self.db.pool.acquire().await.unwrap();
        engine::enqueue(&mut conn, &job).await.unwrap().id.unwrap()
    }

    async fn finished(&self, id: JobId) {
        let job = admin::wait(&self.db.pool, id, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(job.state, JobState::Completed, "{job:?}");
    }

    /// The document's version, whether it is deleted, and its live chunks' text.
    async fn document(&self) -> Option<(String, bool, String)> {
        let id = NodeId::document(&self.tenant, Provider::S3, &self.key);
        document(&self.db.pool, id).await
    }

    async fn stop(mut self) {
        if let Some(workers) = self.workers.take() {
            workers.shutdown().await;
        }
        self.db.drop_db().await;
    }
}

async fn document(pool: &PgPool, id: NodeId) -> Option<(String, bool, String)> {
    sqlx::query_as(
        "SELECT d.props->>'version', d.deleted_at IS NOT NULL,
                coalesce((SELECT string_agg(c.props->>'text', ' ' ORDER BY (c.props->>'index')::int)
                          FROM edges e JOIN nodes c ON c.id = e.src
                          WHERE e.dst = d.id AND e.rel = 'DERIVED_FROM' AND c.deleted_at IS NULL), '')
         FROM nodes d WHERE d.id = $1",
    )
    .bind(id.0)
    .fetch_optional(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_older_upsert_that_finishes_after_a_newer_one_does_not_restore_stale_content() {
    let object = Object::new().await;
    let old = object.put("The old wording of the contract.").await;
    let slow_read = object.gate.hold(Method::GET, &object.path(), 1);
    let older = object.event(ChangeOp::Upsert, &old).await;
    slow_read.wait_held(1).await;

    let new = object.put("The new wording of the contract.").await;
    let newer = object.event(ChangeOp::Upsert, &new).await;
    object.finished(newer).await;
    assert_eq!(
        object.document().await.unwrap().0,
        new,
        "the newer change is written while the older read is still in flight"
    );

    slow_read.release();
    object.finished(older).await;
    let (version, deleted, text) = object.document().await.unwrap();
    assert_eq!(
        version, new,
        "the older read did not overwrite the newer version"
    );
    assert!(!deleted);
    assert!(text.contains("new wording"), "{text}");
    object.stop().await;
}

#[tokio::test]
async fn an_upsert_that_finishes_after_the_delete_does_not_bring_the_document_back() {
    let object = Object::new().await;
    let version = object.put("A memo that is about to be withdrawn.").await;
    let slow_read = object.gate.hold(Method::GET, &object.path(), 1);
    let upsert = object.event(ChangeOp::Upsert, &version).await;
    slow_read.wait_held(1).await;

    object.delete().await;
    let delete = object.event(ChangeOp::Delete, &version).await;
    object.finished(delete).await;

    slow_read.release();
    object.finished(upsert).await;
    let document = object.document().await;
    assert!(
        document.as_ref().is_none_or(|(_, deleted, _)| *deleted),
        "the deleted object stays deleted: {document:?}"
    );
    object.stop().await;
}

#[tokio::test]
async fn a_delete_that_finishes_after_the_object_came_back_does_not_remove_it() {
    let object = Object::new().await;
    let first = object.put("First edition.").await;
    let create = object.event(ChangeOp::Upsert, &first).await;
    object.finished(create).await;

    object.delete().await;
    // The delete's look at the store (it is gone) is answered, then held on its way back.
    let slow_look = object.gate.hold(Method::HEAD, &object.path(), 1);
    let delete = object.event(ChangeOp::Delete, &first).await;
    slow_look.wait_held(1).await;

    let second = object.put("Second edition, back again.").await;
    let recreate = object.event(ChangeOp::Upsert, &second).await;
    object.finished(recreate).await;

    slow_look.release();
    object.finished(delete).await;
    let (version, deleted, text) = object.document().await.unwrap();
    assert!(!deleted, "the re-created object's document is live");
    assert_eq!(version, second);
    assert!(text.contains("Second edition"), "{text}");
    object.stop().await;
}

#[tokio::test]
async fn content_is_never_recorded_under_a_version_it_is_not() {
    // The job looks at the object (version one), the object is overwritten, then the job reads it: the
    // read must not hand version two's bytes to a job that believes it has version one.
    let object = Object::new().await;
    let one = object.put("Draft one.").await;
    let slow_look = object.gate.hold(Method::HEAD, &object.path(), 1);
    let job = object.event(ChangeOp::Upsert, &one).await;
    slow_look.wait_held(1).await;
    let two = object.put("Draft two, final.").await;
    slow_look.release();
    object.finished(job).await;
    let (version, _, text) = object.document().await.unwrap();
    assert_eq!(
        version, two,
        "the content read is recorded under its own version"
    );
    assert!(text.contains("Draft two"), "{text}");
    object.stop().await;
}
