//! Text from documents, and chunks of it sized for the embedding model.
//!
//! Pure and synchronous: bytes in, text out. Formats are chosen by content type, then extension, then magic
//! bytes. A corrupt or unsupported file is an [`ExtractError`] with the reason, never garbage text, and no
//! file yields more text than [`text_limit`] allows. The service runs extraction in a child process
//! ([`sandbox`]), so what the walkers cannot bound (a PDF parser's recursion, a decompression bomb) ends
//! only that child.

pub mod chunk;
mod formats;
pub mod sandbox;
pub mod tokens;

use sha2::{Digest, Sha256};

pub use chunk::{Chunk, ChunkPolicy, chunk};

/// Document formats we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Portable Document Format.
    Pdf,
    /// Word (Office Open XML).
    Docx,
    /// HTML.
    Html,
    /// Markdown.
    Markdown,
    /// Plain text.
    Text,
    /// JSON.
    Json,
    /// Comma-separated values.
    Csv,
}

impl Format {
    /// The MIME type we record for it.
    pub fn mime(self) -> &'static str {
        match self {
            Format::Pdf => "application/pdf",
            Format::Docx => {
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
            }
            Format::Html => "text/html",
            Format::Markdown => "text/markdown",
            Format::Text => "text/plain",
            Format::Json => "application/json",
            Format::Csv => "text/csv",
        }
    }

    fn from_mime(mime: &str) -> Option<Self> {
        let essence = mime
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        Some(match essence.as_str() {
            "application/pdf" => Format::Pdf,
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document" => {
                Format::Docx
            }
            "text/html" | "application/xhtml+xml" => Format::Html,
            "text/markdown" | "text/x-markdown" => Format::Markdown,
            "text/plain" => Format::Text,
            "application/json" | "text/json" => Format::Json,
            "text/csv" | "application/csv" => Format::Csv,
            _ => return None,
        })
    }

    fn from_extension(key: &str) -> Option<Self> {
        let name = key.rsplit('/').next().unwrap_or(key);
        let extension = name.rsplit_once('.')?.1.to_ascii_lowercase();
        Some(match extension.as_str() {
            "pdf" => Format::Pdf,
            "docx" => Format::Docx,
            "html" | "htm" | "xhtml" => Format::Html,
            "md" | "markdown" => Format::Markdown,
            "txt" | "text" | "log" => Format::Text,
            "json" => Format::Json,
            "csv" => Format::Csv,
            _ => return None,
        })
    }

    /// The format of an object: a specific content type wins, then the extension, then magic bytes.
    pub fn detect(content_type: Option<&str>, key: &str, bytes: &[u8]) -> Option<Self> {
        content_type
            .and_then(Self::from_mime)
            .or_else(|| Self::from_extension(key))
            .or_else(|| {
                if bytes.starts_with(b"%PDF-") {
                    Some(Format::Pdf)
                } else {
                    None
                }
            })
    }
}

/// Text taken out of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    /// The format it was read as.
    pub format: Format,
    /// The text.
    pub text: String,
    /// A title, when the document declares one.
    pub title: Option<String>,
}

impl Extracted {
    /// SHA-256 of the text, hex: unchanged text means nothing to re-chunk or re-embed.
    pub fn content_hash(&self) -> String {
        hash_text(&self.text)
    }
}

/// SHA-256 of a text, hex.
pub fn hash_text(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why a document yields no text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    /// Not a format we read.
    #[error(
        "unsupported file type (content type {content_type:?}, key {key:?}): expected PDF, DOCX, HTML, Markdown, text, JSON or CSV"
    )]
    Unsupported {
        /// The declared content type.
        content_type: Option<String>,
        /// The object key.
        key: String,
    },
    /// The file claims a format but does not hold up to it.
    #[error("corrupt {format:?} file: {reason}")]
    Corrupt {
        /// The format it claimed.
        format: Format,
        /// What is wrong.
        reason: String,
    },
}

/// The most text a file of `size` bytes may yield: eight times its size (JSON paths and CSV headers repeat,
/// DOCX and PDF inflate), at least 1 MiB, at most 64 MiB.
pub fn text_limit(size: usize) -> usize {
    size.saturating_mul(8).clamp(1 << 20, 64 << 20)
}

/// Extracts the text of `bytes`, whose key and declared content type help pick the format.
pub fn extract(
    bytes: &[u8],
    content_type: Option<&str>,
    key: &str,
) -> Result<Extracted, ExtractError> {
    let format =
        Format::detect(content_type, key, bytes).ok_or_else(|| ExtractError::Unsupported {
            content_type: content_type.map(str::to_owned),
            key: key.to_owned(),
        })?;
    let corrupt = |reason: String| ExtractError::Corrupt { format, reason };
    let limit = text_limit(bytes.len());
    let (text, title) = match format {
        Format::Pdf => (formats::pdf(bytes, limit).map_err(corrupt)?, None),
        Format::Docx => formats::docx(bytes, limit).map_err(corrupt)?,
        Format::Html => {
            formats::html(&formats::utf8(bytes).map_err(corrupt)?, limit).map_err(corrupt)?
        }
        Format::Markdown => {
            formats::markdown(&formats::utf8(bytes).map_err(corrupt)?, limit).map_err(corrupt)?
        }
        Format::Text => (formats::utf8(bytes).map_err(corrupt)?, None),
        Format::Json => (formats::json(bytes, limit).map_err(corrupt)?, None),
        Format::Csv => (formats::csv(bytes, limit).map_err(corrupt)?, None),
    };
    Ok(Extracted {
        format,
        text: formats::tidy(&text),
        title: title.map(|t| formats::tidy(&t)).filter(|t| !t.is_empty()),
    })
}
