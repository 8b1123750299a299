//! Data and training settings of a job.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::validate::{SpecError, positive};

/// Where the tokens come from. Paths on the CLI, file ids in the service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Plain text, or JSONL records of one kind: `{"text"}` documents, `{"prompt",
    /// "completion"}` pairs (the completion counts in the loss) or chat `{"messages"}` (the
    /// assistant turns count).
    pub train: String,
    /// Held-out data of the same kind, evaluated forward only (`val_loss`) at every
    /// checkpoint and after the last step, or every `training.eval_every` steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<String>,
    /// `bytes` (token = byte value) or a Hugging Face `tokenizer.json`, with the
    /// `tokenizer_config.json` (`eos_token`, `chat_template`) and `chat_template.jinja` beside
    /// it that JSONL data needs.
    #[serde(default = "default_tokenizer")]
    pub tokenizer: String,
}

pub const BYTES_TOKENIZER: &str = "bytes";

fn default_tokenizer() -> String {
    BYTES_TOKENIZER.to_owned()
}

impl DataSpec {
    /// What the tokenizer asks of a model with `vocab` token ids.
    pub(super) fn check_vocab(&self, vocab: usize, errors: &mut Vec<SpecError>) {
        if self.tokenizer == BYTES_TOKENIZER && vocab < 256 {
            errors.push(SpecError::new(
                "model.vocab_size",
                format!("the bytes tokenizer needs vocab_size >= 256, got {vocab}"),
            ));
        }
    }

    pub(super) fn check(&self, errors: &mut Vec<SpecError>) {
        if self.train.trim().is_empty() {
            errors.push(SpecError::new("data.train", "must name the training data"));
        }
        if self.tokenizer.trim().is_empty() {
            errors.push(SpecError::new(
                "data.tokenizer",
                "must be \"bytes\" or name a tokenizer.json",
            ));
        }
        if self
            .validation
            .as_deref()
            .is_some_and(|v| v.trim().is_empty())
        {
            errors.push(SpecError::new(
                "data.validation",
                "must name the validation data, or be left out",
            ));
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum OptimizerSpec {
    /// PyTorch's AdamW: decoupled weight decay, bias correction.
    Adamw {
        lr: f64,
        #[serde(default = "default_betas")]
        betas: [f64; 2],
        #[serde(default = "default_eps")]
        eps: f64,
        #[serde(default = "default_weight_decay")]
        weight_decay: f64,
    },
    /// Plain SGD, no momentum.
    Sgd { lr: f64 },
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.95]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    0.1
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        OptimizerSpec::Adamw {
            lr: 3e-4,
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: default_weight_decay(),
        }
    }
}

impl OptimizerSpec {
    pub fn lr(&self) -> f64 {
        match self {
            OptimizerSpec::Adamw { lr, .. } | OptimizerSpec::Sgd { lr } => *lr,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LrDecay {
    #[default]
    Constant,
    /// Cosine from the peak rate after warm-up down to zero at the last step.
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainingSpec {
    pub seq_len: usize,
    pub micro_batch_size: usize,
    pub microbatches: usize,
    /// Optimizer steps to train; give this or `epochs`, not both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// Passes over the training data's windows, instead of `steps`: the run takes
    /// `ceil(epochs x windows / (micro_batch_size x microbatches))` steps, where `windows =
    /// floor((tokens - 1) / seq_len)` (the last step may take the first windows of one more
    /// pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u64>,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    /// Global gradient-norm clip; `null` turns clipping off.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: Option<f64>,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default)]
    pub lr_decay: LrDecay,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub shuffle: bool,
    /// Save a checkpoint every this many steps (the final one is always saved).
    #[serde(default)]
    pub checkpoint_every: Option<u64>,
    /// Keep only the latest this many checkpoints, and the best by validation loss when
    /// there is validation data; the others are deleted (never one a resume or another job's
    /// `model.init.from` needs). Left out: every checkpoint is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_checkpoints: Option<u64>,
    /// With `data.validation`: evaluate the validation loss every this many steps, and after
    /// the last. Left out: at every `checkpoint_every` and after the last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<u64>,
    /// With `data.validation`: stop early when the validation loss stops improving; the job
    /// succeeds with `stopped_early: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStoppingSpec>,
    #[serde(default)]
    pub precision: PrecisionSpec,
    /// What the job does when a checkpoint cannot be written for want of storage (no space,
    /// a read-only file system, a quota): `"fail"` (the default; `code: storage_full`) or
    /// `"pause"` (resumable once space is freed).
    #[serde(default = "default_on_storage_error")]
    pub on_storage_error: String,
}

/// Stop training once `patience` evaluations in a row have not improved: an evaluation
/// improves when its loss is more than `min_delta` below the last one that improved (the first
/// always does).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EarlyStoppingSpec {
    /// Evaluations without improvement before the run stops (at least 1).
    pub patience: u64,
    /// How much lower than the last improvement a validation loss must be to count as one
    /// (0 or more; default 0: any decrease).
    #[serde(default)]
    pub min_delta: f64,
}

/// `training.on_storage_error`, once validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoragePolicy {
    Fail,
    Pause,
}

const STORAGE_POLICIES: [(&str, StoragePolicy); 2] = [
    ("fail", StoragePolicy::Fail),
    ("pause", StoragePolicy::Pause),
];

fn default_on_storage_error() -> String {
    "fail".to_owned()
}

/// How activations are stored and matrix products computed. Weights, gradients and optimizer
/// state are f32 either way, and so are checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionSpec {
    /// f32 activations; on CUDA devices the matrix products run on tensor cores in TF32.
    #[default]
    F32,
    /// bf16 activations and matrix products (f32 accumulation): half the activation memory.
    /// CUDA devices only.
    Bf16,
}

fn check_warmup(warmup_steps: u64, steps: u64, errors: &mut Vec<SpecError>) {
    if warmup_steps > steps {
        errors.push(SpecError::new(
            "training.warmup_steps",
            format!("{warmup_steps} warm-up steps exceed the {steps} training steps"),
        ));
    }
}

fn default_grad_clip() -> Option<f64> {
    Some(1.0)
}

impl TrainingSpec {
    /// Sequences in one optimizer step.
    pub fn sequences_per_step(&self) -> usize {
        self.micro_batch_size * self.microbatches
    }

    /// The run's optimizer steps for training data of `windows` sequences: `steps`, or
    /// `epochs` passes over the windows, the last step rounded up. A spec without either
    /// (refused by `check`) has none.
    pub fn total_steps(&self, windows: usize) -> Result<u64, SpecError> {
        let steps = match (self.steps, self.epochs) {
            (Some(steps), _) => steps,
            (None, Some(epochs)) => {
                let sequences = epochs.saturating_mul(windows as u64);
                sequences.div_ceil(self.sequences_per_step().max(1) as u64)
            }
            (None, None) => 0,
        };
        let mut errors = Vec::new();
        check_warmup(self.warmup_steps, steps, &mut errors);
        match errors.pop() {
            Some(e) => Err(e),
            None => Ok(steps),
        }
    }

    /// `None` for a value `check` refuses.
    pub fn storage_policy(&self) -> Option<StoragePolicy> {
        STORAGE_POLICIES
            .iter()
            .find(|(name, _)| *name == self.on_storage_error)
            .map(|(_, policy)| *policy)
    }

    pub(super) fn check(&self, errors: &mut Vec<SpecError>) {
        positive("training.seq_len", self.seq_len, errors);
        if self.storage_policy().is_none() {
            errors.push(SpecError::new(
                "training.on_storage_error",
                format!(
                    "must be \"fail\" or \"pause\", got {:?}",
                    self.on_storage_error
                ),
            ));
        }
        positive("training.micro_batch_size", self.micro_batch_size, errors);
        positive("training.microbatches", self.microbatches, errors);
        match (self.steps, self.epochs) {
            (Some(_), Some(_)) => errors.push(SpecError::new(
                "training.epochs",
                "give training.steps or training.epochs, not both",
            )),
            (None, None) => errors.push(SpecError::new(
                "training.steps",
                "give training.steps (optimizer steps) or training.epochs (passes over the data)",
            )),
            (Some(steps), None) => positive("training.steps", steps as usize, errors),
            (None, Some(epochs)) => positive("training.epochs", epochs as usize, errors),
        }
        let lr = self.optimizer.lr();
        if !(lr.is_finite() && lr > 0.0) {
            errors.push(SpecError::new(
                "training.optimizer.lr",
                format!("must be a positive number, got {lr}"),
            ));
        }
        if let OptimizerSpec::Adamw {
            betas,
            eps,
            weight_decay,
            ..
        } = &self.optimizer
        {
            for (i, beta) in betas.iter().enumerate() {
                if !(0.0..1.0).contains(beta) {
                    errors.push(SpecError::new(
                        format!("training.optimizer.betas[{i}]"),
                        format!("must be in [0, 1), got {beta}"),
                    ));
                }
            }
            if !(eps.is_finite() && *eps > 0.0) {
                errors.push(SpecError::new(
                    "training.optimizer.eps",
                    format!("must be a positive number, got {eps}"),
                ));
            }
            if !(weight_decay.is_finite() && *weight_decay >= 0.0) {
                errors.push(SpecError::new(
                    "training.optimizer.weight_decay",
                    format!("must be zero or positive, got {weight_decay}"),
                ));
            }
        }
        if let Some(clip) = self.grad_clip
            && !(clip.is_finite() && clip > 0.0)
        {
            errors.push(SpecError::new(
                "training.grad_clip",
                format!("must be a positive number or null, got {clip}"),
            ));
        }
        if let Some(steps) = self.steps {
            check_warmup(self.warmup_steps, steps, errors);
        }
        if self.checkpoint_every == Some(0) {
            errors.push(SpecError::new(
                "training.checkpoint_every",
                "must be at least 1, or left out to save only the final checkpoint",
            ));
        }
    }
}

#[cfg(test)]
#[path = "training_tests.rs"]
mod tests;
