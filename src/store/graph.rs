//! SQL for the graph: documents, their chunks, and the edges between them. The ingest job calls these in one
//! transaction per object, holding the document row's lock, so concurrent ingests of one object serialize.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::NodeId;
use crate::error::Result;

/// Edge from a chunk to the document it came from.
pub const DERIVED_FROM: &str = "DERIVED_FROM";

/// What the graph remembers of an ingested document.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DocumentState {
    /// The object version last ingested.
    pub version: Option<String>,
    /// Hash of its text last ingested.
    pub content_hash: Option<String>,
    /// Whether it is soft-deleted.
    pub deleted: bool,
}

/// Namespace of the per-object advisory locks (the first key of the two-key form), so they never meet
/// other advisory locks in the database.
const OBJECT_LOCKS: i32 = 0x616b_6701;

/// Serializes, until the transaction ends, every ingest of one object, whether or not its document exists
/// yet (a row lock cannot cover a row that is about to be inserted). Returns the document's state.
pub async fn lock_document(conn: &mut PgConnection, id: NodeId) -> Result<Option<DocumentState>> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2::uuid::text))")
        .bind(OBJECT_LOCKS)
        .bind(id.0)
        .execute(&mut *conn)
        .await?;
    Ok(sqlx::query_as::<_, DocumentState>(
        "SELECT props->>'version' AS version, props->>'content_hash' AS content_hash, deleted_at IS NOT NULL AS deleted
         FROM nodes WHERE id = $1 FOR UPDATE",
    )
    .bind(id.0)
    .fetch_optional(&mut *conn)
    .await?)
}

/// A document's state, without locking (to skip work early; decisions are made again under the lock).
pub async fn document_state<'e>(
    db: impl sqlx::PgExecutor<'e>,
    id: NodeId,
) -> Result<Option<DocumentState>> {
    Ok(sqlx::query_as::<_, DocumentState>(
        "SELECT props->>'version' AS version, props->>'content_hash' AS content_hash, deleted_at IS NOT NULL AS deleted
         FROM nodes WHERE id = $1",
    )
    .bind(id.0)
    .fetch_optional(db)
    .await?)
}

/// Inserts or replaces a document node; a soft-deleted one comes back. Documents carry no embedding of
/// their own (their chunks do).
pub async fn upsert_document(
    conn: &mut PgConnection,
    id: NodeId,
    tenant_id: &str,
    props: &Value,
    payload_ref: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO nodes (id, tenant_id, classes, props, payload_ref, embedding_status)
         VALUES ($1, $2, ARRAY['Document'], $3, $4, 'skipped')
         ON CONFLICT (id) DO UPDATE
         SET props = EXCLUDED.props, payload_ref = EXCLUDED.payload_ref, deleted_at = NULL, updated_at = now()",
    )
    .bind(id.0)
    .bind(tenant_id)
    .bind(props)
    .bind(payload_ref)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Merges `patch` into a node's props (e.g. a new version whose text did not change).
pub async fn merge_props(conn: &mut PgConnection, id: NodeId, patch: &Value) -> Result<()> {
    sqlx::query("UPDATE nodes SET props = props || $2, updated_at = now() WHERE id = $1")
        .bind(id.0)
        .bind(patch)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A stored chunk of a document.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredChunk {
    /// Its id.
    pub id: Uuid,
    /// Hash of its text.
    pub text_hash: Option<String>,
    /// Whether it is soft-deleted.
    pub deleted: bool,
}

/// The chunks of a document.
pub async fn chunks_of(conn: &mut PgConnection, document: NodeId) -> Result<Vec<StoredChunk>> {
    Ok(sqlx::query_as::<_, StoredChunk>(
        "SELECT n.id, n.props->>'text_hash' AS text_hash, n.deleted_at IS NOT NULL AS deleted
         FROM edges e JOIN nodes n ON n.id = e.src
         WHERE e.dst = $1 AND e.rel = $2",
    )
    .bind(document.0)
    .bind(DERIVED_FROM)
    .fetch_all(&mut *conn)
    .await?)
}

/// A chunk to write.
#[derive(Debug, Clone)]
pub struct ChunkWrite {
    /// Its id.
    pub id: NodeId,
    /// Its props (text, index, offsets, hash, document id).
    pub props: Value,
    /// Whether its text is new or changed, so it needs (re-)embedding.
    pub embed: bool,
}

/// Writes chunks of `document` and their DERIVED_FROM edges. Chunks whose text changed are queued for
/// embedding afresh; unchanged ones keep their embedding.
pub async fn write_chunks(
    conn: &mut PgConnection,
    document: NodeId,
    tenant_id: &str,
    payload_ref: &str,
    chunks: &[ChunkWrite],
) -> Result<()> {
    if chunks.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = chunks.iter().map(|c| c.id.0).collect();
    let props: Vec<&Value> = chunks.iter().map(|c| &c.props).collect();
    let embed: Vec<bool> = chunks.iter().map(|c| c.embed).collect();
    sqlx::query(
        "INSERT INTO nodes (id, tenant_id, classes, props, payload_ref, embedding_status)
         SELECT id, $4, ARRAY['Chunk'], props, $5, 'queued'
         FROM unnest($1::uuid[], $2::jsonb[], $3::bool[]) AS c(id, props, embed)
         ON CONFLICT (id) DO UPDATE
         SET props = EXCLUDED.props, payload_ref = EXCLUDED.payload_ref, deleted_at = NULL, updated_at = now(),
             embedding_status = CASE WHEN nodes.props->>'text_hash' IS DISTINCT FROM EXCLUDED.props->>'text_hash'
                                     THEN 'queued' ELSE nodes.embedding_status END,
             embedding_error = CASE WHEN nodes.props->>'text_hash' IS DISTINCT FROM EXCLUDED.props->>'text_hash'
                                    THEN NULL ELSE nodes.embedding_error END,
             embedding_attempts = CASE WHEN nodes.props->>'text_hash' IS DISTINCT FROM EXCLUDED.props->>'text_hash'
                                       THEN 0 ELSE nodes.embedding_attempts END",
    )
    .bind(&ids)
    .bind(&props)
    .bind(&embed)
    .bind(tenant_id)
    .bind(payload_ref)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO edges (src, rel, dst, tenant_id) SELECT id, $2, $3, $4 FROM unnest($1::uuid[]) AS c(id)
         ON CONFLICT DO NOTHING",
    )
    .bind(&ids)
    .bind(DERIVED_FROM)
    .bind(document.0)
    .bind(tenant_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Removes chunks (and their edges) a document no longer has.
pub async fn remove_nodes(conn: &mut PgConnection, ids: &[Uuid]) -> Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query("DELETE FROM nodes WHERE id = ANY($1)")
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected())
}

/// Soft-deletes a document and its chunks; returns how many nodes changed (0 when already deleted).
pub async fn soft_delete_document(conn: &mut PgConnection, document: NodeId) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE nodes SET deleted_at = now(), updated_at = now()
         WHERE deleted_at IS NULL
           AND (id = $1 OR id IN (SELECT src FROM edges WHERE dst = $1 AND rel = $2))",
    )
    .bind(document.0)
    .bind(DERIVED_FROM)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// What a purge removes (or, dry, would remove).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow, serde::Serialize, serde::Deserialize,
)]
pub struct PurgeCounts {
    /// Soft-deleted documents.
    pub documents: i64,
    /// Their chunks.
    pub chunks: i64,
    /// Edges touching either.
    pub edges: i64,
}

impl std::ops::AddAssign for PurgeCounts {
    fn add_assign(&mut self, other: Self) {
        self.documents += other.documents;
        self.chunks += other.chunks;
        self.edges += other.edges;
    }
}

// The documents past retention ($1 tenant or all, $2 cutoff), their soft-deleted chunks, and every edge that
// touches one of them. Shared by the dry count and the delete, so the two cannot disagree.
const PURGEABLE: &str = "
    chunks AS (
        SELECT DISTINCT e.src AS id FROM edges e JOIN docs d ON e.dst = d.id JOIN nodes c ON c.id = e.src
         WHERE e.rel = 'DERIVED_FROM' AND c.deleted_at IS NOT NULL),
    doomed AS (SELECT id FROM docs UNION SELECT id FROM chunks),
    touching AS (
        SELECT count(*) AS n FROM edges
         WHERE src IN (SELECT id FROM doomed) OR dst IN (SELECT id FROM doomed))";

const EXPIRED_DOCS: &str = "SELECT id FROM nodes
     WHERE entity_type = 'Document' AND deleted_at < $2 AND ($1::text IS NULL OR tenant_id = $1)";

/// Counts what a purge of documents soft-deleted before `cutoff` would remove.
pub async fn count_purgeable(
    conn: &mut PgConnection,
    tenant: Option<&str>,
    cutoff: DateTime<Utc>,
) -> Result<PurgeCounts> {
    let sql = format!(
        "WITH docs AS ({EXPIRED_DOCS}), {PURGEABLE}
         SELECT (SELECT count(*) FROM docs) AS documents, (SELECT count(*) FROM chunks) AS chunks,
                (SELECT n FROM touching) AS edges"
    );
    // Built only from the constants above.
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(tenant)
        .bind(cutoff)
        .fetch_one(&mut *conn)
        .await?)
}

/// Hard-deletes up to `limit` documents soft-deleted before `cutoff`, oldest first, with their chunks and
/// every edge touching them (embeddings go by cascade). Rows another purger holds are skipped, not waited for.
pub async fn purge_batch(
    conn: &mut PgConnection,
    tenant: Option<&str>,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> Result<PurgeCounts> {
    let sql = format!(
        "WITH docs AS ({EXPIRED_DOCS} ORDER BY deleted_at, id LIMIT $3 FOR UPDATE SKIP LOCKED), {PURGEABLE},
         gone AS (DELETE FROM nodes WHERE id IN (SELECT id FROM doomed) RETURNING id)
         SELECT (SELECT count(*) FROM docs) AS documents, (SELECT count(*) FROM chunks) AS chunks,
                (SELECT n FROM touching) AS edges, (SELECT count(*) FROM gone) AS deleted"
    );
    let (documents, chunks, edges, _deleted): (i64, i64, i64, i64) =
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant)
            .bind(cutoff)
            .bind(limit)
            .fetch_one(&mut *conn)
            .await?;
    Ok(PurgeCounts {
        documents,
        chunks,
        edges,
    })
}
