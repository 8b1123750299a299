//! A training run from a job spec, the one path the CLI's `train` and the service's workers
//! share: resolve the model and the data, plan for the devices, place the model, then step,
//! report and checkpoint until done or told to stop.

mod error;
mod replicas;
mod setup;
mod training_pipeline;

use std::path::{Path, PathBuf};
use std::time::Instant;

pub use error::RunError;
pub use setup::{DeviceKind, gpu_budget, gpu_precision, plan_job, plan_on_gpu, resolve_arch};
use training_pipeline::TrainingPipeline;

use crate::data::Batcher;
use crate::exec::checkpoint::commit::write_checkpoint;
use crate::exec::checkpoint::model_files::{load_weights, save_model};
use crate::exec::checkpoint::trainer_state::{TrainerState, load_optimizer, save_optimizer};
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
}

/// A placed model, its data and its plan, ready to step.
pub struct Run {
    pub spec: JobSpec,
    /// The chosen plan with its predictions and the runners-up.
    pub answer: Answer,
    pipeline: Box<dyn TrainingPipeline>,
    batcher: Batcher,
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
    /// Where the checkpoint after `step` goes (`last`: the run's final step).
    fn checkpoint_dir(&self, step: u64, last: bool) -> PathBuf;
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
        self.spec.training.steps
    }

    /// Each run-wide device's predicted peak bytes (the planner's simulation of the chosen
    /// plan; every replica's devices repeat the first's).
    pub fn predicted_peaks(&self) -> Vec<u64> {
        let one = self.answer.sim.devices.iter().map(|d| d.peak_bytes);
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
        })
    }

    /// Writes `model.safetensors` + `config.json` (Hugging Face layout),
    /// `optimizer.safetensors`, `trainer_state.json` and, last, `manifest.json` into `dir`,
    /// whole or not at all (`checkpoint::commit`).
    pub fn save_checkpoint(&self, dir: &Path, last_loss: Option<f64>) -> Result<(), RunError> {
        write_checkpoint(dir, |dir| {
            self.pipeline.with_state(&mut |pairs| {
                let parts: Vec<_> = pairs.iter().map(|(p, _)| *p).collect();
                save_model(dir, self.pipeline.config(), &parts)?;
                Ok(save_optimizer(dir, pairs)?)
            })?;
            let step = self.step();
            TrainerState {
                step,
                data_position: step * self.spec.training.sequences_per_step() as u64,
                rng_seed: self.spec.training.seed,
                last_loss,
            }
            .save(dir)?;
            Ok(())
        })
    }

    /// Continues from a checkpoint written by `save_checkpoint` for the same model.
    pub fn resume_from(&mut self, dir: &Path) -> Result<TrainerState, RunError> {
        let state = TrainerState::load(dir)?;
        let weights = dir.join("model.safetensors");
        self.pipeline.load_state(&mut |parts, states| {
            load_weights(parts, &weights)?;
            let mut pairs: Vec<_> = parts.iter().zip(states.iter_mut()).collect();
            load_optimizer(dir, &mut pairs)
        })?;
        self.pipeline.set_step(state.step);
        Ok(state)
    }
}

/// Steps `run` to the end of its training, checkpointing every `training.checkpoint_every`
/// steps and at the end, unless the observer stops it first.
pub fn drive(run: &mut Run, observer: &mut dyn Observer) -> Result<Outcome, RunError> {
    observer.plan_chosen(run)?;
    let total = run.total_steps();
    let every = run.spec.training.checkpoint_every;
    let mut last_loss = None;
    while run.step() < total {
        match observer.stop_requested() {
            Some(Stop::Now) => return Ok(Outcome::Stopped { step: run.step() }),
            Some(Stop::Checkpoint) => {
                let step = run.step();
                let dir = observer.checkpoint_dir(step, false);
                run.save_checkpoint(&dir, last_loss)?;
                observer.checkpoint_saved(step, &dir)?;
                return Ok(Outcome::Stopped { step });
            }
            None => {}
        }
        let metrics = run.train_step()?;
        last_loss = Some(metrics.loss);
        observer.step(&metrics)?;
        let step = metrics.step;
        if step < total && every.is_some_and(|k| step.is_multiple_of(k)) {
            let dir = observer.checkpoint_dir(step, false);
            run.save_checkpoint(&dir, last_loss)?;
            observer.checkpoint_saved(step, &dir)?;
        }
    }
    let dir = observer.checkpoint_dir(run.step(), true);
    run.save_checkpoint(&dir, last_loss)?;
    observer.checkpoint_saved(run.step(), &dir)?;
    Ok(Outcome::Completed { final_dir: dir })
}
