//! Multi-step flows built from jobs and the rooms below them: [`intake`] turns verified storage events into
//! `ingest_object` jobs, whether pushed or pulled by the Pub/Sub [`subscriber`]; [`nodes`] creates nodes with their embedding jobs under the pending caps;
//! [`embeddings`] reports on, requeues and searches the embeddings; [`connector_check`] tests one connector and
//! ingests one object on request.

pub mod connector_check;
pub mod embeddings;
pub mod intake;
pub mod nodes;
pub mod pubsub_topics;
pub mod subscriber;
