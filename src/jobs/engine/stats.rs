//! Queue statistics for operators (the admin API, the dashboard) and the Prometheus gauges, from one query.
//!
//! Gauges are sampled when `/metrics` is scraped, at most every few seconds, so every replica reports the
//! database's truth and an idle replica does not query at all.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Mutex;

use crate::error::Result;
use crate::metrics::metrics;
use crate::store::jobs::{self as store, QueueCounts, WorkerRecord};
use crate::store::redis_jobs::RedisJobs;

/// The counts of every job wherever it waits: PostgreSQL's table and outbox, and Redis when the connector
/// and embedding queues live there. Fails rather than leave out a backend, so nobody reads a half-count as
/// an empty queue.
pub async fn counts(pool: &PgPool, redis: Option<&RedisJobs>) -> Result<Vec<QueueCounts>> {
    let mut rows = store::queue_counts(pool).await?;
    if let Some(redis) = redis {
        rows.extend(redis.queue_counts().await?);
    }
    Ok(rows)
}

/// Counts for a queue, a kind or a tenant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    /// Due and waiting.
    pub pending: i64,
    /// Waiting for a later run time (including retries in backoff).
    pub scheduled: i64,
    /// Being run.
    pub running: i64,
    /// Dead-lettered.
    pub dead: i64,
    /// How long the oldest pending job has been due.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Completed in the last five minutes.
    pub completed_last_5m: i64,
    /// Dead-lettered in the last five minutes.
    pub dead_last_5m: i64,
}

impl Counts {
    fn add(&mut self, row: &QueueCounts) {
        self.pending += row.pending;
        self.scheduled += row.scheduled;
        self.running += row.running;
        self.dead += row.dead;
        self.completed_last_5m += row.completed_5m;
        self.dead_last_5m += row.dead_5m;
        if let Some(oldest) = row.oldest_pending {
            let age = (row.now - oldest).num_milliseconds().max(0) as f64 / 1000.0;
            self.oldest_pending_age_seconds =
                Some(self.oldest_pending_age_seconds.map_or(age, |a| a.max(age)));
        }
    }
}

/// Statistics of one queue, with a breakdown by kind.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueStat {
    /// Queue name.
    pub queue: String,
    /// Totals.
    pub counts: Counts,
    /// By kind.
    pub kinds: BTreeMap<String, Counts>,
}

/// Statistics of one tenant in one queue, for one provider (the guide's `connector:{provider}:{tenant}`
/// queues), or for jobs without one.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantStat {
    /// Queue name.
    pub queue: String,
    /// Tenant.
    pub tenant_id: String,
    /// Provider, for jobs that carry one.
    pub provider: Option<String>,
    /// Totals.
    pub counts: Counts,
}

/// Everything an operator wants at a glance.
#[derive(Debug, Clone)]
pub struct Overview {
    /// Per queue.
    pub queues: Vec<QueueStat>,
    /// Per tenant, for jobs that carry one.
    pub tenants: Vec<TenantStat>,
    /// Worker processes, with whether they are alive.
    pub workers: Vec<(WorkerRecord, bool)>,
}

/// Reads the statistics; a worker silent for longer than `orphan_timeout` is reported as not alive.
pub async fn overview(
    pool: &PgPool,
    redis: Option<&RedisJobs>,
    orphan_timeout: Duration,
) -> Result<Overview> {
    let rows = counts(pool, redis).await?;
    let mut queues: BTreeMap<String, QueueStat> = BTreeMap::new();
    let mut tenants: BTreeMap<(String, String, Option<String>), Counts> = BTreeMap::new();
    for row in &rows {
        let queue = queues
            .entry(row.queue.clone())
            .or_insert_with(|| QueueStat {
                queue: row.queue.clone(),
                counts: Counts::default(),
                kinds: BTreeMap::new(),
            });
        queue.counts.add(row);
        queue.kinds.entry(row.kind.clone()).or_default().add(row);
        if let Some(tenant) = &row.tenant_id {
            tenants
                .entry((row.queue.clone(), tenant.clone(), row.provider.clone()))
                .or_default()
                .add(row);
        }
    }
    let workers = store::workers(pool)
        .await?
        .into_iter()
        .map(|w| {
            let alive = w.silent_seconds < orphan_timeout.as_secs_f64();
            (w, alive)
        })
        .collect();
    Ok(Overview {
        queues: queues.into_values().collect(),
        tenants: tenants
            .into_iter()
            .map(|((queue, tenant_id, provider), counts)| TenantStat {
                queue,
                tenant_id,
                provider,
                counts,
            })
            .collect(),
        workers,
    })
}

/// How long the per-minute history is kept.
pub const HISTORY_KEPT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The per-minute history of the last `minutes` (at most a day), oldest first, every queue.
pub async fn history(pool: &PgPool, minutes: i64) -> Result<Vec<store::HistoryRow>> {
    store::history(pool, minutes.clamp(1, 24 * 60)).await
}

/// Gauges another room derives from the same counts (e.g. the connector backlog), refreshed with ours.
pub type ExtraGauges = fn(&[QueueCounts]);

/// Samples the queue gauges into the metrics registry, at most once per `every`.
#[derive(Debug)]
pub struct GaugeSampler {
    every: Duration,
    last: Mutex<Option<Instant>>,
    extra: Option<ExtraGauges>,
}

impl GaugeSampler {
    /// A sampler that queries at most once per `every`, and hands the counts to `extra` too.
    pub fn new(every: Duration, extra: Option<ExtraGauges>) -> Self {
        Self {
            every,
            last: Mutex::new(None),
            extra,
        }
    }

    /// Refreshes the gauges unless they are fresh enough.
    pub async fn sample(
        &self,
        pool: &PgPool,
        redis: Option<&RedisJobs>,
        orphan_timeout: Duration,
    ) -> Result<()> {
        let mut last = self.last.lock().await;
        if last.is_some_and(|at| at.elapsed() < self.every) {
            return Ok(());
        }
        let rows = counts(pool, redis).await?;
        let workers = store::workers(pool).await?;
        let m = metrics();
        // Reset first so that label sets which emptied out report nothing rather than their last value.
        m.queue_depth.reset();
        m.queue_oldest_pending_age.reset();
        m.queue_tenant_depth.reset();
        m.workers_alive.reset();
        let mut by_kind: BTreeMap<(&str, &str), Counts> = BTreeMap::new();
        let mut by_tenant: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        for row in &rows {
            by_kind.entry((&row.queue, &row.kind)).or_default().add(row);
            if let Some(tenant) = &row.tenant_id {
                *by_tenant.entry((&row.queue, tenant)).or_default() += row.pending + row.scheduled;
            }
        }
        for ((queue, kind), counts) in &by_kind {
            for (state, value) in [
                ("pending", counts.pending),
                ("scheduled", counts.scheduled),
                ("running", counts.running),
                ("dead", counts.dead),
            ] {
                m.queue_depth
                    .with_label_values(&[queue, kind, state])
                    .set(value);
            }
            m.queue_oldest_pending_age
                .with_label_values(&[queue, kind])
                .set(counts.oldest_pending_age_seconds.unwrap_or(0.0) as i64);
        }
        for ((queue, tenant), depth) in by_tenant {
            m.queue_tenant_depth
                .with_label_values(&[queue, tenant])
                .set(depth);
        }
        if let Some(extra) = self.extra {
            extra(&rows);
        }
        let alive = || {
            workers
                .iter()
                .filter(|w| w.silent_seconds < orphan_timeout.as_secs_f64())
        };
        for worker in alive().filter(|w| !w.kinds.is_empty()) {
            m.workers_alive.with_label_values(&[&worker.host]).inc();
        }
        // Nobody firing schedules means no purge, no polling: the NoSchedulerRunning alert reads this.
        m.schedulers_alive.with_label_values(&[] as &[&str]).set(
            alive()
                .filter(|w| w.roles.iter().any(|r| r == "scheduler"))
                .count() as i64,
        );
        *last = Some(Instant::now());
        Ok(())
    }
}
