//! `ingest_object`: one job per object change. Loads the tenant's connector, then either soft-deletes the
//! object's document or fetches, extracts, chunks and writes it (document, chunks, edges and the chunks'
//! embedding jobs in one transaction). Re-running it for the same object version changes nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;

use super::embed_node::{Caps, EmbedAction, EmbedNode, Room};
use super::engine::{self, Backoff, Job, JobContext, JobError, Policy, Uniqueness};
use crate::connectors::{ObjectMeta, ObjectSource, SourceError, Sources};
use crate::domain::{ChangeOp, NodeId, Provider, TenantId};
use crate::extract::{
    self,
    sandbox::{Extraction, Sandbox, SandboxError},
};
use crate::metrics::{Stage, metrics};
use crate::registry::{LoadError, Registry};
use crate::store::graph::{self, ChunkWrite};

/// Queue of connector jobs.
pub const QUEUE: &str = "connector";

/// One change to one object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IngestObject {
    /// The tenant whose connector the object belongs to.
    pub tenant_id: String,
    /// The provider, as the event named it (checked when the job runs: an unknown one is dead-lettered).
    pub provider: String,
    /// The object key.
    pub key: String,
    /// What happened.
    pub op: ChangeOp,
    /// The object version the event saw (ETag or generation), when known.
    pub version: Option<String>,
    /// When the store says it happened.
    pub event_time: Option<DateTime<Utc>>,
    /// Where the change was heard: `webhook:s3`, `webhook:gcs`, `backfill:<run>`, `poller`, `pubsub`.
    pub source: String,
}

impl Job for IngestObject {
    const KIND: &'static str = "ingest_object";

    fn policy() -> Policy {
        Policy {
            max_attempts: 8,
            backoff: Backoff::exponential(Duration::from_secs(5), 2.0, Duration::from_secs(600)),
            timeout: Duration::from_secs(300),
            concurrency: 4,
            uniqueness: Uniqueness::Retained,
            fair: true,
            // A full embedding backlog can take hours to drain; waiting for it is not a failure.
            max_snoozes: 2000,
            ..Policy::new(QUEUE)
        }
    }

    /// The same change to the same object version is queued once, however often it is announced.
    fn unique_key(&self) -> Option<String> {
        let version = self.version.as_deref()?;
        let key = format!(
            "{}:{}:{}:{}@{version}",
            self.tenant_id, self.provider, self.op, self.key
        );
        // Object keys can be long; keep the index entry well inside PostgreSQL's limit.
        Some(if key.len() > 512 {
            format!("sha256:{}", extract::hash_text(&key))
        } else {
            key
        })
    }

    fn tenant_id(&self) -> Option<&str> {
        Some(&self.tenant_id)
    }

    fn provider(&self) -> Option<&str> {
        Some(&self.provider)
    }
}

/// What ingest handlers need.
#[derive(Debug, Clone)]
pub struct Deps {
    /// The database.
    pub pool: PgPool,
    /// Connector configurations.
    pub registry: Arc<Registry>,
    /// Storage backends, reused across jobs.
    pub sources: Arc<Sources>,
    /// `CONNECTOR_MAX_FILE_SIZE_MB`, in bytes.
    pub max_file_bytes: u64,
    /// Where documents are extracted and chunked, out of this process.
    pub extractor: Arc<Sandbox>,
    /// Pending-embedding caps: over them, ingest waits (without using attempts) rather than queue more.
    pub embedding_caps: Caps,
}

/// How long an ingest waits before looking at the embedding backlog again.
const BACKLOG_WAIT: Duration = Duration::from_secs(15);

/// What an ingest did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Created,
    Updated,
    Unchanged,
    Deleted,
    /// Not a document (a folder marker, an image, an archive): nothing to read, and no error either.
    Skipped,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Updated => "updated",
            Outcome::Unchanged => "unchanged",
            Outcome::Deleted => "deleted",
            Outcome::Skipped => "skipped",
        }
    }
}

/// The guide's error types for `connector_worker_errors_total`.
fn error_type(err: &JobError) -> &'static str {
    let code = match err {
        JobError::Permanent { code, .. } => Some(code.as_str()),
        JobError::Transient { code, .. } => code.as_deref(),
        JobError::RetryAfter { .. } | JobError::Snooze { .. } => None,
    };
    match code {
        Some("no_config" | "config_unreadable") => "no_config",
        Some("parse") => "parse",
        Some("unsupported_provider") => "unsupported_provider",
        _ => "processing",
    }
}

/// Runs one ingest and records its metrics.
pub async fn run(job: IngestObject, cx: JobContext<Deps>) -> Result<(), JobError> {
    let started = Instant::now();
    let result = ingest(&job, &cx).await;
    let m = metrics();
    match &result {
        Ok(outcome) => {
            m.ingest
                .with_label_values(&[&job.provider, &job.tenant_id, outcome.label()])
                .inc();
            m.ingest_duration
                .with_label_values(&[&job.provider])
                .observe(started.elapsed().as_secs_f64());
            tracing::debug!(tenant = %job.tenant_id, provider = %job.provider, key = %job.key, outcome = outcome.label(), "ingested");
        }
        // Waiting for the embedding backlog to drain is not an ingest failure.
        Err(JobError::Snooze { .. }) => {}
        Err(err) => {
            m.ingest_errors
                .with_label_values(&[&job.provider, &job.tenant_id])
                .inc();
            m.worker_errors.with_label_values(&[error_type(err)]).inc();
        }
    }
    result.map(|_| ())
}

fn source_error(err: SourceError) -> JobError {
    match err {
        SourceError::Unavailable(m) => JobError::transient_with_code("processing", m),
        SourceError::Changed(m) => JobError::transient_with_code("processing", m),
        SourceError::TooLarge { .. } => JobError::permanent("too_large", err),
        SourceError::Denied(_) => JobError::permanent("access_denied", err),
        SourceError::NotFound(_) => JobError::permanent("not_found", err),
        SourceError::Invalid(_) => JobError::permanent("invalid", err),
    }
}

/// How many times an ingest starts over because the object changed under it before it gives up for this
/// attempt (an object rewritten continuously).
const CHANGED_RETRIES: u32 = 3;

/// Why one pass over the object did not finish.
enum Pass {
    Done(Outcome),
    /// The object changed between looking at it and committing: look again.
    Changed,
}

async fn ingest(job: &IngestObject, cx: &JobContext<Deps>) -> Result<Outcome, JobError> {
    let deps = &cx.state;
    let provider: Provider = job
        .provider
        .parse()
        .map_err(|e: String| JobError::permanent("unsupported_provider", e))?;
    let tenant = TenantId::parse(&job.tenant_id).map_err(|e| JobError::permanent("invalid", e))?;
    let connector = match deps.registry.load(&tenant, provider).await {
        Ok(Some(connector)) if connector.enabled => connector,
        Ok(Some(_)) => {
            return Err(JobError::transient_with_code(
                "no_config",
                format!(
                    "the {provider} connector of tenant {tenant} is disabled; enable it or the change is dropped when retries run out"
                ),
            ));
        }
        Ok(None) => {
            return Err(JobError::transient_with_code(
                "no_config",
                format!(
                    "tenant {tenant} has no {provider} connector; register one or the change is dropped when retries run out"
                ),
            ));
        }
        Err(LoadError::Database(e)) => return Err(e.into()),
        Err(e) => return Err(JobError::transient_with_code("config_unreadable", e)),
    };
    let source = deps
        .sources
        .get(&format!("{provider}:{tenant}"), &connector.config)
        .await
        .map_err(source_error)?;
    let document = NodeId::document(&tenant, provider, &job.key);
    let target = Target {
        tenant,
        document,
        payload_ref: match connector.config.bucket() {
            Some(bucket) => format!(
                "{}://{bucket}/{}",
                if provider == Provider::Gcs {
                    "gs"
                } else {
                    "s3"
                },
                job.key
            ),
            None => format!("file://{}", job.key),
        },
    };
    for _ in 0..CHANGED_RETRIES {
        if let Pass::Done(outcome) = ingest_once(job, cx, &*source, &target).await? {
            return Ok(outcome);
        }
    }
    Err(JobError::transient_with_code(
        "processing",
        format!(
            "{} changed {CHANGED_RETRIES} times while being ingested; trying again later",
            job.key
        ),
    ))
}

/// Where an object's document goes.
struct Target {
    tenant: TenantId,
    document: NodeId,
    payload_ref: String,
}

/// One pass: look at the object as the store has it now, fetch exactly that version, and commit only if
/// the store still has that version at commit time (checked under the object's lock, which every ingest of
/// the object takes): whatever order jobs finish in, the last commit reflects the store's latest state, so
/// an older upsert never overwrites a newer one and never brings a deleted document back.
async fn ingest_once<S: ObjectSource>(
    job: &IngestObject,
    cx: &JobContext<Deps>,
    source: &S,
    target: &Target,
) -> Result<Pass, JobError> {
    let deps = &cx.state;
    // Whatever the event said, the store's current state decides: events can arrive late or out of order.
    let looked = Instant::now();
    let stat = source.stat(&job.key).await.map_err(source_error)?;
    let mut fetching = looked.elapsed();
    let Some(meta) = stat else {
        return commit_delete(cx, source, job, target).await;
    };
    if job.op == ChangeOp::Delete {
        tracing::info!(tenant = %target.tenant, key = %job.key, "delete event for an object that exists again; keeping it");
        return Ok(Pass::Done(Outcome::Unchanged));
    }
    // Consoles and sync tools make empty `dir/` objects for folders.
    if job.key.ends_with('/') {
        return skip(cx, "a folder marker (the key ends with /)".to_owned()).await;
    }
    if let Some(stored) = graph::document_state(&deps.pool, target.document).await?
        && !stored.deleted
        && stored.version.as_deref() == Some(meta.version.as_str())
    {
        return Ok(Pass::Done(Outcome::Unchanged));
    }
    let mut conn = deps.pool.acquire().await?;
    if let Room::Limited(0, why) = deps
        .embedding_caps
        .room(&mut conn, target.tenant.as_str())
        .await?
    {
        return Err(JobError::snooze(
            BACKLOG_WAIT,
            format!("waiting for the embedding backlog: {why}"),
        ));
    }
    drop(conn);
    if meta.size > deps.max_file_bytes {
        return Err(JobError::permanent(
            "too_large",
            SourceError::TooLarge {
                size: meta.size,
                limit: deps.max_file_bytes,
            },
        ));
    }
    let read = Instant::now();
    let bytes = match source.fetch(&meta, deps.max_file_bytes).await {
        Ok(bytes) => bytes,
        Err(SourceError::Changed(_) | SourceError::NotFound(_)) => return Ok(Pass::Changed),
        Err(other) => return Err(source_error(other)),
    };
    fetching += read.elapsed();
    metrics().stage(Stage::Fetch, fetching);
    // Only naming the format, which reads no more than a magic number, is safe outside the sandbox. An
    // object in no format we read is not a failed document: it is recorded and counted, not dead-lettered.
    if extract::Format::detect(meta.content_type.as_deref(), &job.key, &bytes).is_none() {
        return skip(
            cx,
            format!(
                "not a document type this service reads (content type {:?}); expected PDF, DOCX, HTML, Markdown, text, JSON or CSV",
                meta.content_type.as_deref().unwrap_or("none")
            ),
        )
        .await;
    }
    // In a child process: a hostile file can end only that child (see extract::sandbox).
    let extracting = Instant::now();
    let extraction = deps
        .extractor
        .run(bytes, meta.content_type.clone(), &job.key)
        .await
        .map_err(|e| match e {
            SandboxError::Unavailable(_) => JobError::transient_with_code("processing", e),
            SandboxError::Refused(_) | SandboxError::Broke(_) => JobError::permanent("parse", e),
        })?;
    let sandboxed = extracting.elapsed();
    metrics().stage(Stage::Chunk, extraction.chunk_time);
    metrics().stage(
        Stage::Extract,
        sandboxed.saturating_sub(extraction.chunk_time),
    );

    let writing = Instant::now();
    let pass = write(cx, source, job, target, &meta, &extraction).await;
    metrics().stage(Stage::Write, writing.elapsed());
    pass
}

/// Ends the job as skipped, keeping why in its result (`progress`) for the operator.
async fn skip(cx: &JobContext<Deps>, why: String) -> Result<Pass, JobError> {
    let mut tx = cx.begin().await?;
    cx.checkpoint(&mut tx, &json!({"skipped": why})).await?;
    tx.commit().await?;
    Ok(Pass::Done(Outcome::Skipped))
}

/// Whether the store still has exactly `meta`'s version (asked under the object's lock).
async fn still_current<S: ObjectSource>(source: &S, meta: &ObjectMeta) -> Result<bool, JobError> {
    let now = source.stat(&meta.key).await.map_err(source_error)?;
    Ok(now.is_some_and(|now| now.version == meta.version))
}

/// Soft-deletes the object's document, unless the object exists again by the time we hold its lock.
async fn commit_delete<S: ObjectSource>(
    cx: &JobContext<Deps>,
    source: &S,
    job: &IngestObject,
    target: &Target,
) -> Result<Pass, JobError> {
    let mut tx = cx.begin().await?;
    graph::lock_document(&mut tx, target.document).await?;
    if source.stat(&job.key).await.map_err(source_error)?.is_some() {
        // Re-created meanwhile: this is an upsert now (or, for a delete event, nothing to do).
        return Ok(Pass::Changed);
    }
    graph::soft_delete_document(&mut tx, target.document).await?;
    tx.commit().await?;
    Ok(Pass::Done(Outcome::Deleted))
}

async fn write<S: ObjectSource>(
    cx: &JobContext<Deps>,
    source: &S,
    job: &IngestObject,
    target: &Target,
    meta: &ObjectMeta,
    extracted: &Extraction,
) -> Result<Pass, JobError> {
    let (tenant, document) = (&target.tenant, target.document);
    let chunks = &extracted.chunks;
    let content_hash = &extracted.content_hash;
    let mut tx = cx.begin().await?;
    // Every ingest of this object waits here for the others; then the store says whether what we read is
    // still its current version. If not, a newer change (or a delete) is, or will be, written by its own job.
    let stored = graph::lock_document(&mut tx, document).await?;
    if !still_current(source, meta).await? {
        return Ok(Pass::Changed);
    }
    let version = json!({
        "version": meta.version,
        "size": meta.size,
        "updated": meta.updated,
        "ingested_at": Utc::now(),
        "event_time": job.event_time,
        "source": job.source,
    });
    if let Some(stored) = &stored
        && !stored.deleted
        && stored.version.as_deref() == Some(meta.version.as_str())
    {
        return Ok(Pass::Done(Outcome::Unchanged));
    }
    if let Some(stored) = &stored
        && !stored.deleted
        && stored.content_hash.as_deref() == Some(content_hash.as_str())
    {
        // Same text under a new version: record the version, keep chunks and embeddings.
        graph::merge_props(&mut tx, document, &version).await?;
        tx.commit().await?;
        return Ok(Pass::Done(Outcome::Unchanged));
    }
    let mut props = json!({
        "title": extracted.title.clone().unwrap_or_else(|| job.key.rsplit('/').next().unwrap_or(&job.key).to_owned()),
        "uri": target.payload_ref,
        "key": job.key,
        "provider": job.provider,
        "content_hash": content_hash,
        "mime_type": extracted.format.mime(),
        "content_type": meta.content_type,
        "chunk_count": chunks.len(),
    });
    if let (Some(props), Some(version)) = (props.as_object_mut(), version.as_object()) {
        props.extend(version.clone());
    }
    graph::upsert_document(
        &mut tx,
        document,
        tenant.as_str(),
        &props,
        &target.payload_ref,
    )
    .await?;

    let existing = graph::chunks_of(&mut tx, document).await?;
    let mut writes = Vec::with_capacity(chunks.len());
    let mut to_embed = Vec::new();
    for chunk in chunks {
        let id = NodeId::chunk(document, chunk.index);
        let text_hash = extract::hash_text(&chunk.text);
        let unchanged = existing
            .iter()
            .any(|c| c.id == id.0 && c.text_hash.as_deref() == Some(text_hash.as_str()));
        if !unchanged {
            to_embed.push(EmbedNode {
                node_id: id,
                tenant_id: tenant.to_string(),
                action: EmbedAction::Embed,
            });
        }
        writes.push(ChunkWrite {
            id,
            embed: !unchanged,
            props: json!({
                "text": chunk.text,
                "index": chunk.index,
                "char_start": chunk.char_start,
                "char_end": chunk.char_end,
                "tokens": chunk.tokens,
                "text_hash": text_hash,
                "document_id": document,
            }),
        });
    }
    // Jobs before nodes: queuing an embedding may wait on a worker claiming the node's previous one, and
    // that worker must never wait on a node row this transaction already holds.
    engine::enqueue_many(&mut tx, &to_embed).await?;
    graph::write_chunks(
        &mut tx,
        document,
        tenant.as_str(),
        &target.payload_ref,
        &writes,
    )
    .await?;
    let keep: Vec<uuid::Uuid> = writes.iter().map(|w| w.id.0).collect();
    let gone: Vec<uuid::Uuid> = existing
        .iter()
        .map(|c| c.id)
        .filter(|id| !keep.contains(id))
        .collect();
    graph::remove_nodes(&mut tx, &gone).await?;
    tx.commit().await?;
    Ok(Pass::Done(match stored {
        None => Outcome::Created,
        Some(_) => Outcome::Updated,
    }))
}
