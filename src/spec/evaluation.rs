//! The rules of the training settings that read the validation data or prune checkpoints:
//! `training.eval_every`, `training.early_stopping` and `training.keep_checkpoints`.

use super::training::{DataSpec, TrainingSpec};
use super::validate::SpecError;

impl TrainingSpec {
    /// Whether the validation loss is evaluated after `step` of `total` steps: every
    /// `eval_every` steps, else at every `checkpoint_every`; and after the last step.
    pub fn evaluates_at(&self, step: u64, total: u64) -> bool {
        let every = self.eval_every.or(self.checkpoint_every);
        step == total || every.is_some_and(|k| k > 0 && step.is_multiple_of(k))
    }

    pub(super) fn check_evaluation(&self, data: &DataSpec, errors: &mut Vec<SpecError>) {
        let needs_data = |field: &str, errors: &mut Vec<SpecError>| {
            if data.validation.is_none() {
                errors.push(SpecError::new(
                    format!("training.{field}"),
                    "evaluates the validation loss, but data.validation names no validation \
                     data: add data.validation or leave this out",
                ));
            }
        };
        if let Some(every) = self.eval_every {
            needs_data("eval_every", errors);
            if every == 0 {
                errors.push(SpecError::new(
                    "training.eval_every",
                    "must be at least 1, or left out to evaluate at every checkpoint and after \
                     the last step",
                ));
            }
        }
        if let Some(stopping) = &self.early_stopping {
            needs_data("early_stopping", errors);
            if stopping.patience == 0 {
                errors.push(SpecError::new(
                    "training.early_stopping.patience",
                    "must be at least 1 (evaluations without improvement before stopping)",
                ));
            }
            let delta = stopping.min_delta;
            if !(delta.is_finite() && delta >= 0.0) {
                errors.push(SpecError::new(
                    "training.early_stopping.min_delta",
                    format!("must be zero or a positive number, got {delta}"),
                ));
            }
        }
        if self.keep_checkpoints == Some(0) {
            errors.push(SpecError::new(
                "training.keep_checkpoints",
                "must be at least 1 (a resume needs the latest checkpoint), or left out to keep \
                 every checkpoint",
            ));
        }
    }
}
