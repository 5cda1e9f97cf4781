//! Where documents come from: each provider's configuration (and, with ingestion, its object source).
//!
//! No SQL, no HTTP, no encryption here: configurations arrive already decrypted.

pub mod config;

pub use config::{ConnectorConfig, secret_fields};
