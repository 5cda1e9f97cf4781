//! A short cache of decrypted connectors. Any process that changes a configuration NOTIFYs; every process's
//! listener drops the entry, so changes are seen within a notification's latency. While the listener is
//! disconnected the cache is bypassed, so a lost connection never serves stale settings.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::Connector;
use crate::domain::Provider;
use crate::metrics::metrics;
use crate::store::connectors::NOTIFY_CHANNEL;
use crate::store::listen::{Heard, Hub};

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

    /// Follows changes heard on the process's LISTEN hub until `stop`. While the hub is disconnected the
    /// cache is bypassed; when it (re)connects the cache starts from empty, since changes made meanwhile
    /// are unknown.
    pub(super) async fn follow(&self, hub: &Hub, stop: CancellationToken) {
        let mut heard = hub.subscribe();
        if hub.connected() {
            self.clear();
            self.listening.store(true, Ordering::SeqCst);
        }
        loop {
            let received = tokio::select! {
                () = stop.cancelled() => break,
                received = heard.recv() => received,
            };
            match received {
                Ok(Heard::Notice { channel, payload }) if &*channel == NOTIFY_CHANNEL => {
                    match payload
                        .split_once(':')
                        .and_then(|(p, t)| Some((p.parse().ok()?, t)))
                    {
                        Some((provider, tenant)) => self.forget(provider, tenant),
                        None => self.clear(),
                    }
                }
                Ok(Heard::Notice { .. }) => {}
                Ok(Heard::Connected) => {
                    self.clear();
                    self.listening.store(true, Ordering::SeqCst);
                }
                Ok(Heard::Lost) => {
                    self.listening.store(false, Ordering::SeqCst);
                    metrics()
                        .pubsub_reconnects
                        .with_label_values(&["config_cache"])
                        .inc();
                    tracing::warn!(
                        "config cache: the LISTEN connection dropped; reading configs uncached until it is back"
                    );
                }
                // Some notifications were missed: anything cached may be stale.
                Err(RecvError::Lagged(_)) => self.clear(),
                Err(RecvError::Closed) => break,
            }
        }
        self.listening.store(false, Ordering::SeqCst);
    }
}
