//! S3 event notifications (the JSON inside an SNS Notification's `Message`): which objects were created or
//! removed. Test events (sent when notifications are configured) are recognized and carry no changes.

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::ObjectChange;
use crate::domain::ChangeOp;

#[derive(Debug, Deserialize)]
struct Notification {
    #[serde(rename = "Records", default)]
    records: Vec<Record>,
    #[serde(rename = "Event")]
    event: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    event_name: String,
    event_time: Option<DateTime<Utc>>,
    s3: Entity,
}

#[derive(Debug, Deserialize)]
struct Entity {
    bucket: Bucket,
    object: Object,
}

#[derive(Debug, Deserialize)]
struct Bucket {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Object {
    key: String,
    e_tag: Option<String>,
    version_id: Option<String>,
    sequencer: Option<String>,
}

/// Decodes an S3 event key: `+` is a space, then %XX escapes (form encoding).
pub fn decode_key(raw: &str) -> Result<String, String> {
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map_err(|_| format!("object key {raw:?} does not decode to UTF-8"))
        .and_then(|key| {
            crate::domain::storable_key(&key).map_err(|e| format!("object key {raw:?}: {e}"))?;
            Ok(key.into_owned())
        })
}

/// The changes an S3 notification announces; `Ok(None)` for an s3:TestEvent.
pub fn parse(message: &str) -> Result<Option<Vec<ObjectChange>>, String> {
    let value: serde_json::Value = serde_json::from_str(message)
        .map_err(|e| format!("the SNS Message is not an S3 event notification: {e}"))?;
    crate::domain::refuse_nul(&value).map_err(|e| format!("in the SNS Message, {e}"))?;
    let notification: Notification = serde_json::from_value(value)
        .map_err(|e| format!("the SNS Message is not an S3 event notification: {e}"))?;
    if notification.event.as_deref() == Some("s3:TestEvent") {
        return Ok(None);
    }
    if notification.records.is_empty() {
        return Err("the S3 event notification has no Records".to_owned());
    }
    notification
        .records
        .into_iter()
        .filter_map(|record| {
            let op = if record.event_name.starts_with("ObjectCreated:") {
                ChangeOp::Upsert
            } else if record.event_name.starts_with("ObjectRemoved:") {
                ChangeOp::Delete
            } else {
                // Other event types (restore, replication, ...) do not change content.
                return None;
            };
            Some(decode_key(&record.s3.object.key).map(|key| {
                ObjectChange {
                    bucket: record.s3.bucket.name,
                    key,
                    op,
                    // Deletes have no ETag; the sequencer orders events on one key.
                    version: record
                        .s3
                        .object
                        .e_tag
                        .or(record.s3.object.version_id)
                        .or(record.s3.object.sequencer)
                        .map(|v| v.trim_matches('"').to_owned()),
                    event_time: record.event_time,
                }
            }))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As in the AWS documentation's example event (abridged).
    const PUT: &str = r#"{"Records":[{"eventVersion":"2.1","eventSource":"aws:s3","awsRegion":"us-west-2",
        "eventTime":"1970-01-01T00:00:00.000Z","eventName":"ObjectCreated:Put",
        "userIdentity":{"principalId":"AIDAJDPLRKLG7UEXAMPLE"},
        "s3":{"s3SchemaVersion":"1.0","configurationId":"testConfigRule",
              "bucket":{"name":"amzn-s3-demo-bucket","ownerIdentity":{"principalId":"A3NL1KOZZKExample"},"arn":"arn:aws:s3:::amzn-s3-demo-bucket"},
              "object":{"key":"reports/Q4+summary%282024%29.pdf","size":1024,"eTag":"d41d8cd98f00b204e9800998ecf8427e","versionId":"096fKKXTRTtl3on89fVO.nfljtsv6qko","sequencer":"0055AED6DCD90281E5"}}}]}"#;

    #[test]
    fn an_object_created_record_is_an_upsert_with_a_decoded_key() {
        let changes = parse(PUT).unwrap().unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].bucket, "amzn-s3-demo-bucket");
        assert_eq!(changes[0].key, "reports/Q4 summary(2024).pdf");
        assert_eq!(changes[0].op, ChangeOp::Upsert);
        assert_eq!(
            changes[0].version.as_deref(),
            Some("d41d8cd98f00b204e9800998ecf8427e")
        );
    }

    #[test]
    fn an_object_removed_record_is_a_delete_versioned_by_its_sequencer() {
        let removed = r#"{"Records":[{"eventName":"ObjectRemoved:Delete","eventTime":"2026-01-01T00:00:00Z",
            "s3":{"bucket":{"name":"b"},"object":{"key":"a%2Fb.txt","sequencer":"0A1B"}}}]}"#;
        let changes = parse(removed).unwrap().unwrap();
        assert_eq!(
            (changes[0].key.as_str(), changes[0].op),
            ("a/b.txt", ChangeOp::Delete)
        );
        assert_eq!(changes[0].version.as_deref(), Some("0A1B"));
    }

    #[test]
    fn a_test_event_carries_no_changes() {
        let test = r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2026-01-01T00:00:00.000Z","Bucket":"b","RequestId":"r","HostId":"h"}"#;
        assert_eq!(parse(test).unwrap(), None);
    }

    #[test]
    fn keys_decode_with_form_rules() {
        assert_eq!(decode_key("a+b%2Bc%20d").unwrap(), "a b+c d");
        assert!(decode_key("bad%FF%FE").is_err());
    }

    #[test]
    fn malformed_messages_say_why() {
        assert!(parse("not json").unwrap_err().contains("not an S3 event"));
        assert!(parse("{}").unwrap_err().contains("no Records"));
        assert!(parse(r#"{"Records":[{"eventName":"ObjectCreated:Put"}]}"#).is_err());
    }
}
