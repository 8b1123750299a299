//! The model part of a job: a Llama architecture and where its initial weights come from.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::rope::RopeScaling;
use super::validate::{SpecError, positive};
use crate::plan::inventory::ModelDims;

/// The Hugging Face model class a job trains and writes back. All compute Llama's layers;
/// a Mistral is a Llama under another name once its sliding window is off (`null`), a Qwen2
/// adds biases to its query, key and value projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    #[default]
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub const ALL: [Architecture; 3] = [
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Qwen2,
    ];

    /// `config.json`'s `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
    }

    /// `config.json`'s `architectures` entry.
    pub fn class_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// Whether the query, key and value projections carry biases.
    pub fn qkv_bias(self) -> bool {
        self == Architecture::Qwen2
    }
}

/// Initial weights: a seeded random init, or a Hugging Face Llama directory (CLI: a path;
/// service: a model file id, or `job_…` for that job's latest checkpoint), or a given
/// checkpoint of a job (service only). Only the weights are taken: optimizer state and step
/// start fresh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(
    untagged,
    deny_unknown_fields,
    expecting = "model.init is {\"seed\": N}, {\"from\": \"<model file id, directory or job_…>\"} or {\"from\": {\"job\": \"job_…\", \"step\": N}}"
)]
pub enum ModelInit {
    Seed { seed: u64 },
    From { from: String },
    FromCheckpoint { from: JobCheckpointRef },
}

/// One checkpoint of a job of the same tenant: `{"job": "job_…", "step": 120}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobCheckpointRef {
    pub job: String,
    pub step: u64,
}

/// How job ids begin, which no uploaded file id or checkpoint path does.
const JOB_ID_PREFIX: &str = "job_";

impl ModelInit {
    /// The job (and step, when given; else its latest) whose checkpoint the weights come from.
    pub fn source_job(&self) -> Option<(&str, Option<u64>)> {
        match self {
            ModelInit::From { from } if from.starts_with(JOB_ID_PREFIX) => Some((from, None)),
            ModelInit::FromCheckpoint { from } => Some((&from.job, Some(from.step))),
            _ => None,
        }
    }

    /// The Hugging Face directory to load, if any. A job's checkpoint is refused here: only
    /// the service, which keeps the jobs, turns one into a directory.
    pub fn directory(&self) -> Result<Option<&str>, SpecError> {
        if let Some((job, _)) = self.source_job() {
            return Err(SpecError::new(
                "model.init.from",
                format!(
                    "{job:?} names a job's checkpoint, which only the service resolves; here give                      a checkpoint directory path (e.g. ./{job} for a directory of that name)"
                ),
            ));
        }
        Ok(match self {
            ModelInit::From { from } => Some(from),
            _ => None,
        })
    }
}

impl Default for ModelInit {
    fn default() -> Self {
        ModelInit::Seed { seed: 0 }
    }
}

/// Architecture fields may be left out when `init.from` names pretrained weights: they are then
/// read from its `config.json`, and any that are given must agree with it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// `llama` (the default for a random init), `mistral` or `qwen2`; with `init.from` the checkpoint's
    /// `config.json` decides, and a value given here must agree with it.
    pub architecture: Option<Architecture>,
    pub hidden_size: Option<usize>,
    pub num_layers: Option<usize>,
    pub num_heads: Option<usize>,
    /// Defaults to `num_heads` (no grouped-query attention).
    pub num_kv_heads: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub vocab_size: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    /// Rotary scaling (`{"rope_type": "llama3", ...}` or `{"rope_type": "linear", ...}`);
    /// absent means none.
    pub rope_scaling: Option<RopeScaling>,
    /// One weight for the embedding and the LM head (`tie_word_embeddings` in `config.json`;
    /// Llama 3.2 1B/3B, SmolLM2, small Qwen2.5). Default false for a random init; with
    /// `init.from` the checkpoint's `config.json` decides, and a value given here must agree.
    pub tie_embeddings: Option<bool>,
    #[serde(default)]
    pub init: ModelInit,
}

/// A fully known Llama architecture.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelArch {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// A pretrained model's stated context length, written back unchanged.
    pub max_position_embeddings: Option<usize>,
    /// The LM head reads the embedding's table (`tie_word_embeddings`).
    #[serde(default)]
    pub tie_embeddings: bool,
}

pub const DEFAULT_RMS_NORM_EPS: f64 = 1e-5;
pub const DEFAULT_ROPE_THETA: f64 = 10000.0;

impl ModelArch {
    pub fn dims(&self) -> ModelDims {
        ModelDims {
            hidden: self.hidden_size,
            layers: self.num_layers,
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            ffn: self.intermediate_size,
            vocab: self.vocab_size,
            qkv_bias: self.architecture.qkv_bias(),
            tied_embeddings: self.tie_embeddings,
        }
    }

    /// Shape rules the kernels rely on, reported under `prefix` (e.g. `model`).
    pub fn check(&self, prefix: &str, errors: &mut Vec<SpecError>) {
        let p = |f: &str| format!("{prefix}.{f}");
        positive(&p("hidden_size"), self.hidden_size, errors);
        positive(&p("num_layers"), self.num_layers, errors);
        positive(&p("num_heads"), self.num_heads, errors);
        positive(&p("num_kv_heads"), self.num_kv_heads, errors);
        positive(&p("intermediate_size"), self.intermediate_size, errors);
        positive(&p("vocab_size"), self.vocab_size, errors);
        if self.num_heads > 0 && !self.hidden_size.is_multiple_of(self.num_heads) {
            errors.push(SpecError::new(
                p("num_heads"),
                format!(
                    "{} heads do not divide hidden_size {}; divisors near it: {}",
                    self.num_heads,
                    self.hidden_size,
                    nearby_divisors(self.hidden_size, self.num_heads)
                ),
            ));
        } else if self.num_heads > 0 && !(self.hidden_size / self.num_heads).is_multiple_of(2) {
            errors.push(SpecError::new(
                p("num_heads"),
                format!(
                    "head_dim = hidden_size / num_heads = {} must be even for rotary embeddings",
                    self.hidden_size / self.num_heads
                ),
            ));
        }
        if self.num_kv_heads > 0 && !self.num_heads.is_multiple_of(self.num_kv_heads) {
            errors.push(SpecError::new(
                p("num_kv_heads"),
                format!(
                    "{} key/value heads do not divide num_heads {}; divisors near it: {}",
                    self.num_kv_heads,
                    self.num_heads,
                    nearby_divisors(self.num_heads, self.num_kv_heads)
                ),
            ));
        }
        for (field, value) in [
            ("rms_norm_eps", self.rms_norm_eps),
            ("rope_theta", self.rope_theta),
        ] {
            if !(value.is_finite() && value > 0.0) {
                errors.push(SpecError::new(
                    p(field),
                    format!("must be a positive number, got {value}"),
                ));
            }
        }
        if let Some(scaling) = &self.rope_scaling {
            scaling.check(&p("rope_scaling"), errors);
        }
    }
}

/// Divisors of `n` closest to `near`, for error messages.
fn nearby_divisors(n: usize, near: usize) -> String {
    let mut divisors: Vec<usize> = (1..=n).filter(|d| n.is_multiple_of(*d)).collect();
    divisors.sort_by_key(|d| d.abs_diff(near));
    let mut closest: Vec<usize> = divisors.into_iter().take(3).collect();
    closest.sort_unstable();
    closest
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl ModelSpec {
    /// The architecture when every required field is given (random init).
    pub fn explicit_arch(&self) -> Option<ModelArch> {
        Some(ModelArch {
            architecture: self.architecture.unwrap_or_default(),
            hidden_size: self.hidden_size?,
            num_layers: self.num_layers?,
            num_heads: self.num_heads?,
            num_kv_heads: self.num_kv_heads.or(self.num_heads)?,
            intermediate_size: self.intermediate_size?,
            vocab_size: self.vocab_size?,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(DEFAULT_RMS_NORM_EPS),
            rope_theta: self.rope_theta.unwrap_or(DEFAULT_ROPE_THETA),
            rope_scaling: self.rope_scaling,
            max_position_embeddings: None,
            tie_embeddings: self.tie_embeddings.unwrap_or(false),
        })
    }

    /// Combines the fields given here with a pretrained model's architecture: any field given
    /// must equal the pretrained value.
    pub fn merge_pretrained(&self, pretrained: &ModelArch) -> Result<ModelArch, Vec<SpecError>> {
        let mut errors = Vec::new();
        let mut agree = |field: &str, given: Option<f64>, actual: f64| {
            if let Some(given) = given
                && given != actual
            {
                errors.push(SpecError::new(
                    format!("model.{field}"),
                    format!("is {given} but the pretrained model's config.json says {actual}; leave it out or set {actual}"),
                ));
            }
        };
        let as_f = |v: Option<usize>| v.map(|v| v as f64);
        agree(
            "hidden_size",
            as_f(self.hidden_size),
            pretrained.hidden_size as f64,
        );
        agree(
            "num_layers",
            as_f(self.num_layers),
            pretrained.num_layers as f64,
        );
        agree(
            "num_heads",
            as_f(self.num_heads),
            pretrained.num_heads as f64,
        );
        agree(
            "num_kv_heads",
            as_f(self.num_kv_heads),
            pretrained.num_kv_heads as f64,
        );
        agree(
            "intermediate_size",
            as_f(self.intermediate_size),
            pretrained.intermediate_size as f64,
        );
        agree(
            "vocab_size",
            as_f(self.vocab_size),
            pretrained.vocab_size as f64,
        );
        agree("rms_norm_eps", self.rms_norm_eps, pretrained.rms_norm_eps);
        agree("rope_theta", self.rope_theta, pretrained.rope_theta);
        if let Some(given) = self.architecture
            && given != pretrained.architecture
        {
            errors.push(SpecError::new(
                "model.architecture",
                format!(
                    "is {} but the pretrained model's config.json says {}; leave it out or set {}",
                    given.model_type(),
                    pretrained.architecture.model_type(),
                    pretrained.architecture.model_type()
                ),
            ));
        }
        if let Some(given) = self.tie_embeddings
            && given != pretrained.tie_embeddings
        {
            errors.push(SpecError::new(
                "model.tie_embeddings",
                format!(
                    "is {given} but the pretrained model's config.json says tie_word_embeddings: \
                     {}; leave it out or set {}",
                    pretrained.tie_embeddings, pretrained.tie_embeddings
                ),
            ));
        }
        if self.rope_scaling.is_some() && self.rope_scaling != pretrained.rope_scaling {
            errors.push(SpecError::new(
                "model.rope_scaling",
                format!(
                    "is {:?} but the pretrained model's config.json says {:?}; leave it out",
                    self.rope_scaling, pretrained.rope_scaling
                ),
            ));
        }
        if errors.is_empty() {
            Ok(*pretrained)
        } else {
            Err(errors)
        }
    }

    pub(super) fn check(&self, errors: &mut Vec<SpecError>) {
        match (&self.init, self.explicit_arch()) {
            (ModelInit::Seed { .. }, None) => {
                for (field, given) in [
                    ("hidden_size", self.hidden_size.is_some()),
                    ("num_layers", self.num_layers.is_some()),
                    ("num_heads", self.num_heads.is_some()),
                    ("intermediate_size", self.intermediate_size.is_some()),
                    ("vocab_size", self.vocab_size.is_some()),
                ] {
                    if !given {
                        errors.push(SpecError::new(
                            format!("model.{field}"),
                            "is required when the model starts from a random init (model.init.seed)",
                        ));
                    }
                }
            }
            (_, Some(arch)) => arch.check("model", errors),
            (ModelInit::From { from }, None) => {
                if from.trim().is_empty() {
                    errors.push(SpecError::new(
                        "model.init.from",
                        "must name a model directory or file",
                    ));
                }
            }
            (ModelInit::FromCheckpoint { .. }, None) => {}
        }
        if let ModelInit::FromCheckpoint { from } = &self.init
            && !from.job.starts_with(JOB_ID_PREFIX)
        {
            errors.push(SpecError::new(
                "model.init.from.job",
                format!("{:?} is not a job id (job_…)", from.job),
            ));
        }
    }
}
