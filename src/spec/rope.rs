//! Rotary position embedding scaling: the variants transformers calls `rope_type` that this
//! project implements. Every other `rope_type` is refused where a config is read.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::validate::SpecError;

/// How rotary frequencies are rescaled for contexts longer than the model was trained on.
/// Absent means transformers' `default` (no scaling).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "rope_type", rename_all = "lowercase", deny_unknown_fields)]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (positions interpolated).
    Linear { factor: f64 },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth blend between,
    /// the bands set by wavelengths against `original_max_position_embeddings`.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: u64,
    },
}

impl RopeScaling {
    /// The values Llama 3.1's checkpoints ship with.
    pub const LLAMA_3_1: RopeScaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };

    /// The `rope_type` name transformers uses.
    pub fn name(&self) -> &'static str {
        match self {
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Llama3 { .. } => "llama3",
        }
    }

    /// Values the frequency formulas need, reported under `prefix` (e.g. `model.rope_scaling`).
    pub fn check(&self, prefix: &str, errors: &mut Vec<SpecError>) {
        let mut positive = |field: &str, value: f64| {
            if !(value.is_finite() && value > 0.0) {
                errors.push(SpecError::new(
                    format!("{prefix}.{field}"),
                    format!("must be a positive number, got {value}"),
                ));
            }
        };
        match *self {
            RopeScaling::Linear { factor } => positive("factor", factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("factor", factor);
                positive("low_freq_factor", low_freq_factor);
                positive("high_freq_factor", high_freq_factor);
                positive(
                    "original_max_position_embeddings",
                    original_max_position_embeddings as f64,
                );
                if high_freq_factor <= low_freq_factor {
                    errors.push(SpecError::new(
                        format!("{prefix}.high_freq_factor"),
                        format!(
                            "must be greater than low_freq_factor ({low_freq_factor}), got \
                             {high_freq_factor}"
                        ),
                    ));
                }
            }
        }
    }
}
