//! Splitting a document's text into chunks that each fit the embedding model's window, so no text is ever
//! silently truncated by the embedder. Chunks end on sentence boundaries where possible, on word boundaries
//! when a sentence alone is too long, and overlap their predecessor by a few sentences for context.

use unicode_segmentation::UnicodeSegmentation;

use super::tokens::{MODEL_WINDOW, SPECIAL_TOKENS, WordPiece};

/// How chunks are cut.
#[derive(Debug, Clone, Copy)]
pub struct ChunkPolicy {
    /// Most wordpieces per chunk (special tokens excluded).
    pub max_tokens: usize,
    /// Wordpieces of the previous chunk's tail repeated at the start of the next.
    pub overlap_tokens: usize,
}

impl Default for ChunkPolicy {
    /// The whole window of all-MiniLM-L6-v2 less its two special tokens, with ~12 % overlap.
    fn default() -> Self {
        Self {
            max_tokens: MODEL_WINDOW - SPECIAL_TOKENS,
            overlap_tokens: 32,
        }
    }
}

/// One chunk of a document.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Chunk {
    /// Position in the document, from 0.
    pub index: usize,
    /// The text (a slice of the document's text).
    pub text: String,
    /// Offset of the first character, counted in characters.
    pub char_start: usize,
    /// Offset one past the last character, counted in characters.
    pub char_end: usize,
    /// Wordpieces (at most the policy's maximum).
    pub tokens: usize,
}

/// A piece that is never split further: a sentence, or a run of words from an overlong sentence.
#[derive(Debug, Clone, Copy)]
struct Segment {
    start: usize,
    end: usize,
    tokens: usize,
}

/// Sentences (byte ranges, trimmed), with overlong ones broken into runs of words that fit.
fn segments(text: &str, wp: &WordPiece, max: usize) -> Vec<Segment> {
    let mut out = Vec::new();
    for (offset, sentence) in text.split_sentence_bound_indices() {
        let trimmed = sentence.trim();
        if trimmed.is_empty() {
            continue;
        }
        let start = offset + (sentence.len() - sentence.trim_start().len());
        let tokens = wp.count(trimmed);
        if tokens <= max {
            out.push(Segment {
                start,
                end: start + trimmed.len(),
                tokens,
            });
            continue;
        }
        let mut run: Option<Segment> = None;
        for (word_offset, word) in trimmed.split_word_bound_indices() {
            let word_tokens = wp.count(word);
            let word_start = start + word_offset;
            let word_end = word_start + word.len();
            match run.as_mut() {
                Some(current) if current.tokens + word_tokens <= max => {
                    current.end = word_end;
                    current.tokens += word_tokens;
                }
                _ => {
                    if let Some(done) = run.take().filter(|r| r.tokens > 0) {
                        out.push(done);
                    }
                    run = Some(Segment {
                        start: word_start,
                        end: word_end,
                        tokens: word_tokens,
                    });
                }
            }
        }
        out.extend(run.filter(|r| r.tokens > 0));
    }
    out
}

/// Cuts `text` into chunks under `policy`.
pub fn chunk(text: &str, policy: ChunkPolicy, wp: &WordPiece) -> Vec<Chunk> {
    let pieces = segments(text, wp, policy.max_tokens);
    let mut ranges: Vec<(usize, usize)> = Vec::new(); // segment index ranges [first, last]
    let mut first = 0;
    while first < pieces.len() {
        let mut last = first;
        let mut total = pieces[first].tokens;
        while last + 1 < pieces.len() && total + pieces[last + 1].tokens <= policy.max_tokens {
            last += 1;
            total += pieces[last].tokens;
        }
        ranges.push((first, last));
        if last + 1 >= pieces.len() {
            break;
        }
        // Start the next chunk a few segments back, as far as the overlap allows, but always move forward.
        let mut next = last + 1;
        let mut carried = 0;
        while next > first + 1 && carried + pieces[next - 1].tokens <= policy.overlap_tokens {
            next -= 1;
            carried += pieces[next].tokens;
        }
        first = next;
    }
    let mut chunks = Vec::with_capacity(ranges.len());
    // Chunk starts and ends only move forward, so character offsets are counted from the previous ones:
    // linear in the text's length, however many chunks it has.
    let (mut starts, mut ends) = (CharCursor::default(), CharCursor::default());
    for (first, last) in ranges {
        let (start, end) = (pieces[first].start, pieces[last].end);
        let slice = &text[start..end];
        // Counting the joined text, not the sum, is the guarantee; they agree because pieces split at
        // whitespace or punctuation, but the check costs little.
        let tokens = wp.count(slice);
        debug_assert!(tokens <= policy.max_tokens, "chunk of {tokens} wordpieces");
        chunks.push(Chunk {
            index: chunks.len(),
            text: slice.to_owned(),
            char_start: starts.advance(text, start),
            char_end: ends.advance(text, end),
            tokens,
        });
    }
    chunks
}

/// A byte offset and the number of characters before it, moved forward only.
#[derive(Debug, Default)]
struct CharCursor {
    byte: usize,
    chars: usize,
}

impl CharCursor {
    /// The character offset of byte offset `to` (not before the cursor).
    fn advance(&mut self, text: &str, to: usize) -> usize {
        self.chars += text[self.byte..to].chars().count();
        self.byte = to;
        self.chars
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wp() -> &'static WordPiece {
        WordPiece::minilm()
    }

    #[test]
    fn a_short_text_is_one_chunk_with_exact_offsets() {
        let text = "  First sentence. Second one!  ";
        let chunks = chunk(text, ChunkPolicy::default(), wp());
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].text, "First sentence. Second one!");
        let chars: Vec<char> = text.chars().collect();
        let sliced: String = chars[chunks[0].char_start..chunks[0].char_end]
            .iter()
            .collect();
        assert_eq!(sliced, chunks[0].text);
    }

    #[test]
    fn every_chunk_fits_the_window_and_nothing_is_lost() {
        let sentence = "The quick brown fox jumps over the lazy dog near the riverbank at dawn. ";
        let text = sentence.repeat(200);
        let policy = ChunkPolicy::default();
        let chunks = chunk(&text, policy, wp());
        assert!(chunks.len() > 5);
        for c in &chunks {
            assert!(
                c.tokens <= policy.max_tokens,
                "chunk {} has {} tokens",
                c.index,
                c.tokens
            );
            assert_eq!(c.tokens, wp().count(&c.text));
            assert!(
                c.text.ends_with('.'),
                "chunks end on sentence boundaries: {:?}",
                &c.text[c.text.len() - 10..]
            );
        }
        // Consecutive chunks overlap or touch: no gap of text is skipped.
        for pair in chunks.windows(2) {
            assert!(
                pair[1].char_start <= pair[0].char_end,
                "gap between chunk {} and {}",
                pair[0].index,
                pair[1].index
            );
            assert!(
                pair[1].char_start > pair[0].char_start,
                "chunks move forward"
            );
        }
        assert_eq!(
            chunks.last().unwrap().char_end,
            text.trim_end().chars().count()
        );
    }

    #[test]
    fn an_overlong_sentence_is_split_on_words() {
        let text = "word ".repeat(1000) + "end.";
        let chunks = chunk(
            &text,
            ChunkPolicy {
                max_tokens: 100,
                overlap_tokens: 0,
            },
            wp(),
        );
        assert!(chunks.len() >= 10);
        assert!(chunks.iter().all(|c| c.tokens <= 100));
        let total: usize = chunks.iter().map(|c| c.tokens).sum();
        assert_eq!(
            total,
            wp().count(&text),
            "without overlap the pieces add up to the whole"
        );
    }

    #[test]
    fn overlap_repeats_the_tail_of_the_previous_chunk() {
        let text = (0..40)
            .map(|i| format!("Sentence number {i} is here."))
            .collect::<Vec<_>>()
            .join(" ");
        let chunks = chunk(
            &text,
            ChunkPolicy {
                max_tokens: 40,
                overlap_tokens: 10,
            },
            wp(),
        );
        assert!(chunks.len() > 2);
        for pair in chunks.windows(2) {
            assert!(
                pair[1].char_start < pair[0].char_end,
                "chunk {} overlaps its predecessor",
                pair[1].index
            );
        }
    }

    #[test]
    fn character_offsets_are_exact_for_every_chunk_of_a_long_text() {
        // Offsets are counted incrementally (linear time); they must still match the text exactly.
        let text = "Ünïcode wörds in a short séntence. ".repeat(8_000);
        let chunks = chunk(&text, ChunkPolicy::default(), wp());
        assert!(chunks.len() > 200);
        let chars: Vec<char> = text.chars().collect();
        for c in &chunks {
            let sliced: String = chars[c.char_start..c.char_end].iter().collect();
            assert_eq!(sliced, c.text, "chunk {}", c.index);
        }
    }

    #[test]
    fn blank_text_has_no_chunks() {
        assert!(chunk(" \n ", ChunkPolicy::default(), wp()).is_empty());
    }
}
