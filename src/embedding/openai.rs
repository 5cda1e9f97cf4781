//! An OpenAI-compatible `POST {base}/embeddings` API (OpenAI, Azure-style gateways, vLLM, Ollama, TEI...).
//!
//! Short waits (429 or 5xx with a Retry-After of a few seconds) are retried here; longer ones are handed to
//! the job engine as [`EmbedError::RateLimited`], so no worker slot sits out a long backoff. A 400 means
//! the input was refused; results are put back in input order by their `index`; their dimension is checked.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use super::{BuildError, EmbedError, Embedder};
use crate::backoff::Backoff;
use crate::config::Secret;

/// Attempts within one call before the error goes back to the job engine.
const ATTEMPTS: u32 = 3;
/// Longest wait retried within a call.
const MAX_INLINE_WAIT: Duration = Duration::from_secs(5);

/// See the module docs.
#[derive(Debug)]
pub struct OpenAiEmbedder {
    url: String,
    model: String,
    key: Option<Secret>,
    dimensions: usize,
    client: reqwest::Client,
}

#[derive(Serialize)]
struct Request<'a> {
    model: &'a str,
    input: &'a [String],
    dimensions: usize,
    encoding_format: &'static str,
}

#[derive(Deserialize)]
struct Response {
    data: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    index: usize,
    embedding: Vec<f32>,
}

impl OpenAiEmbedder {
    /// An embedder calling `{base}/embeddings` with `model`, asking for `dimensions`.
    pub fn new(
        base: &str,
        model: &str,
        key: Option<Secret>,
        dimensions: usize,
    ) -> Result<Self, BuildError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| BuildError(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            url: format!("{}/embeddings", base.trim_end_matches('/')),
            model: model.to_owned(),
            key,
            dimensions,
            client,
        })
    }

    async fn call(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut retries = Backoff::doubling(Duration::from_millis(500), MAX_INLINE_WAIT).retries();
        loop {
            let mut request = self.client.post(&self.url).json(&Request {
                model: &self.model,
                input: texts,
                dimensions: self.dimensions,
                encoding_format: "float",
            });
            if let Some(key) = &self.key {
                request = request.bearer_auth(key.expose());
            }
            let error = match request.send().await {
                Err(e) => EmbedError::Unavailable(format!("{}: {e}", self.url)),
                Ok(response) => match self.read(response, texts.len()).await {
                    Ok(vectors) => return Ok(vectors),
                    Err(e) => e,
                },
            };
            let backoff = retries.failed();
            let wait = match &error {
                EmbedError::RateLimited { after, .. } => *after,
                EmbedError::Unavailable(_) => backoff,
                EmbedError::Rejected(_) | EmbedError::Featureless => return Err(error),
            };
            if retries.failures() >= ATTEMPTS || wait > MAX_INLINE_WAIT {
                return Err(error);
            }
            tokio::time::sleep(wait).await;
        }
    }

    async fn read(
        &self,
        response: reqwest::Response,
        expected: usize,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s.min(3600.0)));
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let message = format!(
                "{} answered {status}: {}",
                self.url,
                body.chars().take(500).collect::<String>()
            );
            return Err(match status {
                StatusCode::TOO_MANY_REQUESTS => EmbedError::RateLimited {
                    after: retry_after.unwrap_or(Duration::from_secs(10)),
                    message,
                },
                s if s.is_server_error() => match retry_after {
                    Some(after) => EmbedError::RateLimited { after, message },
                    None => EmbedError::Unavailable(message),
                },
                StatusCode::BAD_REQUEST
                | StatusCode::UNPROCESSABLE_ENTITY
                | StatusCode::PAYLOAD_TOO_LARGE => EmbedError::Rejected(message),
                // 401/403/404: configuration (key, model, URL), not the input: retry once it is fixed.
                _ => EmbedError::Unavailable(message),
            });
        }
        let mut body: Response = response.json().await.map_err(|e| {
            EmbedError::Unavailable(format!("{} answered an unreadable body: {e}", self.url))
        })?;
        if body.data.len() != expected || body.data.iter().any(|item| item.index >= expected) {
            return Err(EmbedError::Unavailable(format!(
                "{} answered {} embeddings for {expected} inputs",
                self.url,
                body.data.len()
            )));
        }
        body.data.sort_by_key(|item| item.index);
        if body.data.windows(2).any(|w| w[0].index == w[1].index) {
            return Err(EmbedError::Unavailable(format!(
                "{} answered duplicate indexes",
                self.url
            )));
        }
        Ok(body.data.into_iter().map(|item| item.embedding).collect())
    }
}

impl Embedder for OpenAiEmbedder {
    fn model_id(&self) -> &str {
        &self.model
    }

    fn dimensions(&self) -> usize {
        self.dimensions
    }

    fn embed(&self, texts: Vec<String>) -> BoxFuture<'_, Result<Vec<Vec<f32>>, EmbedError>> {
        async move { self.call(&texts).await }.boxed()
    }
}
