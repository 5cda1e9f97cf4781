//! Pure types shared by every layer: identifiers parsed at the edge, and the states things move through.
//!
//! Nothing here does I/O or knows about HTTP, SQL or apalis.

mod cron;
mod job;
mod node;
mod provider;
mod tenant;
mod text;

pub use cron::CronExpr;
pub use job::{AttemptError, JobId, JobState};
pub use node::{ChangeOp, EmbeddingStatus, NodeId};
pub use provider::Provider;
pub use tenant::TenantId;
pub use text::{nul_in, refuse_nul, storable_key};
