//! PaliGemmaProcessor's prompt layout and the model's tokenizer.json, both ways: prompt text to
//! ids, generated ids to text (whole, or as a stream of final pieces: [`TextStream`]).
//!
//! Layout, as transformers' `PaliGemmaProcessor.prepare_inputs_layout` (5.x) builds it:
//! - a prompt without `<image>`: `"<image>" * N + "<bos>" + prompt + "\n"`;
//! - a prompt with one `<image>` (the form transformers' docs show: `"<image>caption en"`): the
//!   placeholder becomes the N image tokens and `<bos>` goes right after it, the text before it
//!   stays before: `"caption <image> en"` is `caption ` + images + `<bos>` + ` en\n`;
//! - more `<image>` placeholders than the request's one image: refused, as transformers refuses
//!   them (`The total number of <image> tokens ... should be the same as the number of images`).
//!
//! Every other special token a user types (`<bos>`, `<eos>`, `<pad>`, `<loc0001>`, ...) is
//! tokenized as the tokenizer's added token, as transformers does; the tokenizer adds no `<bos>`
//! of its own (the processor sets `add_bos_token = False`).

use std::path::Path;

use tokenizers::Tokenizer;

use crate::config::Manifest;

/// The image placeholder of PaliGemmaProcessor (`IMAGE_TOKEN`).
pub const IMAGE_TOKEN: &str = "<image>";

/// The text tokens a prompt may hold by default (`--max-prompt-tokens`): `<bos>`, the task and
/// its closing `\n`, not the image tokens. PaliGemma's tasks are a few words to a few sentences.
pub const DEFAULT_MAX_PROMPT_TOKENS: usize = 512;

/// No token of a tokenizer covers more bytes than this (Gemma's longest are runs of 31 spaces):
/// a prompt longer than the cap times this cannot fit and is refused without tokenizing it.
const MAX_BYTES_PER_TOKEN: usize = 64;

/// Why a prompt cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The model directory's tokenizer.json is missing or not a tokenizer the tokenizers crate reads.
    #[error("{path}: cannot load the tokenizer ({message}); the model directory should hold the tokenizer.json the export copied")]
    Tokenizer {
        /// The tokenizer.json path.
        path: String,
        /// The tokenizers crate's error.
        message: String,
    },
    /// The prompt is only whitespace, around one `<image>` or not.
    #[error("the prompt is empty; give a task such as \"caption en\", \"detect cat\" or a question")]
    Empty,
    /// The prompt holds more than one `<image>` placeholder.
    #[error("the prompt holds {count} {IMAGE_TOKEN} placeholders and a request has one image; write {IMAGE_TOKEN} once (where the image goes) or not at all (the image then goes first), as transformers' processor requires")]
    ImagePlaceholders {
        /// The `<image>` placeholders found.
        count: usize,
    },
    /// max_new_tokens is 0.
    #[error("0 new tokens are asked for; ask for at least 1 (max_new_tokens / --max-new-tokens), transformers refuses 0 as well")]
    NoNewTokens,
    /// The prompt's text tokens are over `--max-prompt-tokens`.
    #[error("the prompt is {text_tokens} text tokens, over the limit of {limit} (--max-prompt-tokens); shorten it")]
    OverTokenLimit {
        /// `<bos>` and the prompt's text with its closing `\n`; not the image tokens.
        text_tokens: usize,
        /// `--max-prompt-tokens`.
        limit: usize,
    },
    /// The prompt is longer than `--max-prompt-tokens` tokens of 64 bytes, the longest a token
    /// covers: refused without tokenizing it.
    #[error("the prompt is {bytes} bytes, more than {limit} tokens (--max-prompt-tokens) can hold; shorten it")]
    OverByteLimit {
        /// The prompt's length in UTF-8 bytes.
        bytes: usize,
        /// `--max-prompt-tokens`.
        limit: usize,
    },
    /// The prompt and max_new_tokens together are over the model's `max_position_embeddings`.
    #[error("the prompt is {prompt_tokens} tokens ({image_tokens} image + {text_tokens} text) and {max_new_tokens} new tokens are asked for, over the model's {limit} positions; shorten the prompt or lower --max-new-tokens")]
    TooLong {
        /// Image and text tokens together.
        prompt_tokens: usize,
        /// The manifest's `num_image_tokens`.
        image_tokens: usize,
        /// `<bos>` and the prompt's text with its closing `\n`.
        text_tokens: usize,
        /// The request's max_new_tokens.
        max_new_tokens: usize,
        /// The manifest's `max_position_embeddings`.
        limit: usize,
    },
    /// The tokenizer failed on the prompt text.
    #[error("tokenizing the prompt failed: {0}")]
    Encode(String),
}

/// The tokenizer with the prompt layout and limits of one model; cheap to share (`Arc`) between
/// the model worker and the HTTP handlers that check prompts before queueing them.
pub struct PromptEncoder {
    tokenizer: Tokenizer,
    image_token_id: i64,
    bos_token_id: i64,
    num_image_tokens: usize,
    max_positions: usize,
    max_prompt_tokens: usize,
}

impl PromptEncoder {
    /// Loads `model_dir/tokenizer.json`; prompts are held to `max_prompt_tokens` text tokens.
    pub fn load(model_dir: &Path, m: &Manifest, max_prompt_tokens: usize) -> Result<PromptEncoder, PromptError> {
        let path = model_dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| PromptError::Tokenizer {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(PromptEncoder {
            tokenizer,
            image_token_id: m.image_token_id,
            bos_token_id: m.bos_token_id,
            num_image_tokens: m.num_image_tokens,
            max_positions: m.max_position_embeddings,
            max_prompt_tokens,
        })
    }

    fn tokenize(&self, text: &str) -> Result<Vec<i64>, PromptError> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| PromptError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().iter().map(|&t| i64::from(t)).collect())
    }

    /// Prompt ids for one image (the layout in the module docs), checked against the prompt
    /// token cap and to leave room for `max_new_tokens` (at least 1) in the model's positions.
    pub fn encode(&self, prompt: &str, max_new_tokens: usize) -> Result<Vec<i64>, PromptError> {
        let count = prompt.matches(IMAGE_TOKEN).count();
        if count > 1 {
            return Err(PromptError::ImagePlaceholders { count });
        }
        let (before, after) = prompt.split_once(IMAGE_TOKEN).unwrap_or(("", prompt));
        if before.trim().is_empty() && after.trim().is_empty() {
            return Err(PromptError::Empty);
        }
        if max_new_tokens == 0 {
            return Err(PromptError::NoNewTokens);
        }
        if prompt.len() > self.max_prompt_tokens.saturating_mul(MAX_BYTES_PER_TOKEN) {
            return Err(PromptError::OverByteLimit {
                bytes: prompt.len(),
                limit: self.max_prompt_tokens,
            });
        }
        let mut ids = self.tokenize(before)?;
        ids.extend(std::iter::repeat_n(self.image_token_id, self.num_image_tokens));
        ids.push(self.bos_token_id);
        ids.extend(self.tokenize(&format!("{after}\n"))?);
        let text_tokens = ids.len() - self.num_image_tokens;
        if text_tokens > self.max_prompt_tokens {
            return Err(PromptError::OverTokenLimit {
                text_tokens,
                limit: self.max_prompt_tokens,
            });
        }
        if ids.len() + max_new_tokens > self.max_positions {
            return Err(PromptError::TooLong {
                prompt_tokens: ids.len(),
                image_tokens: self.num_image_tokens,
                text_tokens,
                max_new_tokens,
                limit: self.max_positions,
            });
        }
        Ok(ids)
    }

    /// Text of generated ids (without `<eos>`) as transformers' `decode(ids,
    /// skip_special_tokens=True)` gives it.
    pub fn decode(&self, ids: &[i64]) -> String {
        self.decode_ids(ids, true)
    }

    /// The same text with special tokens kept: what the detection and segmentation parsers read,
    /// so `<loc>`/`<seg>` tokens survive even in a tokenizer that marks them special.
    pub fn decode_with_special_tokens(&self, ids: &[i64]) -> String {
        self.decode_ids(ids, false)
    }

    fn decode_ids(&self, ids: &[i64], skip_special_tokens: bool) -> String {
        // An id past the tokenizer (an untrained padding row a random model may emit) decodes to
        // nothing rather than failing the request.
        let known: Vec<u32> = ids
            .iter()
            .filter_map(|&t| u32::try_from(t).ok())
            .filter(|&t| self.tokenizer.id_to_token(t).is_some())
            .collect();
        self.tokenizer.decode(&known, skip_special_tokens).unwrap_or_default()
    }

    /// Whether text decoded up to and including `id` can still change when more ids follow:
    /// a byte-fallback token (`<0xE2>`) may be the first byte of a character the next ones
    /// complete (or, if they do not, one U+FFFD per byte: a later byte can turn an earlier
    /// complete character into U+FFFD), and a token that decodes to nothing (a skipped special
    /// token, an unknown id) leaves the byte run before it open.
    fn keeps_text_open(&self, id: i64) -> bool {
        let Some(token) = u32::try_from(id).ok().and_then(|t| self.tokenizer.id_to_token(t)) else {
            return true;
        };
        let is_byte = token.len() == 6 && token.starts_with("<0x") && token.ends_with('>') && u8::from_str_radix(&token[3..5], 16).is_ok();
        is_byte || self.decode(&[id]).is_empty()
    }
}

/// Generated ids to text as it becomes final, for streaming: the pieces [`push`](Self::push) and
/// [`finish`](Self::finish) return, concatenated, are exactly [`PromptEncoder::decode`] of all
/// the ids (the non-streamed answer), and no piece ever has to be taken back or cut inside a
/// character. Text is held back while it ends in an open byte-fallback run (see
/// `keeps_text_open`): the role of the prefix/read offsets of transformers' `TextStreamer` and
/// text-generation-inference's `decode_token`, here by the token kinds that can change.
#[derive(Debug, Default, Clone)]
pub struct TextStream {
    ids: Vec<i64>,
    emitted: String,
}

impl TextStream {
    /// Adds one generated id; returns the text it makes final (often empty).
    pub fn push(&mut self, encoder: &PromptEncoder, id: i64) -> String {
        self.ids.push(id);
        if encoder.keeps_text_open(id) {
            return String::new();
        }
        self.advance(encoder.decode(&self.ids))
    }

    /// The rest of the text once no id follows.
    pub fn finish(&mut self, encoder: &PromptEncoder) -> String {
        self.advance(encoder.decode(&self.ids))
    }

    /// The text sent so far.
    pub fn emitted(&self) -> &str {
        &self.emitted
    }

    /// Starts the ids over but keeps what was sent: a request run again (after its batch failed)
    /// sends nothing until its text passes what the first run sent.
    pub fn restart(&mut self) {
        self.ids.clear();
    }

    fn advance(&mut self, text: String) -> String {
        match text.strip_prefix(self.emitted.as_str()) {
            Some(rest) if !rest.is_empty() => {
                let rest = rest.to_string();
                self.emitted.push_str(&rest);
                rest
            }
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed scenes model's tokenizer (Gemma's decoder: byte fallback, `▁` as space).
    fn encoder() -> PromptEncoder {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/scenes");
        PromptEncoder::load(&dir, &Manifest::load(&dir).unwrap(), DEFAULT_MAX_PROMPT_TOKENS).unwrap()
    }

    fn id(encoder: &PromptEncoder, token: &str) -> i64 {
        i64::from(
            encoder
                .tokenizer
                .token_to_id(token)
                .unwrap_or_else(|| panic!("{token} is not in the vocabulary")),
        )
    }

    /// Deltas of `ids` streamed one by one, and the text decoded at once.
    fn stream(encoder: &PromptEncoder, ids: &[i64]) -> (Vec<String>, String) {
        let mut s = TextStream::default();
        let mut deltas: Vec<String> = ids.iter().map(|&t| s.push(encoder, t)).collect();
        deltas.push(s.finish(encoder));
        (deltas.into_iter().filter(|d| !d.is_empty()).collect(), encoder.decode(ids))
    }

    #[test]
    fn a_later_byte_that_spoils_a_character_never_takes_back_sent_text() {
        let e = encoder();
        let [c3, a9, ff] = ["<0xC3>", "<0xA9>", "<0xFF>"].map(|t| id(&e, t));
        let word = id(&e, "a");
        // é alone is final only once a non-byte token follows; with <0xFF> after it the run
        // [C3 A9 FF] is not UTF-8 and decodes to one U+FFFD per byte, é included.
        let (deltas, text) = stream(&e, &[word, c3, a9, ff, word]);
        assert_eq!(text, "a\u{FFFD}\u{FFFD}\u{FFFD}a");
        assert_eq!(deltas, ["a", "\u{FFFD}\u{FFFD}\u{FFFD}a"]);
        let (deltas, text) = stream(&e, &[c3, a9, word]);
        assert_eq!((deltas.concat(), text.as_str()), ("éa".to_string(), "éa"));
        // An incomplete character at the end of the answer is sent by finish, as decode gives it.
        let (deltas, text) = stream(&e, &[word, c3]);
        assert_eq!(deltas, ["a", "\u{FFFD}"]);
        assert_eq!(text, "a\u{FFFD}");
    }

    #[test]
    fn streamed_deltas_always_add_up_to_the_decoded_text() {
        let e = encoder();
        let vocab = e.tokenizer.get_vocab_size(true) as u64;
        let bytes: Vec<i64> = (0..=255u8).map(|b| id(&e, &format!("<0x{b:02X}>"))).collect();
        // A fixed pseudo-random walk: half byte tokens (runs of valid and invalid UTF-8), the
        // rest any id, special ones and ids past the vocabulary included.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..500 {
            let ids: Vec<i64> = (0..(next() % 24))
                .map(|_| match next() % 4 {
                    0 | 1 => bytes[(next() % 256) as usize],
                    _ => (next() % (vocab + 3)) as i64,
                })
                .collect();
            let (deltas, text) = stream(&e, &ids);
            assert_eq!(deltas.concat(), text, "ids {ids:?}");
        }
    }

    #[test]
    fn prompts_over_the_token_cap_or_without_new_tokens_are_refused() {
        let e = encoder();
        assert!(e.encode("caption en", 8).is_ok());
        assert!(matches!(e.encode("caption en", 0), Err(PromptError::NoNewTokens)));
        // 2,000 emoji: 8,000 byte-fallback tokens, refused by the cap before any position check.
        let emoji = "😀".repeat(2000);
        assert!(
            matches!(e.encode(&emoji, 8), Err(PromptError::OverTokenLimit { limit: 512, .. })),
            "{:?}",
            e.encode(&emoji, 8).err()
        );
        let huge = "a".repeat(1 << 20);
        assert!(matches!(e.encode(&huge, 8), Err(PromptError::OverByteLimit { .. })));
        for empty in ["", "  ", "<image>", " <image>\n"] {
            assert!(matches!(e.encode(empty, 8), Err(PromptError::Empty)), "{empty:?}");
        }
    }
}
