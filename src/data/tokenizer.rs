//! Tokenizers: `bytes` (a token per byte) or a Hugging Face `tokenizer.json`, with the
//! `tokenizer_config.json` and `chat_template.jinja` beside it when they exist.

use std::path::Path;

use crate::data::DataError;
use crate::data::chat::ChatTemplate;
use crate::data::tokenizer_config::TokenizerConfig;

pub enum Tokenizer {
    /// Token = byte value; vocabulary 256. It has no end-of-sequence token nor chat template.
    Bytes,
    HuggingFace(Box<HfTokenizer>),
}

/// A Hugging Face tokenizer and what its config says.
pub struct HfTokenizer {
    pub name: String,
    pub tokenizer: tokenizers::Tokenizer,
    pub config: TokenizerConfig,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Bytes => write!(f, "Tokenizer::Bytes"),
            Tokenizer::HuggingFace(t) => {
                write!(
                    f,
                    "Tokenizer::HuggingFace({}, vocab {})",
                    t.name,
                    t.tokenizer.get_vocab_size(true)
                )
            }
        }
    }
}

impl Tokenizer {
    /// `bytes`, or the path of a `tokenizer.json` (its config files are read beside it).
    pub fn load(name: &str) -> Result<Tokenizer, DataError> {
        if name == "bytes" {
            return Ok(Tokenizer::Bytes);
        }
        let path = Path::new(name);
        let tokenizer =
            tokenizers::Tokenizer::from_file(path).map_err(|e| DataError::Tokenizer {
                name: name.to_string(),
                reason: format!("cannot load as a tokenizer.json: {e}"),
            })?;
        Ok(Tokenizer::HuggingFace(Box::new(HfTokenizer {
            name: name.to_string(),
            tokenizer,
            config: TokenizerConfig::load_beside(path)?,
        })))
    }

    /// The number of distinct ids the tokenizer can produce.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::HuggingFace(t) => t.tokenizer.get_vocab_size(true),
        }
    }

    /// Token ids of a whole file's contents (bytes need not be UTF-8 for `bytes`).
    pub fn encode(&self, raw: &[u8]) -> Result<Vec<u32>, DataError> {
        match self {
            Tokenizer::Bytes => Ok(raw.iter().map(|&b| b as u32).collect()),
            Tokenizer::HuggingFace(t) => {
                let text = std::str::from_utf8(raw).map_err(|e| DataError::Tokenizer {
                    name: t.name.clone(),
                    reason: format!("the data is not UTF-8 text: {e}"),
                })?;
                Ok(t.encode(text)?.get_ids().to_vec())
            }
        }
    }
}

impl HfTokenizer {
    /// Encodes text without the tokenizer's own special tokens (special tokens written in the
    /// text are still recognised).
    pub fn encode(&self, text: &str) -> Result<tokenizers::Encoding, DataError> {
        self.tokenizer
            .encode(text, false)
            .map_err(|e| DataError::Tokenizer {
                name: self.name.clone(),
                reason: e.to_string(),
            })
    }

    /// The id of the config's `eos_token`, which ends each document and completion.
    pub fn eos_id(&self, what: &'static str) -> Result<u32, DataError> {
        let lacks = |fix| DataError::TokenizerLacks {
            what,
            needs: "an end-of-sequence token",
            tokenizer: self.name.clone(),
            fix,
        };
        let eos = self.config.eos_token.as_deref().ok_or_else(|| {
            lacks("give a tokenizer_config.json with eos_token beside the tokenizer.json")
        })?;
        self.tokenizer
            .token_to_id(eos)
            .ok_or_else(|| lacks("tokenizer_config.json's eos_token is not in its vocabulary"))
    }

    /// The config's chat template, compiled; the tokenizer's special tokens end turns.
    pub fn chat_template(&self) -> Result<ChatTemplate, DataError> {
        let source =
            self.config
                .chat_template
                .as_deref()
                .ok_or_else(|| DataError::TokenizerLacks {
                    what: "chat",
                    needs: "a chat template",
                    tokenizer: self.name.clone(),
                    fix: "give tokenizer_config.json's chat_template or chat_template.jinja beside \
                      the tokenizer.json",
                })?;
        let mut special: Vec<String> = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special)
            .map(|t| t.content)
            .collect();
        special.sort();
        let c = &self.config;
        ChatTemplate::new(source, c.bos_token.clone(), c.eos_token.clone(), special).map_err(
            |reason| DataError::TokenizerConfig {
                field: "chat_template".into(),
                reason,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_tokens_and_bad_tokenizers_are_errors() {
        let t = Tokenizer::load("bytes").unwrap();
        assert_eq!(t.encode(&[0, 255, b'a']).unwrap(), vec![0, 255, 97]);
        assert_eq!(t.vocab_size(), 256);
        let err = Tokenizer::load("/nonexistent/tokenizer.json").unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/tokenizer.json"),
            "{err}"
        );
    }

    #[test]
    fn hugging_face_tokenizer_json_encodes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        // A word-level tokenizer: the smallest valid tokenizer.json.
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
            "decoder":null,"model":{"type":"WordLevel","vocab":{"[UNK]":0,"hello":1,"world":2},
            "unk_token":"[UNK]"}}"#;
        std::fs::write(&path, json).unwrap();
        let t = Tokenizer::load(path.to_str().unwrap()).unwrap();
        assert_eq!(t.vocab_size(), 3);
        assert_eq!(t.encode(b"hello world moon").unwrap(), vec![1, 2, 0]);
    }
}
