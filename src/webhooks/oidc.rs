//! Google-signed OIDC tokens on Pub/Sub pushes: RS256 JWTs checked against Google's JWKS (URL configurable,
//! for tests), with the configured audience, Google's issuer, expiry, and optionally the pushing service
//! account's email.
//!
//! The key set is cached. When a token names an unknown key, one request fetches the set while concurrent
//! ones wait for it, so a burst on a cold cache fetches once and every request verifies.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::{Mutex, RwLock};

/// Google's issuers.
const ISSUERS: &[&str] = &["https://accounts.google.com", "accounts.google.com"];
/// Keys are re-read at least this often.
const KEYS_TTL: Duration = Duration::from_secs(3600);
/// An unknown key id triggers at most one fetch in this window (no fetch storms from forged tokens).
const MIN_REFETCH: Duration = Duration::from_secs(30);

/// Why a push's token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidcError {
    /// No `Authorization: Bearer` token.
    #[error("no bearer token")]
    Missing,
    /// The token is not a valid Google OIDC token for us.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// Google's keys could not be fetched; the pusher should retry.
    #[error("cannot fetch the signing keys: {0}")]
    Unavailable(String),
}

#[derive(Debug, Deserialize)]
struct Claims {
    email: Option<String>,
    #[serde(default)]
    email_verified: bool,
}

struct Keys {
    by_kid: HashMap<String, DecodingKey>,
    fetched: Option<Instant>,
}

/// See the module docs.
pub struct OidcVerifier {
    client: reqwest::Client,
    jwks_url: String,
    audience: String,
    email: Option<String>,
    keys: RwLock<Keys>,
    refreshing: Mutex<()>,
}

impl std::fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("jwks_url", &self.jwks_url)
            .field("audience", &self.audience)
            .field("email", &self.email)
            .finish()
    }
}

impl OidcVerifier {
    /// A verifier for tokens with `audience`, from `email` when given, signed by keys at `jwks_url`.
    pub fn new(jwks_url: String, audience: String, email: Option<String>) -> Self {
        Self {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("a plain reqwest client builds"),
            jwks_url,
            audience,
            email,
            keys: RwLock::new(Keys {
                by_kid: HashMap::new(),
                fetched: None,
            }),
            refreshing: Mutex::new(()),
        }
    }

    /// How many keys are cached, and how long ago they were fetched.
    pub async fn cache_state(&self) -> (usize, Option<Duration>) {
        let keys = self.keys.read().await;
        (keys.by_kid.len(), keys.fetched.map(|at| at.elapsed()))
    }

    /// Verifies the `Authorization` header's bearer token.
    pub async fn verify(&self, authorization: Option<&str>) -> Result<(), OidcError> {
        let token = authorization
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(OidcError::Missing)?;
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| OidcError::Invalid(e.to_string()))?;
        if header.alg != Algorithm::RS256 {
            return Err(OidcError::Invalid(format!(
                "algorithm {:?} is not RS256",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| OidcError::Invalid("the token names no key (kid)".to_owned()))?;
        let key = self.key(&kid).await?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[&self.audience]);
        validation.set_issuer(ISSUERS);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = 60;
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| OidcError::Invalid(e.to_string()))?
            .claims;
        if let Some(expected) = &self.email {
            if claims.email.as_deref() != Some(expected.as_str()) {
                return Err(OidcError::Invalid(format!(
                    "the token is for {:?}, not the expected service account",
                    claims.email.unwrap_or_default()
                )));
            }
            if !claims.email_verified {
                return Err(OidcError::Invalid(
                    "the token's email is not verified".to_owned(),
                ));
            }
        }
        Ok(())
    }

    async fn key(&self, kid: &str) -> Result<DecodingKey, OidcError> {
        {
            let keys = self.keys.read().await;
            if let Some(key) = keys.by_kid.get(kid)
                && keys.fetched.is_some_and(|at| at.elapsed() < KEYS_TTL)
            {
                return Ok(key.clone());
            }
        }
        // One fetch at a time; whoever waited here finds the keys the first one fetched.
        let _turn = self.refreshing.lock().await;
        {
            let keys = self.keys.read().await;
            let fresh = keys.fetched.is_some_and(|at| at.elapsed() < MIN_REFETCH);
            match keys.by_kid.get(kid) {
                Some(key) if keys.fetched.is_some_and(|at| at.elapsed() < KEYS_TTL) => {
                    return Ok(key.clone());
                }
                None if fresh => {
                    return Err(OidcError::Invalid(format!("unknown signing key {kid:?}")));
                }
                _ => {}
            }
        }
        let set: JwkSet = self
            .client
            .get(&self.jwks_url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| OidcError::Unavailable(e.to_string()))?
            .json()
            .await
            .map_err(|e| OidcError::Unavailable(format!("the key set is not JSON: {e}")))?;
        let mut by_kid = HashMap::new();
        for jwk in &set.keys {
            if let (Some(id), Ok(key)) = (jwk.common.key_id.clone(), DecodingKey::from_jwk(jwk)) {
                by_kid.insert(id, key);
            }
        }
        let found = by_kid.get(kid).cloned();
        *self.keys.write().await = Keys {
            by_kid,
            fetched: Some(Instant::now()),
        };
        found.ok_or_else(|| OidcError::Invalid(format!("unknown signing key {kid:?}")))
    }
}
