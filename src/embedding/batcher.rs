//! Gathers concurrent embedding requests (one per `embed_node` job) into model calls of up to
//! `EMBEDDING_BATCH_SIZE` texts, and answers each request with its own result.
//!
//! A batch is formed only when the backend has room for it, so requests that arrive while the model is busy
//! join the next call instead of waiting behind small ones. When a call fails in a way one input can cause
//! (the backend refused an input), its texts are embedded one by one, so a poisoned text fails only its own
//! job; an outage or rate limit fails every request of the batch with the same retryable error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{EmbedError, Embedder, normalized};
use crate::metrics::metrics;

/// How long a batch waits for more requests after its first one.
const LINGER: Duration = Duration::from_millis(3);

struct Request {
    text: String,
    reply: oneshot::Sender<Result<Vec<f32>, EmbedError>>,
}

/// See the module docs. Cheap to clone; the batching task ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Batcher {
    embedder: Arc<dyn Embedder>,
    requests: mpsc::Sender<Request>,
}

impl Batcher {
    /// Starts batching for `embedder`: up to `batch_size` texts per call and `parallel` calls at once.
    pub fn spawn(embedder: Arc<dyn Embedder>, batch_size: usize, parallel: usize) -> Self {
        let (requests, queue) = mpsc::channel(batch_size.max(1) * parallel.max(1) * 4);
        tokio::spawn(gather(
            embedder.clone(),
            queue,
            batch_size.max(1),
            parallel.max(1),
        ));
        Self { embedder, requests }
    }

    /// The model id stored beside each vector.
    pub fn model_id(&self) -> &str {
        self.embedder.model_id()
    }

    /// The vectors' dimension.
    pub fn dimensions(&self) -> usize {
        self.embedder.dimensions()
    }

    /// Embeds one text (batched with whatever else is asked meanwhile); the vector is unit length.
    pub async fn embed(&self, text: String) -> Result<Vec<f32>, EmbedError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request { text, reply })
            .await
            .map_err(|_| EmbedError::Unavailable("the embedding batcher has stopped".to_owned()))?;
        answer.await.map_err(|_| {
            EmbedError::Unavailable("the embedding batcher dropped the request".to_owned())
        })?
    }
}

async fn gather(
    embedder: Arc<dyn Embedder>,
    mut queue: mpsc::Receiver<Request>,
    size: usize,
    parallel: usize,
) {
    let slots = Arc::new(Semaphore::new(parallel));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < size {
            // Whatever is already queued joins at once; otherwise wait a moment for stragglers.
            match queue.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => match tokio::time::timeout_at(deadline, queue.recv()).await {
                    Ok(Some(request)) => batch.push(request),
                    _ => break,
                },
            }
        }
        let embedder = embedder.clone();
        tokio::spawn(async move {
            run(&*embedder, batch).await;
            drop(slot);
        });
    }
}

async fn run(embedder: &dyn Embedder, batch: Vec<Request>) {
    let m = metrics();
    m.embedding_batch_size.observe(batch.len() as f64);
    let texts: Vec<String> = batch.iter().map(|r| r.text.clone()).collect();
    let started = Instant::now();
    let result = embedder.embed(texts).await;
    m.embedding_call_duration
        .observe(started.elapsed().as_secs_f64());
    let dimensions = embedder.dimensions();
    match result {
        Ok(vectors) if vectors.len() == batch.len() => {
            for (request, vector) in batch.into_iter().zip(vectors) {
                answer(request, normalized(vector, dimensions));
            }
        }
        Ok(vectors) => {
            let error = EmbedError::Unavailable(format!(
                "the backend answered {} vectors for {} texts",
                vectors.len(),
                batch.len()
            ));
            for request in batch {
                answer(request, Err(error.clone()));
            }
        }
        Err(EmbedError::Rejected(reason)) if batch.len() > 1 => {
            tracing::info!(%reason, size = batch.len(), "a batch was refused; embedding its texts one by one");
            for request in batch {
                let single = embedder
                    .embed(vec![request.text.clone()])
                    .await
                    .and_then(|mut v| {
                        v.pop()
                            .ok_or_else(|| EmbedError::Unavailable("no vector returned".to_owned()))
                    })
                    .and_then(|v| normalized(v, dimensions));
                answer(request, single);
            }
        }
        Err(error) => {
            for request in batch {
                answer(request, Err(error.clone()));
            }
        }
    }
}

fn answer(request: Request, result: Result<Vec<f32>, EmbedError>) {
    let label = match &result {
        Ok(_) => "ok",
        Err(EmbedError::Rejected(_) | EmbedError::Featureless) => "rejected",
        Err(EmbedError::Unavailable(_)) => "unavailable",
        Err(EmbedError::RateLimited { .. }) => "rate_limited",
    };
    metrics().embedding_texts.with_label_values(&[label]).inc();
    // The job may have timed out and gone; its result is then simply dropped.
    let _ = request.reply.send(result);
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures::FutureExt;
    use futures::future::BoxFuture;

    use super::*;
    use crate::embedding::hash::HashEmbedder;

    /// A backend that refuses any batch containing "poison" and records the batch sizes it saw.
    #[derive(Debug)]
    struct Picky {
        inner: HashEmbedder,
        calls: Mutex<Vec<usize>>,
    }

    impl Embedder for Picky {
        fn model_id(&self) -> &str {
            "picky"
        }
        fn dimensions(&self) -> usize {
            self.inner.dimensions()
        }
        fn embed(&self, texts: Vec<String>) -> BoxFuture<'_, Result<Vec<Vec<f32>>, EmbedError>> {
            self.calls.lock().unwrap().push(texts.len());
            let result = if texts.iter().any(|t| t.contains("poison")) {
                Err(EmbedError::Rejected("input refused".to_owned()))
            } else {
                Ok(texts.iter().map(|t| self.inner.vector(t)).collect())
            };
            async move { result }.boxed()
        }
    }

    #[tokio::test]
    async fn concurrent_requests_share_a_call_and_a_poisoned_text_fails_alone() {
        let picky = Arc::new(Picky {
            inner: HashEmbedder::new("h", 32),
            calls: Mutex::new(Vec::new()),
        });
        let batcher = Batcher::spawn(picky.clone(), 8, 1);
        let texts = ["alpha beta", "gamma delta", "poison pill", "epsilon zeta"];
        let results =
            futures::future::join_all(texts.iter().map(|t| batcher.embed((*t).to_owned()))).await;
        assert!(results[0].is_ok() && results[1].is_ok() && results[3].is_ok());
        assert!(matches!(results[2], Err(EmbedError::Rejected(_))));
        let calls = picky.calls.lock().unwrap().clone();
        assert_eq!(
            calls[0], 4,
            "the four requests were one call first: {calls:?}"
        );
        assert_eq!(&calls[1..], &[1, 1, 1, 1], "then one by one: {calls:?}");
    }

    #[tokio::test]
    async fn a_text_without_features_is_rejected_without_failing_its_neighbours() {
        let batcher = Batcher::spawn(Arc::new(HashEmbedder::new("h", 32)), 8, 1);
        let (good, empty) = tokio::join!(
            batcher.embed("some words".to_owned()),
            batcher.embed("?!".to_owned())
        );
        let good = good.unwrap();
        assert!(
            (good.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5,
            "unit length"
        );
        assert!(matches!(empty, Err(EmbedError::Featureless)));
    }
}
