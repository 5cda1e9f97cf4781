//! GCS notifications by Pub/Sub streaming pull, for connectors that name a `subscription`: one long-lived
//! stream per subscription, each message turned into committed `ingest_object` jobs (through [`intake`],
//! as a push would be) and acknowledged only after that commit. A message whose jobs did not commit is
//! nacked, so Pub/Sub delivers it again.
//!
//! The client library retries broken streams by itself, silently; to see a dead connection (and count it),
//! each session also asks the service for the subscription every `PUBSUB_TCP_KEEPALIVE`. A failed check, a
//! stream error or the stream's end closes the session; the next one starts after a capped exponential
//! backoff, counted in `connector_pubsub_reconnect_total{source="gcs_subscriber"}`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use google_cloud_pubsub::client::{Subscriber, SubscriptionAdmin};
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::subscriber::handler::Handler;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::intake::{self, Intake};
use super::pubsub_topics::credentials;
use crate::backoff::{Backoff, Retries};
use crate::connectors::ConnectorConfig;
use crate::domain::Provider;
use crate::metrics::metrics;
use crate::registry::Registry;
use crate::webhooks::pubsub;

/// How often the set of subscriptions is compared with the connector configurations.
const REFRESH: Duration = Duration::from_secs(5);
/// The first reconnect waits about this long; each failed one doubles it, up to the configured cap.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// How long a message whose jobs did not commit is held before it is handed back.
const NACK_PAUSE: Duration = Duration::from_secs(1);
/// A connection check that takes longer than this counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// How subscribers behave.
#[derive(Debug, Clone, Copy)]
pub struct SubscriberSettings {
    /// How often a session checks its connection (`PUBSUB_TCP_KEEPALIVE`).
    pub check_every: Duration,
    /// The longest wait between reconnects (`PUBSUB_RECONNECT_MAX_SECONDS`).
    pub max_backoff: Duration,
}

/// One subscription's state, as the health endpoint shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SubscriptionState {
    /// `projects/<p>/subscriptions/<s>`.
    pub subscription: String,
    /// The Pub/Sub endpoint, when not Google's.
    pub endpoint: Option<String>,
    /// Tenants whose connectors name it.
    pub tenants: Vec<String>,
    /// Whether the current session has checked its connection and is streaming.
    pub connected: bool,
    /// Sessions started after the first.
    pub reconnects: u64,
    /// Messages handled (acked or nacked).
    pub messages: u64,
    /// When the last message arrived.
    pub last_message_at: Option<DateTime<Utc>>,
    /// Why the last session ended.
    pub last_error: Option<String>,
    /// The topic the subscription reads (as the service says), matched against topic allowlists.
    pub topic: Option<String>,
    /// Messages acked without jobs because no tenant reading the bucket allows the topic, or because they
    /// cannot be read as a GCS notification.
    pub rejected: u64,
    /// Why the last such message was refused.
    pub last_rejection: Option<String>,
}

/// The states of this process's subscriptions.
#[derive(Debug, Clone, Default)]
pub struct Subscriptions {
    states: Arc<Mutex<BTreeMap<Key, SubscriptionState>>>,
}

impl Subscriptions {
    /// Every subscription's state, by name.
    pub fn snapshot(&self) -> Vec<SubscriptionState> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, SubscriptionState>> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn topic(&self, key: &Key) -> Option<String> {
        self.lock().get(key).and_then(|s| s.topic.clone())
    }

    fn update(&self, key: &Key, change: impl FnOnce(&mut SubscriptionState)) {
        if let Some(state) = self.lock().get_mut(key) {
            change(state);
        }
    }
}

/// A subscription as reached through one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    subscription: String,
    endpoint: Option<String>,
}

struct Running {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Keeps one session per configured subscription until `stop`: starts sessions for subscriptions that
/// appear in connector configurations and stops those that disappear.
pub fn spawn(
    pool: PgPool,
    registry: Arc<Registry>,
    settings: SubscriberSettings,
    subscriptions: Subscriptions,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut running: HashMap<Key, Running> = HashMap::new();
        loop {
            match wanted(&registry).await {
                Ok(wanted) => {
                    running.retain(|key, session| {
                        let keep = wanted.contains_key(key);
                        if !keep {
                            tracing::info!(
                                subscription = key.subscription,
                                "subscriber stopping: no connector names it any more"
                            );
                            session.stop.cancel();
                            subscriptions.lock().remove(key);
                        }
                        keep
                    });
                    for (key, (config, tenants)) in wanted {
                        if let Some(state) = subscriptions.lock().get_mut(&key) {
                            state.tenants = tenants;
                            continue;
                        }
                        subscriptions.lock().insert(
                            key.clone(),
                            SubscriptionState {
                                subscription: key.subscription.clone(),
                                endpoint: key.endpoint.clone(),
                                tenants,
                                connected: false,
                                reconnects: 0,
                                messages: 0,
                                last_message_at: None,
                                last_error: None,
                                topic: None,
                                rejected: 0,
                                last_rejection: None,
                            },
                        );
                        let session_stop = stop.child_token();
                        let task = tokio::spawn(subscribe(
                            Session {
                                key: key.clone(),
                                config,
                                pool: pool.clone(),
                                registry: registry.clone(),
                                settings,
                                subscriptions: subscriptions.clone(),
                            },
                            session_stop.clone(),
                        ));
                        running.insert(
                            key,
                            Running {
                                stop: session_stop,
                                task,
                            },
                        );
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, "cannot read connector configurations; subscribers keep running as they are")
                }
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(REFRESH) => {}
            }
        }
        for (_, session) in running {
            session.stop.cancel();
            let _ = session.task.await;
        }
    })
}

/// Subscriptions named by enabled GCS connectors, with the first connector's configuration (for credentials)
/// and every tenant naming it.
async fn wanted(
    registry: &Registry,
) -> crate::error::Result<BTreeMap<Key, (Arc<ConnectorConfig>, Vec<String>)>> {
    let mut wanted: BTreeMap<Key, (Arc<ConnectorConfig>, Vec<String>)> = BTreeMap::new();
    for connector in registry.pulling_connectors().await? {
        let ConnectorConfig::Gcs(gcs) = connector.config.as_ref() else {
            continue;
        };
        let Some(subscription) = gcs.subscription.clone() else {
            continue;
        };
        let key = Key {
            subscription,
            endpoint: gcs.pubsub_endpoint.clone(),
        };
        wanted
            .entry(key)
            .or_insert_with(|| (connector.config.clone(), Vec::new()))
            .1
            .push(connector.tenant_id.to_string());
    }
    Ok(wanted)
}

struct Session {
    key: Key,
    config: Arc<ConnectorConfig>,
    pool: PgPool,
    registry: Arc<Registry>,
    settings: SubscriberSettings,
    subscriptions: Subscriptions,
}

/// Runs sessions one after another until `stop`.
async fn subscribe(session: Session, stop: CancellationToken) {
    let subscription = session.key.subscription.clone();
    let mut retries = Backoff::doubling(FIRST_BACKOFF, session.settings.max_backoff).retries();
    let mut first = true;
    loop {
        if !first {
            metrics()
                .pubsub_reconnects
                .with_label_values(&["gcs_subscriber"])
                .inc();
            session
                .subscriptions
                .update(&session.key, |s| s.reconnects += 1);
        }
        first = false;
        let wait = match session.run(&stop, &mut retries).await {
            Ok(()) => return,
            Err(reason) => {
                session.subscriptions.update(&session.key, |s| {
                    s.connected = false;
                    s.last_error = Some(reason.clone());
                });
                let wait = retries.failed();
                tracing::warn!(%subscription, %reason, retry_in = ?wait, "subscriber disconnected; reconnecting");
                wait
            }
        };
        if Retries::sleep(wait, &stop).await {
            return;
        }
    }
}

impl Session {
    /// One connection: Ok when stopped, Err (why) when it broke.
    async fn run(&self, stop: &CancellationToken, retries: &mut Retries) -> Result<(), String> {
        let gcs = match self.config.as_ref() {
            ConnectorConfig::Gcs(gcs) => gcs,
            _ => return Err("not a GCS connector".to_owned()),
        };
        let credentials = credentials(gcs)?;
        let mut subscriber = Subscriber::builder().with_credentials(credentials.clone());
        let mut admin = SubscriptionAdmin::builder().with_credentials(credentials);
        if let Some(endpoint) = &self.key.endpoint {
            subscriber = subscriber.with_endpoint(endpoint.clone());
            admin = admin.with_endpoint(endpoint.clone());
        }
        let subscriber = subscriber
            .build()
            .await
            .map_err(|e| format!("cannot build the Pub/Sub client: {e}"))?;
        let admin = admin
            .build()
            .await
            .map_err(|e| format!("cannot build the Pub/Sub admin client: {e}"))?;
        self.check(&admin).await?;
        let mut stream = subscriber
            .subscribe(self.key.subscription.clone())
            .set_max_outstanding_messages(100)
            .build();
        retries.succeeded();
        self.subscriptions.update(&self.key, |s| s.connected = true);
        tracing::info!(subscription = self.key.subscription, "subscriber connected");
        let mut checks = tokio::time::interval(self.settings.check_every);
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        checks.tick().await;
        let outcome = loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break Ok(()),
                next = stream.next() => match next {
                    Some(Ok((message, handler))) => self.handle(message, handler).await,
                    Some(Err(e)) => break Err(format!("the stream failed: {e}")),
                    None => break Err("the stream ended".to_owned()),
                },
                _ = checks.tick() => {
                    if let Err(reason) = self.check(&admin).await {
                        break Err(reason);
                    }
                }
            }
        };
        // Messages received but not handled are not acked: Pub/Sub redelivers them.
        stream.shutdown_token().shutdown().await;
        outcome
    }

    /// Asks the service for the subscription: proves the connection, the credentials and that it exists,
    /// and learns the topic it reads.
    async fn check(&self, admin: &SubscriptionAdmin) -> Result<(), String> {
        let asked = admin
            .get_subscription()
            .set_subscription(self.key.subscription.clone())
            .send();
        match tokio::time::timeout(CHECK_TIMEOUT, asked).await {
            Ok(Ok(subscription)) => {
                let topic = Some(subscription.topic).filter(|t| !t.is_empty());
                self.subscriptions.update(&self.key, |s| s.topic = topic);
                Ok(())
            }
            Ok(Err(e)) => Err(format!("the subscription check failed: {e}")),
            Err(_) => Err(format!(
                "the subscription check got no answer within {CHECK_TIMEOUT:?}"
            )),
        }
    }

    async fn handle(&self, message: Message, handler: Handler) {
        let publish_time = message
            .publish_time
            .and_then(|t| DateTime::from_timestamp(t.seconds(), t.nanos().max(0) as u32));
        let m = metrics();
        self.subscriptions.update(&self.key, |s| {
            s.messages += 1;
            s.last_message_at = Some(Utc::now());
        });
        let change = match pubsub::notification(&message.attributes, publish_time) {
            Ok((_, Some(change))) => change,
            Ok((event_type, None)) => {
                tracing::debug!(event_type, "notification without a content change; acked");
                handler.ack();
                m.pubsub_messages.with_label_values(&["ignored"]).inc();
                return;
            }
            Err(reason) => {
                // Redelivery cannot make it valid: ack it, and say so.
                tracing::warn!(subscription = self.key.subscription, message_id = message.message_id, %reason,
                    "malformed Pub/Sub message acked without jobs");
                self.subscriptions.update(&self.key, |s| {
                    s.rejected += 1;
                    s.last_rejection = Some(format!("message {}: {reason}", message.message_id));
                });
                handler.ack();
                m.pubsub_messages.with_label_values(&["rejected"]).inc();
                return;
            }
        };
        let topic = self.subscriptions.topic(&self.key);
        let mut topics = vec![self.key.subscription.as_str()];
        topics.extend(topic.as_deref());
        let accepted = intake::accept(
            &self.pool,
            &self.registry,
            Provider::Gcs,
            &pubsub::delivery_id(&self.key.subscription, &message.message_id, publish_time),
            &topics,
            None,
            std::slice::from_ref(&change),
            "pubsub_pull",
        )
        .await;
        match accepted {
            Ok(Intake::TopicRejected { tenants }) => {
                // Redelivering cannot change the allowlist's mind: acked, but counted (the rejection metric,
                // and this subscription's state) and logged, never dropped silently.
                let why = format!(
                    "topic {} is not in the topic_allowlist of the connectors reading bucket {}",
                    topic.as_deref().unwrap_or("(unknown)"),
                    change.bucket
                );
                tracing::warn!(subscription = self.key.subscription, ?tenants, key = change.key, %why,
                    "Pub/Sub message refused by topic allowlist; acked without jobs");
                self.subscriptions.update(&self.key, |s| {
                    s.rejected += 1;
                    s.last_rejection = Some(why);
                });
                handler.ack();
                m.pubsub_messages.with_label_values(&["rejected"]).inc();
            }
            Ok(outcome) => {
                if matches!(outcome, Intake::NoConnector) {
                    tracing::debug!(?outcome, key = change.key, "message acked without jobs");
                }
                handler.ack();
                m.pubsub_messages.with_label_values(&["acked"]).inc();
            }
            Err(err) => {
                tracing::warn!(subscription = self.key.subscription, message_id = message.message_id, %err,
                    "jobs for a Pub/Sub message did not commit; nacked for redelivery");
                // Pub/Sub redelivers a nacked message at once: pausing keeps a database outage from becoming
                // a hot loop of redeliveries (the stream is handled one message at a time).
                tokio::time::sleep(NACK_PAUSE).await;
                handler.nack();
                m.pubsub_messages.with_label_values(&["nacked"]).inc();
            }
        }
    }
}
