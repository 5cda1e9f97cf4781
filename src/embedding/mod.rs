//! Text to vectors: one [`Embedder`] trait with three backends ([`local`] all-MiniLM-L6-v2 on candle,
//! [`openai`] for OpenAI-compatible APIs, [`hash`] feature hashing for tests and the model-free quickstart),
//! and the [`batcher`] that gathers concurrent requests into model calls while answering each on its own.
//!
//! Every vector leaves this room L2-normalised, finite, non-zero and of the configured dimension; nothing
//! else is ever stored.

pub mod batcher;
pub mod fetch;
pub mod hash;
pub mod local;
pub mod openai;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::config::{EmbeddingBackend, EmbeddingSettings};

pub use batcher::Batcher;

/// Something that embeds texts. Implementations answer one vector per text, in order.
pub trait Embedder: Send + Sync + fmt::Debug {
    /// The model id stored beside each vector.
    fn model_id(&self) -> &str;

    /// The vectors' dimension.
    fn dimensions(&self) -> usize;

    /// Embeds a batch; an error fails the whole batch (the [`Batcher`] then retries items one by one when
    /// the error may be due to one of them).
    fn embed(&self, texts: Vec<String>) -> BoxFuture<'_, Result<Vec<Vec<f32>>, EmbedError>>;
}

/// Why texts were not embedded, and so what the job does next.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EmbedError {
    /// This input cannot be embedded (refused by the provider, no features, a non-finite result): retrying
    /// the same text will not help.
    #[error("the text cannot be embedded: {0}")]
    Rejected(String),
    /// The text has nothing the model can represent (its vector is zero), so nothing is similar to it.
    #[error(
        "the text cannot be embedded: the vector is zero (the text has nothing the model can represent)"
    )]
    Featureless,
    /// The backend failed or cannot be reached: retry later.
    #[error("the embedding backend is unavailable: {0}")]
    Unavailable(String),
    /// The backend asked to slow down.
    #[error("the embedding backend is rate limiting (retry in {after:?}): {message}")]
    RateLimited {
        /// How long it asked to wait.
        after: Duration,
        /// What it said.
        message: String,
    },
}

/// Checks a vector and scales it to unit length. Zero, non-finite or wrongly sized vectors are refused:
/// a zero vector has no direction, so it would match nothing and poison cosine ranking.
pub fn normalized(mut vector: Vec<f32>, dimensions: usize) -> Result<Vec<f32>, EmbedError> {
    if vector.len() != dimensions {
        return Err(EmbedError::Unavailable(format!(
            "the backend returned a {}-dimensional vector, {dimensions} were expected (check EMBEDDING_DIMENSIONS and EMBEDDING_MODEL)",
            vector.len()
        )));
    }
    if vector.iter().any(|x| !x.is_finite()) {
        return Err(EmbedError::Rejected(
            "the vector has NaN or infinite components".to_owned(),
        ));
    }
    let norm = vector
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm < 1e-12 {
        return Err(EmbedError::Featureless);
    }
    for x in &mut vector {
        *x = (f64::from(*x) / norm) as f32;
    }
    Ok(vector)
}

/// Cosine similarity of two vectors (for tests and diagnostics; search runs in the database).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb)) as f32
}

/// Why the configured embedder could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(pub String);

/// Builds the configured embedder. Loading the local model reads ~90 MB and takes a second or two.
pub fn build(settings: &EmbeddingSettings) -> Result<Arc<dyn Embedder>, BuildError> {
    Ok(match settings.backend {
        EmbeddingBackend::Local => Arc::new(local::LocalEmbedder::load(
            &settings.model_dir,
            &settings.model,
            settings.threads as usize,
        )?),
        EmbeddingBackend::OpenAi => Arc::new(openai::OpenAiEmbedder::new(
            &settings.api_base,
            &settings.model,
            settings.api_key.clone(),
            settings.dimensions as usize,
        )?),
        EmbeddingBackend::Hash => Arc::new(hash::HashEmbedder::new(
            &settings.model,
            settings.dimensions as usize,
        )),
    })
}

/// The process's embedder behind its batcher, built on first use: an API process that never searches
/// never loads the model, and a worker builds it at start-up to fail fast.
#[derive(Debug)]
pub struct Service {
    settings: EmbeddingSettings,
    model: String,
    batcher: tokio::sync::OnceCell<Batcher>,
}

impl Service {
    /// A service for `settings`; nothing is loaded yet.
    pub fn new(settings: EmbeddingSettings) -> Self {
        Self {
            model: settings.model.clone(),
            settings,
            batcher: tokio::sync::OnceCell::new(),
        }
    }

    /// A service around an embedder built by the caller (tests, benchmarks).
    pub fn with_embedder(settings: EmbeddingSettings, embedder: Arc<dyn Embedder>) -> Self {
        let mut service = Self::new(settings);
        service.model = embedder.model_id().to_owned();
        let batcher = Batcher::spawn(embedder, service.batch_size(), service.parallel());
        let _ = service.batcher.set(batcher);
        service
    }

    /// The model id stored beside each vector.
    pub fn model_id(&self) -> &str {
        &self.model
    }

    /// The configured settings.
    pub fn settings(&self) -> &EmbeddingSettings {
        &self.settings
    }

    fn batch_size(&self) -> usize {
        self.settings.batch_size as usize
    }

    /// Model calls in flight at once: one per inference thread locally; a few for an HTTP API.
    fn parallel(&self) -> usize {
        match self.settings.backend {
            EmbeddingBackend::Local if self.settings.threads > 0 => self.settings.threads as usize,
            EmbeddingBackend::Local => std::thread::available_parallelism().map_or(1, usize::from),
            EmbeddingBackend::OpenAi => 4,
            EmbeddingBackend::Hash => 1,
        }
    }

    /// The batcher, building the embedder the first time (a failure is reported, and retried next call).
    pub async fn batcher(&self) -> Result<&Batcher, EmbedError> {
        self.batcher
            .get_or_try_init(|| async {
                let settings = self.settings.clone();
                let embedder = tokio::task::spawn_blocking(move || build(&settings))
                    .await
                    .map_err(|e| {
                        EmbedError::Unavailable(format!("loading the embedder crashed: {e}"))
                    })?
                    .map_err(|e| EmbedError::Unavailable(e.to_string()))?;
                Ok(Batcher::spawn(embedder, self.batch_size(), self.parallel()))
            })
            .await
    }

    /// Embeds one text (batched with concurrent requests).
    pub async fn embed(&self, text: String) -> Result<Vec<f32>, EmbedError> {
        self.batcher().await?.embed(text).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_scaled_to_unit_length() {
        let v = normalized(vec![3.0, 4.0], 2).unwrap();
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn zero_nan_and_missized_vectors_are_refused() {
        assert!(matches!(
            normalized(vec![0.0, 0.0], 2),
            Err(EmbedError::Featureless)
        ));
        assert!(matches!(
            normalized(vec![f32::NAN, 1.0], 2),
            Err(EmbedError::Rejected(_))
        ));
        assert!(matches!(
            normalized(vec![1.0], 2),
            Err(EmbedError::Unavailable(_))
        ));
    }
}
