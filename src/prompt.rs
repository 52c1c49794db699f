//! PaliGemmaProcessor's prompt format: `"<image>" * N + "<bos>" + prompt + "\n"`, tokenized with
//! the model's tokenizer.json (bos is not added by the tokenizer; `\n` ends the prefix).

use std::path::Path;

use tokenizers::Tokenizer;

use crate::config::Manifest;

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("{path}: cannot load the tokenizer ({message}); the model directory should hold the tokenizer.json the export copied")]
    Tokenizer { path: String, message: String },
    #[error("the prompt is empty; give a task such as \"caption en\", \"detect cat\" or a question")]
    Empty,
    #[error("the prompt is {prompt_tokens} tokens ({image_tokens} image + {text_tokens} text) and {max_new_tokens} new tokens are asked for, over the model's {limit} positions; shorten the prompt or lower --max-new-tokens")]
    TooLong {
        prompt_tokens: usize,
        image_tokens: usize,
        text_tokens: usize,
        max_new_tokens: usize,
        limit: usize,
    },
    #[error("tokenizing the prompt failed: {0}")]
    Encode(String),
}

pub struct PromptEncoder {
    tokenizer: Tokenizer,
    image_token_id: i64,
    bos_token_id: i64,
    num_image_tokens: usize,
    max_positions: usize,
}

impl PromptEncoder {
    pub fn load(model_dir: &Path, m: &Manifest) -> Result<PromptEncoder, PromptError> {
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
        })
    }

    /// Prompt ids for one image, checked to leave room for `max_new_tokens`.
    pub fn encode(&self, prompt: &str, max_new_tokens: usize) -> Result<Vec<i64>, PromptError> {
        if prompt.trim().is_empty() {
            return Err(PromptError::Empty);
        }
        let text = self
            .tokenizer
            .encode(format!("{prompt}\n"), false)
            .map_err(|e| PromptError::Encode(e.to_string()))?;
        let mut ids = vec![self.image_token_id; self.num_image_tokens];
        ids.push(self.bos_token_id);
        ids.extend(text.get_ids().iter().map(|&t| i64::from(t)));
        if ids.len() + max_new_tokens > self.max_positions {
            return Err(PromptError::TooLong {
                prompt_tokens: ids.len(),
                image_tokens: self.num_image_tokens,
                text_tokens: ids.len() - self.num_image_tokens,
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
}
