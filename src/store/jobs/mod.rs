//! SQL for the job tables: enqueue, claim, finish, heartbeat, rescue, prune, schedules, and the admin queries.
//!
//! Functions take a connection or transaction so that callers own atomicity: a job is inserted in the same
//! transaction as the change it follows from. Nothing here knows about job kinds' policies; callers pass the
//! numbers (attempt budget, backoff result) they computed.
//!
//! One file per concern: [`enqueue`], [`claim`], [`finish`] (results, checkpoints, hand-backs), [`workers`]
//! (registration, heartbeats), [`upkeep`] (orphan rescue, pruning), [`schedules`], the operators' [`admin`]
//! queries, and the [`outbox`] of jobs bound for the Redis backend.

mod admin;
mod claim;
mod enqueue;
mod finish;
mod outbox;
mod schedules;
mod upkeep;
mod workers;

pub use admin::*;
pub use claim::*;
pub use enqueue::*;
pub use finish::*;
pub use outbox::*;
pub use schedules::*;
pub use upkeep::*;
pub use workers::*;

use sqlx::PgConnection;

use crate::error::Result;

/// The channel workers LISTEN on; the payload is the kind that has new due work.
pub const NOTIFY_CHANNEL: &str = "activekg_jobs";

/// The channel that tells a worker to stop a cancelled attempt; the payload is `<job id>:<attempt>`.
pub const CANCEL_CHANNEL: &str = "activekg_job_cancel";

/// Wakes workers of the given kinds (delivered when the surrounding transaction commits).
pub async fn notify_kinds<'a>(
    conn: &mut PgConnection,
    kinds: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    let mut kinds: Vec<&str> = kinds.into_iter().collect();
    kinds.sort_unstable();
    kinds.dedup();
    if !kinds.is_empty() {
        sqlx::query("SELECT pg_notify($1, k) FROM unnest($2::text[]) AS k")
            .bind(NOTIFY_CHANNEL)
            .bind(&kinds)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
