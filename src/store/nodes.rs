//! SQL for nodes created and read through the API (ingested documents and chunks are written by `graph`).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::error::Result;

/// A node to create.
#[derive(Debug, Clone)]
pub struct NewNode {
    /// Its id.
    pub id: Uuid,
    /// Its tenant.
    pub tenant_id: String,
    /// Its classes (the first is its `entity_type`).
    pub classes: Vec<String>,
    /// Its properties (the text to embed is `props.text`).
    pub props: Value,
    /// Where its content came from, if anywhere.
    pub payload_ref: Option<String>,
    /// `queued` when it has text, else `skipped`.
    pub embedding_status: &'static str,
}

/// Inserts nodes in the caller's transaction; returns, per input, whether it was new (an existing id is
/// left untouched and reported as `false`).
pub async fn insert(conn: &mut PgConnection, nodes: &[NewNode]) -> Result<Vec<bool>> {
    let ids: Vec<Uuid> = nodes.iter().map(|n| n.id).collect();
    let tenants: Vec<&str> = nodes.iter().map(|n| n.tenant_id.as_str()).collect();
    // Arrays of arrays must be rectangular in PostgreSQL, so classes travel as JSON.
    let classes: Vec<Value> = nodes
        .iter()
        .map(|n| Value::from(n.classes.clone()))
        .collect();
    let props: Vec<&Value> = nodes.iter().map(|n| &n.props).collect();
    let refs: Vec<Option<&str>> = nodes.iter().map(|n| n.payload_ref.as_deref()).collect();
    let statuses: Vec<&str> = nodes.iter().map(|n| n.embedding_status).collect();
    let inserted: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO nodes (id, tenant_id, classes, props, payload_ref, embedding_status)
         SELECT id, tenant_id, ARRAY(SELECT jsonb_array_elements_text(classes)), props, payload_ref, status
         FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::jsonb[], $5::text[], $6::text[])
              AS n(id, tenant_id, classes, props, payload_ref, status)
         ON CONFLICT (id) DO NOTHING
         RETURNING id",
    )
    .bind(&ids)
    .bind(&tenants)
    .bind(&classes)
    .bind(&props)
    .bind(&refs)
    .bind(&statuses)
    .fetch_all(&mut *conn)
    .await?;
    Ok(ids.iter().map(|id| inserted.contains(id)).collect())
}

/// A node as the API shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct NodeRecord {
    /// Id.
    pub id: Uuid,
    /// Tenant.
    pub tenant_id: String,
    /// Classes.
    pub classes: Vec<String>,
    /// Properties.
    pub props: Value,
    /// Content origin.
    pub payload_ref: Option<String>,
    /// Embedding status.
    pub embedding_status: String,
    /// Why the last embedding attempt failed.
    pub embedding_error: Option<String>,
    /// Attempts of the current embedding request.
    pub embedding_attempts: i32,
    /// Model of the stored vector.
    pub embedding_model: Option<String>,
    /// When the vector was stored.
    pub embedded_at: Option<DateTime<Utc>>,
    /// Whether a vector is stored.
    pub has_embedding: bool,
    /// Its dimension, when stored.
    pub embedding_dimensions: Option<i32>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last content change.
    pub updated_at: DateTime<Utc>,
    /// Soft-deleted at.
    pub deleted_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str =
    "n.id, n.tenant_id, n.classes, n.props, n.payload_ref, n.embedding_status, n.embedding_error,
    n.embedding_attempts, n.embedding_model, n.embedded_at, e.node_id IS NOT NULL AS has_embedding,
    e.dimensions AS embedding_dimensions, n.created_at, n.updated_at, n.deleted_at";

/// One node.
pub async fn get<'e>(db: impl PgExecutor<'e>, id: Uuid) -> Result<Option<NodeRecord>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM nodes n LEFT JOIN node_embeddings e ON e.node_id = n.id WHERE n.id = $1"
    );
    Ok(sqlx::query_as::<_, NodeRecord>(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(db)
        .await?)
}

/// Which nodes a listing shows.
#[derive(Debug, Clone, Default)]
pub struct NodeFilter {
    /// One tenant.
    pub tenant_id: Option<String>,
    /// Nodes having this class.
    pub class: Option<String>,
    /// In this embedding status.
    pub embedding_status: Option<String>,
    /// With (or without) a stored vector.
    pub has_embedding: Option<bool>,
    /// Include soft-deleted nodes.
    pub include_deleted: bool,
    /// Resume after this (created_at, id) position, newest first.
    pub after: Option<(DateTime<Utc>, Uuid)>,
    /// Page size.
    pub limit: i64,
}

/// Nodes, newest first, a page at a time.
pub async fn list<'e>(db: impl PgExecutor<'e>, filter: &NodeFilter) -> Result<Vec<NodeRecord>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM nodes n LEFT JOIN node_embeddings e ON e.node_id = n.id
         WHERE ($1::text IS NULL OR n.tenant_id = $1)
           AND ($2::text IS NULL OR n.classes @> ARRAY[$2])
           AND ($3::text IS NULL OR n.embedding_status = $3)
           AND ($4::bool IS NULL OR (e.node_id IS NOT NULL) = $4)
           AND ($5 OR n.deleted_at IS NULL)
           AND ($6::timestamptz IS NULL OR (n.created_at, n.id) < ($6, $7))
         ORDER BY n.created_at DESC, n.id DESC
         LIMIT $8"
    );
    let (after_at, after_id) = filter.after.unzip();
    Ok(sqlx::query_as::<_, NodeRecord>(sqlx::AssertSqlSafe(sql))
        .bind(filter.tenant_id.as_deref())
        .bind(filter.class.as_deref())
        .bind(filter.embedding_status.as_deref())
        .bind(filter.has_embedding)
        .bind(filter.include_deleted)
        .bind(after_at)
        .bind(after_id)
        .bind(filter.limit)
        .fetch_all(db)
        .await?)
}
