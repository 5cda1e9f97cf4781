//! Feature hashing: each lower-cased word and word bigram adds ±1 to a bucket picked by its hash. Texts
//! sharing words get similar vectors, so search behaves plausibly, but this is not a language model: it is for
//! tests and for trying activekg without downloading one. Deterministic across processes and versions.

use futures::FutureExt;
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};

use super::{EmbedError, Embedder};

/// See the module docs.
#[derive(Debug, Clone)]
pub struct HashEmbedder {
    model: String,
    dimensions: usize,
}

impl HashEmbedder {
    /// An embedder of `dimensions` buckets, recorded under `model`.
    pub fn new(model: &str, dimensions: usize) -> Self {
        Self {
            model: model.to_owned(),
            dimensions: dimensions.max(1),
        }
    }

    /// One text's vector (not normalised; zero when the text has no words).
    pub fn vector(&self, text: &str) -> Vec<f32> {
        let mut vector = vec![0.0f32; self.dimensions];
        let words: Vec<String> = text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect();
        let bigrams = words.windows(2).map(|w| format!("{} {}", w[0], w[1]));
        for feature in words.iter().cloned().chain(bigrams) {
            let digest = Sha256::digest(feature.as_bytes());
            let bucket = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
                % self.dimensions as u64;
            let sign = if digest[8] & 1 == 0 { 1.0 } else { -1.0 };
            vector[bucket as usize] += sign;
        }
        vector
    }
}

impl Embedder for HashEmbedder {
    fn model_id(&self) -> &str {
        &self.model
    }

    fn dimensions(&self) -> usize {
        self.dimensions
    }

    fn embed(&self, texts: Vec<String>) -> BoxFuture<'_, Result<Vec<Vec<f32>>, EmbedError>> {
        let vectors = texts.iter().map(|t| self.vector(t)).collect();
        async move { Ok(vectors) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedding::cosine;

    #[test]
    fn shared_words_make_similar_vectors_and_the_result_is_stable() {
        let e = HashEmbedder::new("hash-v1", 384);
        let food = e.vector("A man is eating food.");
        assert_eq!(food, e.vector("a man is EATING food"));
        let bread = e.vector("A man is eating a piece of bread.");
        let horse = e.vector("The horse gallops across the field.");
        assert!(cosine(&food, &bread) > cosine(&food, &horse));
    }

    #[test]
    fn a_text_without_words_has_a_zero_vector() {
        assert!(
            HashEmbedder::new("h", 16)
                .vector("?!  ...")
                .iter()
                .all(|x| *x == 0.0)
        );
    }
}
