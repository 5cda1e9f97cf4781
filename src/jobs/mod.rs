//! Job kinds, one file each: arguments, policy and handler. The [`engine`] runs them.
//!
//! Only `jobs/`, `workflows/` and `app` touch apalis. A kind's handler calls into `store`, `registry`,
//! `connectors`, `extract` and `embedding`; it never queues work any other way than through [`engine::enqueue`].

pub mod backfill_page;
pub mod confirm_sns_subscription;
pub mod embed_node;
pub mod engine;
pub mod ingest_object;
pub mod poll_connectors;
pub mod purge_deleted;
pub mod rotate_keys;

use std::sync::Arc;

use sqlx::PgPool;

use crate::config::JobSettings;
use crate::connectors::Sources;
use crate::registry::Registry;
use crate::store::redis_jobs::RedisJobs;
use engine::upkeep::{self, Chore};
use engine::{Runtime, Scheduler};

/// Queue of the scheduled and operator-started housekeeping kinds (rotation, purge, polling).
pub const MAINTENANCE: &str = "maintenance";

/// The queues this build knows, for `activekg worker --queues`.
pub const QUEUES: &[&str] = &[ingest_object::QUEUE, embed_node::QUEUE, MAINTENANCE];

/// The queues `ACTIVEKG_JOBS_BACKEND=redis` moves to Redis: the per-object churn. Maintenance stays in
/// PostgreSQL, where purge and rotation checkpoints commit with their work.
pub const REDIS_QUEUES: &[&str] = &[ingest_object::QUEUE, embed_node::QUEUE];

/// What job handlers are built from.
#[derive(Debug, Clone)]
pub struct Deps {
    /// The database.
    pub pool: PgPool,
    /// Job engine settings.
    pub settings: JobSettings,
    /// Connector configurations.
    pub registry: Arc<Registry>,
    /// Storage backends, shared by every connector job of the process.
    pub sources: Arc<Sources>,
    /// `CONNECTOR_MAX_FILE_SIZE_MB`, in bytes.
    pub max_file_bytes: u64,
    /// Where documents are extracted (child processes under limits).
    pub extractor: Arc<crate::extract::sandbox::Sandbox>,
    /// Where SNS confirmations are sent from (redirected for emulators).
    pub sns: Arc<crate::webhooks::sns::CertFetcher>,
    /// The embedder.
    pub embeddings: Arc<crate::embedding::Service>,
    /// Pending-embedding caps.
    pub embedding_caps: embed_node::Caps,
}

/// Registers every kind whose queue is in `queues` (all when `None`).
pub fn register(runtime: &mut Runtime, deps: &Deps, queues: Option<&[String]>) {
    let wanted = |queue: &str| queues.is_none_or(|q| q.iter().any(|w| w == queue));
    if wanted(ingest_object::QUEUE) {
        let ingest = ingest_object::Deps {
            pool: deps.pool.clone(),
            registry: deps.registry.clone(),
            sources: deps.sources.clone(),
            max_file_bytes: deps.max_file_bytes,
            extractor: deps.extractor.clone(),
            embedding_caps: deps.embedding_caps.clone(),
        };
        runtime.register(ingest, ingest_object::run);
        let pages = backfill_page::Deps {
            pool: deps.pool.clone(),
            registry: deps.registry.clone(),
            sources: deps.sources.clone(),
        };
        runtime.register(pages, backfill_page::run);
        runtime.register(deps.sns.clone(), confirm_sns_subscription::run);
    }
    if wanted(embed_node::QUEUE) {
        let embed = embed_node::Deps {
            pool: deps.pool.clone(),
            embeddings: deps.embeddings.clone(),
        };
        runtime.register(embed, embed_node::run);
    }
    if wanted(MAINTENANCE) {
        let rotation = rotate_keys::Deps {
            pool: deps.pool.clone(),
            registry: deps.registry.clone(),
        };
        runtime.register(rotation, rotate_keys::run);
        runtime.register(deps.pool.clone(), purge_deleted::run);
        runtime.register(deps.pool.clone(), poll_connectors::run);
    }
}

/// Chores every process runs with the engine's own upkeep, whatever its role.
pub fn chores(runtime: &mut Runtime, redis: Option<RedisJobs>) {
    // Every 20 s, so each minute is sampled soon after it ends by whichever process gets there first.
    runtime.chore(Chore::new(
        "sample_job_history",
        std::time::Duration::from_secs(20),
        move |pool| {
            let redis = redis.clone();
            async move {
                crate::store::jobs::sample_history(&pool).await?;
                if let Some(redis) = redis {
                    let minute = crate::store::jobs::last_whole_minute(&pool).await?;
                    let rows = redis.history(minute).await?;
                    crate::store::jobs::record_history(&pool, &rows).await?;
                }
                // Only deletions are worth a log line.
                crate::store::jobs::prune_history(&pool, engine::stats::HISTORY_KEPT).await
            }
        },
    ));
    runtime.chore(Chore::new(
        "prune_webhook_deliveries",
        upkeep::PRUNE_EVERY,
        |pool| async move {
            // Redeliveries come within hours; a week of delivery ids is ample.
            let mut total = 0;
            loop {
                let n =
                    crate::store::webhooks::prune_deliveries(&pool, WEBHOOK_DEDUPE, 1000).await?;
                total += n;
                if n < 1000 {
                    return Ok(total);
                }
            }
        },
    ));
}

/// The guide's backlog gauge, `connector_worker_queue_depth{provider,tenant}` (pending and scheduled
/// connector jobs), derived from the engine's queue counts when they are sampled.
pub fn connector_backlog(rows: &[crate::store::jobs::QueueCounts]) {
    let gauge = &crate::metrics::metrics().connector_queue_depth;
    gauge.reset();
    let mut by_provider: std::collections::BTreeMap<(&str, &str), i64> = Default::default();
    for row in rows {
        if let (Some(provider), Some(tenant)) = (&row.provider, &row.tenant_id) {
            *by_provider.entry((provider, tenant)).or_default() += row.pending + row.scheduled;
        }
    }
    for ((provider, tenant), depth) in by_provider {
        gauge.with_label_values(&[provider, tenant]).set(depth);
    }
}

/// How long webhook delivery ids are kept for de-duplication.
pub const WEBHOOK_DEDUPE: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

/// Kinds whose moves something in PostgreSQL follows (a node's embedding status, a backfill run; the
/// triggers on `jobs` keep them): when they run from Redis, their moves are mirrored to it
/// (`RedisJobs::mirror_moves`).
pub const MIRRORED_KINDS: &[&str] = &[
    <embed_node::EmbedNode as engine::Job>::KIND,
    <backfill_page::BackfillPage as engine::Job>::KIND,
];

/// Every job kind this build runs.
pub const KINDS: &[&str] = &[
    <ingest_object::IngestObject as engine::Job>::KIND,
    <embed_node::EmbedNode as engine::Job>::KIND,
    <backfill_page::BackfillPage as engine::Job>::KIND,
    <poll_connectors::PollConnectors as engine::Job>::KIND,
    <purge_deleted::PurgeDeleted as engine::Job>::KIND,
    <rotate_keys::RotateKeys as engine::Job>::KIND,
    <confirm_sns_subscription::ConfirmSnsSubscription as engine::Job>::KIND,
];

/// The cron schedules, by name: connector polling, then the purger.
pub const SCHEDULES: &[&str] = &["connectors.poll", "connectors.purge_deleted"];

/// Adds every built-in schedule.
pub fn schedule(scheduler: &mut Scheduler, settings: &crate::config::Settings) {
    scheduler.add(
        SCHEDULES[0],
        poll_connectors::EVERY
            .parse()
            .expect("a fixed, valid cron expression"),
        |tick| poll_connectors::PollConnectors { tick },
    );
    let (batch_size, retention_days) = (settings.purger.batch_size, settings.purger.retention_days);
    scheduler.add(
        SCHEDULES[1],
        settings.purger.schedule.clone(),
        move |tick| purge_deleted::PurgeDeleted {
            tenant_id: None,
            batch_size,
            retention_days,
            tick: Some(tick),
        },
    );
}
