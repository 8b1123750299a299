//! A data file as one token stream and, per token, whether it counts as a target in the loss.
//! Plain text counts whole. JSONL records are tokenized one by one and concatenated in file
//! order: a document is its tokens then the end-of-sequence token (all count); a prompt and
//! completion are the prompt's tokens (not counted) then the completion's and the
//! end-of-sequence token (counted); a chat is its rendered text with only the counted
//! assistant turns counting, nothing added between records.

use std::path::Path;

use crate::data::records::{self, Records};
use crate::data::tokenizer::HfTokenizer;
use crate::data::{DataError, Tokenizer};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corpus {
    pub tokens: Vec<u32>,
    /// Parallel to `tokens`: whether predicting that token counts in the loss.
    pub counted: Vec<bool>,
}

impl Corpus {
    fn push(&mut self, ids: &[u32], counted: bool) {
        self.tokens.extend_from_slice(ids);
        self.counted.extend(std::iter::repeat_n(counted, ids.len()));
    }
}

impl Tokenizer {
    /// Reads and tokenizes a data file, plain text or JSONL.
    pub fn corpus_of_file(&self, path: &Path) -> Result<Corpus, DataError> {
        let raw = std::fs::read(path).map_err(|e| DataError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        self.corpus(&raw)
    }

    /// Tokenizes a data file's contents, plain text or JSONL.
    pub fn corpus(&self, raw: &[u8]) -> Result<Corpus, DataError> {
        if !records::is_jsonl(raw) {
            let tokens = self.encode(raw)?;
            let counted = vec![true; tokens.len()];
            return Ok(Corpus { tokens, counted });
        }
        let (records, lines) = records::parse(raw)?;
        match self {
            Tokenizer::HuggingFace(t) => t.corpus(&records, &lines),
            Tokenizer::Bytes => Err(DataError::TokenizerLacks {
                what: "JSONL",
                needs: "an end-of-sequence token or a chat template",
                tokenizer: "bytes".into(),
                fix: "give a Hugging Face tokenizer.json with its tokenizer_config.json",
            }),
        }
    }
}

impl HfTokenizer {
    fn corpus(&self, records: &Records, lines: &[usize]) -> Result<Corpus, DataError> {
        let mut c = Corpus {
            tokens: Vec::new(),
            counted: Vec::new(),
        };
        match records {
            Records::Text(docs) => {
                let eos = self.eos_id("text")?;
                for doc in docs {
                    c.push(self.encode(doc)?.get_ids(), true);
                    c.push(&[eos], true);
                }
            }
            Records::PromptCompletion(pairs) => {
                let eos = self.eos_id("prompt/completion")?;
                for (prompt, completion) in pairs {
                    c.push(self.encode(prompt)?.get_ids(), false);
                    c.push(self.encode(completion)?.get_ids(), true);
                    c.push(&[eos], true);
                }
            }
            Records::Chat(chats) => {
                let template = self.chat_template()?;
                for (messages, &line) in chats.iter().zip(lines) {
                    let rendered = template
                        .render(messages)
                        .map_err(|reason| DataError::Template { line, reason })?;
                    let enc = self.encode(&rendered.text)?;
                    for (&id, &(start, end)) in enc.get_ids().iter().zip(enc.get_offsets()) {
                        let counts = rendered
                            .counted
                            .iter()
                            .any(|s| start < s.end && end > s.start);
                        c.push(&[id], counts);
                    }
                }
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenizer_config::{CONFIG_FILE, TEMPLATE_FILE};

    /// A word-level tokenizer with ChatML's special tokens, its config and template.
    fn tokenizer(dir: &Path, config: &str, template: Option<&str>) -> Tokenizer {
        let json = r#"{"version":"1.0","truncation":null,"padding":null,
            "added_tokens":[
              {"id":5,"content":"<|im_start|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
              {"id":6,"content":"<|im_end|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
            "decoder":null,"model":{"type":"WordLevel","vocab":{"[UNK]":0,"hi":1,"yo":2,
            "user":3,"assistant":4},"unk_token":"[UNK]"}}"#;
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), config).unwrap();
        if let Some(t) = template {
            std::fs::write(dir.join(TEMPLATE_FILE), t).unwrap();
        }
        Tokenizer::load(path.to_str().unwrap()).unwrap()
    }

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}\
                          <|im_end|> {% endfor %}";

    #[test]
    fn records_become_tokens_and_masks() {
        let dir = tempfile::tempdir().unwrap();
        let t = tokenizer(dir.path(), r#"{"eos_token": "<|im_end|>"}"#, Some(CHATML));
        let c = t
            .corpus(b"{\"text\": \"hi yo\"}\n{\"text\": \"yo\"}\n")
            .unwrap();
        assert_eq!(c.tokens, vec![1, 2, 6, 2, 6]);
        assert!(c.counted.iter().all(|&b| b));
        let c = t
            .corpus(b"{\"prompt\": \"hi hi\", \"completion\": \"yo\"}")
            .unwrap();
        assert_eq!(c.tokens, vec![1, 1, 2, 6]);
        assert_eq!(c.counted, vec![false, false, true, true]);
        let chat = concat!(
            r#"{"messages": [{"role": "user", "content": "hi"}, "#,
            r#"{"role": "assistant", "content": "yo hi"}]}"#,
            "\n",
            r#"{"messages": [{"role": "user", "content": "yo"}, "#,
            r#"{"role": "assistant", "content": "hi", "weight": 0}]}"#
        );
        let c = t.corpus(chat.as_bytes()).unwrap();
        // <|im_start|> user hi <|im_end|> <|im_start|> assistant yo hi <|im_end|>, then the
        // second chat, whose only assistant turn has weight 0.
        assert_eq!(
            c.tokens,
            vec![5, 3, 1, 6, 5, 4, 2, 1, 6, 5, 3, 2, 6, 5, 4, 1, 6]
        );
        let counted: Vec<usize> = (0..c.tokens.len()).filter(|&i| c.counted[i]).collect();
        assert_eq!(counted, vec![6, 7, 8]);
        // Plain text is unchanged: every token counts.
        let plain = Tokenizer::Bytes.corpus(b"ab {\"text\": 1}").unwrap();
        assert_eq!(plain.tokens.len(), 14);
        assert!(plain.counted.iter().all(|&b| b));
    }

    #[test]
    fn what_the_data_needs_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let t = tokenizer(dir.path(), "{}", None);
        let e = t.corpus(b"{\"text\": \"hi\"}").unwrap_err().to_string();
        assert!(
            e.contains("end-of-sequence") && e.contains("eos_token"),
            "{e}"
        );
        let e = t
            .corpus(br#"{"messages": [{"role": "user", "content": "hi"}]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("chat template"), "{e}");
        let e = Tokenizer::Bytes
            .corpus(b"{\"text\": \"hi\"}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bytes"), "{e}");
        let failing = "{{ raise_exception('no system turns') }}";
        let t = tokenizer(dir.path(), "{}", Some(failing));
        let chat = "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}";
        let e = t
            .corpus(format!("{chat}\n\n{chat}").as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("no system turns"), "{e}");
    }

    /// The fixture of tests/fixtures/chat (made by its make_fixture.py): our ids and masks
    /// are those transformers' `apply_chat_template` gives, record by record, concatenated.
    #[test]
    fn chat_ids_and_masks_match_transformers() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat");
        let t = Tokenizer::load(dir.join("tokenizer.json").to_str().unwrap()).unwrap();
        let c = t.corpus_of_file(&dir.join("chat.jsonl")).unwrap();
        let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
        let expected: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        let (mut ids, mut masks) = (Vec::new(), Vec::new());
        for record in &expected {
            let list = |k: &str| -> Vec<u64> {
                let v = record[k].as_array().unwrap();
                v.iter().map(|x| x.as_u64().unwrap()).collect()
            };
            ids.extend(list("input_ids").into_iter().map(|x| x as u32));
            masks.extend(list("assistant_masks").into_iter().map(|x| x == 1));
        }
        assert_eq!(c.tokens, ids);
        assert_eq!(c.counted, masks);
        assert!(masks.iter().any(|&m| m) && !masks.iter().all(|&m| m));
    }
}
