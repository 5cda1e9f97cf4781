//! SQL for webhook delivery deduplication.

use sqlx::{PgConnection, PgExecutor};

use crate::domain::Provider;
use crate::error::Result;

/// Records a delivery in the caller's transaction; false when it was recorded before (a redelivery).
pub async fn record_delivery(
    conn: &mut PgConnection,
    provider: Provider,
    message_id: &str,
    jobs: i32,
) -> Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO webhook_deliveries (provider, message_id, jobs) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(provider.as_str())
    .bind(message_id)
    .bind(jobs)
    .execute(&mut *conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Forgets deliveries older than `keep` (redeliveries come within hours; a week is ample), `limit` at a time.
pub async fn prune_deliveries<'e>(
    db: impl PgExecutor<'e>,
    keep: std::time::Duration,
    limit: i64,
) -> Result<u64> {
    let done = sqlx::query(
        "DELETE FROM webhook_deliveries WHERE ctid IN (
             SELECT ctid FROM webhook_deliveries WHERE received_at < now() - make_interval(secs => $1) LIMIT $2)",
    )
    .bind(keep.as_secs_f64())
    .bind(limit)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}
