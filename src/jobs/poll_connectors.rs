//! `poll_connectors`: for buckets without notifications. On each tick of its schedule it starts a pass for
//! every connector with `poll_interval_seconds` whose interval has run out and whose last pass has ended.
//! A pass is a backfill run that queues only objects changed since the connector's watermark, so listing,
//! paging, retries and de-duplication are the backfill's, and the cursor lives in `connector_polls`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use super::MAINTENANCE as QUEUE;
use super::backfill_page::BackfillPage;
use super::engine::{self, Backoff, Job, JobContext, JobError, Policy};
use crate::domain::Provider;
use crate::metrics::metrics;
use crate::store::backfill::{self, Origin};
use crate::store::polls;

/// How often connectors are checked for a due pass: the finest useful `poll_interval_seconds`.
pub const EVERY: &str = "*/5 * * * * *";

/// Each pass re-offers objects changed this long before the watermark: writes whose change time is earlier
/// than the moment they became visible in a listing (multipart uploads, clock skew) are not missed. Objects
/// queued before are skipped by their ingest jobs' idempotency keys.
pub const OVERLAP: Duration = Duration::from_secs(600);

/// One check for due passes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PollConnectors {
    /// The schedule tick that asked for it.
    pub tick: DateTime<Utc>,
}

impl Job for PollConnectors {
    const KIND: &'static str = "poll_connectors";

    fn policy() -> Policy {
        Policy {
            priority: 5,
            max_attempts: 3,
            backoff: Backoff::exponential(Duration::from_secs(1), 2.0, Duration::from_secs(30)),
            timeout: Duration::from_secs(60),
            concurrency: 1,
            ..Policy::new(QUEUE)
        }
    }
}

/// Starts a pass for each due connector; returns the runs started.
pub async fn start_due(pool: &PgPool) -> crate::error::Result<Vec<Uuid>> {
    let mut tx = pool.begin().await?;
    let started = start_due_in(&mut tx).await?;
    tx.commit().await?;
    Ok(started)
}

/// [`start_due`] in the caller's transaction; also counts the passes that failed since the last tick.
pub async fn start_due_in(tx: &mut sqlx::PgConnection) -> crate::error::Result<Vec<Uuid>> {
    for (provider, failed) in polls::take_failures(&mut *tx).await? {
        metrics()
            .poller_runs
            .with_label_values(&[&provider, "failed"])
            .inc_by(u64::try_from(failed).unwrap_or(0));
    }
    let due = polls::due(&mut *tx).await?;
    let mut started = Vec::with_capacity(due.len());
    for poll in due {
        let Ok(provider) = poll.provider.parse::<Provider>() else {
            continue;
        };
        let since = poll
            .watermark
            .map(|w| w - chrono::Duration::from_std(OVERLAP).expect("a small duration"));
        let run_id = Uuid::new_v4();
        backfill::create(
            &mut *tx,
            run_id,
            &poll.tenant_id,
            &poll.provider,
            &poll.prefix,
            None,
            Origin::Poll(since),
        )
        .await?;
        engine::enqueue(
            &mut *tx,
            &BackfillPage {
                run_id,
                tenant_id: poll.tenant_id.clone(),
                provider,
                prefix: poll.prefix.clone(),
                page: 0,
                page_token: None,
            },
        )
        .await?;
        polls::begin_pass(
            &mut *tx,
            &poll.tenant_id,
            &poll.provider,
            run_id,
            poll.interval_seconds,
        )
        .await?;
        metrics()
            .poller_runs
            .with_label_values(&[provider.as_str(), "started"])
            .inc();
        tracing::debug!(%run_id, tenant = poll.tenant_id, %provider, ?since, "poll pass started");
        started.push(run_id);
    }
    Ok(started)
}

/// Runs one check.
pub async fn run(_: PollConnectors, cx: JobContext<PgPool>) -> Result<(), JobError> {
    let mut tx = cx.begin().await?;
    start_due_in(&mut tx).await?;
    tx.commit().await?;
    Ok(())
}
