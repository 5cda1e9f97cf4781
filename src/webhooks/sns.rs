//! Amazon SNS HTTP(S) deliveries: parsing the JSON body, the signature check (SignatureVersion 1 = SHA1,
//! 2 = SHA256, over the canonical string of the message type), and the rules for the certificate and
//! subscription URLs. Pure except for [`CertFetcher`], which fetches and caches signing certificates.

use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;

use super::keys::{FetchError, KeyFetcher};

/// What an SNS delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnsKind {
    /// A message published to the topic (here: S3 events).
    Notification,
    /// SNS asks us to confirm a new subscription.
    SubscriptionConfirmation,
    /// SNS tells us a subscription was removed.
    UnsubscribeConfirmation,
}

/// An SNS delivery as POSTed (JSON, sent as text/plain).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SnsMessage {
    /// Notification, SubscriptionConfirmation or UnsubscribeConfirmation.
    #[serde(rename = "Type")]
    pub kind_name: String,
    /// Unique per message; redeliveries repeat it.
    pub message_id: String,
    /// The topic.
    pub topic_arn: String,
    /// The payload (for S3 events, a JSON document as a string).
    pub message: String,
    /// When SNS published it.
    pub timestamp: String,
    /// "1" (SHA1) or "2" (SHA256).
    pub signature_version: String,
    /// Base64 signature.
    pub signature: String,
    /// Where the signing certificate is.
    #[serde(rename = "SigningCertURL")]
    pub signing_cert_url: String,
    /// Optional subject (part of the signed string when present).
    pub subject: Option<String>,
    /// For confirmations: the URL that confirms.
    #[serde(rename = "SubscribeURL")]
    pub subscribe_url: Option<String>,
    /// For confirmations.
    pub token: Option<String>,
}

impl SnsMessage {
    /// Parses a delivery body; the error says what is wrong.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("not an SNS message: {e}"))?;
        crate::domain::refuse_nul(&value)?;
        let message: Self =
            serde_json::from_value(value).map_err(|e| format!("not an SNS message: {e}"))?;
        message.kind()?;
        if message.message_id.is_empty() || message.message_id.len() > 256 {
            return Err("MessageId is empty or too long".to_owned());
        }
        Ok(message)
    }

    /// The message type.
    pub fn kind(&self) -> Result<SnsKind, String> {
        match self.kind_name.as_str() {
            "Notification" => Ok(SnsKind::Notification),
            "SubscriptionConfirmation" => Ok(SnsKind::SubscriptionConfirmation),
            "UnsubscribeConfirmation" => Ok(SnsKind::UnsubscribeConfirmation),
            other => Err(format!("unknown SNS message Type {other:?}")),
        }
    }

    /// The string SNS signed, per message type.
    pub fn string_to_sign(&self) -> Result<String, String> {
        let mut pairs: Vec<(&str, &str)> =
            vec![("Message", &self.message), ("MessageId", &self.message_id)];
        match self.kind()? {
            SnsKind::Notification => {
                if let Some(subject) = &self.subject {
                    pairs.push(("Subject", subject));
                }
                pairs.extend([
                    ("Timestamp", self.timestamp.as_str()),
                    ("TopicArn", &self.topic_arn),
                    ("Type", &self.kind_name),
                ]);
            }
            SnsKind::SubscriptionConfirmation | SnsKind::UnsubscribeConfirmation => {
                let subscribe_url = self
                    .subscribe_url
                    .as_deref()
                    .ok_or("SubscribeURL is missing")?;
                let token = self.token.as_deref().ok_or("Token is missing")?;
                pairs.extend([
                    ("SubscribeURL", subscribe_url),
                    ("Timestamp", &self.timestamp),
                    ("Token", token),
                    ("TopicArn", &self.topic_arn),
                    ("Type", &self.kind_name),
                ]);
            }
        }
        Ok(pairs.iter().map(|(k, v)| format!("{k}\n{v}\n")).collect())
    }

    /// Checks the signature with the signing certificate's public key (PKCS#1 RSAPublicKey DER).
    pub fn verify(&self, public_key: &[u8]) -> Result<(), String> {
        let algorithm: &'static dyn ring::signature::VerificationAlgorithm =
            match self.signature_version.as_str() {
                "1" => &ring::signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
                "2" => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                other => return Err(format!("unsupported SignatureVersion {other:?}")),
            };
        let signature = base64::engine::general_purpose::STANDARD
            .decode(self.signature.trim())
            .map_err(|_| "Signature is not base64".to_owned())?;
        let signed = self.string_to_sign()?;
        ring::signature::UnparsedPublicKey::new(algorithm, public_key)
            .verify(signed.as_bytes(), &signature)
            .map_err(|_| "the signature does not match the message".to_owned())
    }
}

/// An https URL on an SNS host (`sns.<region>.amazonaws.com`, or `.com.cn`). Returns the URL's path and query.
fn sns_url(url: &str) -> Result<&str, String> {
    let rest = url.strip_prefix("https://").ok_or("the URL is not https")?;
    let (host, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let region = host
        .strip_prefix("sns.")
        .and_then(|h| {
            h.strip_suffix(".amazonaws.com")
                .or_else(|| h.strip_suffix(".amazonaws.com.cn"))
        })
        .ok_or_else(|| format!("host {host:?} is not an SNS host (sns.<region>.amazonaws.com)"))?;
    if region.is_empty()
        || !region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!("host {host:?} is not an SNS host"));
    }
    Ok(path)
}

/// The signing certificate must be an https `.pem` on an SNS host; returns its path.
pub fn check_cert_url(url: &str) -> Result<&str, String> {
    let path = sns_url(url).map_err(|e| format!("SigningCertURL refused: {e}"))?;
    if !path.starts_with('/') || !path.ends_with(".pem") || path.contains("..") {
        return Err("SigningCertURL refused: the path must be a .pem file".to_owned());
    }
    Ok(path)
}

/// The confirmation URL must be https on an SNS host; returns its path and query.
pub fn check_subscribe_url(url: &str) -> Result<&str, String> {
    sns_url(url).map_err(|e| format!("SubscribeURL refused: {e}"))
}

/// The RSA public key of a PEM certificate, as ring wants it.
pub fn public_key_from_pem(pem: &[u8]) -> Result<Vec<u8>, String> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("not a PEM certificate: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// Fetches signing certificates and caches their keys (see [`super::keys`]). In production it fetches the
/// checked URL itself; `redirect_base` (tests, emulators) fetches the same path from another base URL.
#[derive(Debug)]
pub struct CertFetcher {
    keys: KeyFetcher<Vec<u8>>,
    redirect_base: Option<String>,
}

/// Why a certificate is not available.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// The URL breaks the rules: nothing was fetched.
    #[error("{0}")]
    Refused(String),
    /// The fetch failed; SNS should retry later.
    #[error("cannot fetch the signing certificate: {0}")]
    Unavailable(String),
}

impl From<FetchError> for CertError {
    fn from(err: FetchError) -> Self {
        match err {
            FetchError::Refused(m) => CertError::Refused(m),
            FetchError::Unavailable(m) => CertError::Unavailable(m),
        }
    }
}

impl CertFetcher {
    /// A fetcher; `redirect_base` is for emulators only.
    pub fn new(redirect_base: Option<String>) -> Self {
        Self {
            keys: KeyFetcher::new(
                Duration::from_secs(24 * 3600),
                Duration::from_secs(60),
                64 * 1024,
            ),
            redirect_base,
        }
    }

    /// Certificates currently cached.
    pub fn cached(&self) -> usize {
        self.keys.cached()
    }

    /// The public key of the certificate at `url`, fetched once per day at most.
    pub async fn public_key(&self, url: &str) -> Result<Vec<u8>, CertError> {
        let path = check_cert_url(url).map_err(CertError::Refused)?;
        let request = |client: &reqwest::Client| {
            match &self.redirect_base {
                Some(base) => client
                    .get(format!("{}{path}", base.trim_end_matches('/')))
                    // moto serves its certificates only to requests that look like SNS API calls.
                    .header(
                        "Authorization",
                        "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/sns/aws4_request",
                    ),
                None => client.get(url),
            }
            .header("Accept", "application/x-pem-file, */*")
        };
        Ok(self
            .keys
            .get(url, false, request, public_key_from_pem)
            .await?)
    }

    /// GETs a confirmation URL (checked; redirected like certificates for emulators).
    pub async fn confirm(&self, subscribe_url: &str) -> Result<(), CertError> {
        let path = check_subscribe_url(subscribe_url).map_err(CertError::Refused)?;
        let url = match &self.redirect_base {
            Some(base) => format!("{}{path}", base.trim_end_matches('/')),
            None => subscribe_url.to_owned(),
        };
        let response = self
            .keys
            .client()
            .get(url)
            .send()
            .await
            .map_err(|e| CertError::Unavailable(e.without_url().to_string()))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(CertError::Unavailable(format!(
                "HTTP {}",
                response.status()
            )))
        }
    }
}

/// Why an SNS delivery is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnsRefusal {
    /// Not an SNS message (400).
    Malformed(String),
    /// The certificate URL breaks the rules (403; nothing was fetched).
    CertUrl(String),
    /// The certificate could not be fetched (503; SNS retries).
    CertUnavailable(String),
    /// The signature does not match (403).
    Signature(String),
    /// Older than the replay bound, or from the future (403).
    Stale(String),
}

/// Verifies SNS deliveries: the message shape, the signature (unless turned off for development), and
/// that it is recent, so a recorded delivery cannot be replayed once its de-duplication id has expired.
#[derive(Debug)]
pub struct SnsVerifier {
    /// Signing certificates.
    pub certs: CertFetcher,
    /// `ACTIVEKG_SNS_VERIFY`.
    pub check_signatures: bool,
    /// `ACTIVEKG_SNS_MAX_AGE_SECONDS`.
    pub max_age: Duration,
}

/// How far in the future a timestamp may be (clock skew).
const MAX_SKEW: Duration = Duration::from_secs(300);

impl SnsVerifier {
    /// Parses and verifies `body`; on success also says which verification result to count.
    pub async fn verify(
        &self,
        body: &[u8],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(SnsMessage, SnsKind, &'static str), SnsRefusal> {
        let message = SnsMessage::parse(body).map_err(SnsRefusal::Malformed)?;
        let kind = message.kind().map_err(SnsRefusal::Malformed)?;
        let result = if self.check_signatures {
            let key = self
                .certs
                .public_key(&message.signing_cert_url)
                .await
                .map_err(|e| match e {
                    CertError::Refused(reason) => SnsRefusal::CertUrl(reason),
                    CertError::Unavailable(reason) => SnsRefusal::CertUnavailable(reason),
                })?;
            message.verify(&key).map_err(SnsRefusal::Signature)?;
            "signature_ok"
        } else {
            "skipped"
        };
        // Checked after the signature, so the timestamp is SNS's and not the sender's.
        let sent = chrono::DateTime::parse_from_rfc3339(&message.timestamp)
            .map_err(|_| {
                SnsRefusal::Malformed(format!("Timestamp {:?} is not RFC 3339", message.timestamp))
            })?
            .with_timezone(&chrono::Utc);
        let age = now - sent;
        if age > chrono::Duration::from_std(self.max_age).unwrap_or(chrono::Duration::MAX) {
            return Err(SnsRefusal::Stale(format!(
                "the message was sent at {sent}, more than {} s ago (ACTIVEKG_SNS_MAX_AGE_SECONDS): refusing a replay",
                self.max_age.as_secs()
            )));
        }
        if -age > chrono::Duration::from_std(MAX_SKEW).unwrap_or(chrono::Duration::MAX) {
            return Err(SnsRefusal::Stale(format!(
                "the message claims to be sent at {sent}, in the future"
            )));
        }
        Ok((message, kind, result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_pem_urls_on_sns_hosts_are_fetched() {
        for ok in [
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
            "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem",
        ] {
            assert!(check_cert_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://sns.us-east-1.amazonaws.com/x.pem",
            "https://sns.us-east-1.amazonaws.com.evil.com/x.pem",
            "https://evil.com/sns.us-east-1.amazonaws.com/x.pem",
            "https://sns..amazonaws.com/x.pem",
            "https://sns.us-east-1.amazonaws.com/x.txt",
            "https://sns.us-east-1.amazonaws.com/../x.pem",
            "https://user@sns.us-east-1.amazonaws.com/x.pem",
            "https://sns.us-east-1.amazonaws.com:8443/x.pem",
        ] {
            assert!(check_cert_url(bad).is_err(), "{bad} must be refused");
        }
        assert!(
            check_subscribe_url(
                "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription&Token=x"
            )
            .is_ok()
        );
        assert!(
            check_subscribe_url("https://attacker.example/?Action=ConfirmSubscription").is_err()
        );
    }

    #[test]
    fn the_notification_string_includes_the_subject_only_when_present() {
        let mut message = SnsMessage {
            kind_name: "Notification".into(),
            message_id: "m".into(),
            topic_arn: "arn".into(),
            message: "body".into(),
            timestamp: "t".into(),
            signature_version: "2".into(),
            signature: String::new(),
            signing_cert_url: String::new(),
            subject: None,
            subscribe_url: None,
            token: None,
        };
        assert_eq!(
            message.string_to_sign().unwrap(),
            "Message\nbody\nMessageId\nm\nTimestamp\nt\nTopicArn\narn\nType\nNotification\n"
        );
        message.subject = Some("s".into());
        assert!(
            message
                .string_to_sign()
                .unwrap()
                .contains("Subject\ns\nTimestamp")
        );
    }

    #[test]
    fn a_confirmation_needs_its_url_and_token_to_be_signed() {
        let body = br#"{"Type":"SubscriptionConfirmation","MessageId":"m","TopicArn":"a","Message":"x","Timestamp":"t",
            "SignatureVersion":"1","Signature":"","SigningCertURL":"https://sns.us-east-1.amazonaws.com/c.pem"}"#;
        let message = SnsMessage::parse(body).unwrap();
        assert!(
            message
                .string_to_sign()
                .unwrap_err()
                .contains("SubscribeURL")
        );
    }
}
