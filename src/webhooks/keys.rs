//! Verification keys fetched over HTTP and cached: SNS signing certificates (one per URL) and Google's OIDC
//! key set. One fetch at a time (callers that wait find the result in the cache), a timeout and a size cap
//! on every fetch, and a floor on how often a key can be fetched again, so forged messages naming unknown
//! keys cannot make us fetch in a storm.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Why a key is not available.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// What came back is not a usable key (nothing to retry).
    #[error("{0}")]
    Refused(String),
    /// The fetch failed; the sender should retry later.
    #[error("{0}")]
    Unavailable(String),
}

struct Entry<V> {
    value: V,
    fetched: Instant,
}

/// See the module docs.
pub struct KeyFetcher<V> {
    client: reqwest::Client,
    ttl: Duration,
    min_refetch: Duration,
    max_bytes: usize,
    max_entries: usize,
    entries: std::sync::Mutex<HashMap<String, Entry<V>>>,
    turn: tokio::sync::Mutex<()>,
}

impl<V> std::fmt::Debug for KeyFetcher<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFetcher")
            .field("ttl", &self.ttl)
            .field("cached", &self.entries.lock().map_or(0, |e| e.len()))
            .finish()
    }
}

impl<V: Clone> KeyFetcher<V> {
    /// Keys kept for `ttl`, fetched again at most every `min_refetch`, each at most `max_bytes` long.
    pub fn new(ttl: Duration, min_refetch: Duration, max_bytes: usize) -> Self {
        Self {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("a plain reqwest client builds"),
            ttl,
            min_refetch,
            max_bytes,
            max_entries: 256,
            entries: std::sync::Mutex::new(HashMap::new()),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// Keys in the cache.
    pub fn cached(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Seconds since the key at `url` was fetched, if it is cached.
    pub fn age(&self, url: &str) -> Option<Duration> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(url)
            .map(|e| e.fetched.elapsed())
    }

    /// The key at `url` as cached, however old.
    pub fn peek(&self, url: &str) -> Option<V> {
        self.fresh(url, Duration::MAX)
    }

    fn fresh(&self, url: &str, within: Duration) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(url)
            .filter(|e| e.fetched.elapsed() < within)
            .map(|e| e.value.clone())
    }

    /// The key at `url`: from the cache while fresh, else fetched (`request` adds what the server wants) and
    /// parsed by `parse`. With `again`, a cached key is fetched anew unless it was fetched within the
    /// refetch floor (a message named a key the cached set does not have).
    pub async fn get(
        &self,
        url: &str,
        again: bool,
        request: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
        parse: impl Fn(&[u8]) -> Result<V, String>,
    ) -> Result<V, FetchError> {
        let wanted = if again { self.min_refetch } else { self.ttl };
        if let Some(value) = self.fresh(url, wanted) {
            return Ok(value);
        }
        let _turn = self.turn.lock().await;
        // Whoever fetched while we waited has left it here.
        if let Some(value) = self.fresh(url, wanted) {
            return Ok(value);
        }
        let response = request(&self.client)
            .send()
            .await
            .map_err(|e| FetchError::Unavailable(e.without_url().to_string()))?;
        if !response.status().is_success() {
            return Err(FetchError::Unavailable(format!(
                "HTTP {}",
                response.status()
            )));
        }
        if response
            .content_length()
            .is_some_and(|n| n > self.max_bytes as u64)
        {
            return Err(FetchError::Refused(
                "the key is implausibly large".to_owned(),
            ));
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| FetchError::Unavailable(e.without_url().to_string()))?;
        if body.len() > self.max_bytes {
            return Err(FetchError::Refused(
                "the key is implausibly large".to_owned(),
            ));
        }
        let value = parse(&body).map_err(FetchError::Refused)?;
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.max_entries {
            entries.retain(|_, e| e.fetched.elapsed() < self.ttl);
            if entries.len() >= self.max_entries {
                entries.clear();
            }
        }
        entries.insert(
            url.to_owned(),
            Entry {
                value: value.clone(),
                fetched: Instant::now(),
            },
        );
        Ok(value)
    }

    /// A GET with the fetcher's client (timeout, no redirects), for calls that are not keys.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}
