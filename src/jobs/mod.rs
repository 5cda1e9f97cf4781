//! Job kinds, one file each: arguments, policy and handler. The [`engine`] runs them.
//!
//! Only `jobs/`, `workflows/` and `app` touch apalis. A kind's handler calls into `store` and the domain
//! rooms; it never queues work any other way than through [`engine::enqueue`].

pub mod engine;
pub mod maintenance;

use sqlx::PgPool;

use crate::config::JobSettings;
use engine::{Runtime, Scheduler};

/// The queues this build knows, for `activekg worker --queues`.
pub const QUEUES: &[&str] = &[maintenance::QUEUE];

/// Registers every kind whose queue is in `queues` (all when `None`).
pub fn register(
    runtime: &mut Runtime,
    pool: &PgPool,
    settings: &JobSettings,
    queues: Option<&[String]>,
) {
    let wanted = |queue: &str| queues.is_none_or(|q| q.iter().any(|w| w == queue));
    if wanted(maintenance::QUEUE) {
        maintenance::register(runtime, pool, settings);
    }
}

/// Adds every built-in schedule.
pub fn schedule(scheduler: &mut Scheduler, settings: &JobSettings) {
    maintenance::schedule(scheduler, settings);
}
