//! Tokenizers: `bytes` (a token per byte) or a Hugging Face `tokenizer.json`.

use std::path::Path;

use crate::data::DataError;

pub enum Tokenizer {
    /// Token = byte value; vocabulary 256.
    Bytes,
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Bytes => write!(f, "Tokenizer::Bytes"),
            Tokenizer::HuggingFace(t) => {
                write!(
                    f,
                    "Tokenizer::HuggingFace(vocab {})",
                    t.get_vocab_size(true)
                )
            }
        }
    }
}

impl Tokenizer {
    /// `bytes`, or the path of a `tokenizer.json`.
    pub fn load(name: &str) -> Result<Tokenizer, DataError> {
        if name == "bytes" {
            return Ok(Tokenizer::Bytes);
        }
        let path = Path::new(name);
        let tok = tokenizers::Tokenizer::from_file(path).map_err(|e| DataError::Tokenizer {
            name: name.to_string(),
            reason: format!("cannot load as a tokenizer.json: {e}"),
        })?;
        Ok(Tokenizer::HuggingFace(Box::new(tok)))
    }

    /// The number of distinct ids the tokenizer can produce.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::HuggingFace(t) => t.get_vocab_size(true),
        }
    }

    /// Token ids of a whole file's contents (bytes need not be UTF-8 for `bytes`).
    pub fn encode(&self, raw: &[u8]) -> Result<Vec<u32>, DataError> {
        match self {
            Tokenizer::Bytes => Ok(raw.iter().map(|&b| b as u32).collect()),
            Tokenizer::HuggingFace(t) => {
                let text = std::str::from_utf8(raw).map_err(|e| DataError::Tokenizer {
                    name: "tokenizer.json".into(),
                    reason: format!("the data is not UTF-8 text: {e}"),
                })?;
                let enc = t.encode(text, false).map_err(|e| DataError::Tokenizer {
                    name: "tokenizer.json".into(),
                    reason: e.to_string(),
                })?;
                Ok(enc.get_ids().to_vec())
            }
        }
    }

    /// Reads and tokenizes a file.
    pub fn encode_file(&self, path: &Path) -> Result<Vec<u32>, DataError> {
        let raw = std::fs::read(path).map_err(|e| DataError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        self.encode(&raw)
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
