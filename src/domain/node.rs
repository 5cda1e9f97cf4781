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
