//! The topic a Pub/Sub subscription reads, asked of the Pub/Sub API with a connector's credentials and
//! cached: a push (and a pulled message) names only its subscription, while operators allow topics.
//! Also the connector's Pub/Sub client credentials, shared with the streaming [`super::subscriber`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use google_cloud_auth::credentials::Credentials;
use google_cloud_pubsub::client::SubscriptionAdmin;

use crate::connectors::config::GcsConfig;

/// How long an answer is kept.
const TTL: Duration = Duration::from_secs(600);
/// A lookup slower than this fails (the push is answered 503 and retried).
const TIMEOUT: Duration = Duration::from_secs(10);

/// (Pub/Sub endpoint, subscription).
type CacheKey = (Option<String>, String);

/// See the module docs.
#[derive(Debug, Default)]
pub struct TopicResolver {
    /// To (when asked, topic).
    cache: Mutex<HashMap<CacheKey, (Instant, String)>>,
}

impl TopicResolver {
    /// The topic `subscription` reads, as the Pub/Sub service `gcs` points at tells it.
    pub async fn topic_of(&self, gcs: &GcsConfig, subscription: &str) -> Result<String, String> {
        let key = (gcs.pubsub_endpoint.clone(), subscription.to_owned());
        if let Some((at, topic)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            && at.elapsed() < TTL
        {
            return Ok(topic.clone());
        }
        let admin = admin(gcs).await?;
        let asked = admin
            .get_subscription()
            .set_subscription(subscription.to_owned())
            .send();
        let found = tokio::time::timeout(TIMEOUT, asked)
            .await
            .map_err(|_| {
                format!("Pub/Sub did not say within {TIMEOUT:?} which topic {subscription} reads")
            })?
            .map_err(|e| format!("cannot look up subscription {subscription}: {e}"))?;
        let topic = found.topic;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(key, (Instant::now(), topic.clone()));
        Ok(topic)
    }
}

/// A Pub/Sub admin client for `gcs`'s endpoint and credentials.
pub(super) async fn admin(gcs: &GcsConfig) -> Result<SubscriptionAdmin, String> {
    let mut admin = SubscriptionAdmin::builder().with_credentials(credentials(gcs)?);
    if let Some(endpoint) = &gcs.pubsub_endpoint {
        admin = admin.with_endpoint(endpoint.clone());
    }
    admin
        .build()
        .await
        .map_err(|e| format!("cannot build the Pub/Sub admin client: {e}"))
}

/// The connector's service account (inline or from a file); anonymous against a custom endpoint without
/// one (the emulator); else Application Default Credentials.
pub(super) fn credentials(gcs: &GcsConfig) -> Result<Credentials, String> {
    use google_cloud_auth::credentials::{Builder, anonymous, service_account};
    let key: Option<String> = match (&gcs.credentials_json, &gcs.credentials_path) {
        (Some(json), _) => Some(json.expose().to_owned()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read credentials_path {path:?}: {e}"))?,
        ),
        (None, None) => None,
    };
    match key {
        Some(key) => {
            let key: serde_json::Value = serde_json::from_str(&key)
                .map_err(|e| format!("the service-account key is not JSON: {e}"))?;
            service_account::Builder::new(key)
                .build()
                .map_err(|e| format!("the service-account key cannot be used: {e}"))
        }
        None if gcs.pubsub_endpoint.is_some() => Ok(anonymous::Builder::new().build()),
        None => Builder::default()
            .build()
            .map_err(|e| format!("no Google credentials (Application Default Credentials): {e}")),
    }
}
