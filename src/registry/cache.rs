//! A short cache of decrypted connectors. Any process that changes a configuration NOTIFYs; every process's
//! listener drops the entry, so changes are seen within a notification's latency. While the listener is
//! disconnected the cache is bypassed, so a lost connection never serves stale settings.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::Connector;
use crate::domain::Provider;
use crate::metrics::metrics;
use crate::store::connectors::NOTIFY_CHANNEL;

type Key = (Provider, String);
/// When an entry was read, and what was read (including "no such connector").
type Entry = (Instant, Option<Arc<Connector>>);

#[derive(Debug)]
pub(super) struct Cache {
    ttl: Duration,
    entries: Mutex<HashMap<Key, Entry>>,
    listening: AtomicBool,
}

impl Cache {
    pub(super) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
            listening: AtomicBool::new(false),
        }
    }

    pub(super) fn listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    /// A fresh entry (which may record that there is no connector), unless the cache is bypassed.
    pub(super) fn get(&self, provider: Provider, tenant: &str) -> Option<Option<Arc<Connector>>> {
        if !self.listening() {
            return None;
        }
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(&(provider, tenant.to_owned()))
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, connector)| connector.clone())
    }

    pub(super) fn put(&self, provider: Provider, tenant: &str, connector: Option<Arc<Connector>>) {
        if self.listening() {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            entries.insert((provider, tenant.to_owned()), (Instant::now(), connector));
        }
    }

    pub(super) fn forget(&self, provider: Provider, tenant: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(&(provider, tenant.to_owned()));
    }

    fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Listens for changes until `stop`, reconnecting with capped exponential backoff.
    pub(super) async fn listen(&self, pool: &PgPool, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let connected = async {
                let mut listener = PgListener::connect_with(pool).await?;
                listener.listen(NOTIFY_CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let mut listener = tokio::select! {
                () = stop.cancelled() => break,
                result = connected => match result {
                    Ok(listener) => listener,
                    Err(err) => {
                        tracing::warn!(%err, retry_in = ?backoff, "config cache listener cannot connect; reading configs uncached");
                        self.wait(&stop, &mut backoff).await;
                        continue;
                    }
                },
            };
            // Changes made while we were not listening are unknown: start from empty.
            self.clear();
            self.listening.store(true, Ordering::SeqCst);
            backoff = Duration::from_millis(250);
            loop {
                let received = tokio::select! {
                    () = stop.cancelled() => {
                        self.listening.store(false, Ordering::SeqCst);
                        return;
                    }
                    received = listener.try_recv() => received,
                };
                match received {
                    Ok(Some(note)) => match note
                        .payload()
                        .split_once(':')
                        .and_then(|(p, t)| Some((p.parse().ok()?, t)))
                    {
                        Some((provider, tenant)) => self.forget(provider, tenant),
                        None => self.clear(),
                    },
                    Ok(None) | Err(_) => break,
                }
            }
            self.listening.store(false, Ordering::SeqCst);
            metrics()
                .pubsub_reconnects
                .with_label_values(&["config_cache"])
                .inc();
            tracing::warn!(retry_in = ?backoff, "config cache listener lost its connection; reconnecting");
            self.wait(&stop, &mut backoff).await;
        }
        self.listening.store(false, Ordering::SeqCst);
    }

    async fn wait(&self, stop: &CancellationToken, backoff: &mut Duration) {
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(*backoff) => {}
        }
        *backoff = (*backoff * 2).min(Duration::from_secs(30));
    }
}
