//! Validation loss: `data.validation`'s windows, cut as the training data's are (sequence i
//! is tokens `[i*S, i*S+S]`, targets shifted by one, a last partial window dropped), read in
//! order in micro-batches of the training's `micro_batch_size` sequences (the last one may
//! hold fewer) and run forward only on the run's own devices. `val_loss` is the mean
//! cross-entropy over every counted target of every window.

use std::path::Path;
use std::time::Instant;

use crate::data::{BatchLayout, Batcher, DataError, Microbatch, Tokenizer};
use crate::exec::model::counted_tokens;
use crate::spec::{JobSpec, ModelArch, SpecError};

use super::RunError;

const PARAM: &str = "data.validation";

/// The validation data, cut into the micro-batches every evaluation runs.
#[derive(Debug)]
pub struct ValidationSet {
    batches: Vec<Microbatch>,
    /// Counted targets over every window.
    targets: u64,
    windows: usize,
}

/// What one evaluation measured.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Evaluation {
    /// Steps completed when it ran.
    pub step: u64,
    pub val_loss: f64,
    /// Counted target tokens and whole windows evaluated.
    pub val_targets: u64,
    pub val_windows: u64,
    pub eval_time_s: f64,
}

impl ValidationSet {
    /// The spec's validation data, if it names any; a problem with it is the user's, named
    /// by `data.validation` (or `data.tokenizer`).
    pub fn load(spec: &JobSpec, arch: &ModelArch) -> Result<Option<ValidationSet>, RunError> {
        let Some(path) = &spec.data.validation else {
            return Ok(None);
        };
        let t = &spec.training;
        let blame = |e: DataError| match e.param() {
            "data.tokenizer" => RunError::Data(e),
            _ => RunError::Spec(vec![SpecError::new(PARAM, e.to_string())]),
        };
        let tokenizer = Tokenizer::load(&spec.data.tokenizer)?;
        let corpus = tokenizer.corpus_of_file(Path::new(path)).map_err(blame)?;
        let layout = BatchLayout {
            seq_len: t.seq_len,
            micro_batch_size: t.micro_batch_size,
            microbatches: 1,
            shuffle: false,
            seed: 0,
        };
        let windows = Batcher::of_corpus(&corpus, arch.vocab_size, layout).map_err(blame)?;
        let count = windows.windows();
        let batches: Vec<Microbatch> = (0..count)
            .step_by(t.micro_batch_size)
            .enumerate()
            .map(|(i, first)| windows.window_batch(i, first..first + t.micro_batch_size))
            .collect();
        let targets = counted_tokens(&batches).map_err(|_| {
            RunError::Spec(vec![SpecError::new(
                PARAM,
                format!(
                    "none of its {count} whole windows of {} tokens has a target that counts \
                     in the loss",
                    t.seq_len
                ),
            )])
        })?;
        Ok(Some(ValidationSet {
            batches,
            targets: targets as u64,
            windows: count,
        }))
    }

    pub fn batches(&self) -> &[Microbatch] {
        &self.batches
    }

    /// The evaluation of a loss summed over every batch, after `step` steps, begun at
    /// `started`.
    pub fn evaluation(&self, step: u64, loss_sum: f64, started: Instant) -> Evaluation {
        Evaluation {
            step,
            val_loss: loss_sum / self.targets as f64,
            val_targets: self.targets,
            val_windows: self.windows as u64,
            eval_time_s: started.elapsed().as_secs_f64(),
        }
    }
}
