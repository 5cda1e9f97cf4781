//! Creating nodes through the API: validate each one, hold each tenant to its pending-embedding cap, and
//! write the nodes with their `embed_node` jobs in one transaction (a node is never left `queued` without a
//! job, and a job never points at a node that was not written).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::{JobId, NodeId, TenantId};
use crate::error::{Error, Result};
use crate::extract;
use crate::jobs::embed_node::{Caps, EmbedAction, EmbedNode, Room};
use crate::jobs::engine;
use crate::store::embeddings as embeddings_store;
use crate::store::nodes::{self as store, NewNode};

/// Most nodes one batch request may create.
pub const MAX_BATCH: usize = 200;
/// Longest text a node may carry (the model reads the first 256 tokens; the rest is kept for display).
pub const MAX_TEXT_BYTES: usize = 1 << 20;
/// What a client over a cap is told to wait.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);

/// A node as a client asks for it.
#[derive(Debug, Clone)]
pub struct NodeInput {
    /// Its id, when the client chooses it (makes retries idempotent); else a random one.
    pub id: Option<Uuid>,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// Its classes; the first is its `entity_type`.
    pub classes: Vec<String>,
    /// Its properties.
    pub props: Map<String, Value>,
    /// The text to embed (stored as `props.text`).
    pub text: Option<String>,
    /// Where its content came from.
    pub payload_ref: Option<String>,
}

/// What became of one requested node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// Written; with its embedding job when it has text.
    Created {
        /// The node.
        id: Uuid,
        /// `queued` or `skipped`.
        embedding_status: &'static str,
        /// Its embedding job.
        job_id: Option<JobId>,
    },
    /// A node with this id exists; nothing was changed.
    Exists {
        /// The node.
        id: Uuid,
    },
    /// Refused; the text says why.
    Invalid(String),
}

/// Why nothing was created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// A pending-embedding cap is reached: retry after the backlog drains.
    #[error("{message}")]
    OverCap {
        /// Suggested wait.
        retry_after: Duration,
        /// Which cap and by how much.
        message: String,
    },
    /// Anything else.
    #[error(transparent)]
    Other(#[from] Error),
}

fn validate(input: NodeInput) -> Result<NewNode, String> {
    if input.classes.is_empty() {
        return Err("classes must name at least one class (e.g. [\"Note\"])".to_owned());
    }
    if let Some(bad) = input.classes.iter().find(|c| {
        c.is_empty() || c.len() > 64 || !c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
    }) {
        return Err(format!(
            "class {bad:?} must be 1 to 64 ASCII letters, digits or underscores"
        ));
    }
    let mut props = input.props;
    let text = match (input.text, props.get("text")) {
        (Some(_), Some(_)) => {
            return Err("give the text either as `text` or as `props.text`, not both".to_owned());
        }
        (Some(text), None) => Some(text),
        (None, Some(Value::String(text))) => Some(text.clone()),
        (None, Some(Value::Null) | None) => None,
        (None, Some(_)) => return Err("props.text must be a string".to_owned()),
    };
    if text.as_ref().is_some_and(|t| t.len() > MAX_TEXT_BYTES) {
        return Err(format!("text is larger than {MAX_TEXT_BYTES} bytes"));
    }
    if text.as_ref().is_some_and(|t| t.contains('\0')) {
        return Err("text must not contain NUL characters".to_owned());
    }
    let embeddable = text.as_ref().is_some_and(|t| !t.trim().is_empty());
    if let Some(text) = text {
        props.insert(
            "text_hash".to_owned(),
            Value::from(extract::hash_text(&text)),
        );
        props.insert("text".to_owned(), Value::from(text));
    }
    Ok(NewNode {
        id: input.id.unwrap_or_else(Uuid::new_v4),
        tenant_id: input.tenant_id.to_string(),
        classes: input.classes,
        props: Value::Object(props),
        payload_ref: input.payload_ref,
        embedding_status: if embeddable { "queued" } else { "skipped" },
    })
}

/// Creates nodes and queues their embeddings. Invalid items are reported per item and the rest are
/// created; if any tenant's cap cannot take its new embeddings, nothing is created.
pub async fn create(
    pool: &PgPool,
    caps: Caps,
    inputs: Vec<NodeInput>,
) -> Result<Vec<Created>, CreateError> {
    let checked: Vec<Result<NewNode, String>> = inputs.into_iter().map(validate).collect();
    let mut by_tenant: BTreeMap<&str, usize> = BTreeMap::new();
    for node in checked.iter().flatten() {
        let count = by_tenant.entry(node.tenant_id.as_str()).or_default();
        if node.embedding_status == "queued" {
            *count += 1;
        }
    }
    let mut tx = pool.begin().await.map_err(Error::from)?;
    // Tenants in a fixed order, so two requests spanning the same tenants cannot deadlock on their locks.
    for (tenant, wanted) in &by_tenant {
        embeddings_store::lock_tenant(&mut tx, tenant).await?;
        if let Room::Limited(left, why) = caps.room(&mut tx, tenant).await?
            && (left as usize) < *wanted
        {
            return Err(CreateError::OverCap {
                retry_after: RETRY_AFTER,
                message: format!(
                    "too many embeddings pending: {why}; this request needs {wanted} more and {left} fit now; retry later"
                ),
            });
        }
    }
    let nodes: Vec<NewNode> = checked.iter().flatten().cloned().collect();
    let inserted = store::insert(&mut tx, &nodes).await?;
    let jobs: Vec<EmbedNode> = nodes
        .iter()
        .zip(&inserted)
        .filter(|(node, new)| **new && node.embedding_status == "queued")
        .map(|(node, _)| EmbedNode {
            node_id: NodeId(node.id),
            tenant_id: node.tenant_id.clone(),
            action: EmbedAction::Embed,
        })
        .collect();
    let enqueued = engine::enqueue_many(&mut tx, &jobs).await?;
    tx.commit().await.map_err(Error::from)?;

    let mut job_ids = jobs
        .iter()
        .zip(enqueued)
        .map(|(job, e)| (job.node_id.0, e.id));
    let mut written = nodes.iter().zip(inserted);
    Ok(checked
        .iter()
        .map(|item| match item {
            Err(reason) => Created::Invalid(reason.clone()),
            Ok(_) => {
                let (node, new) = written.next().expect("one result per valid node");
                if !new {
                    return Created::Exists { id: node.id };
                }
                let job_id = if node.embedding_status == "queued" {
                    job_ids.next().and_then(|(_, id)| id)
                } else {
                    None
                };
                Created::Created {
                    id: node.id,
                    embedding_status: node.embedding_status,
                    job_id,
                }
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(classes: &[&str], text: Option<&str>) -> NodeInput {
        NodeInput {
            id: None,
            tenant_id: TenantId::parse("acme").unwrap(),
            classes: classes.iter().map(|c| (*c).to_owned()).collect(),
            props: Map::new(),
            text: text.map(str::to_owned),
            payload_ref: None,
        }
    }

    #[test]
    fn a_node_with_text_is_queued_with_its_hash_and_one_without_is_skipped() {
        let node = validate(input(&["Note"], Some("hello"))).unwrap();
        assert_eq!(node.embedding_status, "queued");
        assert_eq!(node.props["text"], "hello");
        assert_eq!(node.props["text_hash"], extract::hash_text("hello"));
        assert_eq!(
            validate(input(&["Note"], None)).unwrap().embedding_status,
            "skipped"
        );
        assert_eq!(
            validate(input(&["Note"], Some("   ")))
                .unwrap()
                .embedding_status,
            "skipped"
        );
    }

    #[test]
    fn bad_classes_and_texts_are_refused_with_the_reason() {
        assert!(
            validate(input(&[], Some("x")))
                .unwrap_err()
                .contains("at least one class")
        );
        assert!(
            validate(input(&["no spaces"], None))
                .unwrap_err()
                .contains("letters, digits")
        );
        let mut both = input(&["Note"], Some("x"));
        both.props.insert("text".into(), Value::from("y"));
        assert!(validate(both).unwrap_err().contains("not both"));
        let mut typed = input(&["Note"], None);
        typed.props.insert("text".into(), Value::from(3));
        assert!(validate(typed).unwrap_err().contains("must be a string"));
    }
}
