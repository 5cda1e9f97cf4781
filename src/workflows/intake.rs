//! From verified storage events to committed `ingest_object` jobs: find the tenants whose connector reads the
//! bucket (and prefix), hold each to its topic allowlist, skip redeliveries, and enqueue one job per tenant and
//! change in one transaction. The caller answers the webhook only after this returns.

use sqlx::PgPool;

use crate::domain::Provider;
use crate::error::Result;
use crate::jobs::engine;
use crate::jobs::ingest_object::IngestObject;
use crate::metrics::metrics;
use crate::registry::Registry;
use crate::store::webhooks as store;
use crate::webhooks::ObjectChange;
use crate::workflows::pubsub_topics::TopicResolver;

/// What became of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    /// Jobs were committed (some may have been duplicates of jobs already queued).
    Accepted {
        /// Jobs inserted.
        jobs: usize,
        /// Tenants they are for.
        tenants: Vec<String>,
    },
    /// This message was accepted before; nothing new was queued.
    Duplicate,
    /// No tenant's connector reads these objects; nothing to do.
    NoConnector,
    /// Every tenant that reads these objects refuses the delivering topic.
    TopicRejected {
        /// The tenants that refused.
        tenants: Vec<String>,
    },
}

/// How to learn which topic a pushed message came through: a push names only its subscription.
#[derive(Debug, Clone, Copy)]
pub struct TopicLookup<'a> {
    /// Asks Pub/Sub (cached).
    pub resolver: &'a TopicResolver,
    /// The subscription that pushed.
    pub subscription: &'a str,
}

/// Routes `changes` announced by message `message_id` of `provider`. `topics` are the names the delivery
/// came through (SNS topic ARN; Pub/Sub subscription, and topic when known), matched against each tenant's
/// `topic_allowlist`; with `lookup`, the subscription's topic is asked of Pub/Sub (with that tenant's
/// credentials) when an allowlist needs it.
#[allow(clippy::too_many_arguments)]
pub async fn accept(
    pool: &PgPool,
    registry: &Registry,
    provider: Provider,
    message_id: &str,
    topics: &[&str],
    lookup: Option<TopicLookup<'_>>,
    changes: &[ObjectChange],
    source: &str,
) -> Result<Intake> {
    let mut jobs = Vec::new();
    let mut rejected = Vec::new();
    let mut matched = false;
    let mut resolved: Option<String> = None;
    for change in changes {
        for subscriber in registry
            .bucket_subscribers(provider, &change.bucket)
            .await?
        {
            if !change.key.starts_with(&subscriber.prefix) {
                continue;
            }
            matched = true;
            let allowed = |topic: &str| subscriber.topic_allowlist.iter().any(|a| a == topic);
            let mut pass =
                subscriber.topic_allowlist.is_empty() || topics.iter().any(|t| allowed(t));
            if !pass && let Some(lookup) = lookup {
                if resolved.is_none() {
                    resolved = Some(resolve(registry, &subscriber.tenant_id, lookup).await?);
                }
                pass = resolved.as_deref().is_some_and(allowed);
            }
            if !pass {
                metrics()
                    .webhook_topic_rejected
                    .with_label_values(&[provider.as_str(), &subscriber.tenant_id])
                    .inc();
                tracing::warn!(tenant = %subscriber.tenant_id, %provider, ?topics, topic = ?resolved,
                    allowlist = ?subscriber.topic_allowlist, "webhook topic rejected: topic not in allowlist");
                rejected.push(subscriber.tenant_id);
                continue;
            }
            jobs.push(IngestObject {
                tenant_id: subscriber.tenant_id,
                provider: provider.to_string(),
                key: change.key.clone(),
                op: change.op,
                version: change.version.clone(),
                event_time: change.event_time,
                source: source.to_owned(),
            });
        }
    }
    if jobs.is_empty() {
        rejected.sort();
        rejected.dedup();
        return Ok(if !rejected.is_empty() {
            Intake::TopicRejected { tenants: rejected }
        } else {
            if !matched {
                tracing::warn!(%provider, buckets = ?changes.iter().map(|c| &c.bucket).collect::<Vec<_>>(),
                    "webhook event for objects no connector reads; ignored");
            }
            Intake::NoConnector
        });
    }
    let mut tx = pool.begin().await?;
    if !store::record_delivery(&mut tx, provider, message_id, jobs.len() as i32).await? {
        return Ok(Intake::Duplicate);
    }
    let results = engine::enqueue_many(&mut tx, &jobs).await?;
    tx.commit().await?;
    let mut tenants: Vec<String> = jobs.into_iter().map(|j| j.tenant_id).collect();
    tenants.sort();
    tenants.dedup();
    Ok(Intake::Accepted {
        jobs: results.iter().filter(|r| r.inserted).count(),
        tenants,
    })
}

/// The pushing subscription's topic, asked of Pub/Sub with the credentials of `tenant`'s GCS connector.
/// A failed lookup is "try again later": Pub/Sub redelivers, and nothing is dropped meanwhile.
async fn resolve(registry: &Registry, tenant: &str, lookup: TopicLookup<'_>) -> Result<String> {
    let unavailable = |why: String| crate::error::Error::Unavailable(why);
    let tenant = crate::domain::TenantId::parse(tenant).map_err(|e| unavailable(e.to_string()))?;
    let connector = registry
        .load(&tenant, Provider::Gcs)
        .await
        .map_err(|e| {
            unavailable(format!(
                "cannot read the connector to look up the topic: {e}"
            ))
        })?
        .ok_or_else(|| unavailable("the connector disappeared".to_owned()))?;
    let crate::connectors::ConnectorConfig::Gcs(gcs) = connector.config.as_ref() else {
        return Err(unavailable("not a GCS connector".to_owned()));
    };
    lookup
        .resolver
        .topic_of(gcs, lookup.subscription)
        .await
        .map_err(|why| {
            tracing::warn!(subscription = lookup.subscription, %why, "cannot learn the pushing subscription's topic");
            unavailable(format!("cannot learn which topic the subscription reads: {why}"))
        })
}
