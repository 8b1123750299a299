//! What JSONL data needs from a Hugging Face tokenizer besides `tokenizer.json`: the
//! end-of-sequence and beginning-of-sequence tokens and the chat template, read from the
//! `tokenizer_config.json` and `chat_template.jinja` files beside it. Their other settings
//! describe transformers' Python classes and do not change how `tokenizer.json` encodes here
//! (records are encoded without the tokenizer's own special tokens).

use std::path::Path;

use serde_json::Value;

use crate::data::DataError;

pub const CONFIG_FILE: &str = "tokenizer_config.json";
pub const TEMPLATE_FILE: &str = "chat_template.jinja";

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerConfig {
    pub eos_token: Option<String>,
    pub bos_token: Option<String>,
    /// The Jinja source of the chat template.
    pub chat_template: Option<String>,
}

impl TokenizerConfig {
    /// Reads the files beside `tokenizer_json` that exist; none is an empty config.
    pub fn load_beside(tokenizer_json: &Path) -> Result<TokenizerConfig, DataError> {
        let dir = tokenizer_json.parent().unwrap_or(Path::new("."));
        let read = |name: &str| -> Result<Option<String>, DataError> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok(Some(text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(DataError::Io {
                    path,
                    reason: e.to_string(),
                }),
            }
        };
        let mut config = match read(CONFIG_FILE)? {
            Some(text) => TokenizerConfig::parse(&text)?,
            None => TokenizerConfig::default(),
        };
        if let Some(template) = read(TEMPLATE_FILE)? {
            config.set_template_file(template)?;
        }
        Ok(config)
    }

    /// Parses a `tokenizer_config.json`.
    pub fn parse(text: &str) -> Result<TokenizerConfig, DataError> {
        let bad = |field: &str, reason: String| DataError::TokenizerConfig {
            field: field.to_string(),
            reason,
        };
        let value: Value =
            serde_json::from_str(text).map_err(|e| bad("", format!("not JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(bad("", "must be a JSON object".into()));
        };
        let token = |field: &str| -> Result<Option<String>, DataError> {
            match map.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                // transformers writes an added token as {"content": ..., ...}.
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(bad(field, "an object without a string \"content\"".into())),
                },
                Some(other) => Err(bad(field, format!("must be a string, not {other}"))),
            }
        };
        Ok(TokenizerConfig {
            eos_token: token("eos_token")?,
            bos_token: token("bos_token")?,
            chat_template: chat_template(map.get("chat_template"))?,
        })
    }

    /// Takes a `chat_template.jinja`; one that disagrees with the config's own is refused.
    pub fn set_template_file(&mut self, template: String) -> Result<(), DataError> {
        match &self.chat_template {
            Some(own) if *own != template => Err(DataError::TokenizerConfig {
                field: "chat_template".into(),
                reason: format!(
                    "{CONFIG_FILE} and {TEMPLATE_FILE} hold different chat templates; keep one"
                ),
            }),
            _ => {
                self.chat_template = Some(template);
                Ok(())
            }
        }
    }
}

/// A template string, or transformers' list of named templates (the one named `default`).
fn chat_template(value: Option<&Value>) -> Result<Option<String>, DataError> {
    let bad = |reason: String| DataError::TokenizerConfig {
        field: "chat_template".into(),
        reason,
    };
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(|t| Some(t.to_string()))
            .ok_or_else(|| bad("a list of named templates without one named \"default\"".into())),
        Some(other) => Err(bad(format!("must be a string, not {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_templates_are_read_in_both_forms() {
        let c = TokenizerConfig::parse(
            r#"{"eos_token": {"content": "</s>", "lstrip": false}, "bos_token": "<s>",
                "chat_template": [{"name": "tool_use", "template": "x"},
                                  {"name": "default", "template": "{{ 1 }}"}],
                "model_max_length": 2048}"#,
        )
        .unwrap();
        assert_eq!(c.eos_token.as_deref(), Some("</s>"));
        assert_eq!(c.bos_token.as_deref(), Some("<s>"));
        assert_eq!(c.chat_template.as_deref(), Some("{{ 1 }}"));
        let e = TokenizerConfig::parse(r#"{"eos_token": 2}"#).unwrap_err();
        assert!(e.to_string().contains("eos_token"), "{e}");
        let e = TokenizerConfig::parse(r#"{"chat_template": [{"name": "rag"}]}"#).unwrap_err();
        assert!(e.to_string().contains("default"), "{e}");
    }

    #[test]
    fn files_beside_the_tokenizer_are_read_and_must_agree() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("tokenizer.json");
        assert_eq!(
            TokenizerConfig::load_beside(&json).unwrap(),
            TokenizerConfig::default()
        );
        std::fs::write(dir.path().join(TEMPLATE_FILE), "{{ eos_token }}").unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), r#"{"eos_token": "</s>"}"#).unwrap();
        let c = TokenizerConfig::load_beside(&json).unwrap();
        assert_eq!(c.chat_template.as_deref(), Some("{{ eos_token }}"));
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            r#"{"chat_template": "other"}"#,
        )
        .unwrap();
        let e = TokenizerConfig::load_beside(&json).unwrap_err();
        assert!(e.to_string().contains("different chat templates"), "{e}");
    }
}
