//! `confirm_sns_subscription`: confirms an SNS subscription by GETting the SubscribeURL of a verified
//! SubscriptionConfirmation (its host was checked when the confirmation arrived, and is checked again here).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::engine::{Backoff, Job, JobContext, JobError, Policy};
use crate::webhooks::sns::{CertError, CertFetcher};

/// A confirmation to send.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfirmSnsSubscription {
    /// The topic subscribed to.
    pub topic_arn: String,
    /// The URL that confirms.
    pub subscribe_url: String,
    /// The confirmation message (one job per message).
    pub message_id: String,
}

impl Job for ConfirmSnsSubscription {
    const KIND: &'static str = "confirm_sns_subscription";

    fn policy() -> Policy {
        Policy {
            max_attempts: 6,
            backoff: Backoff::exponential(Duration::from_secs(5), 2.0, Duration::from_secs(300)),
            timeout: Duration::from_secs(30),
            concurrency: 1,
            ..Policy::new(super::ingest_object::QUEUE)
        }
    }

    fn unique_key(&self) -> Option<String> {
        Some(self.message_id.clone())
    }
}

/// Sends the confirmation.
pub async fn run(
    job: ConfirmSnsSubscription,
    cx: JobContext<Arc<CertFetcher>>,
) -> Result<(), JobError> {
    match cx.state.confirm(&job.subscribe_url).await {
        Ok(()) => {
            tracing::info!(topic = %job.topic_arn, "SNS subscription confirmed");
            Ok(())
        }
        Err(CertError::Refused(reason)) => Err(JobError::permanent("refused", reason)),
        Err(CertError::Unavailable(reason)) => Err(JobError::transient(reason)),
    }
}
