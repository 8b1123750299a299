//! The optimizer state (`optimizer.safetensors`, or its shards and index: `sharded`) and
//! `trainer_state.json`: what an exact resume needs beyond weights.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::exec::checkpoint::CheckpointError;
use crate::exec::checkpoint::safetensors_io::{F32View, write_f32_file};
use crate::exec::checkpoint::sharded::{OPTIMIZER, Shard, TensorSet};
use crate::exec::model::PartParams;
use crate::exec::optim::PartOptimState;

/// Where training stands. Batching is a pure function of the step, so the step fixes the
/// data position; the shuffle seed is the only randomness.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainerState {
    /// Steps completed.
    pub step: u64,
    /// Sequences consumed (step x sequences per step).
    pub data_position: u64,
    /// The seed of the data shuffle (epoch e uses stream e of this seed).
    pub rng_seed: u64,
    /// The loss of the last completed step.
    pub last_loss: Option<f64>,
    /// The validation loss evaluated after this checkpoint's step, when one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Validation so far, which early stopping's patience resumes from.
    #[serde(default)]
    pub validation: ValidationProgress,
}

/// The validation losses a run has seen: the lowest and when, and how many evaluations in a
/// row have not beaten, by more than early stopping's `min_delta`, the last one that did.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ValidationProgress {
    /// The last evaluation: the steps completed then and its loss.
    pub last_step: Option<u64>,
    pub last_val_loss: Option<f64>,
    /// The lowest validation loss so far (the earliest of equals) and its step.
    pub best_step: Option<u64>,
    pub best_val_loss: Option<f64>,
    /// The loss of the last evaluation that improved by more than `min_delta`.
    pub improved_val_loss: Option<f64>,
    pub evaluations_without_improvement: u64,
}

impl ValidationProgress {
    /// Records the evaluation after `step` steps; whether it improved by more than
    /// `min_delta` on the last evaluation that did (the first always does).
    pub fn record(&mut self, step: u64, val_loss: f64, min_delta: f64) -> bool {
        self.last_step = Some(step);
        self.last_val_loss = Some(val_loss);
        if self.best_val_loss.is_none_or(|best| val_loss < best) {
            self.best_step = Some(step);
            self.best_val_loss = Some(val_loss);
        }
        let improved = (self.improved_val_loss).is_none_or(|last| last - val_loss > min_delta);
        if improved {
            self.improved_val_loss = Some(val_loss);
            self.evaluations_without_improvement = 0;
        } else {
            self.evaluations_without_improvement += 1;
        }
        improved
    }

    /// The loss of the evaluation after `step` steps, if the last one was then.
    pub fn loss_at(&self, step: u64) -> Option<f64> {
        self.last_val_loss.filter(|_| self.last_step == Some(step))
    }
}

fn io_err(path: &Path, e: impl ToString) -> CheckpointError {
    CheckpointError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

impl TrainerState {
    pub fn save(&self, dir: &Path) -> Result<(), CheckpointError> {
        let path = dir.join("trainer_state.json");
        let text = serde_json::to_string_pretty(self).map_err(|e| io_err(&path, e))?;
        std::fs::write(&path, text).map_err(|e| CheckpointError::write(&path, e))
    }

    pub fn load(dir: &Path) -> Result<TrainerState, CheckpointError> {
        let path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
        serde_json::from_str(&text).map_err(|e| CheckpointError::Format {
            path,
            reason: e.to_string(),
        })
    }
}

/// Writes `shard` of AdamW's moments: those of the given parts, as `exp_avg.<name>` and
/// `exp_avg_sq.<name>` (nothing but the file for SGD).
pub fn save_optimizer(
    dir: &Path,
    shard: Shard,
    parts: &[(&PartParams, &PartOptimState)],
) -> Result<(), CheckpointError> {
    let mut tensors = Vec::new();
    for (p, st) in parts {
        for (i, name) in p.counted() {
            for (prefix, list) in [("exp_avg", &st.exp_avg), ("exp_avg_sq", &st.exp_avg_sq)] {
                if let Some(t) = list.get(i) {
                    let view = F32View {
                        shape: t.shape().to_vec(),
                        data: t.data(),
                    };
                    tensors.push((format!("{prefix}.{name}"), view));
                }
            }
        }
    }
    let meta: Option<HashMap<String, String>> = None;
    write_f32_file(&dir.join(shard.file(OPTIMIZER)), tensors, meta)
}

/// Reads the moments saved by `save_optimizer` (every shard of them) into already allocated
/// state.
pub fn load_optimizer(
    file: &TensorSet,
    parts: &mut [(&PartParams, &mut PartOptimState)],
) -> Result<(), CheckpointError> {
    for (p, st) in parts.iter_mut() {
        for (i, name) in p.names.iter().enumerate() {
            for (prefix, list) in [
                ("exp_avg", &mut st.exp_avg),
                ("exp_avg_sq", &mut st.exp_avg_sq),
            ] {
                let Some(t) = list.get_mut(i) else { continue };
                let key = format!("{prefix}.{name}");
                let (shape, data) = file.f32(&key)?;
                if shape != t.shape() {
                    return Err(CheckpointError::ShapeMismatch {
                        name: key,
                        found: shape,
                        expected: t.shape().to_vec(),
                    });
                }
                t.data_mut().copy_from_slice(&data);
            }
        }
    }
    Ok(())
}
