//! Training data: tokenizers and deterministic batching into micro-batches.

pub mod batching;
pub mod chat;
pub mod corpus;
pub mod records;
pub mod tokenizer;
pub mod tokenizer_config;

use std::path::PathBuf;

use thiserror::Error;

pub use batching::{BatchLayout, Batcher, Microbatch};
pub use corpus::Corpus;
pub use tokenizer::Tokenizer;

/// The target of a token that does not count in the loss (PyTorch's `ignore_index` default).
pub const IGNORE_TARGET: i32 = -100;

#[derive(Debug, Error)]
pub enum DataError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("tokenizer {name:?}: {reason}")]
    Tokenizer { name: String, reason: String },
    #[error(
        "the data has {tokens} tokens, fewer than one sequence needs ({needed}: seq_len {seq_len} \
         plus one target), so it has no window to train or evaluate on; a run cycles through \
         the windows, so one is enough for any number of steps: give more text{}",
        shorter_seq_len(*tokens)
    )]
    TooShort {
        tokens: usize,
        needed: usize,
        seq_len: usize,
    },
    #[error("token id {id} at position {position} is not below the model's vocab_size {vocab}")]
    TokenOutOfRange {
        id: u32,
        position: usize,
        vocab: usize,
    },
    #[error("batch layout: {field} must be at least 1")]
    EmptyLayout { field: &'static str },
    #[error("line {line}{}: {reason}", field_of(field))]
    Record {
        line: usize,
        field: String,
        reason: String,
    },
    #[error("the chat record at line {line}: {reason}")]
    Template { line: usize, reason: String },
    #[error("tokenizer_config.json{}: {reason}", field_of(field))]
    TokenizerConfig { field: String, reason: String },
    #[error("{what} records need {needs}, which tokenizer {tokenizer:?} does not give; {fix}")]
    TokenizerLacks {
        what: &'static str,
        needs: &'static str,
        tokenizer: String,
        fix: &'static str,
    },
    #[error("no target token of the data counts in the loss (every one is masked)")]
    NothingCounted,
    #[error(
        "training step {step} holds no target token that counts in the loss: each of its \
         {sequences} sequences of {seq_len} tokens is masked whole (a prompt longer than \
         seq_len, say); give a longer training.seq_len, more sequences per step, or data \
         whose records fit"
    )]
    StepWithoutTargets {
        step: u64,
        sequences: usize,
        seq_len: usize,
    },
}

impl DataError {
    /// The job field at fault: the tokenizer (with its config) or the training data.
    pub fn param(&self) -> &'static str {
        match self {
            DataError::Tokenizer { .. }
            | DataError::TokenizerConfig { .. }
            | DataError::TokenizerLacks { .. } => "data.tokenizer",
            _ => "data.train",
        }
    }
}

/// The longest `training.seq_len` that `tokens` tokens hold a window of, if any.
fn shorter_seq_len(tokens: usize) -> String {
    match tokens {
        0 | 1 => String::new(),
        _ => format!(" or a training.seq_len of at most {}", tokens - 1),
    }
}

fn field_of(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!(", field {field}")
    }
}
