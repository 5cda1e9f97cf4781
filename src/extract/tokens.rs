//! Counting wordpieces exactly as all-MiniLM-L6-v2's tokenizer (BertTokenizer, uncased) splits text, so the
//! chunker can guarantee every chunk fits the model's window without loading the model.
//!
//! The steps mirror Hugging Face `tokenizers`: BertNormalizer (clean text, isolate CJK ideographs, strip
//! accents, lowercase), BertPreTokenizer (split on whitespace and punctuation), then greedy longest-match
//! WordPiece with `##` continuations and `[UNK]` for words over 100 characters or with no match.

use std::collections::HashSet;
use std::sync::LazyLock;

use unicode_general_category::{GeneralCategory, get_general_category};
use unicode_normalization::UnicodeNormalization;

/// Positions the model reserves for `[CLS]` and `[SEP]`.
pub const SPECIAL_TOKENS: usize = 2;
/// The model's window, special tokens included.
pub const MODEL_WINDOW: usize = 256;

/// The vocabulary and the splitting rules.
#[derive(Debug)]
pub struct WordPiece {
    vocab: HashSet<String>,
}

static MINILM: LazyLock<WordPiece> =
    LazyLock::new(|| WordPiece::from_vocab(include_str!("../../assets/minilm-vocab.txt")));

impl WordPiece {
    /// all-MiniLM-L6-v2's vocabulary (vendored in `assets/`).
    pub fn minilm() -> &'static WordPiece {
        &MINILM
    }

    /// A counter over a `vocab.txt` (one token per line).
    pub fn from_vocab(vocab: &str) -> Self {
        Self {
            vocab: vocab.lines().map(str::to_owned).collect(),
        }
    }

    /// How many wordpieces `text` becomes (special tokens not included).
    pub fn count(&self, text: &str) -> usize {
        pre_tokenize(&normalize(text))
            .iter()
            .map(|word| self.pieces(word))
            .sum()
    }

    fn pieces(&self, word: &str) -> usize {
        let chars: Vec<char> = word.chars().collect();
        if chars.len() > 100 {
            return 1;
        }
        let mut count = 0;
        let mut start = 0;
        let mut candidate = String::with_capacity(word.len() + 2);
        while start < chars.len() {
            let mut end = chars.len();
            let mut found = false;
            while start < end {
                candidate.clear();
                if start > 0 {
                    candidate.push_str("##");
                }
                candidate.extend(&chars[start..end]);
                if self.vocab.contains(&candidate) {
                    found = true;
                    break;
                }
                end -= 1;
            }
            if !found {
                // The whole word becomes one [UNK].
                return 1;
            }
            count += 1;
            start = end;
        }
        count
    }
}

fn is_control(c: char) -> bool {
    if matches!(c, '\t' | '\n' | '\r') {
        return false;
    }
    // ASCII (most text) without the table lookup, which is the costliest step of counting otherwise.
    if c.is_ascii() {
        return c.is_ascii_control();
    }
    matches!(
        get_general_category(c),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::Unassigned
            | GeneralCategory::PrivateUse
            | GeneralCategory::Surrogate
    )
}

fn is_whitespace(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || c.is_whitespace()
}

fn is_punctuation(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_punctuation();
    }
    matches!(
        get_general_category(c),
        GeneralCategory::ConnectorPunctuation
            | GeneralCategory::DashPunctuation
            | GeneralCategory::ClosePunctuation
            | GeneralCategory::FinalPunctuation
            | GeneralCategory::InitialPunctuation
            | GeneralCategory::OtherPunctuation
            | GeneralCategory::OpenPunctuation
    )
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

fn normalize(text: &str) -> String {
    let mut cleaned = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\0' || c == '\u{fffd}' || is_control(c) {
            continue;
        }
        if is_whitespace(c) {
            cleaned.push(' ');
        } else if is_cjk(c) {
            cleaned.push(' ');
            cleaned.push(c);
            cleaned.push(' ');
        } else {
            cleaned.push(c);
        }
    }
    if cleaned.is_ascii() {
        // Nothing to decompose and no accents to strip.
        cleaned.make_ascii_lowercase();
        return cleaned;
    }
    cleaned
        .nfd()
        .filter(|c| get_general_category(*c) != GeneralCategory::NonspacingMark)
        .flat_map(char::to_lowercase)
        .collect()
}

fn pre_tokenize(text: &str) -> Vec<&str> {
    let mut words = Vec::new();
    for piece in text.split(is_whitespace).filter(|p| !p.is_empty()) {
        let mut start = 0;
        for (i, c) in piece.char_indices() {
            if is_punctuation(c) {
                if start < i {
                    words.push(&piece[start..i]);
                }
                words.push(&piece[i..i + c.len_utf8()]);
                start = i + c.len_utf8();
            }
        }
        if start < piece.len() {
            words.push(&piece[start..]);
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts from the real Hugging Face tokenizer (tokenizer.json of the same model).
    #[test]
    fn counts_match_the_models_own_tokenizer() {
        let cases: &[(&str, usize)] = &[
            ("Hello, world!", 4),
            ("unaffable", 3),
            ("A man is eating food.", 6),
            ("Café déjà vu — naïve résumé", 7),
            ("日本語のテキスト", 8),
            (&"x".repeat(150), 1),
            ("e-mail: bob@example.com (2024-01-05) $3.50", 21),
            ("Tabs\tand\nnewlines\r\nhere", 6),
            ("ÄÖÜ straße", 4),
            ("emoji 😀 test", 5),
            ("\u{0}null\u{fffd} char\u{200b} zero-width", 5),
        ];
        let wp = WordPiece::minilm();
        for (text, expected) in cases {
            assert_eq!(wp.count(text), *expected, "{text:?}");
        }
    }

    #[test]
    fn empty_and_blank_text_count_nothing() {
        assert_eq!(WordPiece::minilm().count(""), 0);
        assert_eq!(WordPiece::minilm().count(" \n\t "), 0);
    }
}
