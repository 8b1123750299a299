//! JSONL training records: one JSON object a line, of one kind for the whole file (taken from
//! the first record): documents (`text`), prompt/completion pairs, or chat `messages`. Every
//! line is checked; a bad one is an error naming its line number and field.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::data::DataError;

/// The records of a JSONL file, all of one kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Records {
    /// Documents, each to be followed by the tokenizer's end-of-sequence token.
    Text(Vec<String>),
    /// Only the completion (and the end-of-sequence token after it) counts in the loss.
    PromptCompletion(Vec<(String, String)>),
    /// Conversations rendered by the tokenizer's chat template.
    Chat(Vec<Vec<Message>>),
}

/// One chat message. `weight` is only for assistant messages: 0 leaves it out of the loss.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    #[serde(skip)]
    pub weight: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Message {
    /// Whether this message's tokens count in the loss.
    pub fn counts(&self) -> bool {
        self.role == Role::Assistant && self.weight == 1
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    PromptCompletion,
    Chat,
}

impl Kind {
    fn of(record: &Map<String, Value>) -> Option<Kind> {
        if record.contains_key("messages") {
            Some(Kind::Chat)
        } else if record.contains_key("prompt") || record.contains_key("completion") {
            Some(Kind::PromptCompletion)
        } else if record.contains_key("text") {
            Some(Kind::Text)
        } else {
            None
        }
    }

    fn fields(self) -> &'static [&'static str] {
        match self {
            Kind::Text => &["text"],
            Kind::PromptCompletion => &["prompt", "completion"],
            Kind::Chat => &["messages"],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Text => "{\"text\"}",
            Kind::PromptCompletion => "{\"prompt\", \"completion\"}",
            Kind::Chat => "{\"messages\"}",
        }
    }
}

/// Whether a file is JSONL: its first non-blank line is a JSON object. Anything else is plain
/// text.
pub fn is_jsonl(raw: &[u8]) -> bool {
    let first = raw
        .split(|&b| b == b'\n')
        .find(|line| !line.trim_ascii().is_empty());
    first.is_some_and(|line| {
        line.trim_ascii().starts_with(b"{")
            && serde_json::from_slice::<Value>(line).is_ok_and(|v| v.is_object())
    })
}

/// Parses and checks every line (blank lines are skipped). Returns the records with the line
/// number (from 1) of each.
pub fn parse(raw: &[u8]) -> Result<(Records, Vec<usize>), DataError> {
    let text = std::str::from_utf8(raw).map_err(|e| DataError::Record {
        line: 1 + raw[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
        field: String::new(),
        reason: "not UTF-8 text".into(),
    })?;
    let mut records: Option<(Kind, Records)> = None;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |field: &str, reason: String| DataError::Record {
            line: i + 1,
            field: field.to_string(),
            reason,
        };
        let value: Value =
            serde_json::from_str(line).map_err(|e| at("", format!("not JSON: {e}")))?;
        let Value::Object(record) = value else {
            return Err(at("", "not a JSON object".into()));
        };
        let this = Kind::of(&record).ok_or_else(|| {
            at(
                "",
                "a record needs \"text\", \"prompt\" and \"completion\", or \"messages\"".into(),
            )
        })?;
        let (first, all) = records.get_or_insert_with(|| (this, Records::empty(this)));
        if this != *first {
            return Err(at(
                "",
                format!(
                    "a {} record in a file whose first record is {}; one kind per file",
                    this.name(),
                    first.name()
                ),
            ));
        }
        if let Some(unknown) = record.keys().find(|k| !this.fields().contains(&k.as_str())) {
            return Err(at(
                unknown,
                format!(
                    "unknown field; a {} record has only {:?}",
                    this.name(),
                    this.fields()
                ),
            ));
        }
        all.push(&record)
            .map_err(|(field, reason)| at(&field, reason))?;
        lines.push(i + 1);
    }
    match records {
        Some((_, records)) => Ok((records, lines)),
        None => Err(DataError::Record {
            line: 1,
            field: String::new(),
            reason: "the file has no records".into(),
        }),
    }
}

impl Records {
    fn empty(kind: Kind) -> Records {
        match kind {
            Kind::Text => Records::Text(Vec::new()),
            Kind::PromptCompletion => Records::PromptCompletion(Vec::new()),
            Kind::Chat => Records::Chat(Vec::new()),
        }
    }

    /// Parses one record of this file's kind and appends it.
    fn push(&mut self, record: &Map<String, Value>) -> Result<(), FieldError> {
        match self {
            Records::Text(all) => all.push(string(record, "text", "text".into())?),
            Records::PromptCompletion(all) => all.push((
                string(record, "prompt", "prompt".into())?,
                string(record, "completion", "completion".into())?,
            )),
            Records::Chat(all) => all.push(parse_messages(record)?),
        }
        Ok(())
    }
}

type FieldError = (String, String);

fn string(record: &Map<String, Value>, field: &str, path: String) -> Result<String, FieldError> {
    match record.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err((path, format!("must be a string, not {}", json_type(other)))),
        None => Err((path, "missing".into())),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_messages(record: &Map<String, Value>) -> Result<Vec<Message>, FieldError> {
    let Some(Value::Array(messages)) = record.get("messages") else {
        return Err(("messages".into(), "must be an array of messages".into()));
    };
    if messages.is_empty() {
        return Err(("messages".into(), "has no messages".into()));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(m, &format!("messages[{i}]")))
        .collect()
}

fn parse_message(m: &Value, path: &str) -> Result<Message, FieldError> {
    let Value::Object(m) = m else {
        return Err((path.into(), "must be an object".into()));
    };
    if let Some(unknown) = m
        .keys()
        .find(|k| !["role", "content", "weight"].contains(&k.as_str()))
    {
        return Err((
            format!("{path}.{unknown}"),
            "unknown field; a message has role, content and (assistant only) weight".into(),
        ));
    }
    let role = match string(m, "role", format!("{path}.role"))?.as_str() {
        "system" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => {
            return Err((
                format!("{path}.role"),
                format!("unknown role {other:?}; one of system, user, assistant"),
            ));
        }
    };
    let content = string(m, "content", format!("{path}.content"))?;
    let weight = match m.get("weight") {
        None => 1,
        Some(w) if role != Role::Assistant => {
            return Err((
                format!("{path}.weight"),
                format!("only assistant messages carry a weight (got {w})"),
            ));
        }
        Some(Value::Number(n)) if n.as_u64() == Some(0) => 0,
        Some(Value::Number(n)) if n.as_u64() == Some(1) => 1,
        Some(other) => {
            return Err((
                format!("{path}.weight"),
                format!("must be 0 or 1, not {other}"),
            ));
        }
    };
    Ok(Message {
        role,
        content,
        weight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(raw: &str) -> String {
        parse(raw.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn kinds_are_detected_and_parsed() {
        assert!(is_jsonl(b"\n{\"text\": \"a\"}\n"));
        assert!(!is_jsonl(b"{not json\n"));
        assert!(!is_jsonl(b"plain text {\"text\": 1}"));
        let (r, lines) = parse(b"{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n").unwrap();
        assert_eq!(r, Records::Text(vec!["a".into(), "b".into()]));
        assert_eq!(lines, vec![1, 3]);
        let (r, _) = parse(br#"{"prompt": "p", "completion": "c"}"#).unwrap();
        assert_eq!(r, Records::PromptCompletion(vec![("p".into(), "c".into())]));
        let chat = r#"{"messages": [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo", "weight": 0}]}"#
            .replace('\n', "");
        let (Records::Chat(c), _) = parse(chat.as_bytes()).unwrap() else {
            panic!("not chat")
        };
        assert_eq!(c[0][1].role, Role::Assistant);
        assert!(!c[0][1].counts() && !c[0][0].counts());
    }

    #[test]
    fn bad_lines_name_their_line_and_field() {
        let e = err("{\"text\": \"a\"}\n{\"text\": 3}");
        assert!(
            e.contains("line 2") && e.contains("text") && e.contains("a number"),
            "{e}"
        );
        let e = err("{\"text\": \"a\"}\n{\"prompt\": \"p\", \"completion\": \"c\"}");
        assert!(
            e.contains("line 2") && e.contains("one kind per file"),
            "{e}"
        );
        let e = err("{\"text\": \"a\"}\nnot json");
        assert!(e.contains("line 2") && e.contains("not JSON"), "{e}");
        let e = err("{\"text\": \"a\", \"source\": \"web\"}");
        assert!(
            e.contains("line 1") && e.contains("source") && e.contains("unknown"),
            "{e}"
        );
        let e = err("{\"prompt\": \"p\"}");
        assert!(e.contains("completion") && e.contains("missing"), "{e}");
        let e = err(r#"{"messages": [{"role": "tool", "content": "x"}]}"#);
        assert!(
            e.contains("messages[0].role") && e.contains("\"tool\""),
            "{e}"
        );
        let e = err(r#"{"messages": [{"role": "user", "content": "x", "weight": 0}]}"#);
        assert!(e.contains("messages[0].weight"), "{e}");
        let e = err(r#"{"messages": [{"role": "assistant", "content": "x", "weight": 2}]}"#);
        assert!(e.contains("must be 0 or 1"), "{e}");
        let e = err(r#"{"messages": [{"role": "user", "content": [{"type": "text"}]}]}"#);
        assert!(
            e.contains("messages[0].content") && e.contains("an array"),
            "{e}"
        );
        let e = err(r#"{"messages": [{"role": "user", "content": "x", "name": "a"}]}"#);
        assert!(e.contains("messages[0].name"), "{e}");
    }
}
