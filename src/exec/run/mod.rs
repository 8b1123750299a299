//! A training run from a job spec, the one path the CLI's `train` and the service's workers
//! share: resolve the model and the data, plan for the devices, place the model, then step,
//! report and checkpoint until done or told to stop.

mod checkpointing;
mod device_kind;
mod drive;
mod error;
mod evaluate;
mod host_budget;
mod over_ranks;
mod rank_links;
mod replicas;
mod setup;
mod training_pipeline;

use std::path::{Path, PathBuf};
use std::time::Instant;

pub use device_kind::DeviceKind;
pub use drive::drive;
pub use error::RunError;
pub use evaluate::{Evaluation, ValidationSet};
pub use setup::{count_steps, gpu_budget, gpu_precision, plan_job, plan_on_gpu, resolve_arch};
use training_pipeline::TrainingPipeline;

use crate::data::Batcher;
use crate::exec::checkpoint::trainer_state::ValidationProgress;
use crate::exec::model::LlamaConfig;
use crate::plan::search::Answer;
use crate::spec::JobSpec;

/// What one optimizer step measured.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepMetrics {
    /// Steps completed, counting this one (1 for the first).
    pub step: u64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub step_time_s: f64,
    /// Each device's measured peak so far.
    pub device_peak_bytes: Vec<u64>,
    /// Seconds each device spent in gradient reductions across replicas in this step
    /// (waiting for the other replicas included).
    pub device_reduction_s: Vec<f64>,
    /// The validation loss evaluated after this step, when one was.
    pub val_loss: Option<f64>,
}

/// A placed model, its data and its plan, ready to step.
pub struct Run {
    pub spec: JobSpec,
    /// The chosen plan with its predictions and the runners-up.
    pub answer: Answer,
    pipeline: Box<dyn TrainingPipeline>,
    batcher: Batcher,
    /// `training.steps`, or the steps its `epochs` come to over the data.
    total_steps: u64,
    /// `data.validation`'s windows, when the spec names any.
    validation: Option<ValidationSet>,
    /// The evaluations so far (carried across a resume by the trainer state).
    progress: ValidationProgress,
}

/// Why a run stopped before its last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Checkpoint, then return.
    Checkpoint,
    /// Return without a checkpoint.
    Now,
}

/// How `drive` ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every step done; the final checkpoint is in the directory given.
    Completed { final_dir: PathBuf },
    /// Early stopping ended the run after `step` steps (checkpointed in `final_dir`); the
    /// best validation loss was after `best_step`.
    StoppedEarly {
        step: u64,
        final_dir: PathBuf,
        best_step: Option<u64>,
    },
    /// Stopped on request after `step` steps (checkpointed when asked to be).
    Stopped { step: u64 },
}

/// Who watches a run: gets each step's metrics and each checkpoint, and may stop it between
/// steps.
pub trait Observer {
    fn plan_chosen(&mut self, _run: &Run) -> Result<(), RunError> {
        Ok(())
    }
    fn step(&mut self, metrics: &StepMetrics) -> Result<(), RunError>;
    /// An evaluation of the validation data, before the `step` report of the same step.
    fn evaluated(&mut self, _evaluation: &Evaluation) -> Result<(), RunError> {
        Ok(())
    }
    /// Where the checkpoint after `step` goes (`last`: the run's final step).
    fn checkpoint_dir(&self, step: u64, last: bool) -> PathBuf;
    /// Asked before the checkpoint after `step` is written: an error stops the run without
    /// writing it (the service's worker no longer holds the job, say).
    fn before_checkpoint(&mut self, _step: u64) -> Result<(), RunError> {
        Ok(())
    }
    fn checkpoint_saved(&mut self, _step: u64, _dir: &Path) -> Result<(), RunError> {
        Ok(())
    }
    fn stop_requested(&mut self) -> Option<Stop> {
        None
    }
}

impl Run {
    /// Steps completed.
    pub fn step(&self) -> u64 {
        self.pipeline.step()
    }

    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// Each run-wide device's predicted peak bytes (the planner's simulation of the chosen
    /// plan; every replica's devices repeat the first's).
    pub fn predicted_peaks(&self) -> Vec<u64> {
        let one = self.answer.sim.devices.iter().map(|d| d.peak_bytes);
        let replicas = self.answer.plan.replicas as usize;
        one.collect::<Vec<_>>().repeat(replicas)
    }

    /// The plan the run follows (replica 0's programs).
    pub fn plan(&self) -> &crate::plan::Plan {
        &self.answer.plan
    }

    /// Each run-wide device's predicted peak bytes during an evaluation between steps
    /// (`data.validation`), as `predicted_peaks`.
    pub fn predicted_eval_peaks(&self) -> Vec<u64> {
        let one = self.answer.sim.devices.iter().map(|d| d.eval_peak_bytes);
        let replicas = self.answer.plan.replicas as usize;
        one.collect::<Vec<_>>().repeat(replicas)
    }

    pub fn measured_peaks(&self) -> Vec<u64> {
        self.pipeline
            .measured_peaks()
            .into_iter()
            .map(|b| b as u64)
            .collect()
    }

    pub fn config(&self) -> &LlamaConfig {
        self.pipeline.config()
    }

    /// One optimizer step on the next batch.
    pub fn train_step(&mut self) -> Result<StepMetrics, RunError> {
        let step = self.step();
        let microbatches = self.batcher.step(step);
        let tokens: usize = microbatches.iter().map(|m| m.shape.tokens()).sum();
        let started = Instant::now();
        let (report, timings) = self.pipeline.train_step(&microbatches)?;
        let seconds = started.elapsed().as_secs_f64();
        Ok(StepMetrics {
            step: step + 1,
            loss: report.loss,
            learning_rate: report.lr as f64,
            grad_norm: report.grad_norm,
            tokens: tokens as u64,
            tokens_per_s: tokens as f64 / seconds.max(1e-9),
            step_time_s: seconds,
            device_peak_bytes: self.measured_peaks(),
            device_reduction_s: timings.iter().map(|t| t.reducing.as_secs_f64()).collect(),
            val_loss: None,
        })
    }

    /// Evaluates the validation data, forward only, with the weights as they are now (none
    /// without `data.validation`), and records it for early stopping.
    pub fn evaluate(&mut self) -> Result<Option<Evaluation>, RunError> {
        let Some(validation) = &self.validation else {
            return Ok(None);
        };
        let started = Instant::now();
        let loss_sum = self.pipeline.evaluate(validation.batches())?;
        let evaluation = validation.evaluation(self.step(), loss_sum, started);
        let min_delta = (self.spec.training.early_stopping).map_or(0.0, |e| e.min_delta);
        (self.progress).record(evaluation.step, evaluation.val_loss, min_delta);
        Ok(Some(evaluation))
    }

    /// The validation losses seen so far.
    pub fn validation_progress(&self) -> ValidationProgress {
        self.progress
    }

    /// The run-wide devices this process runs: all of the plan's, but in a run spread over
    /// ranks (`prepare_rank`).
    pub fn local_devices(&self) -> std::ops::Range<u32> {
        self.pipeline.local_devices()
    }

    /// Ends a run spread over ranks: says goodbye to the others and waits for theirs, so no
    /// rank's last frames are cut off (nothing to do in one process).
    pub fn close_ranks(&self) -> Result<(), RunError> {
        Ok(self.pipeline.close_ranks()?)
    }

    /// Whether this process completes the run's checkpoints (in a run over ranks, rank 0;
    /// the others write their shards only).
    pub fn commits_checkpoints(&self) -> bool {
        self.pipeline.commits_checkpoints()
    }

    /// A run spread over ranks stopped here with `reason`: the other ranks stop too.
    pub fn abort_ranks(&self, reason: &str) {
        self.pipeline.abort_ranks(reason);
    }
}
