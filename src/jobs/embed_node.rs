//! `embed_node`: computes and stores a node's embedding. One pending job per node; per-tenant fairness; the
//! guide's retry defaults (5 attempts, 10 s base doubling to 300 s).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::engine::{Backoff, Job, Policy, Uniqueness};
use crate::domain::NodeId;

/// Queue of embedding jobs.
pub const QUEUE: &str = "embedding";

/// Why a node is (re-)embedded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbedAction {
    /// First embedding, or its text changed.
    Embed,
    /// Recompute (e.g. after a model change) even if one exists.
    Refresh,
}

/// Arguments: which node, for which tenant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbedNode {
    /// The node.
    pub node_id: NodeId,
    /// Its tenant.
    pub tenant_id: String,
    /// Why.
    pub action: EmbedAction,
}

impl Job for EmbedNode {
    const KIND: &'static str = "embed_node";

    fn policy() -> Policy {
        Policy {
            max_attempts: 5,
            backoff: Backoff::exponential(Duration::from_secs(10), 2.0, Duration::from_secs(300)),
            timeout: Duration::from_secs(120),
            concurrency: 2,
            uniqueness: Uniqueness::WhileActive,
            fair: true,
            ..Policy::new(QUEUE)
        }
    }

    /// One pending job per node: a second request while one is pending or running is a no-op.
    fn unique_key(&self) -> Option<String> {
        Some(self.node_id.to_string())
    }

    fn tenant_id(&self) -> Option<&str> {
        Some(&self.tenant_id)
    }
}
