//! What a tenant's connector is configured with, per provider, validated. Unknown fields are refused by
//! name; secrets are typed [`Secret`] so they never print.
//!
//! Documents arrive and are stored as JSON objects; this module only parses and checks them. Which fields
//! are secret is declared here ([`secret_fields`]) and sealed by `crypto`.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::Secret;
use crate::domain::Provider;

/// The fields whose values are encrypted at rest and never returned.
pub fn secret_fields(provider: Provider) -> &'static [&'static str] {
    match provider {
        Provider::S3 => &["access_key_id", "secret_access_key", "session_token"],
        Provider::Gcs => &["credentials_json", "hmac_secret"],
        Provider::Local => &[],
    }
}

/// Amazon S3 or an S3-compatible store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Only keys under this prefix.
    #[serde(default)]
    pub prefix: String,
    /// AWS region (default us-east-1).
    pub region: Option<String>,
    /// Custom endpoint (S3-compatible stores, emulators), http(s) URL.
    pub endpoint: Option<String>,
    /// Path-style addressing (needed by most S3-compatible stores).
    #[serde(default)]
    pub force_path_style: bool,
    /// Static credentials; without them the default AWS credential chain is used.
    pub access_key_id: Option<Secret>,
    /// Static credentials.
    pub secret_access_key: Option<Secret>,
    /// Session token for temporary credentials.
    pub session_token: Option<Secret>,
    /// SNS topic ARNs allowed to deliver this bucket's events (empty: any).
    #[serde(default)]
    pub topic_allowlist: Vec<String>,
    /// Poll the bucket for changes this often, for buckets without notifications.
    pub poll_interval_seconds: Option<u32>,
}

/// Google Cloud Storage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcsConfig {
    /// Bucket name.
    pub bucket: String,
    /// Only objects under this prefix.
    #[serde(default)]
    pub prefix: String,
    /// Google Cloud project.
    pub project: Option<String>,
    /// Service-account key JSON.
    pub credentials_json: Option<Secret>,
    /// Path of a service-account key file on the worker.
    pub credentials_path: Option<String>,
    /// HMAC secret, for interoperability access.
    pub hmac_secret: Option<Secret>,
    /// Custom endpoint (emulators), http(s) URL.
    pub endpoint: Option<String>,
    /// Pub/Sub subscription for streaming pull (`projects/<p>/subscriptions/<s>`).
    pub subscription: Option<String>,
    /// Pub/Sub endpoint for the subscription, http(s) URL (emulators; default: Google's). Without
    /// credentials, the emulator is called anonymously.
    pub pubsub_endpoint: Option<String>,
    /// Pub/Sub topics allowed to deliver this bucket's events (empty: any).
    #[serde(default)]
    pub topic_allowlist: Vec<String>,
    /// Poll the bucket for changes this often, for buckets without notifications.
    pub poll_interval_seconds: Option<u32>,
}

/// A directory on the worker's disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// Absolute path of the directory.
    pub path: String,
    /// Only files under this sub-path.
    #[serde(default)]
    pub prefix: String,
    /// Scan the directory for changes this often.
    pub poll_interval_seconds: Option<u32>,
}

/// What this server lets connector configurations reach: folders on its disk and endpoints other than the
/// providers' own. The admin token manages connectors, and must not become a way to read any file of the
/// host or to send credentials to any URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confinement {
    /// Folders local connectors and `credentials_path` files must be inside. Empty: none in production,
    /// any in development.
    pub local_roots: Vec<std::path::PathBuf>,
    /// Hosts (`host` or `host:port`) custom endpoints may name. Empty: none in production, any in development.
    pub endpoints: Vec<String>,
    /// Whether this is a production deployment (see `config::Settings::production`).
    pub production: bool,
}

impl Confinement {
    fn check_path(&self, field: &str, path: &str) -> Result<(), String> {
        let path = std::path::Path::new(path);
        if path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(format!("{field} {} must not contain `..`", path.display()));
        }
        if self.local_roots.is_empty() {
            return if self.production {
                Err(format!(
                    "{field} {}: this server reads no files for connectors (set ACTIVEKG_LOCAL_ROOTS to the folders it may read)",
                    path.display()
                ))
            } else {
                Ok(())
            };
        }
        // Symlinks are resolved where the path exists, so a link inside a root cannot point out of it.
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        let inside = self.local_roots.iter().any(|root| {
            let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.clone());
            real.starts_with(root)
        });
        if inside {
            Ok(())
        } else {
            Err(format!(
                "{field} {} is outside the folders this server lets connectors read (ACTIVEKG_LOCAL_ROOTS)",
                path.display()
            ))
        }
    }

    fn check_endpoint(&self, field: &str, url: &str) -> Result<(), String> {
        if !self.production && self.endpoints.is_empty() {
            return Ok(());
        }
        let authority = url
            .split_once("://")
            .map_or(url, |(_, rest)| rest)
            .split(['/', '?', '#'])
            .next()
            .unwrap_or("");
        let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
        let host = authority
            .rsplit_once(':')
            .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
            .map_or(authority, |(host, _)| host);
        if self.endpoints.iter().any(|allowed| {
            allowed.eq_ignore_ascii_case(authority) || allowed.eq_ignore_ascii_case(host)
        }) {
            Ok(())
        } else {
            Err(format!(
                "{field} {url:?}: connectors send credentials to their endpoint, and this server allows only the \
                 providers' own and those in ACTIVEKG_CONNECTOR_ENDPOINTS"
            ))
        }
    }

    /// Whether `config` stays within what this server allows.
    pub fn check(&self, config: &ConnectorConfig) -> Result<(), String> {
        match config {
            ConnectorConfig::S3(c) => c
                .endpoint
                .as_deref()
                .map_or(Ok(()), |e| self.check_endpoint("endpoint", e)),
            ConnectorConfig::Gcs(c) => {
                for (field, endpoint) in [
                    ("endpoint", &c.endpoint),
                    ("pubsub_endpoint", &c.pubsub_endpoint),
                ] {
                    if let Some(endpoint) = endpoint {
                        self.check_endpoint(field, endpoint)?;
                    }
                }
                c.credentials_path
                    .as_deref()
                    .map_or(Ok(()), |p| self.check_path("credentials_path", p))
            }
            ConnectorConfig::Local(c) => self.check_path("path", &c.path),
        }
    }
}

/// A connector's configuration, typed by provider.
#[derive(Debug, Clone)]
pub enum ConnectorConfig {
    /// S3.
    S3(S3Config),
    /// GCS.
    Gcs(GcsConfig),
    /// Local folder.
    Local(LocalConfig),
}

impl ConnectorConfig {
    /// Parses and validates a plaintext document (secrets as strings, without `enabled`).
    pub fn parse(provider: Provider, doc: &Map<String, Value>) -> Result<Self, String> {
        let value = Value::Object(doc.clone());
        let parsed = match provider {
            Provider::S3 => Self::S3(serde_json::from_value(value).map_err(describe)?),
            Provider::Gcs => Self::Gcs(serde_json::from_value(value).map_err(describe)?),
            Provider::Local => Self::Local(serde_json::from_value(value).map_err(describe)?),
        };
        parsed.validate()?;
        Ok(parsed)
    }

    /// The provider.
    pub fn provider(&self) -> Provider {
        match self {
            Self::S3(_) => Provider::S3,
            Self::Gcs(_) => Provider::Gcs,
            Self::Local(_) => Provider::Local,
        }
    }

    /// Topics allowed to deliver events (empty: any).
    pub fn topic_allowlist(&self) -> &[String] {
        match self {
            Self::S3(c) => &c.topic_allowlist,
            Self::Gcs(c) => &c.topic_allowlist,
            Self::Local(_) => &[],
        }
    }

    /// The bucket, for cloud providers.
    pub fn bucket(&self) -> Option<&str> {
        match self {
            Self::S3(c) => Some(&c.bucket),
            Self::Gcs(c) => Some(&c.bucket),
            Self::Local(_) => None,
        }
    }

    /// The key prefix the connector is limited to.
    pub fn prefix(&self) -> &str {
        match self {
            Self::S3(c) => &c.prefix,
            Self::Gcs(c) => &c.prefix,
            Self::Local(c) => &c.prefix,
        }
    }

    /// How often to poll, when polling is configured.
    pub fn poll_interval_seconds(&self) -> Option<u32> {
        match self {
            Self::S3(c) => c.poll_interval_seconds,
            Self::Gcs(c) => c.poll_interval_seconds,
            Self::Local(c) => c.poll_interval_seconds,
        }
    }

    fn validate(&self) -> Result<(), String> {
        match self {
            Self::S3(c) => {
                check_bucket(&c.bucket, 63)?;
                check_prefix(&c.prefix)?;
                if let Some(region) = &c.region
                    && (region.is_empty()
                        || !region
                            .chars()
                            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-'))
                {
                    return Err(format!(
                        "region {region:?} is not an AWS region name (e.g. us-east-1)"
                    ));
                }
                check_endpoint(c.endpoint.as_deref())?;
                if c.access_key_id.is_some() != c.secret_access_key.is_some() {
                    return Err(
                        "access_key_id and secret_access_key go together: give both or neither"
                            .to_owned(),
                    );
                }
                if c.session_token.is_some() && c.access_key_id.is_none() {
                    return Err(
                        "session_token needs access_key_id and secret_access_key".to_owned()
                    );
                }
                check_topics(&c.topic_allowlist)?;
                check_poll(c.poll_interval_seconds)
            }
            Self::Gcs(c) => {
                check_bucket(&c.bucket, 222)?;
                check_prefix(&c.prefix)?;
                check_endpoint(c.endpoint.as_deref())?;
                check_endpoint(c.pubsub_endpoint.as_deref())
                    .map_err(|e| format!("pubsub_endpoint: {e}"))?;
                if c.credentials_json.is_some() && c.credentials_path.is_some() {
                    return Err("give credentials_json or credentials_path, not both".to_owned());
                }
                if let Some(json) = &c.credentials_json {
                    let key: Value = serde_json::from_str(json.expose())
                        .map_err(|_| "credentials_json is not JSON: paste the service-account key file's content".to_owned())?;
                    if !key.is_object() {
                        return Err(
                            "credentials_json must be a JSON object (a service-account key)"
                                .to_owned(),
                        );
                    }
                }
                if let Some(path) = &c.credentials_path
                    && !path.starts_with('/')
                {
                    return Err(format!(
                        "credentials_path {path:?} must be an absolute path"
                    ));
                }
                if let Some(subscription) = &c.subscription
                    && !is_resource_name(subscription, "subscriptions")
                {
                    return Err(format!(
                        "subscription {subscription:?} must look like projects/<project>/subscriptions/<name>"
                    ));
                }
                check_topics(&c.topic_allowlist)?;
                check_poll(c.poll_interval_seconds)
            }
            Self::Local(c) => {
                if !c.path.starts_with('/') {
                    return Err(format!("path {:?} must be an absolute path", c.path));
                }
                check_prefix(&c.prefix)?;
                check_poll(c.poll_interval_seconds)
            }
        }
    }
}

/// serde's messages already name the field ("unknown field `colour`, expected one of ...").
fn describe(err: serde_json::Error) -> String {
    let text = err.to_string();
    // Drop serde's " at line 1 column 2": the document was JSON already, positions mean nothing here.
    match text.find(" at line ") {
        Some(cut) => text[..cut].to_owned(),
        None => text,
    }
}

fn check_bucket(bucket: &str, max: usize) -> Result<(), String> {
    let ok = (3..=max).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_'))
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bucket {bucket:?} is not a valid bucket name (3-{max} lowercase letters, digits, '-', '.', starting and ending with a letter or digit)"
        ))
    }
}

fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.len() > 1024 || prefix.contains('\0') {
        return Err("prefix must be at most 1024 characters, without NUL".to_owned());
    }
    Ok(())
}

fn check_endpoint(endpoint: Option<&str>) -> Result<(), String> {
    match endpoint {
        Some(url)
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || url.chars().any(char::is_whitespace)
                || url.len() < "http://x".len() =>
        {
            Err(format!(
                "endpoint {url:?} must be an http:// or https:// URL"
            ))
        }
        _ => Ok(()),
    }
}

fn check_topics(topics: &[String]) -> Result<(), String> {
    match topics.iter().find(|t| t.trim().is_empty() || t.len() > 512) {
        Some(bad) => Err(format!("topic_allowlist entry {bad:?} is not a topic name")),
        None => Ok(()),
    }
}

fn check_poll(seconds: Option<u32>) -> Result<(), String> {
    match seconds {
        Some(s) if !(5..=86_400).contains(&s) => Err(format!(
            "poll_interval_seconds {s} is out of range: expected 5 to 86400"
        )),
        _ => Ok(()),
    }
}

fn is_resource_name(name: &str, collection: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    parts.len() == 4
        && parts[0] == "projects"
        && parts[2] == collection
        && !parts[1].is_empty()
        && !parts[3].is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(provider: Provider, value: Value) -> Result<ConnectorConfig, String> {
        ConnectorConfig::parse(provider, value.as_object().unwrap())
    }

    #[test]
    fn a_full_s3_config_parses() {
        let config = parse(
            Provider::S3,
            json!({"bucket": "acme-docs", "prefix": "kb/", "region": "eu-west-1", "endpoint": "http://127.0.0.1:5000",
                   "force_path_style": true, "access_key_id": "AKIA", "secret_access_key": "s",
                   "topic_allowlist": ["arn:aws:sns:us-east-1:123:t"], "poll_interval_seconds": 60}),
        )
        .unwrap();
        assert_eq!(config.bucket(), Some("acme-docs"));
        assert_eq!(config.prefix(), "kb/");
        assert_eq!(config.topic_allowlist().len(), 1);
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let err = parse(Provider::Gcs, json!({"bucket": "acme", "colour": "red"})).unwrap_err();
        assert!(err.contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn bad_values_say_which_field_and_why() {
        let cases = [
            (Provider::S3, json!({"bucket": "Bad_Bucket!"}), "bucket"),
            (
                Provider::S3,
                json!({"bucket": "ok-bucket", "access_key_id": "AKIA"}),
                "go together",
            ),
            (
                Provider::S3,
                json!({"bucket": "ok-bucket", "endpoint": "ftp://x"}),
                "endpoint",
            ),
            (
                Provider::S3,
                json!({"bucket": "ok-bucket", "poll_interval_seconds": 1}),
                "poll_interval_seconds",
            ),
            (
                Provider::Gcs,
                json!({"bucket": "okay", "credentials_json": "{not json"}),
                "credentials_json",
            ),
            (
                Provider::Gcs,
                json!({"bucket": "okay", "subscription": "my-sub"}),
                "subscription",
            ),
            (
                Provider::Gcs,
                json!({"bucket": "okay", "topic_allowlist": [""]}),
                "topic_allowlist",
            ),
            (Provider::Local, json!({"path": "relative/dir"}), "absolute"),
            (
                Provider::S3,
                json!({"prefix": "x"}),
                "missing field `bucket`",
            ),
            (Provider::S3, json!({"bucket": 42}), "invalid type"),
        ];
        for (provider, doc, expected) in cases {
            let err = parse(provider, doc.clone()).unwrap_err();
            assert!(err.contains(expected), "{doc} -> {err}");
        }
    }

    #[test]
    fn secrets_in_a_parsed_config_do_not_print() {
        let config = parse(
            Provider::S3,
            json!({"bucket": "acme", "access_key_id": "AKIAXYZ", "secret_access_key": "shh"}),
        )
        .unwrap();
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("AKIAXYZ") && !debug.contains("shh"),
            "{debug}"
        );
    }
}
