//! all-MiniLM-L6-v2 on the CPU with candle, reproducing sentence-transformers: the model's own tokenizer
//! (truncation at 256 tokens, padding to the longest text of the batch), BERT, mean pooling over real
//! tokens, L2 normalisation.
//!
//! Inference runs on dedicated OS threads, never on the async runtime. The weights are loaded once and
//! shared read-only by every inference thread; each thread runs one single-threaded model call at a time
//! (`RAYON_NUM_THREADS=1`, see [`single_threaded_model_calls`]), which on a few cores beats one call spread
//! over all of them: about 19 against 11 chunks/s of 256 tokens on two cores, because small per-layer operations do not pay
//! for cross-thread synchronisation.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use tokio::sync::oneshot;

use super::{BuildError, EmbedError, Embedder};

/// sentence-transformers' `max_seq_length` for this model.
pub const MAX_TOKENS: usize = 256;

type Reply = oneshot::Sender<Result<Vec<Vec<f32>>, EmbedError>>;

/// See the module docs.
#[derive(Debug)]
pub struct LocalEmbedder {
    model_id: String,
    dimensions: usize,
    work: mpsc::Sender<(Vec<String>, Reply)>,
    threads: usize,
}

struct Model {
    bert: BertModel,
    tokenizer: Tokenizer,
}

impl LocalEmbedder {
    /// Loads the model from `dir` (`model.safetensors`, `config.json`, `tokenizer.json`) and starts `threads`
    /// inference threads (0: one per core).
    pub fn load(dir: &Path, model_id: &str, threads: usize) -> Result<Self, BuildError> {
        let file = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| {
                BuildError(format!(
                    "cannot read {} ({e}): EMBEDDING_MODEL_DIR must hold all-MiniLM-L6-v2's model.safetensors, \
                     config.json and tokenizer.json; `activekg fetch-model` downloads them",
                    path.display()
                ))
            })
        };
        let config: Config = serde_json::from_slice(&file("config.json")?).map_err(|e| {
            BuildError(format!(
                "{}/config.json is not a BERT config: {e}",
                dir.display()
            ))
        })?;
        let dimensions = config.hidden_size;
        let weights = VarBuilder::from_buffered_safetensors(
            file("model.safetensors")?,
            DType::F32,
            &Device::Cpu,
        )
        .map_err(|e| {
            BuildError(format!(
                "{}/model.safetensors does not load: {e}",
                dir.display()
            ))
        })?;
        let bert = BertModel::load(weights, &config).map_err(|e| {
            BuildError(format!(
                "{} is not a BERT model candle can run: {e}",
                dir.display()
            ))
        })?;
        let mut tokenizer = Tokenizer::from_bytes(file("tokenizer.json")?).map_err(|e| {
            BuildError(format!(
                "{}/tokenizer.json does not load: {e}",
                dir.display()
            ))
        })?;
        // The file ships truncation at 128 and fixed padding; sentence-transformers uses 256 and pads each
        // batch to its longest text, and so must we to give the same vectors.
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..TruncationParams::default()
            }))
            .map_err(|e| BuildError(format!("tokenizer truncation: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..PaddingParams::default()
        }));
        let model = Arc::new(Model { bert, tokenizer });
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, usize::from)
        } else {
            threads
        };
        let (work, queue) = mpsc::channel::<(Vec<String>, Reply)>();
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..threads {
            let model = model.clone();
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("embed-{n}"))
                .spawn(move || {
                    loop {
                        // The lock is held only to take the next batch; it ends when the embedder is dropped.
                        let next = queue.lock().map(|q| q.recv());
                        let Ok(Ok((texts, reply))) = next else { break };
                        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            model.embed(&texts)
                        }))
                        .unwrap_or_else(|_| {
                            Err(EmbedError::Rejected(
                                "the local model panicked on this input".to_owned(),
                            ))
                        });
                        let _ = reply.send(result);
                    }
                })
                .map_err(|e| BuildError(format!("cannot start an inference thread: {e}")))?;
        }
        tracing::info!(model = model_id, dir = %dir.display(), threads, "local embedding model loaded");
        Ok(Self {
            model_id: model_id.to_owned(),
            dimensions,
            work,
            threads,
        })
    }

    /// Inference threads.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

impl Model {
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        // A model error depends on the input alone (the weights are in memory), so it is not worth retrying.
        let fail = |e: String| EmbedError::Rejected(format!("the local model failed: {e}"));
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| fail(e.to_string()))?;
        let rows = |f: fn(&tokenizers::Encoding) -> &[u32]| -> Result<Tensor, EmbedError> {
            let rows = encodings
                .iter()
                .map(|e| Tensor::new(f(e), &Device::Cpu))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fail(e.to_string()))?;
            Tensor::stack(&rows, 0).map_err(|e| fail(e.to_string()))
        };
        let ids = rows(|e| e.get_ids())?;
        let mask = rows(|e| e.get_attention_mask())?;
        let pooled = (|| -> candle_core::Result<Vec<Vec<f32>>> {
            let types = ids.zeros_like()?;
            let hidden = self.bert.forward(&ids, &types, Some(&mask))?;
            // Mean over real tokens only: padding must not dilute a short text in a long batch.
            let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
            let mean = summed.broadcast_div(&mask.sum(1)?)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
            mean.broadcast_div(&norm)?.to_vec2::<f32>()
        })();
        pooled.map_err(|e| fail(e.to_string()))
    }
}

impl Embedder for LocalEmbedder {
    fn model_id(&self) -> &str {
        &self.model_id
    }

    fn dimensions(&self) -> usize {
        self.dimensions
    }

    fn embed(&self, texts: Vec<String>) -> BoxFuture<'_, Result<Vec<Vec<f32>>, EmbedError>> {
        let (reply, answer) = oneshot::channel();
        let sent = self.work.send((texts, reply));
        async move {
            sent.map_err(|_| {
                EmbedError::Unavailable("the inference threads have stopped".to_owned())
            })?;
            answer.await.map_err(|_| {
                EmbedError::Unavailable("an inference thread stopped mid-batch".to_owned())
            })?
        }
        .boxed()
    }
}

/// Keeps memory the process frees instead of giving it back to the OS. mimalloc (the binary's allocator) gives
/// freed memory back a second later, and the model frees and allocates tensors of tens of MB for every batch,
/// so every batch faulted its memory in again and the kernel cleared each 2 MiB page anew: 15 % of a `perf`
/// profile of `cargo bench --bench embedding`, whose run took 160-168 s with this against 191-194 s without
/// (system time 8-9 s against 42-45 s). The cost is a process that stays at its high-water mark, as torch's
/// caching allocator does. An operator's `MIMALLOC_PURGE_DELAY` wins.
#[allow(unsafe_code)]
pub fn keep_freed_memory() {
    // `mi_option_purge_delay` in the mimalloc (v3) that libmimalloc-sys builds; the crate names no constant.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // Its default, 1000 ms: anything else means the option is not the one meant here.
    const DEFAULT_DELAY: std::ffi::c_long = 1000;
    let chosen = ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"]
        .iter()
        .any(|var| std::env::var_os(var).is_some());
    // SAFETY: reading and setting an allocator option is thread-safe in mimalloc.
    unsafe {
        if !chosen && libmimalloc_sys::mi_option_get(PURGE_DELAY) == DEFAULT_DELAY {
            libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
        }
    }
}

/// Makes each model call single-threaded, as the inference threads above expect: candle takes its thread
/// count from `RAYON_NUM_THREADS`, read once when first used. An operator's own value wins.
///
/// # Safety
/// It writes the process environment: call it first thing in `main`, before any other thread exists.
#[allow(unsafe_code)]
pub unsafe fn single_threaded_model_calls() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: the caller guarantees no other thread exists to read or write the environment.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
}
