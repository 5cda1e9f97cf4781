//! S3 (and S3-compatible stores) through `aws-sdk-s3`: static credentials from the encrypted config, or the
//! default AWS credential chain; custom endpoint and path-style addressing for other stores and emulators.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::DateTime as AwsDateTime;
use chrono::{DateTime, Utc};

use super::config::S3Config;
use super::source::{ObjectMeta, ObjectSource, Page, SourceError, append_capped};

/// A bucket reached through the AWS SDK.
#[derive(Debug, Clone)]
pub struct S3Source {
    client: Client,
    bucket: String,
}

impl S3Source {
    /// A client for the configured bucket.
    pub async fn new(config: &S3Config) -> Self {
        let region = config
            .region
            .clone()
            .unwrap_or_else(|| "us-east-1".to_owned());
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(60))
                    .build(),
            );
        if let (Some(key), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                key.expose(),
                secret.expose(),
                config.session_token.as_ref().map(|t| t.expose().to_owned()),
                None,
                "activekg-connector-config",
            ));
        }
        let shared = loader.load().await;
        let mut builder =
            aws_sdk_s3::config::Builder::from(&shared).force_path_style(config.force_path_style);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        Self {
            client: Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
        }
    }
}

fn to_chrono(t: Option<&AwsDateTime>) -> Option<DateTime<Utc>> {
    t.and_then(|t| DateTime::from_timestamp(t.secs(), t.subsec_nanos()))
}

/// ETags arrive quoted; the quotes are not part of the version.
fn etag(raw: Option<&str>) -> String {
    raw.unwrap_or_default().trim_matches('"').to_owned()
}

fn classify<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>, what: &str) -> SourceError {
    let status = err.raw_response().map(|r| r.status().as_u16());
    match err {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("");
            let message = format!("{what}: {} {}", code, service.err().message().unwrap_or(""))
                .trim()
                .to_owned();
            match (status, code) {
                (Some(404), _) | (_, "NoSuchKey" | "NoSuchBucket" | "NotFound") => {
                    SourceError::NotFound(message)
                }
                (Some(401 | 403), _)
                | (_, "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch") => {
                    SourceError::Denied(message)
                }
                (Some(412), _) | (_, "PreconditionFailed") => SourceError::Changed(message),
                (Some(400), _) => SourceError::Invalid(message),
                _ => SourceError::Unavailable(message),
            }
        }
        SdkError::ConstructionFailure(_) => {
            SourceError::Invalid(format!("{what}: the request could not be built"))
        }
        _ => SourceError::Unavailable(format!("{what}: {err}")),
    }
}

impl ObjectSource for S3Source {
    async fn stat(&self, key: &str) -> Result<Option<ObjectMeta>, SourceError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(head) => Ok(Some(ObjectMeta {
                key: key.to_owned(),
                version: etag(head.e_tag()),
                size: head.content_length().unwrap_or(0).max(0) as u64,
                content_type: head.content_type().map(str::to_owned),
                updated: to_chrono(head.last_modified()),
            })),
            Err(err) => match classify(&err, &format!("HEAD s3://{}/{key}", self.bucket)) {
                SourceError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn fetch(&self, meta: &ObjectMeta, max_bytes: u64) -> Result<Vec<u8>, SourceError> {
        let key = &meta.key;
        let what = format!("GET s3://{}/{key}", self.bucket);
        let object = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .if_match(format!("\"{}\"", meta.version))
            .send()
            .await
            .map_err(|e| classify(&e, &what))?;
        if let Some(length) = object.content_length()
            && length as u64 > max_bytes
        {
            return Err(SourceError::TooLarge {
                size: length as u64,
                limit: max_bytes,
            });
        }
        let mut body = object.body;
        let mut buffer = Vec::new();
        while let Some(chunk) = body.try_next().await.map_err(|e| {
            SourceError::Unavailable(format!("{what}: reading the body failed: {e}"))
        })? {
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
        let listed = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .max_keys(page_size.clamp(1, 1000) as i32)
            .set_continuation_token(page_token.map(str::to_owned))
            .send()
            .await
            .map_err(|e| classify(&e, &format!("LIST s3://{}/{prefix}", self.bucket)))?;
        let objects = listed
            .contents()
            .iter()
            .filter_map(|o| {
                Some(ObjectMeta {
                    key: o.key()?.to_owned(),
                    version: etag(o.e_tag()),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    content_type: None,
                    updated: to_chrono(o.last_modified()),
                })
            })
            .collect();
        let next_token = if listed.is_truncated().unwrap_or(false) {
            listed.next_continuation_token().map(str::to_owned)
        } else {
            None
        };
        Ok(Page {
            objects,
            next_token,
            refused: Vec::new(),
        })
    }
}
