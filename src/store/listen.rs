//! One LISTEN connection per process, outside the shared pool, fanned out to every room that waits for
//! notifications (job wake-ups, job cancellations, config-cache invalidation).
//!
//! A LISTEN connection is held for the life of the process; taken from the pool it would shrink what jobs and
//! requests can use, and a starved pool would delay the notifications meant to relieve it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backoff::{Backoff, Retries};

/// What a subscriber hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// A notification on one of the hub's channels.
    Notice {
        /// The channel.
        channel: Arc<str>,
        /// Its payload.
        payload: Arc<str>,
    },
    /// The connection is (again) listening: notifications sent while it was not are lost.
    Connected,
    /// The connection dropped; it is being re-established.
    Lost,
}

/// The fan-out; see the module docs.
#[derive(Debug)]
pub struct Hub {
    tx: broadcast::Sender<Heard>,
    connected: AtomicBool,
}

impl Hub {
    /// A receiver of everything heard from now on. Read [`Hub::connected`] after subscribing to know the
    /// state the first message continues from.
    pub fn subscribe(&self) -> broadcast::Receiver<Heard> {
        self.tx.subscribe()
    }

    /// Whether the connection is listening now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }
}

/// Starts listening on `channels` over a dedicated connection with the pool's settings, reconnecting with
/// capped backoff until `stop`.
pub fn spawn(
    pool: &PgPool,
    channels: &[&'static str],
    stop: CancellationToken,
) -> (Arc<Hub>, JoinHandle<()>) {
    let (tx, _) = broadcast::channel(4096);
    let hub = Arc::new(Hub {
        tx,
        connected: AtomicBool::new(false),
    });
    let dedicated = super::dedicated_pool(pool, 1);
    let channels = channels.to_vec();
    let task = tokio::spawn(run(hub.clone(), dedicated, channels, stop));
    (hub, task)
}

async fn run(
    hub: Arc<Hub>,
    dedicated: PgPool,
    channels: Vec<&'static str>,
    stop: CancellationToken,
) {
    // Wake-ups missed while disconnected are covered by polling, but a database back from an outage should be
    // heard from again within seconds: hence the short cap.
    let mut retries =
        Backoff::doubling(Duration::from_millis(250), Duration::from_secs(5)).retries();
    loop {
        let connect = async {
            let mut listener = PgListener::connect_with(&dedicated).await?;
            // We rebuild the listener ourselves after a loss, so that subscribers hear Lost then Connected.
            listener.eager_reconnect(false);
            listener.listen_all(channels.iter().copied()).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            () = stop.cancelled() => break,
            result = connect => match result {
                Ok(listener) => listener,
                Err(err) => {
                    let wait = retries.failed();
                    tracing::warn!(%err, retry_in = ?wait, "cannot LISTEN for notifications; polling meanwhile");
                    if Retries::sleep(wait, &stop).await { break; }
                    continue;
                }
            },
        };
        hub.connected.store(true, Ordering::SeqCst);
        let _ = hub.tx.send(Heard::Connected);
        retries.succeeded();
        loop {
            let received = tokio::select! {
                () = stop.cancelled() => {
                    hub.connected.store(false, Ordering::SeqCst);
                    return;
                }
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(note)) => {
                    let _ = hub.tx.send(Heard::Notice {
                        channel: note.channel().into(),
                        payload: note.payload().into(),
                    });
                }
                Ok(None) | Err(_) => break,
            }
        }
        hub.connected.store(false, Ordering::SeqCst);
        let _ = hub.tx.send(Heard::Lost);
        let wait = retries.failed();
        tracing::warn!(retry_in = ?wait, "the LISTEN connection dropped; reconnecting");
        if Retries::sleep(wait, &stop).await {
            break;
        }
    }
    hub.connected.store(false, Ordering::SeqCst);
}
