//! Claiming due jobs for a worker: most urgent first, or shared fairly between tenants.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgExecutor, Row};

use crate::error::Result;

/// A job claimed by a worker.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    /// The job's id.
    pub id: i64,
    /// Serialized arguments.
    pub args: Value,
    /// This attempt's number (1-based).
    pub attempt: i32,
    /// Attempt budget.
    pub max_attempts: i32,
    /// When the job was inserted.
    pub enqueued_at: DateTime<Utc>,
    /// When it became (or was due to become) runnable.
    pub run_at: DateTime<Utc>,
    /// When this attempt was claimed (database clock).
    pub attempted_at: DateTime<Utc>,
    /// What earlier attempts checkpointed, if anything.
    pub progress: Option<Value>,
    /// Attempts given back so far (snoozes, shutdown hand-backs).
    pub handbacks: i32,
}

/// What claiming the jobs in `next` does, shared by both fetch paths: the attempt counts from here, the worker
/// holds the row, and kinds unique only while pending give their key back.
///
/// The rows are found again by the tuple addresses `next` locked (`picked.tids`), a TID scan that reads only
/// the heap pages. Joining `next` instead, the planner costs a CTE of a thousand rows as a hash join over a
/// sequential scan of `jobs`, which finished rows make larger all day (EXPLAIN: 20 of a claim's 30 ms at 50,000
/// rows); by primary key from an array it took 13 ms for 667 rows, a tenth of it descending the index again.
/// An address is safe to use: `next` holds the row's lock, so the version it names is the current one until
/// this statement commits; should it not be (a row updated between the scan and its lock), the TID no longer
/// matches and the row is simply not claimed this time. `$token` is the parameter naming the claim (see
/// [`claimed_under`]).
macro_rules! claim_next {
    ($token:literal) => {
        concat!(
            r#"
        UPDATE jobs j
        SET state = 'running', attempt = j.attempt + 1, attempted_at = now(), locked_by = $2, claim_token = "#,
            $token,
            r#",
            unique_key = CASE WHEN j.unique_while_pending THEN NULL ELSE j.unique_key END
        WHERE j.ctid = ANY((SELECT tids FROM picked)::tid[]) AND j.state = 'available'
        RETURNING "#,
            claimed_columns!(),
        )
    };
}

/// What a claim answers per row, in [`Claimed`]'s order (`priority` first: the plain claim sorts by it).
macro_rules! claimed_columns {
    () => {
        "j.priority, j.id, j.args, j.attempt, j.max_attempts, j.enqueued_at, j.run_at, j.attempted_at, \
         j.progress, j.handbacks"
    };
}

/// The claimed rows in the order `next` picked them (fair claims: tenant by tenant).
macro_rules! in_order {
    () => {
        r#"
        SELECT claimed.* FROM claimed
        JOIN unnest((SELECT ids FROM picked)) WITH ORDINALITY AS picked_at(id, pos) ON picked_at.id = claimed.id
        ORDER BY picked_at.pos
        "#
    };
}

/// Claims up to `limit` due jobs of `kind` for `worker`, most urgent first, skipping rows other workers hold.
/// The attempt counter moves here, before any work, so a crash mid-attempt still uses up an attempt.
/// `token` names the claim on its rows, so that [`claimed_under`] can find them should its answer be lost.
pub async fn claim<'e>(
    db: impl PgExecutor<'e>,
    kind: &str,
    worker: &str,
    limit: i64,
    token: i64,
) -> Result<Vec<Claimed>> {
    Ok(sqlx::query_as::<_, Claimed>(concat!(
        r#"
        WITH next AS (
            SELECT ctid FROM jobs
            WHERE kind = $1 AND state = 'available' AND run_at <= now()
            ORDER BY priority DESC, run_at, id
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        ),
        picked AS (SELECT ARRAY(SELECT ctid FROM next) AS tids),
        claimed AS ("#,
        claim_next!("$4"),
        // Sorting again is cheaper than joining the rows back to the order `next` locked them in.
        ") SELECT * FROM claimed ORDER BY priority DESC, run_at, id",
    ))
    .bind(kind)
    .bind(worker)
    .bind(limit)
    .bind(token)
    .fetch_all(db)
    .await?)
}

/// The rows a claim named `token` took for `worker` that are still running under it: what a claim whose
/// answer was lost took (PostgreSQL committed it, then the connection broke before the rows arrived), in
/// claim order. Nobody else would ever give them back while the worker lives, so the worker asks again
/// under the same name and runs them as the attempt that claim started.
///
/// Rare, so it reads the worker's running rows (`jobs_running_by_worker`) rather than keep an index of its own.
/// The worker asks again after its fetch backoff (half a second at first), by when the lost claim has long
/// committed or rolled back; one still running on the server past that (cut mid-statement and slower than
/// the backoff) would commit after the answer and strand its rows until the process exits, as before.
pub async fn claimed_under<'e>(
    db: impl PgExecutor<'e>,
    kind: &str,
    worker: &str,
    token: i64,
) -> Result<Vec<Claimed>> {
    Ok(sqlx::query_as::<_, Claimed>(concat!(
        "SELECT ",
        claimed_columns!(),
        " FROM jobs j WHERE j.state = 'running' AND j.locked_by = $2 AND j.kind = $1 AND j.claim_token = $3 \
         ORDER BY j.priority DESC, j.run_at, j.id",
    ))
    .bind(kind)
    .bind(worker)
    .bind(token)
    .fetch_all(db)
    .await?)
}

/// Like [`claim`], but shares the batch between tenants, each tenant's providers apart (the guide's
/// `connector:{provider}:{tenant}` queues): it walks (tenant, provider) pairs with available jobs in key order
/// starting after `after_tenant` (at most `4 * limit` of them), and takes up to an equal share of due jobs
/// from each, oldest first. One tenant's backlog therefore cannot hold back another tenant's first job.
/// Returns the claimed jobs and where the next claim should start (empty once the walk reached the last
/// tenant).
///
/// Each step of the walk is one index probe (the next tenant with any available row), and each tenant's due
/// rows are probed in run order (`jobs_fair_fetch`), so a tenant whose jobs all wait out a backoff costs two
/// probes, not a scan of its rows. Within a tenant, fair kinds run oldest first: priority does not apply.
pub async fn claim_fair<'e>(
    db: impl PgExecutor<'e>,
    kind: &str,
    worker: &str,
    limit: i64,
    after_tenant: &str,
    token: i64,
) -> Result<(Vec<Claimed>, String)> {
    let rows = sqlx::query(concat!(
        r#"
        WITH RECURSIVE tenants(t, depth) AS (
            (SELECT (coalesce(tenant_id, '') || '/' || coalesce(provider, '')), 1 FROM jobs
             WHERE kind = $1 AND state = 'available' AND (coalesce(tenant_id, '') || '/' || coalesce(provider, '')) > $4
             ORDER BY (coalesce(tenant_id, '') || '/' || coalesce(provider, '')) LIMIT 1)
            UNION ALL
            SELECT (SELECT (coalesce(j.tenant_id, '') || '/' || coalesce(j.provider, '')) FROM jobs j
                    WHERE j.kind = $1 AND j.state = 'available' AND (coalesce(j.tenant_id, '') || '/' || coalesce(j.provider, '')) > tenants.t
                    ORDER BY (coalesce(j.tenant_id, '') || '/' || coalesce(j.provider, '')) LIMIT 1),
                   tenants.depth + 1
            FROM tenants WHERE tenants.t IS NOT NULL AND tenants.depth < 4 * $3
        ),
        walked AS (SELECT t FROM tenants WHERE t IS NOT NULL),
        due AS (
            SELECT walked.t FROM walked
            WHERE EXISTS (SELECT 1 FROM jobs j
                          WHERE j.kind = $1 AND j.state = 'available' AND j.run_at <= now()
                            AND (coalesce(j.tenant_id, '') || '/' || coalesce(j.provider, '')) = walked.t)
        ),
        share AS (SELECT greatest(1, ceil($3::float8 / greatest((SELECT count(*) FROM due), 1)))::int AS n,
                         CASE WHEN (SELECT count(*) FROM walked) >= 4 * $3 THEN (SELECT max(t) FROM walked)
                              ELSE '' END AS resume),
        next AS (
            SELECT picked.id, picked.ctid FROM due CROSS JOIN share
            CROSS JOIN LATERAL (
                SELECT j.id, j.ctid FROM jobs j
                WHERE j.kind = $1 AND j.state = 'available' AND j.run_at <= now()
                  AND (coalesce(j.tenant_id, '') || '/' || coalesce(j.provider, '')) = due.t
                ORDER BY j.run_at, j.id
                LIMIT share.n
                FOR UPDATE OF j SKIP LOCKED
            ) picked
            LIMIT $3
        ),
        picked AS (SELECT ARRAY(SELECT id FROM next) AS ids, ARRAY(SELECT ctid FROM next) AS tids),
        claimed AS ("#,
        claim_next!("$5"),
        "), ordered AS (",
        in_order!(),
        r#")
        SELECT ordered.*, (SELECT resume FROM share) AS resume FROM ordered
        UNION ALL
        SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, (SELECT resume FROM share)
        WHERE NOT EXISTS (SELECT 1 FROM claimed)
        "#
    ))
    .bind(kind)
    .bind(worker)
    .bind(limit)
    .bind(after_tenant)
    .bind(token)
    .fetch_all(db)
    .await?;
    let mut resume = String::new();
    let mut claimed = Vec::with_capacity(rows.len());
    for row in rows {
        resume = row
            .try_get::<Option<String>, _>("resume")?
            .unwrap_or_default();
        if let Some(id) = row.try_get::<Option<i64>, _>("id")? {
            claimed.push(Claimed {
                id,
                args: row.try_get("args")?,
                attempt: row.try_get("attempt")?,
                max_attempts: row.try_get("max_attempts")?,
                enqueued_at: row.try_get("enqueued_at")?,
                run_at: row.try_get("run_at")?,
                attempted_at: row.try_get("attempted_at")?,
                progress: row.try_get("progress")?,
                handbacks: row.try_get("handbacks")?,
            });
        }
    }
    Ok((claimed, resume))
}
