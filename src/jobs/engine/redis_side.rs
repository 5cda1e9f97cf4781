//! What a process runs when some queues live in Redis: the relay that hands staged jobs over from
//! PostgreSQL's outbox, and the wake-ups Redis publishes when a kind has new due work.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

use super::backend::KindSignal;
use crate::backoff::{Backoff, Retries};
use crate::store::jobs as store;
use crate::store::listen::Heard;
use crate::store::redis_jobs::RedisJobs;

/// Rows one relay pass hands over.
const RELAY_BATCH: i64 = 1000;

/// A staged job is relayed within this even when its notification is missed (or another process's relay
/// had the rows locked).
const RELAY_SWEEP: Duration = Duration::from_secs(1);

/// Hands staged jobs to Redis whenever an enqueue commits (NOTIFY on the outbox channel), and at least every
/// [`RELAY_SWEEP`]. Every process with Redis runs one; they share the rows (SKIP LOCKED).
pub(super) async fn relay(
    pool: PgPool,
    redis: RedisJobs,
    mut heard: broadcast::Receiver<Heard>,
    stop: CancellationToken,
) {
    let mut retries =
        Backoff::doubling(Duration::from_millis(500), Duration::from_secs(8)).retries();
    loop {
        let wait = match store::relay(&pool, &redis, RELAY_BATCH).await {
            Ok(done) if done.total() as i64 >= RELAY_BATCH => {
                retries.succeeded();
                continue;
            }
            Ok(_) => {
                retries.succeeded();
                RELAY_SWEEP
            }
            Err(err) => {
                let wait = retries.failed();
                if retries.failures() == 1 || retries.failures().is_multiple_of(20) {
                    tracing::warn!(%err, retry_in = ?wait, failures = retries.failures(),
                        "could not hand staged jobs to Redis; they stay safe in PostgreSQL's outbox");
                }
                if Retries::sleep(wait, &stop).await {
                    return;
                }
                continue;
            }
        };
        let sweep = tokio::time::sleep(wait);
        tokio::pin!(sweep);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = &mut sweep => break,
                heard = heard.recv() => match heard {
                    Ok(Heard::Notice { channel, .. }) if &*channel == store::OUTBOX_CHANNEL => break,
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => {}
                },
            }
        }
    }
}

/// Wakes the worker of each kind Redis names. After a lost subscription every worker is woken once, since
/// wake-ups may have been missed meanwhile.
pub(super) async fn wakes(
    redis: RedisJobs,
    signals: HashMap<&'static str, Arc<KindSignal>>,
    stop: CancellationToken,
) {
    let mut retries =
        Backoff::doubling(Duration::from_millis(200), Duration::from_secs(5)).retries();
    loop {
        match redis.wakes().await {
            Ok(stream) => {
                retries.succeeded();
                signals.values().for_each(|s| s.notify());
                tokio::pin!(stream);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        kind = stream.next() => match kind {
                            Some(kind) => {
                                if let Some(signal) = signals.get(kind.as_str()) {
                                    signal.notify();
                                }
                            }
                            None => break,
                        },
                    }
                }
            }
            Err(err) => {
                if retries.failures() == 0 {
                    tracing::warn!(%err, "lost Redis's wake-ups; workers poll until they are back");
                }
            }
        }
        if Retries::sleep(retries.failed(), &stop).await {
            return;
        }
    }
}
