//! The model's hyper-parameters (their Hugging Face `config.json` form is `hf_config`).

use crate::exec::backend::cpu::kernels::rope::Rope;
use crate::exec::model::ModelError;
use crate::plan::inventory::ModelDims;
use crate::spec::{Architecture, ModelArch, RopeScaling};

/// A Llama-style decoder: sizes, the numeric constants the kernels need, and the Hugging Face
/// class it is saved as.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlamaConfig {
    pub dims: ModelDims,
    pub rms_norm_eps: f32,
    pub rope: Rope,
    pub architecture: Architecture,
    /// The context length `config.json` states (it does not change training): kept so a
    /// checkpoint says what the one it came from said.
    pub max_position_embeddings: usize,
}

impl LlamaConfig {
    /// Checks what the kernels rely on: heads divide hidden, kv heads divide heads, even head_dim.
    pub fn validate(&self) -> Result<(), ModelError> {
        let d = &self.dims;
        let bad = |field: &str, reason: String| {
            Err(ModelError::BadConfig {
                field: field.to_string(),
                reason,
            })
        };
        for (field, value) in [
            ("hidden_size", d.hidden),
            ("num_layers", d.layers),
            ("num_heads", d.heads),
            ("num_kv_heads", d.kv_heads),
            ("intermediate_size", d.ffn),
            ("vocab_size", d.vocab),
        ] {
            if value == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if !d.hidden.is_multiple_of(d.heads) {
            return bad(
                "num_heads",
                format!("{} does not divide hidden_size {}", d.heads, d.hidden),
            );
        }
        if !d.heads.is_multiple_of(d.kv_heads) {
            return bad(
                "num_kv_heads",
                format!("{} does not divide num_heads {}", d.kv_heads, d.heads),
            );
        }
        if !d.head_dim().is_multiple_of(2) {
            return bad(
                "num_heads",
                format!("head_dim {} must be even for RoPE", d.head_dim()),
            );
        }
        if !(self.rms_norm_eps > 0.0 && self.rope.theta > 0.0) {
            return bad("rms_norm_eps/rope_theta", "must be positive".into());
        }
        Ok(())
    }

    /// The architecture a job spec resolved to.
    pub fn from_arch(a: &ModelArch) -> Result<LlamaConfig, ModelError> {
        let cfg = LlamaConfig {
            dims: a.dims(),
            rms_norm_eps: a.rms_norm_eps as f32,
            rope: Rope {
                theta: a.rope_theta as f32,
                scaling: a.rope_scaling,
            },
            architecture: a.architecture,
            max_position_embeddings: a
                .max_position_embeddings
                .unwrap_or_else(|| default_context(a.rope_scaling)),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The architecture as a job spec states it.
    pub fn arch(&self) -> ModelArch {
        let d = &self.dims;
        ModelArch {
            architecture: self.architecture,
            hidden_size: d.hidden,
            num_layers: d.layers,
            num_heads: d.heads,
            num_kv_heads: d.kv_heads,
            intermediate_size: d.ffn,
            vocab_size: d.vocab,
            rms_norm_eps: self.rms_norm_eps as f64,
            rope_theta: self.rope.theta as f64,
            rope_scaling: self.rope.scaling,
            max_position_embeddings: Some(self.max_position_embeddings),
            tie_embeddings: d.tied_embeddings,
        }
    }
}

/// A context length for a model that states none: 4096, or what Llama 3.1's scaling stretches
/// its original context to.
pub fn default_context(scaling: Option<RopeScaling>) -> usize {
    match scaling {
        Some(RopeScaling::Llama3 {
            factor,
            original_max_position_embeddings,
            ..
        }) => 4096.max((original_max_position_embeddings as f64 * factor) as usize),
        _ => 4096,
    }
}
