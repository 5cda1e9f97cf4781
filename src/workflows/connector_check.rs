//! An operator's two questions about one connector, answered in words: does it work (its configuration
//! decrypts, its store answers, the object asked about is there, and how changes reach us), and "ingest
//! this one object now".

use sqlx::PgPool;

use crate::connectors::{ConnectorConfig, ObjectSource, Source, SourceError};
use crate::domain::{ChangeOp, JobId, Provider, TenantId, storable_key};
use crate::error::{Error, Result};
use crate::jobs::engine;
use crate::jobs::ingest_object::IngestObject;
use crate::registry::{self, LoadError, Registry};

/// One check and what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// `configuration`, `access`, `object` or `notifications`.
    pub name: &'static str,
    /// Whether it passed.
    pub ok: bool,
    /// What was found, or what is wrong and what to do.
    pub detail: String,
}

impl Check {
    fn new(name: &'static str, ok: bool, detail: impl Into<String>) -> Self {
        Self {
            name,
            ok,
            detail: detail.into(),
        }
    }
}

/// How changes can reach this server, as the caller (which runs the webhooks) knows it.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    /// How GCS pushes are authenticated: `oidc`, `secret`, `none` or `refused`.
    pub push_authentication: String,
    /// Whether SNS signatures are checked.
    pub sns_signatures: bool,
    /// Streaming-pull subscriptions of this process: (subscription, connected, last error).
    pub subscriptions: Vec<(String, bool, Option<String>)>,
}

/// Runs every check; a failed one does not stop the others that can still run.
pub async fn check(
    registry: &Registry,
    tenant: &TenantId,
    provider: Provider,
    key: Option<&str>,
    delivery: &Delivery,
) -> Result<Vec<Check>> {
    let connector = match registry.load(tenant, provider).await {
        Ok(Some(connector)) => connector,
        Ok(None) => return Err(registry::not_found(tenant, provider)),
        Err(LoadError::Database(e)) => return Err(e),
        Err(e) => {
            return Ok(vec![Check::new(
                "configuration",
                false,
                format!(
                    "{e}; restore the key it names or re-register the connector with its secrets"
                ),
            )]);
        }
    };
    let mut checks = vec![Check::new(
        "configuration",
        connector.enabled,
        if connector.enabled {
            "stored, decrypts, enabled".to_owned()
        } else {
            format!("stored and decrypts, but disabled: POST /_admin/connectors/{provider}/enable")
        },
    )];
    let config = &connector.config;
    match Source::open(config).await {
        Err(e) => checks.push(Check::new("access", false, access_problem(&e))),
        Ok(source) => {
            checks.push(match source.list(config.prefix(), None, 5).await {
                Ok(page) => Check::new(
                    "access",
                    true,
                    format!(
                        "listed {} under prefix {:?}: {} object(s) on the first page",
                        where_(config),
                        config.prefix(),
                        page.objects.len()
                    ),
                ),
                Err(e) => Check::new("access", false, access_problem(&e)),
            });
            if let Some(key) = key {
                checks.push(match source.stat(key).await {
                    Ok(Some(meta)) => Check::new(
                        "object",
                        true,
                        format!(
                            "{key:?} is there: {} bytes, version {}, content type {}",
                            meta.size,
                            meta.version,
                            meta.content_type.as_deref().unwrap_or("not given")
                        ),
                    ),
                    Ok(None) => Check::new("object", false, format!("no object is named {key:?}")),
                    Err(e) => Check::new("object", false, access_problem(&e)),
                });
            }
        }
    }
    checks.push(notifications(config, delivery));
    Ok(checks)
}

fn where_(config: &ConnectorConfig) -> String {
    config
        .bucket()
        .map_or_else(|| "the folder".to_owned(), |b| format!("bucket {b:?}"))
}

fn access_problem(err: &SourceError) -> String {
    match err {
        SourceError::Denied(_) => format!(
            "{err}: the credentials are refused or lack permission to list and read (s3:ListBucket and \
             s3:GetObject, or storage.objects.list and storage.objects.get)"
        ),
        SourceError::NotFound(_) => format!("{err}: check the bucket (or folder) name"),
        _ => format!("{err}: the store did not answer; check the endpoint and the network"),
    }
}

fn notifications(config: &ConnectorConfig, delivery: &Delivery) -> Check {
    let polling = config
        .poll_interval_seconds()
        .map(|s| format!("; also polled every {s} s"))
        .unwrap_or_default();
    let allowlist = match config.topic_allowlist() {
        [] => String::new(),
        topics => format!("; only topics {topics:?} are accepted"),
    };
    match config {
        ConnectorConfig::Gcs(c) => match &c.subscription {
            Some(subscription) => {
                match delivery
                    .subscriptions
                    .iter()
                    .find(|(s, _, _)| s == subscription)
                {
                    Some((_, true, _)) => Check::new(
                        "notifications",
                        true,
                        format!(
                            "streaming pull from {subscription} is connected{allowlist}{polling}"
                        ),
                    ),
                    Some((_, false, error)) => Check::new(
                        "notifications",
                        false,
                        format!(
                            "streaming pull from {subscription} is not connected: {}",
                            error.as_deref().unwrap_or("still connecting")
                        ),
                    ),
                    None => Check::new(
                        "notifications",
                        false,
                        format!(
                            "{subscription} is pulled by worker processes, not this one: see GET /_webhooks/gcs/health on a worker{polling}"
                        ),
                    ),
                }
            }
            None if delivery.push_authentication == "refused" => Check::new(
                "notifications",
                config.poll_interval_seconds().is_some(),
                format!(
                    "pushes to POST /_webhooks/gcs are refused: set PUBSUB_VERIFY_SECRET or PUBSUB_VERIFY_OIDC, \
                     or give the connector a subscription to pull{polling}"
                ),
            ),
            None => Check::new(
                "notifications",
                true,
                format!(
                    "a Pub/Sub push subscription must point at POST /_webhooks/gcs (authenticated by {}){allowlist}{polling}",
                    delivery.push_authentication
                ),
            ),
        },
        ConnectorConfig::S3(_) => Check::new(
            "notifications",
            true,
            format!(
                "an SNS topic with the bucket's event notifications must have an HTTPS subscription to POST /_webhooks/s3 ({}){allowlist}{polling}",
                if delivery.sns_signatures {
                    "signatures checked"
                } else {
                    "signatures NOT checked"
                }
            ),
        ),
        ConnectorConfig::Local(_) => Check::new(
            "notifications",
            config.poll_interval_seconds().is_some(),
            match config.poll_interval_seconds() {
                Some(s) => format!("the folder is polled every {s} s"),
                None => {
                    "a folder sends no events: set poll_interval_seconds, or backfill after changes"
                        .to_owned()
                }
            },
        ),
    }
}

/// Queues an ingest of `key` now, whatever any event said: for an object whose event was lost, or to see
/// one document through the pipeline. Answers the job (an equal one already waiting is that job).
pub async fn ingest_now(
    pool: &PgPool,
    registry: &Registry,
    tenant: &TenantId,
    provider: Provider,
    key: &str,
) -> Result<JobId> {
    storable_key(key).map_err(Error::Invalid)?;
    if key.is_empty() {
        return Err(Error::Invalid("key must name an object".to_owned()));
    }
    let connector = registry.require(tenant, provider).await?;
    if !connector.enabled {
        return Err(Error::Conflict(format!(
            "the {provider} connector of tenant {tenant} is disabled: enable it first"
        )));
    }
    let prefix = connector.config.prefix();
    if !key.starts_with(prefix) {
        return Err(Error::Invalid(format!(
            "{key:?} is outside the connector's prefix {prefix:?}"
        )));
    }
    let job = IngestObject {
        tenant_id: tenant.to_string(),
        provider: provider.to_string(),
        key: key.to_owned(),
        op: ChangeOp::Upsert,
        version: None,
        event_time: None,
        source: "api".to_owned(),
    };
    let mut conn = pool.acquire().await?;
    let queued = engine::enqueue(&mut conn, &job)
        .await
        .map_err(|e| Error::Internal(anyhow::anyhow!(e)))?;
    queued.id.ok_or_else(|| {
        Error::Unavailable("the job was queued by a transaction not yet visible; retry".to_owned())
    })
}
