use std::fmt;

use serde::{Deserialize, Serialize};

/// A tenant identifier: 1-128 characters of letters, digits, `.`, `_`, `-` and `@`.
///
/// Tenants name Redis-era queue keys and metric labels, so the alphabet is kept to what is safe in both.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TenantId(String);

impl TenantId {
    /// Parses a tenant id, saying what is wrong with a bad one.
    pub fn parse(value: &str) -> Result<Self, String> {
        if value.is_empty() || value.len() > 128 {
            return Err(format!(
                "tenant_id must be 1 to 128 characters long (got {})",
                value.len()
            ));
        }
        if let Some(bad) = value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@')))
        {
            return Err(format!(
                "tenant_id may only contain letters, digits, '.', '_', '-' and '@' (found {bad:?})"
            ));
        }
        Ok(Self(value.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TenantId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_accept_the_usual_shapes() {
        for ok in ["default", "acme-corp", "team_7", "a.b@c"] {
            assert_eq!(TenantId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn tenant_ids_refuse_empty_long_and_odd_characters() {
        assert!(TenantId::parse("").is_err());
        assert!(TenantId::parse(&"x".repeat(129)).is_err());
        assert!(TenantId::parse("a b").unwrap_err().contains("' '"));
        assert!(TenantId::parse("a:b").is_err());
    }
}
