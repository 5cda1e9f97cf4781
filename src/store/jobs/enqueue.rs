//! Inserting jobs: in the caller's transaction, skipping duplicates by idempotency key row by row.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, Row};

use crate::domain::JobId;
use crate::error::Result;

use super::NOTIFY_CHANNEL;

/// A job to insert.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// The job kind's stable name.
    pub kind: &'static str,
    /// The queue it is reported under.
    pub queue: &'static str,
    /// Serialized arguments.
    pub args: Value,
    /// Higher runs first.
    pub priority: i16,
    /// Attempt budget.
    pub max_attempts: i32,
    /// Run no earlier than this; `None` means now.
    pub run_at: Option<DateTime<Utc>>,
    /// Idempotency key; a second job with the same kind and key is skipped.
    pub unique_key: Option<String>,
    /// Whether the key is released when the job finishes (true) or kept while the row exists (false).
    pub unique_while_active: bool,
    /// Whether the key is released as soon as a worker claims the job (implies `unique_while_active`).
    pub unique_while_pending: bool,
    /// The tenant the job works for, when it has one.
    pub tenant_id: Option<String>,
    /// The storage provider the job works on, when it has one.
    pub provider: Option<String>,
}

/// What happened to one job of an enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The new job, or the existing one its idempotency key matched (`None` only when that job was inserted
    /// by a transaction this one cannot see yet).
    pub id: Option<JobId>,
    /// False when the job was skipped as a duplicate.
    pub inserted: bool,
}

/// Inserts jobs in the caller's transaction. Duplicates by idempotency key (against existing rows or earlier
/// rows of the same batch) are skipped, never an error for the rest of the batch. Workers of kinds with due
/// jobs are notified when the transaction commits.
pub async fn insert(conn: &mut PgConnection, jobs: &[NewJob]) -> Result<Vec<Enqueued>> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let mut kinds = Vec::with_capacity(jobs.len());
    let mut queues = Vec::with_capacity(jobs.len());
    let mut args = Vec::with_capacity(jobs.len());
    let mut priorities = Vec::with_capacity(jobs.len());
    let mut max_attempts = Vec::with_capacity(jobs.len());
    let mut run_ats = Vec::with_capacity(jobs.len());
    let mut keys = Vec::with_capacity(jobs.len());
    let mut while_active = Vec::with_capacity(jobs.len());
    let mut while_pending = Vec::with_capacity(jobs.len());
    let mut tenants = Vec::with_capacity(jobs.len());
    let mut providers = Vec::with_capacity(jobs.len());
    for job in jobs {
        kinds.push(job.kind);
        queues.push(job.queue);
        args.push(&job.args);
        priorities.push(job.priority);
        max_attempts.push(job.max_attempts);
        run_ats.push(job.run_at);
        keys.push(job.unique_key.as_deref());
        while_active.push(job.unique_while_active || job.unique_while_pending);
        while_pending.push(job.unique_while_pending);
        tenants.push(job.tenant_id.as_deref());
        providers.push(job.provider.as_deref());
    }
    // Ids are drawn before the insert so each input row knows its id even when ON CONFLICT skips some.
    // The notify CTE is joined into the result because PostgreSQL skips unreferenced SELECT CTEs.
    let rows = sqlx::query(
        r#"
        WITH input AS (
            SELECT t.*, nextval(pg_get_serial_sequence('jobs', 'id')) AS id
            FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::int2[], $5::int4[], $6::timestamptz[],
                        $7::text[], $8::bool[], $9::text[], $10::text[], $12::bool[])
                 WITH ORDINALITY AS t(kind, queue, args, priority, max_attempts, run_at, unique_key,
                                      unique_while_active, tenant_id, provider, unique_while_pending, ord)
        ),
        inserted AS (
            INSERT INTO jobs (id, kind, queue, args, priority, max_attempts, run_at, unique_key,
                              idempotency_key, unique_while_active, tenant_id, provider, unique_while_pending)
            SELECT id, kind, queue, args, priority, max_attempts, COALESCE(run_at, now()), unique_key,
                   unique_key, unique_while_active, tenant_id, provider, unique_while_pending
            FROM input
            ORDER BY ord
            ON CONFLICT (kind, unique_key) WHERE unique_key IS NOT NULL DO NOTHING
            RETURNING id, kind, run_at
        ),
        notified AS (
            SELECT count(pg_notify($11, kind)) AS n
            FROM (SELECT DISTINCT kind FROM inserted WHERE run_at <= now()) due
        )
        SELECT input.ord, input.kind, input.unique_key, inserted.id AS inserted_id
        FROM input LEFT JOIN inserted ON inserted.id = input.id CROSS JOIN notified
        ORDER BY input.ord
        "#,
    )
    .bind(&kinds)
    .bind(&queues)
    .bind(&args)
    .bind(&priorities)
    .bind(&max_attempts)
    .bind(&run_ats)
    .bind(&keys)
    .bind(&while_active)
    .bind(&tenants)
    .bind(&providers)
    .bind(NOTIFY_CHANNEL)
    .bind(&while_pending)
    .fetch_all(&mut *conn)
    .await?;

    let mut results: Vec<Enqueued> = Vec::with_capacity(rows.len());
    let mut missing: Vec<(String, String)> = Vec::new();
    for row in &rows {
        let inserted: Option<i64> = row.try_get("inserted_id")?;
        results.push(Enqueued {
            id: inserted.map(JobId),
            inserted: inserted.is_some(),
        });
        if inserted.is_none()
            && let Some(key) = row.try_get::<Option<String>, _>("unique_key")?
        {
            missing.push((row.try_get("kind")?, key));
        }
    }
    if !missing.is_empty() {
        // A new statement takes a new snapshot, so it sees rows committed meanwhile and this batch's own.
        let (kinds, keys): (Vec<String>, Vec<String>) = missing.into_iter().unzip();
        let existing: HashMap<(String, String), i64> = sqlx::query_as::<_, (String, String, i64)>(
            "SELECT j.kind, j.unique_key, j.id FROM jobs j
             JOIN unnest($1::text[], $2::text[]) AS k(kind, unique_key)
               ON j.kind = k.kind AND j.unique_key = k.unique_key",
        )
        .bind(&kinds)
        .bind(&keys)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|(kind, key, id)| ((kind, key), id))
        .collect();
        for (row, result) in rows.iter().zip(results.iter_mut()) {
            if !result.inserted
                && let Some(key) = row.try_get::<Option<String>, _>("unique_key")?
            {
                result.id = existing
                    .get(&(row.try_get("kind")?, key))
                    .copied()
                    .map(JobId);
            }
        }
    }
    Ok(results)
}
