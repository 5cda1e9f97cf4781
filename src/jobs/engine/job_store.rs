//! Where a kind's jobs live while they wait and run: PostgreSQL's `jobs` table (the default), or Redis for
//! the queues a deployment moves there (`ACTIVEKG_JOBS_BACKEND=redis`). Enqueue always goes through
//! PostgreSQL, in the caller's transaction: jobs bound for Redis are staged in its outbox and relayed.
//!
//! The workers, the completer and the upkeep speak to this one type; each operation means the same on both
//! (see `store::jobs` and `store::redis_jobs`, and the conformance suite that holds them to it).

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use sqlx::PgPool;

use crate::domain::{AttemptError, JobId};
use crate::error::Result;
use crate::store::jobs::{self as store, Claimed, Completion};
use crate::store::redis_jobs::RedisJobs;

/// One of the two stores.
#[derive(Debug, Clone)]
pub enum JobStore {
    /// The `jobs` table.
    Postgres(PgPool),
    /// Redis, for the queues routed there.
    Redis(RedisJobs),
}

impl JobStore {
    /// Claims up to `limit` due jobs of `kind` for `worker`, most urgent first. `token` names the claim. After
    /// a claim failed, ask `again` under its token: a claim may have taken jobs and lost only its answer (the
    /// connection broke once it had run), and asked again it answers those jobs, as it still holds them, and
    /// takes nothing more (when it holds none, it claims as usual).
    pub async fn claim(
        &self,
        kind: &str,
        worker: &str,
        limit: i64,
        token: i64,
        again: bool,
    ) -> Result<Vec<Claimed>> {
        match self {
            JobStore::Postgres(pool) => {
                if let Some(held) = held_again(pool, kind, worker, token, again).await? {
                    return Ok(held);
                }
                store::claim(pool, kind, worker, limit, token).await
            }
            // Redis keeps each claim's answer under its token, so it needs no hint.
            JobStore::Redis(redis) => redis.claim(kind, worker, limit, &token.to_string()).await,
        }
    }

    /// Claims fairly between (tenant, provider) groups, starting after `after`; `token` and `again` as for
    /// [`Self::claim`] (an answer given again leaves the walk where it was).
    pub async fn claim_fair(
        &self,
        kind: &str,
        worker: &str,
        limit: i64,
        after: &str,
        token: i64,
        again: bool,
    ) -> Result<(Vec<Claimed>, String)> {
        match self {
            JobStore::Postgres(pool) => {
                if let Some(held) = held_again(pool, kind, worker, token, again).await? {
                    return Ok((held, after.to_owned()));
                }
                store::claim_fair(pool, kind, worker, limit, after, token).await
            }
            JobStore::Redis(redis) => {
                redis
                    .claim_fair(kind, worker, limit, after, &token.to_string())
                    .await
            }
        }
    }

    /// Applies attempt results of `worker`; returns the ids applied.
    pub async fn finish(&self, worker: &str, completions: &[Completion]) -> Result<Vec<JobId>> {
        match self {
            JobStore::Postgres(pool) => {
                store::finish(&mut *pool.acquire().await?, worker, completions).await
            }
            JobStore::Redis(redis) => redis.finish(worker, completions).await,
        }
    }

    /// Hands jobs of `worker` back (all of them when `ids` is `None`).
    pub async fn release(
        &self,
        worker: &str,
        ids: Option<&[i64]>,
        note: Option<&AttemptError>,
    ) -> Result<Vec<(JobId, String)>> {
        match self {
            JobStore::Postgres(pool) => store::release(pool, worker, ids, note).await,
            JobStore::Redis(redis) => redis.release(worker, ids, note).await,
        }
    }
}

/// What a PostgreSQL claim asked `again` under `token` still holds (see [`JobStore::claim`]); `None` when it
/// is not asked again or holds nothing, and a claim should take jobs as usual.
async fn held_again(
    pool: &PgPool,
    kind: &str,
    worker: &str,
    token: i64,
    again: bool,
) -> Result<Option<Vec<Claimed>>> {
    if !again {
        return Ok(None);
    }
    let held = store::claimed_under(pool, kind, worker, token).await?;
    Ok((!held.is_empty()).then_some(held))
}

/// The queues this process sends to Redis. Set once at start-up (by the composition root, from
/// `ACTIVEKG_JOBS_BACKEND`) and read by every enqueue, which only has the caller's connection at hand.
static REDIS_QUEUES: RwLock<Option<Arc<HashSet<&'static str>>>> = RwLock::new(None);

/// Routes `queues` to Redis from now on in this process (an empty list routes everything to PostgreSQL).
pub fn route_to_redis(queues: &[&'static str]) {
    let routed = (!queues.is_empty()).then(|| Arc::new(queues.iter().copied().collect()));
    *REDIS_QUEUES.write().unwrap_or_else(|e| e.into_inner()) = routed;
}

/// Whether jobs of `queue` live in Redis in this process.
pub fn on_redis(queue: &str) -> bool {
    REDIS_QUEUES
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .is_some_and(|queues| queues.contains(queue))
}
