//! SQL for embeddings: the vector index set-up, storing vectors, search, the pending-work caps, status and
//! queue figures, and the requeue selection.

use serde_json::Value;
use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use crate::domain::NodeId;
use crate::error::Result;

/// The dimension of the pgvector column and its HNSW index (all-MiniLM-L6-v2's). Vectors of other sizes are
/// stored and searched exactly.
pub const INDEXED_DIMENSIONS: usize = 384;

const EMBED_KIND: &str = "embed_node";

/// How search finds neighbours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VectorIndex {
    /// pgvector's HNSW cosine index.
    Hnsw,
    /// Exact cosine over every vector of the tenant, and why there is no index.
    Exact(String),
}

/// Sets up pgvector when the server has it: the extension, a generated `vector(384)` column and its HNSW
/// index. Idempotent and serialised between processes. Never fails: without pgvector (not installed, or no
/// right to create it) search stays exact, and the answer says why.
pub async fn prepare(pool: &PgPool) -> VectorIndex {
    match try_prepare(pool).await {
        Ok(index) => index,
        Err(err) => VectorIndex::Exact(format!("setting up pgvector failed: {err}")),
    }
}

async fn try_prepare(pool: &PgPool) -> Result<VectorIndex, sqlx::Error> {
    let available: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector')",
    )
    .fetch_one(pool)
    .await?;
    if !available {
        return Ok(VectorIndex::Exact(
            "the pgvector extension is not installed on the PostgreSQL server".to_owned(),
        ));
    }
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock(hashtext('activekg:vector_index'))")
        .execute(&mut *conn)
        .await?;
    let result = async {
        if let Err(err) = sqlx::query("CREATE EXTENSION IF NOT EXISTS vector").execute(&mut *conn).await {
            return Ok(VectorIndex::Exact(format!(
                "cannot create the pgvector extension ({err}); a superuser can run `CREATE EXTENSION vector` in this database"
            )));
        }
        sqlx::query(
            "ALTER TABLE node_embeddings ADD COLUMN IF NOT EXISTS vec vector(384)
             GENERATED ALWAYS AS (CASE WHEN dimensions = 384 THEN embedding::vector(384) END) STORED",
        )
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "CREATE INDEX IF NOT EXISTS node_embeddings_hnsw ON node_embeddings USING hnsw (vec vector_cosine_ops)",
        )
        .execute(&mut *conn)
        .await?;
        Ok(VectorIndex::Hnsw)
    }
    .await;
    sqlx::query("SELECT pg_advisory_unlock(hashtext('activekg:vector_index'))")
        .execute(&mut *conn)
        .await?;
    result
}

/// What the embedding job needs to know about a node.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct NodeText {
    /// Its tenant.
    pub tenant_id: String,
    /// `props.text`, the text embedded.
    pub text: Option<String>,
    /// Whether it is soft-deleted.
    pub deleted: bool,
    /// The model of its stored vector, if any.
    pub model: Option<String>,
    /// The text hash its stored vector was made from, if any.
    pub embedded_hash: Option<String>,
}

/// The node's text and the provenance of its current vector.
pub async fn node_text<'e>(db: impl PgExecutor<'e>, id: NodeId) -> Result<Option<NodeText>> {
    Ok(sqlx::query_as::<_, NodeText>(
        "SELECT n.tenant_id, n.props->>'text' AS text, n.deleted_at IS NOT NULL AS deleted,
                e.model, e.text_hash AS embedded_hash
         FROM nodes n LEFT JOIN node_embeddings e ON e.node_id = n.id
         WHERE n.id = $1",
    )
    .bind(id.0)
    .fetch_optional(db)
    .await?)
}

/// Locks the node row and reads its text, so a vector is stored only for the text it was made from.
pub async fn lock_text(conn: &mut PgConnection, id: NodeId) -> Result<Option<Option<String>>> {
    Ok(sqlx::query_scalar::<_, Option<String>>(
        "SELECT props->>'text' FROM nodes WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
    )
    .bind(id.0)
    .fetch_optional(&mut *conn)
    .await?)
}

/// Stores a node's vector and marks it ready, in the caller's transaction.
pub async fn save(
    conn: &mut PgConnection,
    id: NodeId,
    tenant_id: &str,
    model: &str,
    vector: &[f32],
    text_hash: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO node_embeddings (node_id, tenant_id, model, dimensions, embedding, text_hash)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (node_id) DO UPDATE
         SET model = EXCLUDED.model, dimensions = EXCLUDED.dimensions, embedding = EXCLUDED.embedding,
             text_hash = EXCLUDED.text_hash, created_at = now()",
    )
    .bind(id.0)
    .bind(tenant_id)
    .bind(model)
    .bind(vector.len() as i32)
    .bind(vector)
    .bind(text_hash)
    .execute(&mut *conn)
    .await?;
    mark(conn, id, "ready", Some(model)).await
}

/// Marks a node ready (its stored vector is current) or skipped (no text), clearing any earlier error.
pub async fn mark(
    conn: &mut PgConnection,
    id: NodeId,
    status: &str,
    model: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "UPDATE nodes SET embedding_status = $2, embedding_error = NULL,
                embedding_model = coalesce($3, embedding_model),
                embedded_at = CASE WHEN $2 = 'ready' THEN now() ELSE embedded_at END
         WHERE id = $1",
    )
    .bind(id.0)
    .bind(status)
    .bind(model)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Shows a node as being embedded by attempt `attempt` (the claim does not touch nodes; see the
/// `jobs_embed_node_moved` trigger for why).
pub async fn mark_processing<'e>(db: impl PgExecutor<'e>, id: NodeId, attempt: i32) -> Result<()> {
    sqlx::query(
        "UPDATE nodes SET embedding_status = 'processing', embedding_attempts = $2
         WHERE id = $1 AND (embedding_status <> 'processing' OR embedding_attempts <> $2)",
    )
    .bind(id.0)
    .bind(attempt)
    .execute(db)
    .await?;
    Ok(())
}

/// Pending embedding work (jobs waiting or running), counted up to a bound so the check stays cheap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// The tenant's (at most the bound).
    pub tenant: i64,
    /// Everyone's (at most the bound).
    pub total: i64,
}

/// Serialises embedding-creating requests of one tenant until the transaction ends, so two concurrent
/// requests cannot both squeeze under the cap.
pub async fn lock_tenant(conn: &mut PgConnection, tenant_id: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('activekg:embed_cap'), hashtext($1))")
        .bind(tenant_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Counts pending embeddings, the tenant's up to `tenant_bound` and everyone's up to `total_bound`: in
/// `jobs`, and in the outbox on their way to Redis (the caller adds what Redis holds, after this, so a job
/// moving meanwhile is counted twice rather than missed).
pub async fn pending<'e>(
    db: impl PgExecutor<'e>,
    tenant_id: &str,
    tenant_bound: i64,
    total_bound: i64,
) -> Result<Pending> {
    let (tenant, total): (i64, i64) = sqlx::query_as(
        "SELECT
            (SELECT count(*) FROM (SELECT 1 FROM jobs WHERE kind = $1 AND state IN ('available', 'running')
                                   AND tenant_id = $2
                                   UNION ALL SELECT 1 FROM job_outbox WHERE kind = $1 AND tenant_id = $2
                                   LIMIT $3) t),
            (SELECT count(*) FROM (SELECT 1 FROM jobs WHERE kind = $1 AND state IN ('available', 'running')
                                   UNION ALL SELECT 1 FROM job_outbox WHERE kind = $1
                                   LIMIT $4) a)",
    )
    .bind(EMBED_KIND)
    .bind(tenant_id)
    .bind(tenant_bound)
    .bind(total_bound)
    .fetch_one(db)
    .await?;
    Ok(Pending { tenant, total })
}

/// A search hit.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Hit {
    /// The node.
    pub id: Uuid,
    /// Its classes.
    pub classes: Vec<String>,
    /// Its props.
    pub props: Value,
    /// Cosine similarity to the query (1 is identical).
    pub score: f64,
}

/// The `k` live nodes of a tenant whose vectors (from `model`) are most similar to `query`.
pub async fn search(
    pool: &PgPool,
    index: &VectorIndex,
    tenant_id: &str,
    model: &str,
    query: &[f32],
    k: i64,
    classes: Option<&[String]>,
) -> Result<Vec<Hit>> {
    let mut tx = pool.begin().await?;
    let hits = if *index == VectorIndex::Hnsw && query.len() == INDEXED_DIMENSIONS {
        // Filtering by tenant after the index scan could leave fewer than k rows; pgvector 0.8's iterative
        // scan keeps walking the graph until k rows pass the filter. Relaxed order is re-sorted outside.
        sqlx::query("SET LOCAL hnsw.iterative_scan = relaxed_order")
            .execute(&mut *tx)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET LOCAL hnsw.ef_search = {}",
            k.clamp(40, 1000)
        )))
        .execute(&mut *tx)
        .await?;
        sqlx::query_as::<_, Hit>(
            "SELECT id, classes, props, score FROM (
                 SELECT n.id, n.classes, n.props, 1 - (e.vec <=> $2::real[]::vector(384)) AS score
                 FROM node_embeddings e JOIN nodes n ON n.id = e.node_id
                 WHERE e.tenant_id = $1 AND e.model = $3 AND e.vec IS NOT NULL AND n.deleted_at IS NULL
                   AND ($5::text[] IS NULL OR n.classes && $5)
                 ORDER BY e.vec <=> $2::real[]::vector(384)
                 LIMIT $4
             ) hits ORDER BY score DESC",
        )
        .bind(tenant_id)
        .bind(query)
        .bind(model)
        .bind(k)
        .bind(classes)
        .fetch_all(&mut *tx)
        .await?
    } else {
        sqlx::query_as::<_, Hit>(
            "SELECT n.id, n.classes, n.props, activekg_cosine(e.embedding, $2) AS score
             FROM node_embeddings e JOIN nodes n ON n.id = e.node_id
             WHERE e.tenant_id = $1 AND e.model = $3 AND e.dimensions = cardinality($2::real[])
               AND n.deleted_at IS NULL AND ($5::text[] IS NULL OR n.classes && $5)
             ORDER BY score DESC NULLS LAST
             LIMIT $4",
        )
        .bind(tenant_id)
        .bind(query)
        .bind(model)
        .bind(k)
        .bind(classes)
        .fetch_all(&mut *tx)
        .await?
    };
    tx.commit().await?;
    Ok(hits)
}

/// Live nodes by embedding status.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StatusCount {
    /// The status.
    pub status: String,
    /// Nodes in it.
    pub nodes: i64,
    /// Of those, how many have a stored vector.
    pub with_embedding: i64,
}

/// Counts live nodes by embedding status, for one tenant or all.
pub async fn status_counts<'e>(
    db: impl PgExecutor<'e>,
    tenant_id: Option<&str>,
) -> Result<Vec<StatusCount>> {
    Ok(sqlx::query_as::<_, StatusCount>(
        "SELECT n.embedding_status AS status, count(*) AS nodes, count(e.node_id) AS with_embedding
         FROM nodes n LEFT JOIN node_embeddings e ON e.node_id = n.id
         WHERE n.deleted_at IS NULL AND ($1::text IS NULL OR n.tenant_id = $1)
         GROUP BY n.embedding_status ORDER BY n.embedding_status",
    )
    .bind(tenant_id)
    .fetch_all(db)
    .await?)
}

/// Which nodes a requeue looks at.
#[derive(Debug, Clone, Default)]
pub struct RequeueFilter {
    /// One tenant, or all.
    pub tenant_id: Option<String>,
    /// Only these nodes.
    pub node_ids: Option<Vec<Uuid>>,
    /// Only nodes in these statuses (`None`: any).
    pub statuses: Option<Vec<String>>,
    /// Only nodes without a stored vector.
    pub only_missing_embedding: bool,
    /// At most this many nodes.
    pub limit: i64,
}

const FILTER: &str = "n.deleted_at IS NULL
    AND ($1::text IS NULL OR n.tenant_id = $1)
    AND ($2::uuid[] IS NULL OR n.id = ANY($2))
    AND ($3::text[] IS NULL OR n.embedding_status = ANY($3))";

/// Marks ready the matching nodes whose stored vector was made from their current text and model but whose
/// status says otherwise (e.g. left `queued` by an older deployment). Returns how many.
pub async fn backfill_ready(
    conn: &mut PgConnection,
    filter: &RequeueFilter,
    model: &str,
) -> Result<u64> {
    let sql = format!(
        "WITH picked AS (
             SELECT n.id FROM nodes n JOIN node_embeddings e ON e.node_id = n.id
             WHERE {FILTER} AND n.embedding_status <> 'ready' AND e.model = $5
               AND e.text_hash = n.props->>'text_hash'
             ORDER BY n.id LIMIT $4 FOR UPDATE OF n SKIP LOCKED)
         UPDATE nodes n SET embedding_status = 'ready', embedding_error = NULL, embedding_model = $5,
                embedded_at = coalesce(n.embedded_at, now())
         FROM picked WHERE n.id = picked.id"
    );
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(filter.tenant_id.as_deref())
        .bind(filter.node_ids.as_deref())
        .bind(filter.statuses.as_deref())
        .bind(filter.limit)
        .bind(model)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected())
}

/// Picks up to `limit` matching nodes that have text, and resets them to `queued` for a new embedding
/// request (attempts from zero, error cleared). Returns them with their tenants.
pub async fn pick_for_requeue(
    conn: &mut PgConnection,
    filter: &RequeueFilter,
) -> Result<Vec<(Uuid, String)>> {
    let sql = format!(
        "WITH picked AS (
             SELECT n.id FROM nodes n
             WHERE {FILTER} AND coalesce(n.props->>'text', '') <> ''
               AND (NOT $5 OR NOT EXISTS (SELECT 1 FROM node_embeddings e WHERE e.node_id = n.id))
             ORDER BY n.created_at, n.id LIMIT $4 FOR UPDATE OF n SKIP LOCKED)
         UPDATE nodes n SET embedding_status = 'queued', embedding_error = NULL, embedding_attempts = 0
         FROM picked WHERE n.id = picked.id
         RETURNING n.id, n.tenant_id"
    );
    Ok(
        sqlx::query_as::<_, (Uuid, String)>(sqlx::AssertSqlSafe(sql))
            .bind(filter.tenant_id.as_deref())
            .bind(filter.node_ids.as_deref())
            .bind(filter.statuses.as_deref())
            .bind(filter.limit)
            .bind(filter.only_missing_embedding)
            .fetch_all(&mut *conn)
            .await?,
    )
}
