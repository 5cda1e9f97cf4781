//! Where documents come from: each provider's configuration and its object source (S3, GCS, a local
//! folder) behind the one [`ObjectSource`] interface.
//!
//! No SQL, no HTTP API, no encryption here: configurations arrive already decrypted.

pub mod config;
pub mod gcs;
pub mod local;
pub mod s3;
pub mod source;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use config::{ConnectorConfig, secret_fields};
pub use source::{ObjectMeta, ObjectSource, Page, SourceError};

/// Any configured backend.
#[derive(Debug, Clone)]
pub enum Source {
    /// S3.
    S3(s3::S3Source),
    /// GCS.
    Gcs(Box<gcs::GcsSource>),
    /// Local folder.
    Local(local::LocalSource),
}

impl Source {
    /// The backend a configuration describes.
    pub async fn open(config: &ConnectorConfig) -> Result<Self, SourceError> {
        Ok(match config {
            ConnectorConfig::S3(c) => Self::S3(s3::S3Source::new(c).await),
            ConnectorConfig::Gcs(c) => Self::Gcs(Box::new(gcs::GcsSource::new(c).await?)),
            ConnectorConfig::Local(c) => Self::Local(local::LocalSource::new(c)),
        })
    }
}

impl ObjectSource for Source {
    async fn stat(&self, key: &str) -> Result<Option<ObjectMeta>, SourceError> {
        match self {
            Self::S3(s) => s.stat(key).await,
            Self::Gcs(s) => s.stat(key).await,
            Self::Local(s) => s.stat(key).await,
        }
    }

    async fn fetch(&self, object: &ObjectMeta, max_bytes: u64) -> Result<Vec<u8>, SourceError> {
        match self {
            Self::S3(s) => s.fetch(object, max_bytes).await,
            Self::Gcs(s) => s.fetch(object, max_bytes).await,
            Self::Local(s) => s.fetch(object, max_bytes).await,
        }
    }

    async fn list(
        &self,
        prefix: &str,
        page_token: Option<&str>,
        page_size: u32,
    ) -> Result<Page, SourceError> {
        match self {
            Self::S3(s) => s.list(prefix, page_token, page_size).await,
            Self::Gcs(s) => s.list(prefix, page_token, page_size).await,
            Self::Local(s) => s.list(prefix, page_token, page_size).await,
        }
    }
}

/// Backends built once per configuration and reused: building one (credential chains, TLS) costs more than
/// a request. A changed configuration arrives as a new `Arc` and gets a new backend.
#[derive(Debug, Default)]
pub struct Sources {
    built: Mutex<HashMap<String, Built>>,
}

/// The configuration a backend was built from, and the backend.
type Built = (Arc<ConnectorConfig>, Arc<Source>);

impl Sources {
    /// The backend for `config`, identified by `key` (e.g. tenant and provider).
    pub async fn get(
        &self,
        key: &str,
        config: &Arc<ConnectorConfig>,
    ) -> Result<Arc<Source>, SourceError> {
        if let Some((seen, source)) = self
            .built
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            && Arc::ptr_eq(seen, config)
        {
            return Ok(source.clone());
        }
        let source = Arc::new(Source::open(config).await?);
        self.built
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_owned(), (config.clone(), source.clone()));
        Ok(source)
    }
}
