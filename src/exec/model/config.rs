//! The model's hyper-parameters and their Hugging Face `config.json` form.

use serde_json::{Value, json};

use crate::exec::model::ModelError;
use crate::plan::inventory::ModelDims;
use crate::spec::ModelArch;

/// A Llama-style decoder: sizes plus the two numeric constants the kernels need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlamaConfig {
    pub dims: ModelDims,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
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
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return bad("rms_norm_eps/rope_theta", "must be positive".into());
        }
        Ok(())
    }

    /// The architecture a job spec resolved to.
    pub fn from_arch(a: &ModelArch) -> Result<LlamaConfig, ModelError> {
        let cfg = LlamaConfig {
            dims: a.dims(),
            rms_norm_eps: a.rms_norm_eps as f32,
            rope_theta: a.rope_theta as f32,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a transformers `LlamaConfig` JSON (`rope_theta` at the top or under `rope_parameters`).
    pub fn from_hf_json(v: &Value) -> Result<LlamaConfig, ModelError> {
        let int = |key: &str| -> Result<usize, ModelError> {
            v.get(key)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| ModelError::BadConfig {
                    field: key.to_string(),
                    reason: "missing or not a whole number".into(),
                })
        };
        let heads = int("num_attention_heads")?;
        let hidden = int("hidden_size")?;
        let kv_heads = match v.get("num_key_value_heads") {
            Some(Value::Null) | None => heads,
            Some(_) => int("num_key_value_heads")?,
        };
        if let Some(hd) = v.get("head_dim").and_then(Value::as_u64)
            && heads > 0
            && hd as usize * heads != hidden
        {
            return Err(ModelError::BadConfig {
                field: "head_dim".into(),
                reason: format!("{hd} x {heads} heads != hidden_size {hidden}; unsupported"),
            });
        }
        if v.get("tie_word_embeddings").and_then(Value::as_bool) == Some(true) {
            return Err(ModelError::BadConfig {
                field: "tie_word_embeddings".into(),
                reason: "tied embeddings are not supported (the LM head is its own weight)".into(),
            });
        }
        let theta = v
            .get("rope_theta")
            .or_else(|| v.get("rope_parameters").and_then(|r| r.get("rope_theta")))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let eps = v
            .get("rms_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-6);
        let cfg = LlamaConfig {
            dims: ModelDims {
                hidden,
                layers: int("num_hidden_layers")?,
                heads,
                kv_heads,
                ffn: int("intermediate_size")?,
                vocab: int("vocab_size")?,
            },
            rms_norm_eps: eps as f32,
            rope_theta: theta as f32,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// A `config.json` that transformers' `LlamaForCausalLM.from_pretrained` accepts.
    pub fn to_hf_json(&self) -> Value {
        let d = &self.dims;
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": d.hidden,
            "num_hidden_layers": d.layers,
            "num_attention_heads": d.heads,
            "num_key_value_heads": d.kv_heads,
            "head_dim": d.head_dim(),
            "intermediate_size": d.ffn,
            "vocab_size": d.vocab,
            "rms_norm_eps": self.rms_norm_eps as f64,
            "rope_theta": self.rope_theta as f64,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": false,
            "max_position_embeddings": 4096,
            "initializer_range": 0.02,
            "torch_dtype": "float32",
        })
    }
}
