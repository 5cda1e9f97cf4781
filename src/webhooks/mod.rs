//! Storage events arriving over HTTP: SNS deliveries of S3 notifications ([`sns`], [`s3_events`]) and Pub/Sub
//! pushes of GCS notifications ([`pubsub`], [`oidc`]). Parsing and verification live here, pure where they
//! can be; turning verified events into jobs is `workflows::intake`'s.

pub mod keys;
pub mod oidc;
pub mod pubsub;
pub mod s3_events;
pub mod sns;

use chrono::{DateTime, Utc};

use crate::domain::ChangeOp;

/// One object change an event announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectChange {
    /// Bucket.
    pub bucket: String,
    /// Object key (decoded).
    pub key: String,
    /// Created/updated or removed.
    pub op: ChangeOp,
    /// The version the event names (ETag, generation, or a sequencer for deletes).
    pub version: Option<String>,
    /// When the store says it happened.
    pub event_time: Option<DateTime<Utc>>,
}

/// Mutation fuzzing of the parsers over recorded payloads: whatever arrives, they answer Ok or Err and never
/// panic. Seeded, so a failure reproduces; the seed is in the assertion message.
#[cfg(test)]
mod fuzz {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::Value;

    use super::{pubsub, s3_events, sns};

    /// From the AWS SNS documentation (HTTP/HTTPS notification and confirmation formats).
    const SNS_NOTIFICATION: &str = r#"{"Type":"Notification","MessageId":"22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn":"arn:aws:sns:us-west-2:123456789012:MyTopic","Subject":"Amazon S3 Notification",
        "Message":"{\"Records\":[{\"eventVersion\":\"2.1\",\"eventSource\":\"aws:s3\",\"eventTime\":\"2026-11-29T12:00:00.000Z\",\"eventName\":\"ObjectCreated:Put\",\"s3\":{\"bucket\":{\"name\":\"amzn-s3-demo-bucket\"},\"object\":{\"key\":\"a+b%2Fc.txt\",\"size\":10,\"eTag\":\"d41d8cd9\",\"sequencer\":\"0055AED6DCD90281E5\"}}}]}",
        "Timestamp":"2012-05-02T00:54:06.655Z","SignatureVersion":"1",
        "Signature":"EXAMPLEw6JRNwm1LFQL4ICB0bnXrdB8ClRMTQFGBqwLpGbM78tJ4etTwC5zU7O3tS6tGpey3ejedNdOJ+1fkIp9F2/LmNVKb5aFlYq+9rk9ZiPph5YlLmWsDcyC5T+Sy9/umic5S0UQc2PEtgdpVBahwNOdMW4JPwk0kAJJztnc=",
        "SigningCertURL":"https://sns.us-west-2.amazonaws.com/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem",
        "UnsubscribeURL":"https://sns.us-west-2.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=arn:aws:sns:us-west-2:123456789012:MyTopic:c9135db0"}"#;
    const SNS_CONFIRMATION: &str = r#"{"Type":"SubscriptionConfirmation","MessageId":"165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
        "Token":"2336412f37fb687f5d51e6e241d09c805a5a57b30d712f794cc5f6a988666d92768dd60a747ba6f3beb71854e285d6ad02428b09ceece29417f1f02d609c582afbacc99c583a916b9981dd2728f4ae6fdb82efd087cc3b7849e05798d2d2785c03b0879594eeac82c01f235d0e717736",
        "TopicArn":"arn:aws:sns:us-west-2:123456789012:MyTopic",
        "Message":"You have chosen to subscribe to the topic arn:aws:sns:us-west-2:123456789012:MyTopic.\nTo confirm the subscription, visit the SubscribeURL included in this message.",
        "SubscribeURL":"https://sns.us-west-2.amazonaws.com/?Action=ConfirmSubscription&TopicArn=arn:aws:sns:us-west-2:123456789012:MyTopic&Token=2336412f37",
        "Timestamp":"2012-04-26T20:45:04.751Z","SignatureVersion":"1",
        "Signature":"EXAMPLEpH+DcEwjAPg8O9mY8dReBSwksfg2S7WKQcikcNKWLQjwu6A4VbeS0QHVCkhRS7fUQvi2egU3N858fiTDN6bkkOxYDVrY0Ad8L10Hs3zH81mtnPk5uvvolIC1CXGu43obcgFxeL3khZl8IKvO61GWB6jI9b5+gLPoBc1Q=",
        "SigningCertURL":"https://sns.us-west-2.amazonaws.com/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem"}"#;
    /// From the Cloud Storage Pub/Sub notification documentation, as a push envelope.
    const GCS_PUSH: &str = r#"{"message":{"attributes":{"notificationConfig":"projects/_/buckets/my-bucket/notificationConfigs/1",
        "eventType":"OBJECT_FINALIZE","payloadFormat":"JSON_API_V1","bucketId":"my-bucket","objectId":"docs/report%201.pdf",
        "objectGeneration":"1555530063513442","eventTime":"2019-04-17T19:41:03.514931Z"},
        "data":"eyJraW5kIjoic3RvcmFnZSNvYmplY3QiLCJuYW1lIjoiZG9jcy9yZXBvcnQgMS5wZGYifQ==",
        "messageId":"2070443601311540","message_id":"2070443601311540",
        "publishTime":"2021-02-26T19:13:55.749Z","publish_time":"2021-02-26T19:13:55.749Z"},
        "subscription":"projects/myproject/subscriptions/mysubscription"}"#;

    const ROUNDS: usize = 2_000;

    fn random_value(rng: &mut StdRng, depth: u32) -> Value {
        let strings = [
            "",
            "%",
            "%zz",
            "%FF%FE",
            "+",
            "a+b%2",
            "\u{0}",
            "ünï\u{1F600}",
            "https://sns.x.amazonaws.com/a.pem",
            "==",
        ];
        match rng.random_range(0..10) {
            0 => Value::Null,
            4 | 9 => Value::from(strings[rng.random_range(0..strings.len())]),
            1 => Value::Bool(rng.random()),
            2 => Value::from(rng.random::<i64>()),
            3 => Value::from(rng.random::<f64>() * 1e300),
            5 => Value::from("x".repeat(rng.random_range(0..5_000))),
            6 if depth < 4 => Value::Array(
                (0..rng.random_range(0..3))
                    .map(|_| random_value(rng, depth + 1))
                    .collect(),
            ),
            7 if depth < 4 => Value::Object(
                (0..rng.random_range(0..3))
                    .map(|i| (format!("k{i}"), random_value(rng, depth + 1)))
                    .collect(),
            ),
            _ => Value::Array(Vec::new()),
        }
    }

    /// Every node's JSON pointer, so a mutation hits deep fields (an object key) as often as shallow ones.
    fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    pointers(
                        child,
                        format!("{at}/{}", key.replace('~', "~0").replace('/', "~1")),
                        out,
                    );
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    pointers(child, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
        out.push(at);
    }

    /// Replaces, removes or re-types one node somewhere in the document; JSON inside a string (SNS's
    /// Message) is mutated as a document of its own.
    fn mutate_structure(rng: &mut StdRng, document: &mut Value) {
        let mut all = Vec::new();
        pointers(document, String::new(), &mut all);
        let pointer = all[rng.random_range(0..all.len())].clone();
        if let Some((parent, key)) = pointer.rsplit_once('/')
            && rng.random_bool(0.2)
            && let Some(Value::Object(map)) = document.pointer_mut(parent)
        {
            map.remove(&key.replace("~1", "/").replace("~0", "~"));
            return;
        }
        let node = document
            .pointer_mut(&pointer)
            .expect("pointer from this document");
        if let Value::String(text) = node
            && let Ok(mut inner) = serde_json::from_str::<Value>(text)
            && inner.is_object()
        {
            mutate_structure(rng, &mut inner);
            *text = inner.to_string();
            return;
        }
        *node = random_value(rng, 0);
    }

    fn mutate_bytes(rng: &mut StdRng, bytes: &mut Vec<u8>) {
        if bytes.is_empty() {
            bytes.push(rng.random());
            return;
        }
        let at = rng.random_range(0..bytes.len());
        match rng.random_range(0..4) {
            0 => bytes[at] = rng.random(),
            1 => bytes.truncate(at),
            2 => {
                let end = (at + rng.random_range(1..64)).min(bytes.len());
                bytes.drain(at..end);
            }
            _ => {
                const NOISE: &[u8] = b"{}[]\",:\\%+0";
                let noise: Vec<u8> = (0..rng.random_range(1..8))
                    .map(|_| NOISE[rng.random_range(0..NOISE.len())])
                    .collect();
                bytes.splice(at..at, noise);
            }
        }
    }

    fn mutants(seed: &str, rounds: usize, check: impl Fn(&[u8])) {
        let parsed: Value = serde_json::from_str(seed).expect("seed is JSON");
        for round in 0..rounds {
            let mut rng = StdRng::seed_from_u64(round as u64);
            let mut document = parsed.clone();
            for _ in 0..rng.random_range(1..4) {
                mutate_structure(&mut rng, &mut document);
            }
            let mut bytes = document.to_string().into_bytes();
            let survives = |input: &[u8]| {
                let outcome =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(input)));
                assert!(
                    outcome.is_ok(),
                    "parser panicked on round {round}: {}",
                    String::from_utf8_lossy(input)
                );
            };
            survives(&bytes);
            for _ in 0..rng.random_range(1..4) {
                mutate_bytes(&mut rng, &mut bytes);
            }
            survives(&bytes);
        }
    }

    fn sns_pipeline(body: &[u8]) {
        let Ok(message) = sns::SnsMessage::parse(body) else {
            return;
        };
        let _ = message.string_to_sign();
        let _ = message.verify(&[0x30, 0x03, 0x02, 0x01, 0x01]);
        let _ = sns::check_cert_url(&message.signing_cert_url);
        if let Some(url) = &message.subscribe_url {
            let _ = sns::check_subscribe_url(url);
        }
        if let Ok(Some(changes)) = s3_events::parse(&message.message) {
            assert!(
                changes.iter().all(|c| !c.bucket.is_empty()),
                "a change always names its bucket"
            );
        }
    }

    #[test]
    fn mutated_sns_deliveries_never_panic_the_parsers() {
        mutants(SNS_NOTIFICATION, ROUNDS, sns_pipeline);
        mutants(SNS_CONFIRMATION, ROUNDS, sns_pipeline);
    }

    #[test]
    fn mutated_s3_event_messages_never_panic_the_parser() {
        let message = sns::SnsMessage::parse(SNS_NOTIFICATION.as_bytes())
            .unwrap()
            .message;
        mutants(&message, ROUNDS, |body| {
            if let Ok(text) = std::str::from_utf8(body) {
                let _ = s3_events::parse(text);
            }
        });
    }

    #[test]
    fn mutated_pubsub_pushes_never_panic_the_parser() {
        mutants(GCS_PUSH, ROUNDS, |body| {
            if let Ok(push) = pubsub::parse(body) {
                assert!(
                    !push.message_id.is_empty(),
                    "an accepted push has a messageId"
                );
            }
        });
    }

    #[test]
    fn the_recorded_documentation_payloads_parse() {
        let notification = sns::SnsMessage::parse(SNS_NOTIFICATION.as_bytes()).unwrap();
        assert!(
            notification
                .string_to_sign()
                .unwrap()
                .contains("Subject\nAmazon S3 Notification\n")
        );
        let changes = s3_events::parse(&notification.message).unwrap().unwrap();
        assert_eq!(changes[0].key, "a b/c.txt");
        let confirmation = sns::SnsMessage::parse(SNS_CONFIRMATION.as_bytes()).unwrap();
        assert!(sns::check_subscribe_url(confirmation.subscribe_url.as_deref().unwrap()).is_ok());
        let push = pubsub::parse(GCS_PUSH.as_bytes()).unwrap();
        let change = push.change.unwrap();
        // GCS object names are not URL-encoded in attributes: the name is taken as is.
        assert_eq!(
            (change.bucket.as_str(), change.key.as_str()),
            ("my-bucket", "docs/report%201.pdf")
        );
    }

    #[test]
    fn random_keys_decode_or_fail_without_panicking() {
        let mut rng = StdRng::seed_from_u64(7);
        let alphabet = b"%+aZ09/ \xff\xc3\xa9FE";
        for _ in 0..20_000 {
            let raw: Vec<u8> = (0..rng.random_range(0..24))
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            if let Ok(raw) = std::str::from_utf8(&raw)
                && let Ok(decoded) = s3_events::decode_key(raw)
            {
                assert_eq!(
                    decoded.contains('+'),
                    raw.contains("%2B"),
                    "{raw:?}: '+' only comes from %2B"
                );
            }
        }
    }
}
