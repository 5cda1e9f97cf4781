//! Writes attempt results back to the job rows, batching whatever has piled up into one statement.
//!
//! At low load each result is written at once; under load, results that finish while writes are in flight
//! share the next one, and up to five writes run at once. If the database is unreachable a batch is kept
//! and retried, and the bounded channel pushes back on workers (a slot is only freed once its result is
//! queued here).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

use super::job_store::JobStore;
use crate::backoff::{Backoff, Retries};
use crate::store::jobs::Completion;

/// Most results written by one statement.
const MAX_BATCH: usize = 1000;

enum Message {
    Done(Completion),
    Flush(oneshot::Sender<()>),
}

/// Sends results to the completer task.
#[derive(Debug, Clone)]
pub struct Completer {
    tx: mpsc::Sender<Message>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Done(c) => write!(f, "Done({})", c.id),
            Message::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl Completer {
    /// Starts the completer of worker process `worker`; it ends when every `Completer` clone is dropped and
    /// its queue is written.
    pub fn spawn(store: JobStore, worker: Arc<str>) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        (Self { tx }, tokio::spawn(run(store, worker, rx)))
    }

    /// Queues one result; waits when the completer is behind.
    pub async fn send(&self, completion: Completion) {
        if self.tx.send(Message::Done(completion)).await.is_err() {
            tracing::error!(
                "the job completer has stopped; a result was dropped and its job will be rescued as an orphan"
            );
        }
    }

    /// Queues one result from synchronous code, without waiting.
    pub fn send_detached(&self, completion: Completion) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(Message::Done(completion)).await;
        });
    }

    /// Returns once every result queued before this call is written (or the completer has stopped).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// Writes that may be in flight at once. One writer spends most of its time waiting on the round trip and
/// on its own result rows; a backlog drained by a worker produces results faster than that. With three, a
/// drain's writes of 1,000 results took about 50 ms each, lagged the claims (the last landed 140 ms after
/// the last claim) and left a third of the machine idle; five drained 16 % faster in interleaved rounds
/// (eight no faster, and they hold more of the pool). Only a backlog of 250 results opens another write.
const WRITERS: usize = 5;

async fn run(store: JobStore, worker: Arc<str>, mut rx: mpsc::Receiver<Message>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut flushes = Vec::new();
    let mut parked = Parked::default();
    let mut writes = JoinSet::new();
    let spawn = |writes: &mut JoinSet<Refused>, batch: &mut Vec<Completion>| {
        let batch = std::mem::replace(batch, Vec::with_capacity(MAX_BATCH));
        writes.spawn(write(store.clone(), worker.clone(), batch));
    };
    loop {
        // With nothing in flight a result is written at once. Under load a new write waits for a quarter of
        // a full batch or for a writer to finish: every statement also reads the worker's running jobs, so
        // many small ones cost nearly as much as full ones.
        if !batch.is_empty()
            && writes.len() < WRITERS
            && (writes.is_empty() || batch.len() >= MAX_BATCH / 4)
        {
            spawn(&mut writes, &mut batch);
        }
        tokio::select! {
            message = rx.recv(), if batch.len() < MAX_BATCH => {
                let Some(message) = message else { break };
                let mut next = Some(message);
                while let Some(message) = next.take() {
                    match message {
                        Message::Done(completion) => batch.push(completion),
                        Message::Flush(done) => flushes.push(done),
                    }
                    if batch.len() < MAX_BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                if !flushes.is_empty() {
                    // Everything queued before the flush is in `batch` or a write by now: write and wait.
                    if !batch.is_empty() {
                        spawn(&mut writes, &mut batch);
                    }
                    while let Some(written) = writes.join_next().await {
                        park_refused(written, &mut parked);
                    }
                    for done in flushes.drain(..) {
                        let _ = done.send(());
                    }
                }
            }
            Some(written) = writes.join_next(), if !writes.is_empty() => park_refused(written, &mut parked),
            () = parked.due(), if !parked.is_empty() => parked.retry(&store, &worker).await,
        }
    }
    if !batch.is_empty() {
        spawn(&mut writes, &mut batch);
    }
    while let Some(written) = writes.join_next().await {
        park_refused(written, &mut parked);
    }
    // Last chance for parked results before the process exits; their jobs are rescued otherwise.
    parked.retry(&store, &worker).await;
}

type Refused = Vec<(Completion, crate::error::Error)>;

fn park_refused(written: Result<Refused, tokio::task::JoinError>, parked: &mut Parked) {
    match written {
        Ok(refused) => {
            for (completion, err) in refused {
                parked.park(completion, &err);
            }
        }
        Err(err) => {
            tracing::error!(%err, "a job result write failed; its jobs will be rescued as orphans")
        }
    }
}

/// Results the database refused one by one (a trigger raising, a value it cannot store): set aside and
/// retried on their own, so that one bad result never holds back everyone else's.
struct Parked {
    completions: Vec<Completion>,
    retries: Retries,
    next: Option<tokio::time::Instant>,
}

impl Default for Parked {
    fn default() -> Self {
        Self {
            completions: Vec::new(),
            retries: Backoff::doubling(Duration::from_secs(1), Duration::from_secs(60)).retries(),
            next: None,
        }
    }
}

impl Parked {
    const MAX: usize = 1000;

    fn is_empty(&self) -> bool {
        self.completions.is_empty()
    }

    fn park(&mut self, completion: Completion, err: &crate::error::Error) {
        tracing::error!(job = %completion.id, %err,
            "the database refused this job's result; retrying it on its own (the job stays running meanwhile)");
        if self.completions.len() >= Self::MAX {
            let dropped = self.completions.remove(0);
            tracing::error!(job = %dropped.id, "too many refused results; dropping the oldest (its job is rescued once this process stops)");
        }
        self.completions.push(completion);
        if self.next.is_none() {
            self.retries.succeeded();
            self.next = Some(tokio::time::Instant::now() + self.retries.failed());
        }
    }

    async fn due(&self) {
        match self.next {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    async fn retry(&mut self, store: &JobStore, worker: &str) {
        let mut still = Vec::new();
        let wait = self.retries.failed();
        for completion in std::mem::take(&mut self.completions) {
            if let Err(err) = store
                .finish(worker, std::slice::from_ref(&completion))
                .await
            {
                tracing::warn!(job = %completion.id, %err, retry_in = ?wait, "job result still refused");
                still.push(completion);
            }
        }
        self.completions = still;
        self.next = if self.completions.is_empty() {
            None
        } else {
            Some(tokio::time::Instant::now() + wait)
        };
    }
}

/// Writes the batch. While the database is unreachable the whole batch waits and is retried; when the
/// database refuses the statement, the batch is split until the refused results are found, which are
/// returned to be parked.
async fn write(store: JobStore, worker: Arc<str>, batch: Vec<Completion>) -> Refused {
    let started = std::time::Instant::now();
    let mut retries =
        Backoff::doubling(Duration::from_millis(100), Duration::from_secs(5)).retries();
    loop {
        let written = store.finish(&worker, &batch).await;
        tracing::trace!(results = batch.len(), took = ?started.elapsed(), "recorded job results");
        match written {
            Ok(applied) => {
                if applied.len() < batch.len() {
                    // Rescued and re-run elsewhere, or released at shutdown: the newer attempt owns the row.
                    tracing::debug!(
                        stale = batch.len() - applied.len(),
                        "some results were for attempts that are no longer current; ignored"
                    );
                }
                return Vec::new();
            }
            Err(crate::error::Error::Unavailable(err)) => {
                let wait = retries.failed();
                tracing::warn!(%err, pending = batch.len(), retry_in = ?wait, "could not record job results; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(err) => return split(&store, &worker, batch, err).await,
        }
    }
}

/// Bisects a refused batch: halves that the database takes are written, single refused results returned.
async fn split(
    store: &JobStore,
    worker: &str,
    batch: Vec<Completion>,
    err: crate::error::Error,
) -> Refused {
    let mut refused = Vec::new();
    let mut pending = vec![(batch, err)];
    while let Some((mut batch, err)) = pending.pop() {
        if batch.len() == 1 {
            refused.push((batch.remove(0), err));
            continue;
        }
        let second = batch.split_off(batch.len() / 2);
        for half in [batch, second] {
            if let Err(err) = store.finish(worker, &half).await {
                pending.push((half, err));
            }
        }
    }
    refused
}
