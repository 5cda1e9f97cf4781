//! Google Cloud Storage through `gcloud-storage` (the JSON API client that used to be published as
//! `google-cloud-storage`). The official 1.x crate lists and stats over gRPC, which no local emulator serves,
//! so it could not be tested end to end; this client passes the conformance suite against fake-gcs-server.

use futures::StreamExt;
use gcloud_storage::client::google_cloud_auth::credentials::CredentialsFile;
use gcloud_storage::client::{Client, ClientConfig};
use gcloud_storage::http::Error as GcsError;
use gcloud_storage::http::objects::Object;
use gcloud_storage::http::objects::download::Range;
use gcloud_storage::http::objects::get::GetObjectRequest;
use gcloud_storage::http::objects::list::ListObjectsRequest;

use super::config::GcsConfig;
use super::source::{ObjectMeta, ObjectSource, Page, SourceError, append_capped};

/// A bucket reached through the GCS JSON API.
#[derive(Clone)]
pub struct GcsSource {
    client: Client,
    bucket: String,
}

impl std::fmt::Debug for GcsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsSource")
            .field("bucket", &self.bucket)
            .finish()
    }
}

impl GcsSource {
    /// A client for the configured bucket: service-account credentials from the config (inline or a file),
    /// anonymous against a custom endpoint without credentials (emulators), else application default
    /// credentials.
    pub async fn new(config: &GcsConfig) -> Result<Self, SourceError> {
        let mut base = ClientConfig::default();
        if let Some(endpoint) = &config.endpoint {
            base.storage_endpoint = endpoint.trim_end_matches('/').to_owned();
        }
        let auth_error = |e: gcloud_storage::client::google_cloud_auth::error::Error| {
            SourceError::Denied(format!("GCS credentials cannot be used: {e}"))
        };
        let client_config = if let Some(json) = &config.credentials_json {
            let credentials = CredentialsFile::new_from_str(json.expose())
                .await
                .map_err(auth_error)?;
            base.with_credentials(credentials)
                .await
                .map_err(auth_error)?
        } else if let Some(path) = &config.credentials_path {
            let credentials = CredentialsFile::new_from_file(path.clone())
                .await
                .map_err(auth_error)?;
            base.with_credentials(credentials)
                .await
                .map_err(auth_error)?
        } else if config.endpoint.is_some() {
            base.anonymous()
        } else {
            base.with_auth().await.map_err(auth_error)?
        };
        let mut client_config = client_config;
        if let Some(project) = &config.project {
            client_config.project_id = Some(project.clone());
        }
        Ok(Self {
            client: Client::new(client_config),
            bucket: config.bucket.clone(),
        })
    }
}

fn by_status(status: u16, message: String) -> SourceError {
    match status {
        404 => SourceError::NotFound(message),
        412 => SourceError::Changed(message),
        401 | 403 => SourceError::Denied(message),
        400 => SourceError::Invalid(message),
        _ => SourceError::Unavailable(message),
    }
}

fn classify(err: GcsError, what: &str) -> SourceError {
    match err {
        GcsError::Response(response) => by_status(
            response.code,
            format!("{what}: {} ({})", response.message, response.code),
        ),
        // An error body that is not GCS's JSON (proxies, emulators) still has a status worth reading.
        GcsError::HttpClient(e) if e.status().is_some() => {
            let status = e.status().map_or(0, |s| s.as_u16());
            by_status(status, format!("{what}: HTTP {status}"))
        }
        GcsError::TokenSource(e) => {
            SourceError::Denied(format!("{what}: cannot get an access token: {e}"))
        }
        other => SourceError::Unavailable(format!("{what}: {other}")),
    }
}

fn meta(object: &Object) -> ObjectMeta {
    ObjectMeta {
        key: object.name.clone(),
        version: object.generation.to_string(),
        size: object.size.max(0) as u64,
        content_type: object.content_type.clone(),
        updated: object
            .updated
            .and_then(|t| chrono::DateTime::from_timestamp(t.unix_timestamp(), t.nanosecond())),
    }
}

impl ObjectSource for GcsSource {
    async fn stat(&self, key: &str) -> Result<Option<ObjectMeta>, SourceError> {
        let request = GetObjectRequest {
            bucket: self.bucket.clone(),
            object: key.to_owned(),
            ..GetObjectRequest::default()
        };
        match self.client.get_object(&request).await {
            Ok(object) => Ok(Some(meta(&object))),
            Err(err) => match classify(err, &format!("GET gs://{}/{key}", self.bucket)) {
                SourceError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn fetch(&self, meta: &ObjectMeta, max_bytes: u64) -> Result<Vec<u8>, SourceError> {
        let key = &meta.key;
        let what = format!("download gs://{}/{key}", self.bucket);
        let generation = meta.version.parse().map_err(|_| {
            SourceError::Invalid(format!(
                "{what}: {:?} is not a GCS generation",
                meta.version
            ))
        })?;
        let request = GetObjectRequest {
            bucket: self.bucket.clone(),
            object: key.to_owned(),
            // That generation, and only while it is the live one (real GCS answers 412 otherwise; an
            // emulator that ignores the condition still serves only that generation, or 404).
            generation: Some(generation),
            if_generation_match: Some(generation),
            ..GetObjectRequest::default()
        };
        let mut stream = match self
            .client
            .download_streamed_object(&request, &Range::default())
            .await
        {
            Ok(stream) => stream,
            Err(err) => {
                return Err(match classify(err, &what) {
                    // Gone for good, or only that generation is gone?
                    SourceError::NotFound(m) => match self.stat(key).await? {
                        Some(now) => SourceError::Changed(format!(
                            "{what}: generation {generation} is gone, the live one is {}",
                            now.version
                        )),
                        None => SourceError::NotFound(m),
                    },
                    other => other,
                });
            }
        };
        let mut buffer = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| classify(e, &what))?;
            append_capped(&mut buffer, &chunk, max_bytes)?;
        }
        Ok(buffer)
    }

    async fn list(
        &self,
        prefix: &str,
        page_token: Option<&str>,
        page_size: u32,
    ) -> Result<Page, SourceError> {
        let request = ListObjectsRequest {
            bucket: self.bucket.clone(),
            prefix: Some(prefix.to_owned()).filter(|p| !p.is_empty()),
            page_token: page_token.map(str::to_owned),
            max_results: Some(page_size.clamp(1, 1000) as i32),
            ..ListObjectsRequest::default()
        };
        let listed = self
            .client
            .list_objects(&request)
            .await
            .map_err(|e| classify(e, &format!("LIST gs://{}/{prefix}", self.bucket)))?;
        Ok(Page {
            objects: listed.items.unwrap_or_default().iter().map(meta).collect(),
            next_token: listed.next_page_token.filter(|t| !t.is_empty()),
            refused: Vec::new(),
        })
    }
}
