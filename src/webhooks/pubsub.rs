//! Google Cloud Pub/Sub push deliveries of GCS object notifications: the envelope, the event types, and the
//! shared-token check. (OIDC tokens are checked in [`super::oidc`].)

use std::collections::HashMap;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::ObjectChange;
use crate::domain::ChangeOp;

/// Pub/Sub always names the subscription and the message id; a delivery made by hand (the guide's test
/// webhook) may leave them out, and is then identified by what it says.
#[derive(Debug, Deserialize)]
struct Envelope {
    message: PushMessage,
    #[serde(default)]
    subscription: Option<String>,
}

/// Pub/Sub sends both spellings of some fields (`messageId` and `message_id`); serde aliases would call that
/// a duplicate, so each spelling has its own field.
#[derive(Debug, Deserialize)]
struct PushMessage {
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    attributes: HashMap<String, String>,
    #[serde(rename = "messageId", default)]
    message_id: Option<String>,
    #[serde(rename = "message_id", default)]
    message_id_snake: Option<String>,
    #[serde(rename = "publishTime", default)]
    publish_time: Option<DateTime<Utc>>,
}

/// A push delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    /// The subscription that pushed it (`projects/<p>/subscriptions/<s>`); absent in a delivery made by
    /// hand, which then passes no topic allowlist.
    pub subscription: Option<String>,
    /// Unique per message; redeliveries repeat it.
    pub message_id: String,
    /// The change it announces, or `None` for events that do not change content.
    pub change: Option<ObjectChange>,
    /// The event type as sent.
    pub event_type: String,
    /// When Pub/Sub accepted the message.
    pub publish_time: Option<DateTime<Utc>>,
}

impl Push {
    /// What identifies this message among deliveries: see [`delivery_id`].
    pub fn delivery_id(&self) -> String {
        delivery_id(
            self.subscription.as_deref().unwrap_or("(no subscription)"),
            &self.message_id,
            self.publish_time,
        )
    }
}

/// What identifies a Pub/Sub message among deliveries, for redelivery de-duplication. A message id is
/// unique only within its topic, and an emulator (or a re-created topic) starts ids again, so the
/// subscription and the publish time, which redeliveries repeat, are part of it.
pub fn delivery_id(
    subscription: &str,
    message_id: &str,
    publish_time: Option<DateTime<Utc>>,
) -> String {
    match publish_time {
        Some(t) => format!("{subscription}/{message_id}@{}", t.to_rfc3339()),
        None => format!("{subscription}/{message_id}"),
    }
}

/// Parses a push body into the change it announces.
pub fn parse(body: &[u8]) -> Result<Push, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not a Pub/Sub push envelope: {e}"))?;
    crate::domain::refuse_nul(&value)?;
    let envelope: Envelope =
        serde_json::from_value(value).map_err(|e| format!("not a Pub/Sub push envelope: {e}"))?;
    let message = envelope.message;
    let message_id = match message
        .message_id
        .clone()
        .or_else(|| message.message_id_snake.clone())
    {
        Some(id) if id.is_empty() || id.len() > 256 => {
            return Err("messageId is empty or longer than 256 characters".to_owned());
        }
        Some(id) => id,
        None => content_id(&message),
    };
    if let Some(data) = &message.data {
        // The payload (object metadata JSON) is optional; when present it must at least be base64.
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|_| "message.data is not base64".to_owned())?;
    }
    let (event_type, change) = notification(&message.attributes, message.publish_time)?;
    Ok(Push {
        subscription: envelope.subscription,
        message_id,
        change,
        event_type,
        publish_time: message.publish_time,
    })
}

/// An id for a message sent without one: the same message sent twice is one delivery.
fn content_id(message: &PushMessage) -> String {
    use sha2::{Digest, Sha256};
    let mut attributes: Vec<_> = message.attributes.iter().collect();
    attributes.sort();
    let mut hash = Sha256::new();
    for (name, value) in attributes {
        hash.update(name.as_bytes());
        hash.update([0]);
        hash.update(value.as_bytes());
        hash.update([0]);
    }
    hash.update(message.data.as_deref().unwrap_or_default().as_bytes());
    let digest = hash.finalize();
    format!(
        "content-{}",
        digest[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// The change a GCS notification announces, from its Pub/Sub attributes (the same for push and pull):
/// the event type as sent, and the change, or `None` for events that do not change content.
pub fn notification(
    attributes: &HashMap<String, String>,
    publish_time: Option<DateTime<Utc>>,
) -> Result<(String, Option<ObjectChange>), String> {
    // Pulled messages do not pass through `parse`.
    if let Some(name) = attributes
        .iter()
        .find_map(|(k, v)| (k.contains('\0') || v.contains('\0')).then_some(k))
    {
        return Err(format!(
            "message.attributes.{} contains a NUL character, which this service cannot store",
            name.replace('\0', "\\0")
        ));
    }
    let attribute = |name: &str| {
        attributes
            .get(name)
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or_else(|| format!("message.attributes.{name} is missing: not a GCS notification"))
    };
    let event_type = attribute("eventType")?;
    let op = match event_type.as_str() {
        "OBJECT_FINALIZE" | "OBJECT_METADATA_UPDATE" => Some(ChangeOp::Upsert),
        "OBJECT_DELETE" | "OBJECT_ARCHIVE" => Some(ChangeOp::Delete),
        _ => None,
    };
    let change = match op {
        None => None,
        Some(op) => {
            let generation = attributes.get("objectGeneration").cloned();
            if let Some(g) = &generation
                && g.parse::<i64>().is_err()
            {
                return Err(format!("objectGeneration {g:?} is not a number"));
            }
            Some(ObjectChange {
                bucket: attribute("bucketId")?,
                key: attribute("objectId").and_then(|key| {
                    crate::domain::storable_key(&key)
                        .map_err(|e| format!("message.attributes.objectId: {e}"))?;
                    Ok(key)
                })?,
                op,
                // A delete of generation G and the upload of G are different changes.
                version: generation.map(|g| {
                    if op == ChangeOp::Delete {
                        format!("{g}-deleted")
                    } else {
                        g
                    }
                }),
                event_time: attributes
                    .get("eventTime")
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&Utc))
                    .or(publish_time),
            })
        }
    };
    Ok((event_type, change))
}

/// Why a push is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushRefusal {
    /// No credential was presented (401); `result` is the metric's label.
    Missing {
        /// `token_missing`.
        result: &'static str,
        /// What is missing.
        message: String,
    },
    /// A credential was presented and is wrong (403).
    Invalid {
        /// `token_invalid` or `signature_invalid`.
        result: &'static str,
        /// Why.
        message: String,
    },
    /// Google's keys could not be fetched (503; Pub/Sub retries).
    Unavailable(String),
    /// No way to authenticate pushes is configured, and unauthenticated pushes are not allowed (401).
    NotConfigured,
}

/// How pushes prove they come from our subscription: a Google-signed OIDC token from the expected service
/// account, the shared token, or both (each configured one must pass). Without either, pushes are refused
/// unless the development-only `PUBSUB_ALLOW_UNAUTHENTICATED` is set.
#[derive(Debug)]
pub struct PushVerifier {
    /// `PUBSUB_VERIFY_OIDC`.
    pub oidc: Option<super::oidc::OidcVerifier>,
    /// `PUBSUB_VERIFY_SECRET`.
    pub secret: Option<crate::config::Secret>,
    /// `PUBSUB_ALLOW_UNAUTHENTICATED`.
    pub allow_unauthenticated: bool,
}

impl PushVerifier {
    /// Checks a push's credentials (`Authorization` header, and the token from `X-PubSub-Token` or
    /// `?token=`); on success, the result to count.
    pub async fn verify(
        &self,
        authorization: Option<&str>,
        token: Option<&str>,
    ) -> Result<&'static str, PushRefusal> {
        if self.oidc.is_none() && self.secret.is_none() {
            return if self.allow_unauthenticated {
                Ok("skipped")
            } else {
                Err(PushRefusal::NotConfigured)
            };
        }
        if let Some(oidc) = &self.oidc {
            use super::oidc::OidcError;
            oidc.verify(authorization).await.map_err(|e| match e {
                OidcError::Missing => PushRefusal::Missing {
                    result: "token_missing",
                    message: "the push carries no OIDC bearer token: enable authentication on the push subscription"
                        .to_owned(),
                },
                OidcError::Invalid(reason) => PushRefusal::Invalid {
                    result: "signature_invalid",
                    message: reason,
                },
                OidcError::Unavailable(reason) => PushRefusal::Unavailable(reason),
            })?;
        }
        if let Some(secret) = &self.secret {
            match token {
                None => {
                    return Err(PushRefusal::Missing {
                        result: "token_missing",
                        message: "no X-PubSub-Token header or token query parameter".to_owned(),
                    });
                }
                Some(token) if token_matches(token, secret.expose()) => {}
                Some(_) => {
                    return Err(PushRefusal::Invalid {
                        result: "token_invalid",
                        message: "the token does not match PUBSUB_VERIFY_SECRET".to_owned(),
                    });
                }
            }
        }
        Ok(if self.oidc.is_some() {
            "oidc_ok"
        } else {
            "secret_ok"
        })
    }
}

/// Constant-time comparison of a presented shared token with the configured one.
pub fn token_matches(presented: &str, expected: &str) -> bool {
    bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape the Pub/Sub emulator pushes for a fake-gcs-server upload.
    fn push(event: &str, generation: &str) -> String {
        format!(
            r#"{{"message":{{"data":"eyJraW5kIjoic3RvcmFnZSNvYmplY3QifQ==","attributes":{{"bucketId":"acme-docs",
            "objectId":"kb/a b.md","eventType":"{event}","objectGeneration":"{generation}",
            "eventTime":"2026-11-29T12:00:00.000000Z","payloadFormat":"JSON_API_V1"}},"messageId":"1234",
            "publishTime":"2026-11-29T12:00:01Z"}},"subscription":"projects/test-proj/subscriptions/push-sub"}}"#
        )
    }

    #[test]
    fn finalize_and_metadata_updates_are_upserts_of_that_generation() {
        for event in ["OBJECT_FINALIZE", "OBJECT_METADATA_UPDATE"] {
            let parsed = parse(push(event, "1717").as_bytes()).unwrap();
            let change = parsed.change.unwrap();
            assert_eq!(
                (change.op, change.key.as_str(), change.version.as_deref()),
                (ChangeOp::Upsert, "kb/a b.md", Some("1717"))
            );
            assert_eq!(
                parsed.subscription.as_deref(),
                Some("projects/test-proj/subscriptions/push-sub")
            );
        }
    }

    /// Recorded from the Pub/Sub emulator pushing a fake-gcs-server upload (note both id spellings).
    const RECORDED: &str = r#"{"subscription":"projects\/test-proj\/subscriptions\/manual-sub","message":{"publishTime":"2026-11-29T14:22:20.954Z","data":"eyJraW5kIjoic3RvcmFnZSNvYmplY3QifQ==","publish_time":"2026-11-29T14:22:20.954Z","messageId":"1","attributes":{"objectGeneration":"1795962140935445","eventTime":"2026-11-29T14:22:20Z","bucketId":"evbucket","eventType":"OBJECT_FINALIZE","payloadFormat":"JSON_API_V1","objectId":"docs\/a b.txt"},"message_id":"1"}}"#;

    #[test]
    fn a_recorded_emulator_push_parses() {
        let parsed = parse(RECORDED.as_bytes()).unwrap();
        assert_eq!(parsed.message_id, "1");
        let change = parsed.change.unwrap();
        assert_eq!(
            (change.bucket.as_str(), change.key.as_str()),
            ("evbucket", "docs/a b.txt")
        );
        assert_eq!(change.version.as_deref(), Some("1795962140935445"));
    }

    #[test]
    fn deletes_and_archives_are_deletes() {
        for event in ["OBJECT_DELETE", "OBJECT_ARCHIVE"] {
            let change = parse(push(event, "9").as_bytes()).unwrap().change.unwrap();
            assert_eq!(
                (change.op, change.version.as_deref()),
                (ChangeOp::Delete, Some("9-deleted"))
            );
        }
    }

    #[test]
    fn malformed_envelopes_say_what_is_missing() {
        assert!(parse(b"{}").unwrap_err().contains("push envelope"));
        let no_bucket = r#"{"message":{"attributes":{"eventType":"OBJECT_FINALIZE","objectId":"x"},"messageId":"1"},"subscription":"s"}"#;
        assert!(
            parse(no_bucket.as_bytes())
                .unwrap_err()
                .contains("bucketId")
        );
        let bad_generation = push("OBJECT_FINALIZE", "abc");
        assert!(
            parse(bad_generation.as_bytes())
                .unwrap_err()
                .contains("objectGeneration")
        );
        let bad_data = r#"{"message":{"data":"%%%","attributes":{"eventType":"OBJECT_FINALIZE"},"messageId":"1"},"subscription":"s"}"#;
        assert!(parse(bad_data.as_bytes()).unwrap_err().contains("base64"));
    }

    #[test]
    fn a_redelivery_has_the_same_delivery_id_and_a_reused_message_id_does_not() {
        let at = |s: &str| Some(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc));
        let sub = "projects/p/subscriptions/s";
        let first = delivery_id(sub, "7", at("2026-11-29T12:00:00Z"));
        assert_eq!(first, delivery_id(sub, "7", at("2026-11-29T12:00:00Z")));
        assert_ne!(first, delivery_id(sub, "7", at("2026-11-29T13:00:00Z")));
        assert_ne!(
            first,
            delivery_id(
                "projects/q/subscriptions/s",
                "7",
                at("2026-11-29T12:00:00Z")
            )
        );
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(token_matches("s3cret", "s3cret"));
        assert!(!token_matches("s3cre", "s3cret"));
        assert!(!token_matches("", "s3cret"));
    }
}
