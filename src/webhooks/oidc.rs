//! Google-signed OIDC tokens on Pub/Sub pushes: RS256 JWTs checked against Google's JWKS (URL configurable,
//! for tests), with the configured audience, Google's issuer, expiry, and the pushing service
//! account's verified email (required: any Google account can mint a token for any audience).
//!
//! The key set is cached (see [`super::keys`]). When a token names an unknown key, one request fetches the
//! set while concurrent ones wait for it, so a burst on a cold cache fetches once and every request
//! verifies; a forged key id cannot make us fetch more than every 30 s.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::keys::{FetchError, KeyFetcher};

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

type Keys = Arc<HashMap<String, DecodingKey>>;

/// See the module docs.
pub struct OidcVerifier {
    jwks_url: String,
    audience: String,
    email: String,
    keys: KeyFetcher<Keys>,
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
    /// A verifier for tokens with `audience`, from service account `email`, signed by keys at `jwks_url`.
    pub fn new(jwks_url: String, audience: String, email: String) -> Self {
        Self {
            jwks_url,
            audience,
            email,
            keys: KeyFetcher::new(KEYS_TTL, MIN_REFETCH, 256 * 1024),
        }
    }

    /// How many keys are cached, and how long ago they were fetched.
    pub fn cache_state(&self) -> (usize, Option<Duration>) {
        (
            self.keys.peek(&self.jwks_url).map_or(0, |keys| keys.len()),
            self.keys.age(&self.jwks_url),
        )
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
        // Any Google service account can mint a token for our audience: only the expected one may push.
        if claims.email.as_deref() != Some(self.email.as_str()) {
            return Err(OidcError::Invalid(format!(
                "the token is for {:?}, not the expected service account (PUBSUB_OIDC_EMAIL)",
                claims.email.unwrap_or_default()
            )));
        }
        if !claims.email_verified {
            return Err(OidcError::Invalid(
                "the token's email is not verified".to_owned(),
            ));
        }
        Ok(())
    }

    async fn key(&self, kid: &str) -> Result<DecodingKey, OidcError> {
        for again in [false, true] {
            let keys = self
                .keys
                .get(
                    &self.jwks_url,
                    again,
                    |client| client.get(&self.jwks_url),
                    parse_key_set,
                )
                .await
                .map_err(|e| match e {
                    FetchError::Unavailable(m) | FetchError::Refused(m) => {
                        OidcError::Unavailable(m)
                    }
                })?;
            if let Some(key) = keys.get(kid) {
                return Ok(key.clone());
            }
        }
        Err(OidcError::Invalid(format!("unknown signing key {kid:?}")))
    }
}

fn parse_key_set(body: &[u8]) -> Result<Keys, String> {
    let set: JwkSet =
        serde_json::from_slice(body).map_err(|e| format!("the key set is not JSON: {e}"))?;
    Ok(Arc::new(
        set.keys
            .iter()
            .filter_map(|jwk| Some((jwk.common.key_id.clone()?, DecodingKey::from_jwk(jwk).ok()?)))
            .collect(),
    ))
}
