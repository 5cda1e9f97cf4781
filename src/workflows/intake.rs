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

/// Routes `changes` announced by message `message_id` of `provider`. `topics` are the names the delivery
/// came through (SNS topic ARN; Pub/Sub topic and subscription), matched against each tenant's
/// `topic_allowlist`.
pub async fn accept(
    pool: &PgPool,
    registry: &Registry,
    provider: Provider,
    message_id: &str,
    topics: &[&str],
    changes: &[ObjectChange],
    source: &str,
) -> Result<Intake> {
    let mut jobs = Vec::new();
    let mut rejected = Vec::new();
    let mut matched = false;
    for change in changes {
        for subscriber in registry
            .bucket_subscribers(provider, &change.bucket)
            .await?
        {
            if !change.key.starts_with(&subscriber.prefix) {
                continue;
            }
            matched = true;
            if !subscriber.topic_allowlist.is_empty()
                && !topics
                    .iter()
                    .any(|t| subscriber.topic_allowlist.iter().any(|a| a == t))
            {
                metrics()
                    .webhook_topic_rejected
                    .with_label_values(&[provider.as_str(), &subscriber.tenant_id])
                    .inc();
                tracing::warn!(tenant = %subscriber.tenant_id, %provider, ?topics, allowlist = ?subscriber.topic_allowlist,
                    "webhook topic rejected: topic not in allowlist");
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
