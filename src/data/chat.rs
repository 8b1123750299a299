//! Chat records rendered by the tokenizer's Jinja chat template, with the context transformers
//! gives it (`messages`, `bos_token`, `eos_token`, `add_generation_prompt=false`,
//! `raise_exception`; blocks trimmed as its environment trims them), and where in the text the
//! counted assistant turns lie: each one's content and what the template writes after it, up
//! to and including the first special token (the end of turn: `<|im_end|>`, `<|eot_id|>`,
//! `</s>`). transformers' `{% generation %}` marks are accepted and change nothing.

use std::ops::Range;

use minijinja::{Environment, Error, ErrorKind, context};

use crate::data::records::Message;

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// The tokenizer's special tokens, any of which ends a counted turn.
    end_markers: Vec<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("end_markers", &self.end_markers)
            .finish()
    }
}

/// A rendered conversation and the byte ranges of its text that count in the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub counted: Vec<Range<usize>>,
}

/// Stands for message `k`'s content while the template's own text is located.
fn placeholder(k: usize) -> String {
    format!("\u{F8FF}{k}\u{F8FF}")
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is returned as text.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
        mut end_markers: Vec<String>,
    ) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", without_generation_marks(source))
            .map_err(|e| format!("the chat template does not compile: {e}"))?;
        end_markers.retain(|m| !m.is_empty());
        // The longest first, so a marker that begins another is not taken for it.
        end_markers.sort_by_key(|m| std::cmp::Reverse(m.len()));
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
            end_markers,
        })
    }

    fn render_text(&self, messages: &[Message]) -> Result<String, String> {
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => messages,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
                add_generation_prompt => false,
            })
            .map_err(|e| format!("the chat template fails to render: {e}"))
    }

    /// Renders a conversation and places its counted turns.
    pub fn render(&self, messages: &[Message]) -> Result<Rendered, String> {
        let text = self.render_text(messages)?;
        let marked: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(k, m)| Message {
                content: placeholder(k),
                ..m.clone()
            })
            .collect();
        let skeleton = self.render_text(&marked)?;
        // The text again from the skeleton, noting where each content lands.
        let (mut rebuilt, mut rest, mut spans) = (String::new(), skeleton.as_str(), Vec::new());
        for (k, m) in messages.iter().enumerate() {
            let mark = placeholder(k);
            let at = rest.find(&mark).ok_or_else(|| {
                format!("the chat template does not write message {k}'s content once, in order")
            })?;
            rebuilt.push_str(&rest[..at]);
            spans.push(rebuilt.len()..rebuilt.len() + m.content.len());
            rebuilt.push_str(&m.content);
            rest = &rest[at + mark.len()..];
        }
        rebuilt.push_str(rest);
        if rebuilt != text {
            return Err(
                "the chat template changes the messages' contents (it trims or \
                        rewrites them), so their tokens cannot be placed; give contents as \
                        the template writes them"
                    .into(),
            );
        }
        let mut counted = Vec::new();
        for (k, _) in messages.iter().enumerate().filter(|(_, m)| m.counts()) {
            let until = spans.get(k + 1).map_or(text.len(), |s| s.start);
            let end = self
                .end_of_turn(&text[spans[k].end..until])
                .ok_or_else(|| {
                    format!(
                        "the chat template writes no end-of-turn token (a special token of the \
                     tokenizer) after assistant message {k}"
                    )
                })?;
            counted.push(spans[k].start..spans[k].end + end);
        }
        Ok(Rendered { text, counted })
    }

    /// The length of `after` up to and including its first end marker.
    fn end_of_turn(&self, after: &str) -> Option<usize> {
        self.end_markers
            .iter()
            .filter_map(|m| after.find(m.as_str()).map(|at| (at, at + m.len())))
            .min()
            .map(|(_, end)| end)
    }
}

/// transformers' `{% generation %}` and `{% endgeneration %}` as blocks that always render.
fn without_generation_marks(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let Some(close) = rest[open..].find("%}").map(|c| open + c + 2) else {
            break;
        };
        let tag = &rest[open..close];
        let inner = tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c == '+');
        let (left, right) = (&tag[..2 + lead(tag)], &tag[tag.len() - 2 - trail(tag)..]);
        out.push_str(&rest[..open]);
        match inner.trim() {
            "generation" => out.push_str(&format!("{left} if true {right}")),
            "endgeneration" => out.push_str(&format!("{left} endif {right}")),
            _ => out.push_str(tag),
        }
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

/// Whitespace-control signs right after `{%` (`-` or `+`), kept when a tag is rewritten.
fn lead(tag: &str) -> usize {
    usize::from(matches!(tag.as_bytes().get(2), Some(b'-' | b'+')))
}

fn trail(tag: &str) -> usize {
    let b = tag.as_bytes();
    usize::from(b.len() >= 5 && matches!(b[b.len() - 3], b'-' | b'+'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::records::Role;

    const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}\
        {% if m.role == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}\
        {% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}\
        {% endfor %}";

    fn msg(role: Role, content: &str, weight: u8) -> Message {
        Message {
            role,
            content: content.into(),
            weight,
        }
    }

    fn template(source: &str) -> ChatTemplate {
        let markers = vec!["<|im_start|>".into(), "<|im_end|>".into()];
        ChatTemplate::new(source, None, Some("<|im_end|>".into()), markers).unwrap()
    }

    #[test]
    fn assistant_turns_count_through_their_end_of_turn() {
        let t = template(CHATML);
        let messages = [
            msg(Role::User, "a", 1),
            msg(Role::Assistant, "a", 1),
            msg(Role::User, "b", 1),
            msg(Role::Assistant, "skip", 0),
            msg(Role::User, "c", 1),
            msg(Role::Assistant, "yes", 1),
        ];
        let r = t.render(&messages).unwrap();
        let counted: Vec<&str> = r.counted.iter().map(|s| &r.text[s.clone()]).collect();
        assert_eq!(counted, vec!["a<|im_end|>", "yes<|im_end|>"]);
        assert!(
            r.text
                .starts_with("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\na")
        );
        // The first counted "a" is the assistant's, not the user's nor the role header's.
        assert_eq!(
            r.counted[0].start,
            "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n".len()
        );
    }

    #[test]
    fn templates_that_fail_or_rewrite_are_errors() {
        let t = template("{{ raise_exception('only user turns') }}");
        let e = t.render(&[msg(Role::User, "x", 1)]).unwrap_err();
        assert!(e.contains("only user turns"), "{e}");
        let t = template("{% for m in messages %}{{ m.content | trim }}<|im_end|>{% endfor %}");
        assert!(t.render(&[msg(Role::Assistant, "ok", 1)]).is_ok());
        let e = t.render(&[msg(Role::Assistant, " ok ", 1)]).unwrap_err();
        assert!(e.contains("changes the messages' contents"), "{e}");
        let t = template("{% for m in messages %}{{ m.content }}{% endfor %}");
        let e = t.render(&[msg(Role::Assistant, "ok", 1)]).unwrap_err();
        assert!(e.contains("no end-of-turn token"), "{e}");
        let e = ChatTemplate::new("{% for %}", None, None, vec![]).unwrap_err();
        assert!(e.contains("does not compile"), "{e}");
    }

    #[test]
    fn python_string_methods_work() {
        let t = template("{{ messages[0].content.strip().upper() }}<|im_end|>");
        let r = t.render_text(&[msg(Role::User, " hi ", 1)]).unwrap();
        assert_eq!(r, "HI<|im_end|>");
    }
}
