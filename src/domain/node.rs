use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Provider, TenantId};

/// Namespace for the name-based ids of ingested nodes (fixed forever: changing it would orphan every node).
const NODE_NAMESPACE: Uuid = Uuid::from_u128(0x6f1b_4c62_9a7e_4d55_8c3e_2f0a_b1d4_e9a7);

/// A node's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub Uuid);

impl NodeId {
    /// The Document node of an object: the same object always maps to the same node.
    pub fn document(tenant: &TenantId, provider: Provider, key: &str) -> Self {
        let name = format!("document\u{1f}{tenant}\u{1f}{provider}\u{1f}{key}");
        Self(Uuid::new_v5(&NODE_NAMESPACE, name.as_bytes()))
    }

    /// The `index`th chunk of a document.
    pub fn chunk(document: NodeId, index: usize) -> Self {
        let name = format!("chunk\u{1f}{}\u{1f}{index}", document.0);
        Self(Uuid::new_v5(&NODE_NAMESPACE, name.as_bytes()))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What happened to an object in storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeOp {
    /// Created or overwritten (or its metadata changed).
    Upsert,
    /// Deleted or archived.
    Delete,
}

impl fmt::Display for ChangeOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChangeOp::Upsert => "upsert",
            ChangeOp::Delete => "delete",
        })
    }
}

/// Where a node's embedding is: `queued` -> `processing` -> `ready`; `failed` once its retries are spent;
/// `skipped` when it has no text to embed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingStatus {
    /// Waiting for a worker (or for a retry).
    Queued,
    /// A worker has it.
    Processing,
    /// Its vector is stored.
    Ready,
    /// Its attempts ran out, or it was refused; `embedding_error` says why.
    Failed,
    /// Nothing to embed.
    Skipped,
}

impl EmbeddingStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [EmbeddingStatus; 5] = [
        EmbeddingStatus::Queued,
        EmbeddingStatus::Processing,
        EmbeddingStatus::Ready,
        EmbeddingStatus::Failed,
        EmbeddingStatus::Skipped,
    ];

    /// Its name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            EmbeddingStatus::Queued => "queued",
            EmbeddingStatus::Processing => "processing",
            EmbeddingStatus::Ready => "ready",
            EmbeddingStatus::Failed => "failed",
            EmbeddingStatus::Skipped => "skipped",
        }
    }
}

impl fmt::Display for EmbeddingStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EmbeddingStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EmbeddingStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown embedding status {s:?}: expected one of {}",
                    EmbeddingStatus::ALL.map(EmbeddingStatus::as_str).join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_stable_and_distinct() {
        let acme = TenantId::parse("acme").unwrap();
        let doc = NodeId::document(&acme, Provider::S3, "a/b.pdf");
        assert_eq!(doc, NodeId::document(&acme, Provider::S3, "a/b.pdf"));
        assert_ne!(doc, NodeId::document(&acme, Provider::Gcs, "a/b.pdf"));
        assert_ne!(
            doc,
            NodeId::document(&TenantId::parse("other").unwrap(), Provider::S3, "a/b.pdf")
        );
        assert_eq!(NodeId::chunk(doc, 3), NodeId::chunk(doc, 3));
        assert_ne!(NodeId::chunk(doc, 3), NodeId::chunk(doc, 4));
    }
}
