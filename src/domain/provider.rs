use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where documents come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Amazon S3 (or an S3-compatible store).
    S3,
    /// Google Cloud Storage.
    Gcs,
    /// A directory on the worker's disk: the zero-cloud quickstart.
    Local,
}

impl Provider {
    /// Every provider.
    pub const ALL: [Provider; 3] = [Provider::S3, Provider::Gcs, Provider::Local];

    /// The name the API, metrics and the database use.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::S3 => "s3",
            Provider::Gcs => "gcs",
            Provider::Local => "local",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Provider {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Provider::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown provider {s:?}: expected s3, gcs or local"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_parse_from_their_names_only() {
        for provider in Provider::ALL {
            assert_eq!(provider.as_str().parse::<Provider>().unwrap(), provider);
        }
        assert!(
            "azure"
                .parse::<Provider>()
                .unwrap_err()
                .contains("s3, gcs or local")
        );
        assert!("S3".parse::<Provider>().is_err());
    }
}
