//! `backfill_page`: one page of a bucket listing. In one transaction it enqueues an `ingest_object` job per
//! listed object, the job for the next page, and the run's progress, so a retried page re-lists the same page
//! (its token is in the arguments) and duplicates are skipped by the ingest jobs' idempotency keys. The run
//! ends when the listing does or `max_objects` were enqueued.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use super::engine::{self, Backoff, Job, JobContext, JobError, Policy, Uniqueness};
use super::ingest_object::{IngestObject, QUEUE};
use crate::connectors::{ObjectSource, SourceError, Sources};
use crate::domain::{ChangeOp, Provider, TenantId, storable_key};
use crate::metrics::metrics;
use crate::registry::{LoadError, Registry};
use crate::store::backfill::{self, Origin, PageCounts};
use crate::store::polls;

/// Objects listed per page.
pub const PAGE_SIZE: u32 = 100;

/// One page of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackfillPage {
    /// The run.
    pub run_id: Uuid,
    /// Tenant.
    pub tenant_id: String,
    /// Provider.
    pub provider: Provider,
    /// Key prefix listed.
    pub prefix: String,
    /// Page number (0 first).
    pub page: u64,
    /// The listing's continuation token for this page (`None` for the first).
    pub page_token: Option<String>,
}

impl Job for BackfillPage {
    const KIND: &'static str = "backfill_page";

    fn policy() -> Policy {
        Policy {
            max_attempts: 8,
            backoff: Backoff::exponential(Duration::from_secs(5), 2.0, Duration::from_secs(300)),
            timeout: Duration::from_secs(120),
            concurrency: 2,
            uniqueness: Uniqueness::Retained,
            fair: true,
            ..Policy::new(QUEUE)
        }
    }

    fn unique_key(&self) -> Option<String> {
        Some(format!("{}:{}", self.run_id, self.page))
    }

    fn tenant_id(&self) -> Option<&str> {
        Some(&self.tenant_id)
    }

    fn provider(&self) -> Option<&str> {
        Some(self.provider.as_str())
    }
}

/// What page handlers need.
#[derive(Debug, Clone)]
pub struct Deps {
    /// The database.
    pub pool: PgPool,
    /// Connector configurations.
    pub registry: Arc<Registry>,
    /// Storage backends.
    pub sources: Arc<Sources>,
}

/// Lists one page and queues its objects and the next page. (When the page job ends dead or cancelled, by
/// whatever path, a trigger on the job row closes the run as failed with the job's last error.)
pub async fn run(page: BackfillPage, cx: JobContext<Deps>) -> Result<(), JobError> {
    let deps = &cx.state;
    let tenant = TenantId::parse(&page.tenant_id).map_err(|e| JobError::permanent("invalid", e))?;
    let connector = match deps.registry.load(&tenant, page.provider).await {
        Ok(Some(connector)) => connector,
        Ok(None) => {
            return Err(JobError::permanent(
                "no_config",
                format!("tenant {tenant} has no {} connector", page.provider),
            ));
        }
        Err(LoadError::Database(e)) => return Err(e.into()),
        Err(e) => return Err(JobError::transient_with_code("config_unreadable", e)),
    };
    let source = deps
        .sources
        .get(&format!("{}:{tenant}", page.provider), &connector.config)
        .await
        .map_err(listing_error)?;
    let listed = source
        .list(&page.prefix, page.page_token.as_deref(), PAGE_SIZE)
        .await
        .map_err(listing_error)?;

    let mut tx = cx.begin().await?;
    let run = backfill::get(&mut tx, page.run_id, true)
        .await?
        .ok_or_else(|| {
            JobError::permanent(
                "invalid",
                format!("backfill run {} does not exist", page.run_id),
            )
        })?;
    if run.state != "running" {
        return Ok(());
    }
    let remaining = run
        .max_objects
        .map_or(i64::MAX, |max| (max - run.enqueued).max(0));
    // A poller's pass queues only what changed since its watermark (objects without a change time always).
    let changed =
        |object: &&crate::connectors::ObjectMeta| match (run.changed_since, object.updated) {
            (Some(since), Some(updated)) => updated >= since,
            _ => true,
        };
    // An object whose key this service cannot store is that object's failure, not the page's.
    let mut failures: Vec<serde_json::Value> = listed
        .refused
        .iter()
        .map(|(key, reason)| serde_json::json!({"key": key, "reason": reason}))
        .collect();
    for object in &listed.objects {
        if let Err(reason) = storable_key(&object.key) {
            failures.push(
                serde_json::json!({"key": object.key.replace('\0', "\\0"), "reason": reason}),
            );
        }
    }
    if !failures.is_empty() {
        tracing::warn!(run = %page.run_id, count = failures.len(), "objects that cannot be ingested were listed; recorded on the run");
        metrics()
            .ingest_errors
            .with_label_values(&[page.provider.as_str(), &tenant.to_string()])
            .inc_by(failures.len() as u64);
    }
    let jobs: Vec<IngestObject> = listed
        .objects
        .iter()
        .filter(|object| storable_key(&object.key).is_ok())
        .filter(changed)
        .take(usize::try_from(remaining).unwrap_or(usize::MAX))
        .map(|object| IngestObject {
            tenant_id: tenant.to_string(),
            provider: page.provider.to_string(),
            key: object.key.clone(),
            op: ChangeOp::Upsert,
            version: Some(object.version.clone()),
            event_time: object.updated,
            source: format!("backfill:{}", page.run_id),
        })
        .collect();
    let results = engine::enqueue_many(&mut tx, &jobs).await?;
    let enqueued = results.iter().filter(|r| r.inserted).count() as i64;
    let skipped = results.len() as i64 - enqueued;
    let budget_left = remaining - enqueued > 0;
    let next = listed.next_token.filter(|_| budget_left);
    let counts = PageCounts {
        seen: listed.objects.len() as i64,
        enqueued,
        skipped,
        newest_change: listed.objects.iter().filter_map(|o| o.updated).max(),
        failures,
    };
    backfill::advance(&mut tx, page.run_id, counts, next.is_none()).await?;
    if next.is_none() && run.is_poll_pass() {
        polls::complete(&mut tx, page.run_id).await?;
        metrics()
            .poller_runs
            .with_label_values(&[page.provider.as_str(), "completed"])
            .inc();
    }
    if let Some(token) = next {
        let following = BackfillPage {
            page: page.page + 1,
            page_token: Some(token),
            ..page.clone()
        };
        engine::enqueue(&mut tx, &following).await?;
    }
    tx.commit().await?;
    Ok(())
}

fn listing_error(err: SourceError) -> JobError {
    if err.is_transient() {
        JobError::transient_with_code("processing", err)
    } else {
        JobError::permanent("processing", err)
    }
}

/// Starts a run over `prefix` (the connector's own prefix when `None`): records it and queues its first
/// page in one transaction. Returns the run id and the first page's job.
pub async fn start(
    pool: &PgPool,
    registry: &Registry,
    tenant: &TenantId,
    provider: Provider,
    prefix: Option<String>,
    max_objects: Option<i64>,
) -> crate::error::Result<(Uuid, crate::domain::JobId)> {
    use crate::error::Error;
    let connector = registry.require(tenant, provider).await?;
    if !connector.enabled {
        return Err(Error::Conflict(format!(
            "the {provider} connector of tenant {tenant} is disabled: enable it before backfilling"
        )));
    }
    let base = connector.config.prefix().to_owned();
    let prefix = prefix.unwrap_or_else(|| base.clone());
    if !prefix.starts_with(&base) {
        return Err(Error::Invalid(format!(
            "prefix {prefix:?} is outside the connector's prefix {base:?}"
        )));
    }
    if max_objects.is_some_and(|m| m < 1) {
        return Err(Error::Invalid("limit must be at least 1".to_owned()));
    }
    let run_id = Uuid::new_v4();
    let mut tx = pool.begin().await?;
    backfill::create(
        &mut tx,
        run_id,
        tenant.as_str(),
        provider.as_str(),
        &prefix,
        max_objects,
        Origin::Api,
    )
    .await?;
    let first = engine::enqueue(
        &mut tx,
        &BackfillPage {
            run_id,
            tenant_id: tenant.to_string(),
            provider,
            prefix,
            page: 0,
            page_token: None,
        },
    )
    .await?;
    tx.commit().await?;
    tracing::info!(%run_id, tenant = %tenant, %provider, "backfill started");
    Ok((run_id, first.id.expect("a fresh run's first page is new")))
}

/// A run's progress.
pub async fn status(pool: &PgPool, run_id: Uuid) -> crate::error::Result<backfill::BackfillRun> {
    let mut conn = pool.acquire().await?;
    backfill::get(&mut conn, run_id, false)
        .await?
        .ok_or_else(|| crate::error::Error::NotFound {
            what: "backfill run",
            id: run_id.to_string(),
        })
}
