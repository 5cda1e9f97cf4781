//! The one interface every storage backend offers: stat an object, fetch it (streamed, with a byte cap), and
//! list one page of keys. Errors say what the caller should do next: missing, refused (permanent), too big
//! (permanent, with sizes), or unavailable (retry).

use std::future::Future;

use chrono::{DateTime, Utc};

/// What a backend knows about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key (path inside the bucket or folder).
    pub key: String,
    /// Version: the S3 ETag, the GCS generation, or a local file's mtime and size.
    pub version: String,
    /// Size in bytes.
    pub size: u64,
    /// Content type, when the store records one.
    pub content_type: Option<String>,
    /// Last change.
    pub updated: Option<DateTime<Utc>>,
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Objects in key order.
    pub objects: Vec<ObjectMeta>,
    /// Pass back to get the next page; `None` at the end of the listing.
    pub next_token: Option<String>,
    /// Objects listed that cannot be ingested, with why (a name that is not UTF-8, say), shown as best as
    /// their names can be.
    pub refused: Vec<(String, String)>,
}

/// Why a backend call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The object (or bucket) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The credentials are refused or lack permission (retrying will not help until someone fixes access).
    #[error("access denied: {0}")]
    Denied(String),
    /// Larger than the cap.
    #[error(
        "the object is {size} bytes (or more), over the {limit}-byte limit (CONNECTOR_MAX_FILE_SIZE_MB)"
    )]
    TooLarge {
        /// Bytes seen or announced.
        size: u64,
        /// The cap.
        limit: u64,
    },
    /// The request was wrong (bad key, bad configuration).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The object is no longer the version asked for (overwritten or deleted since it was looked at).
    #[error("the object changed while being read: {0}")]
    Changed(String),
    /// Network trouble, a timeout, throttling or a server error: worth retrying.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

impl SourceError {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Unavailable(_) | SourceError::Changed(_))
    }
}

/// A storage backend.
pub trait ObjectSource: Send + Sync {
    /// Metadata of `key`, or `None` when it does not exist.
    fn stat(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<ObjectMeta>, SourceError>> + Send;

    /// The content of exactly the version `object` describes (as [`ObjectSource::stat`] or a listing gave
    /// it), refusing (before and while reading) anything over `max_bytes`. [`SourceError::Changed`] when the
    /// object is another version by now, so content is never recorded under a version it is not.
    fn fetch(
        &self,
        object: &ObjectMeta,
        max_bytes: u64,
    ) -> impl Future<Output = Result<Vec<u8>, SourceError>> + Send;

    /// One page of keys under `prefix`, in key order, after `page_token`.
    fn list(
        &self,
        prefix: &str,
        page_token: Option<&str>,
        page_size: u32,
    ) -> impl Future<Output = Result<Page, SourceError>> + Send;
}

/// Appends `chunk` to `buffer`, failing once the total passes `limit`: a lying (or missing) Content-Length
/// cannot make us hold more than the cap.
pub(crate) fn append_capped(
    buffer: &mut Vec<u8>,
    chunk: &[u8],
    limit: u64,
) -> Result<(), SourceError> {
    let size = buffer.len() as u64 + chunk.len() as u64;
    if size > limit {
        return Err(SourceError::TooLarge { size, limit });
    }
    buffer.extend_from_slice(chunk);
    Ok(())
}
