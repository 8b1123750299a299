//! The pipeline runtime: one thread per device runs that device's program from the plan,
//! literally and in order. Activations and gradients cross devices only through the plan's
//! send and receive actions; recompute, offload and prefetch happen where the plan puts them.
//! Gradients accumulate per chunk in micro-batch order (every schedule runs a chunk's
//! backwards in that order) and the global gradient norm adds the parts' contributions in
//! model order, so on CPU devices the trained weights are bit-identical whatever the plan.
//! (GPU kernels add some sums with float atomics in whatever order blocks finish: dQ, the
//! embedding's and RMSNorm's weight gradients, the gradient norm. GPU runs agree to rounding,
//! not to the bit.)
//!
//! Data parallelism: the plan's replicas each get their own devices and threads (replica `r`'s
//! device `d` is run-wide device `r * stages + d`), their own copy of the model and their own
//! share of the step's micro-batches; `AR<c>` sums a chunk's gradients across them in replica
//! order (`reduce_point`). Each replica scales its loss by the whole step's token count, so
//! the sum is the global batch's mean gradient and every replica then takes the same step.
//!
//! Sends, receives, reductions and the step's meeting point go through a [`Transport`]: the
//! hand-over between threads of this process ([`transport::InProcess`]), or, for a pipeline
//! spread over processes ([`Ranks`], e.g. [`TcpRanks`]), links to the devices that run
//! elsewhere, with the same orders and so the same bits.
//!
//! Memory is counted at program points: a send gives the sender's bytes back, a receive takes
//! the receiver's, an offload gives them back and a prefetch takes them when the action runs.
//!
//! The runtime is generic over an [`Engine`], the kind of device: [`CpuEngine`] (the host
//! pool is the same memory, so a move is bookkeeping and never stalls) or the CUDA backend's
//! `GpuEngine` (stages on GPUs).

mod chunk;
pub mod engine;
mod evaluate;
mod mailbox;
mod placing;
mod reduce_point;
mod seat;
mod state;
mod step_sync;
mod tcp_ranks;
mod tcp_shards;
pub mod transport;
mod worker;

use std::time::Duration;

use thiserror::Error;

use crate::data::Microbatch;
use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::on_compute_pool;
use crate::exec::checkpoint::CheckpointError;
use crate::exec::checkpoint::sharded::Shard;
use crate::exec::device::{DeviceError, DeviceSet};
use crate::exec::model::{LlamaConfig, ModelError, PartParams};
use crate::exec::optim::OptimizerConfig;
use crate::exec::optim::schedule::LrSchedule;
use crate::exec::train::StepReport;
use crate::plan::ir::{Action, Group, Plan};
use crate::plan::validate::validate;

pub use chunk::ChunkState;
pub use engine::{CpuEngine, Engine};
pub use placing::seeded_parts;
use placing::{copy_parts, place_replica};
use seat::Seat;
pub use tcp_ranks::TcpRanks;
use transport::InProcess;
pub use transport::{Ranks, Transport};
use worker::{DeviceWorker, StepContext};

#[derive(Debug, Error)]
pub enum PipelineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("the plan does not validate: {0}")]
    Plan(#[from] crate::plan::error::PlanError),
    #[error("the plan has {plan} devices but {given} were given")]
    DeviceCount { plan: usize, given: usize },
    #[error("the plan's chunks hold layers {covered} but the model has {layers}")]
    LayerCount { covered: String, layers: usize },
    #[error("the plan has {plan} micro-batches per step but {given} were given")]
    MicrobatchCount { plan: u32, given: usize },
    #[error("device {device}, action {index} ({action}): {source}")]
    Action {
        device: u32,
        index: usize,
        action: Action,
        source: Box<PipelineError>,
    },
    #[error("no {what} for micro-batch {mb}, chunk {chunk}")]
    Missing {
        what: &'static str,
        mb: u32,
        chunk: u32,
    },
    #[error("the {what} of micro-batch {mb}, chunk {chunk} is on the host: a prefetch is missing")]
    OnHost {
        what: &'static str,
        mb: u32,
        chunk: u32,
    },
    #[error("group {group} is on the host: a prefetch is missing")]
    GroupOnHost { group: Group },
    #[error("group {group} is already {}", if *on_host { "on the host" } else { "on the device" })]
    AlreadyThere { group: Group, on_host: bool },
    #[error("chunk {chunk} is not on this device")]
    NotHere { chunk: u32 },
    #[error("a chunk has no parts")]
    EmptyChunk,
    #[error(
        "{part:?} holds no copy of the tied embedding table: the model's embeddings are not tied"
    )]
    Untied { part: crate::exec::model::PartId },
    #[error(
        "the model's tie_word_embeddings is {tied} but the plan {} TIE actions (plan a tied          model with plan::tying::with_tied_embeddings, an untied one without)",
        if *tied { "has no" } else { "has" }
    )]
    TiedPlan { tied: bool },
    #[error("the plan has no optimizer step: no device computed the step's loss and gradient norm")]
    NoStep,
    #[error("group {group} belongs to a micro-batch, not to a chunk")]
    NotChunkGroup { group: Group },
    #[error("group {group} names an optimizer slice the plan does not have")]
    NoSuchSlice { group: Group },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("device {device} does not exist")]
    NoSuchDevice { device: u32 },
    #[error("device {device} ended its program with {leftovers} tensors never used")]
    Incomplete { device: u32, leftovers: usize },
    #[error("step {step}: the loss is {loss} (not finite); parameters were left unchanged")]
    NonFiniteLoss { step: u64, loss: f64 },
    #[error(
        "step {step}: the gradient norm is {norm} (not finite); parameters were left unchanged"
    )]
    NonFiniteGradNorm { step: u64, norm: f64 },
    #[error("gradient reduction across replicas: {0}")]
    Reduction(String),
    #[error(transparent)]
    Transport(#[from] crate::exec::transport::TransportError),
    #[error("stopped because another device failed")]
    Aborted,
    #[error(
        "rank {rank} did not write its shard of the checkpoint after step {step} within {secs} s"
    )]
    ShardLate { rank: u32, step: u64, secs: u64 },
    #[error("device {device}'s thread panicked")]
    Panicked { device: u32 },
}

impl PipelineError {
    fn at(self, device: u32, index: usize, action: Action) -> Self {
        match self {
            e @ (PipelineError::Aborted | PipelineError::Action { .. }) => e,
            e => PipelineError::Action {
                device,
                index,
                action,
                source: Box::new(e),
            },
        }
    }
}

/// What each device measured in one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceTiming {
    pub compute: Duration,
    /// Time waiting for messages or for the other devices at the step's meeting point.
    pub waiting: Duration,
    /// Time in gradient reductions across replicas, waiting for the others included.
    pub reducing: Duration,
}

/// The model split into the plan's chunks, each on its device, and the optimizer around it.
pub struct Pipeline<E: Engine = CpuEngine> {
    pub config: LlamaConfig,
    pub plan: Plan,
    pub devices: DeviceSet,
    /// Per run-wide device (replica by replica), the chunks it holds.
    chunks: Vec<Vec<ChunkState<E>>>,
    pub engine: E,
    pub optimizer: OptimizerConfig,
    pub schedule: LrSchedule,
    pub grad_clip: Option<f32>,
    /// Steps completed so far.
    pub step: u64,
    /// Set when the plan's devices are spread over processes: the others' links.
    ranks: Option<Box<dyn Ranks<E>>>,
}

impl<E: Engine> Pipeline<E> {
    /// Places `parts` (every part of the model, in forward order, in any pool) on the plan's
    /// devices, a copy for each replica, and allocates each chunk's optimizer state there.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: LlamaConfig,
        plan: Plan,
        devices: DeviceSet,
        engine: E,
        parts: Vec<PartParams>,
        optimizer: OptimizerConfig,
        schedule: LrSchedule,
        grad_clip: Option<f32>,
    ) -> Result<Self, PipelineError> {
        let training = (optimizer, schedule, grad_clip);
        Self::build(config, plan, devices, engine, parts, training, None)
    }

    /// As `new`, for the devices of this process only (`ranks.local()`) in a run spread over
    /// several: the other devices run elsewhere and are reached through `ranks`.
    #[allow(clippy::too_many_arguments)]
    pub fn new_on_rank(
        config: LlamaConfig,
        plan: Plan,
        devices: DeviceSet,
        engine: E,
        parts: Vec<PartParams>,
        training: (OptimizerConfig, LrSchedule, Option<f32>),
        ranks: Box<dyn Ranks<E>>,
    ) -> Result<Self, PipelineError> {
        Self::build(config, plan, devices, engine, parts, training, Some(ranks))
    }

    fn build(
        config: LlamaConfig,
        plan: Plan,
        devices: DeviceSet,
        engine: E,
        parts: Vec<PartParams>,
        (optimizer, schedule, grad_clip): (OptimizerConfig, LrSchedule, Option<f32>),
        ranks: Option<Box<dyn Ranks<E>>>,
    ) -> Result<Self, PipelineError> {
        validate(&plan)?;
        let tied = config.dims.tied_embeddings;
        if tied != plan.programs.iter().flatten().any(|a| *a == Action::Tie) {
            return Err(PipelineError::TiedPlan { tied });
        }
        if plan.total_devices() != devices.devices.len() {
            return Err(PipelineError::DeviceCount {
                plan: plan.total_devices(),
                given: devices.devices.len(),
            });
        }
        let layers = config.dims.layers;
        let covered = plan.chunks.last().map_or(0, |c| c.end_layer as usize);
        if covered != layers {
            return Err(PipelineError::LayerCount {
                covered: format!("0..{covered}"),
                layers,
            });
        }
        let mut chunks: Vec<Vec<ChunkState<E>>> =
            (0..plan.total_devices()).map(|_| Vec::new()).collect();
        let stages = plan.devices() as u32;
        let local = ranks
            .as_ref()
            .map_or(0..plan.total_devices() as u32, |r| r.local());
        // Only the replicas with a device here get a copy of the model.
        let here: Vec<u32> = (0..plan.replicas)
            .filter(|r| (r * stages..(r + 1) * stages).any(|d| local.contains(&d)))
            .collect();
        let mut copies = Vec::with_capacity(here.len());
        for _ in 1..here.len() {
            copies.push(copy_parts(&parts, &config, &devices.host)?);
        }
        for (&replica, parts) in here.iter().zip(std::iter::once(parts).chain(copies)) {
            let first_device = replica * stages;
            let placing = (first_device, &local);
            place_replica(&plan, &devices, &engine, &optimizer, placing, parts)?
                .into_iter()
                .for_each(|(d, state)| chunks[d as usize].push(state));
        }
        Ok(Pipeline {
            config,
            plan,
            devices,
            chunks,
            engine,
            optimizer,
            schedule,
            grad_clip,
            step: 0,
            ranks,
        })
    }

    /// The run-wide devices this process runs (every one unless spread over ranks).
    pub fn local_devices(&self) -> std::ops::Range<u32> {
        self.ranks
            .as_ref()
            .map_or(0..self.plan.total_devices() as u32, |r| r.local())
    }

    /// Whether this process completes the run's checkpoints (rank 0 of a spread run does).
    pub fn commits_checkpoints(&self) -> bool {
        self.ranks.as_ref().is_none_or(|r| r.commits_checkpoints())
    }

    /// This process's shard of a checkpoint (the only one in one process).
    pub fn shard(&self) -> Shard {
        self.ranks.as_ref().map_or(Shard::ONE, |r| r.shard())
    }

    /// The staging directory of the checkpoint after the current step: see `Ranks::staging`
    /// (in one process, `named`).
    pub fn staging(&self, named: Option<&str>) -> Result<String, PipelineError> {
        match (&self.ranks, named) {
            (Some(ranks), named) => ranks.staging(self.step, named),
            (None, Some(name)) => Ok(name.to_string()),
            (None, None) => Err(crate::exec::transport::TransportError::Protocol(
                "one process names its own staging directory".into(),
            )
            .into()),
        }
    }

    /// This process's shard of the checkpoint after the current step is written: see
    /// `Ranks::written` (nothing to wait for in one process).
    pub fn shard_written(&self, within: Duration) -> Result<(), PipelineError> {
        self.ranks
            .as_ref()
            .map_or(Ok(()), |r| r.written(self.step, within))
    }

    /// Ends a spread run: says goodbye to the other ranks and waits for theirs.
    pub fn close_ranks(&self) -> Result<(), PipelineError> {
        self.ranks.as_ref().map_or(Ok(()), |r| r.close())
    }

    /// Tells the other ranks of a spread run that this one stopped with `reason`.
    pub fn abort_ranks(&self, reason: &str) {
        if let Some(r) = &self.ranks {
            r.abort(reason);
        }
    }

    /// Each device's measured peak bytes so far.
    pub fn measured_peaks(&self) -> Vec<usize> {
        self.devices
            .devices
            .iter()
            .map(|d| d.peak_bytes())
            .collect()
    }

    /// One optimizer step over the step's micro-batches (in order), run as the plan says.
    pub fn train_step(
        &mut self,
        microbatches: &[Microbatch],
    ) -> Result<(StepReport, Vec<DeviceTiming>), PipelineError> {
        let step_microbatches = self.plan.microbatches * self.plan.replicas;
        if microbatches.len() != step_microbatches as usize {
            return Err(PipelineError::MicrobatchCount {
                plan: step_microbatches,
                given: microbatches.len(),
            });
        }
        // Every replica scales by the whole step's counted targets: their sum is the mean.
        let total_tokens = crate::exec::model::counted_tokens(microbatches)?;
        let devices = self.plan.total_devices();
        let stages = self.plan.devices() as u32;
        let local = self.local_devices();
        let in_process = InProcess::new(self.plan.replicas, stages, local.clone());
        let boxed: Box<dyn Transport<E> + '_> = match &self.ranks {
            Some(ranks) => ranks.transport(self.step, in_process),
            None => Box::new(in_process),
        };
        let transport = &*boxed;
        let cx = StepContext {
            engine: &self.engine,
            config: &self.config,
            microbatches,
            loss_scale: 1.0 / total_tokens as f32,
            transport,
            optimizer: &self.optimizer,
            schedule: &self.schedule,
            grad_clip: self.grad_clip,
            step: self.step,
            host: &self.devices.host,
            tie_stages: [0, self.plan.chunks.len() - 1].map(|c| self.plan.chunks[c].device),
            last_chunk: self.plan.chunks.len() as u32 - 1,
        };
        let alone = devices == 1;
        let mut held = std::mem::take(&mut self.chunks);
        // The chunks of devices that run elsewhere (none) wait here for the step's end.
        let elsewhere: Vec<(usize, Vec<ChunkState<E>>)> = (0..devices)
            .filter(|d| !local.contains(&(*d as u32)))
            .map(|d| (d, std::mem::take(&mut held[d])))
            .collect();
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = held
                .into_iter()
                .enumerate()
                .filter(|(d, _)| local.contains(&(*d as u32)))
                .map(|(d, chunks)| {
                    let pool = &self.devices.devices[d];
                    let seat = Seat {
                        replicas: self.plan.replicas,
                        replica: d as u32 / stages,
                        stage: d as u32 % stages,
                        stages,
                        microbatches: self.plan.microbatches,
                    };
                    let program = &self.plan.programs[seat.stage as usize];
                    let cx = &cx;
                    scope.spawn(move || {
                        let work = move || {
                            // A panic here stops the step at once: the other devices would
                            // otherwise wait for this one until it is joined (in device order).
                            let device = d as u32;
                            let _on_panic =
                                OnPanic(|| cx.transport.abort(&PipelineError::Panicked { device }));
                            let mut w = DeviceWorker::new(seat, pool, program, chunks);
                            let result = w.run(cx);
                            if let Err(e) = &result {
                                cx.transport.abort(e);
                            }
                            (result, w.chunks)
                        };
                        if alone { on_compute_pool(work) } else { work() }
                    })
                })
                .collect();
            handles
                .into_iter()
                .zip(local.clone())
                .map(|(h, d)| {
                    h.join().map_err(|_| {
                        let e = PipelineError::Panicked { device: d };
                        transport.abort(&e);
                        e
                    })
                })
                .collect()
        });
        drop(boxed);
        let reports = self.take_back(results, local.start as usize, elsewhere)?;
        self.finish_step(&reports, total_tokens)
    }

    /// The step's loss, norm and learning rate from the devices' reports (refused when not
    /// finite), and each device's timing; counts the step.
    fn finish_step(
        &mut self,
        reports: &[worker::DeviceStep],
        total_tokens: usize,
    ) -> Result<(StepReport, Vec<DeviceTiming>), PipelineError> {
        let totals = reports
            .iter()
            .find_map(|r| r.totals)
            .ok_or(PipelineError::NoStep)?;
        let step = self.step;
        let loss = totals.loss_sum / total_tokens as f64;
        if !loss.is_finite() {
            return Err(PipelineError::NonFiniteLoss { step, loss });
        }
        if !totals.grad_norm.is_finite() {
            return Err(PipelineError::NonFiniteGradNorm {
                step,
                norm: totals.grad_norm,
            });
        }
        self.step += 1;
        let timings = reports
            .iter()
            .map(|r| DeviceTiming {
                compute: r.compute,
                waiting: r.waiting,
                reducing: r.reducing,
            })
            .collect();
        Ok((
            StepReport {
                step,
                loss,
                grad_norm: totals.grad_norm,
                lr: self.schedule.lr_at(step),
            },
            timings,
        ))
    }

    /// Takes every device's chunks back after a step and returns the devices' reports, or
    /// the error of the device that failed first.
    /// `results` are those of the devices from `first` on; `elsewhere` the (empty) chunk
    /// lists of the devices other processes run.
    #[allow(clippy::type_complexity)]
    fn take_back(
        &mut self,
        results: Vec<
            Result<
                (
                    Result<worker::DeviceStep, PipelineError>,
                    Vec<ChunkState<E>>,
                ),
                PipelineError,
            >,
        >,
        first: usize,
        elsewhere: Vec<(usize, Vec<ChunkState<E>>)>,
    ) -> Result<Vec<worker::DeviceStep>, PipelineError> {
        let mut first_error = None;
        let mut reports = Vec::new();
        let mut chunks_of = Vec::with_capacity(results.len() + elsewhere.len());
        for (d, result) in (first..).zip(results) {
            match result {
                Ok((Ok(report), chunks)) => {
                    chunks_of.push((d, chunks));
                    reports.push(report);
                }
                Ok((Err(e), chunks)) => {
                    chunks_of.push((d, chunks));
                    // The device that failed first names the cause; the others were aborted.
                    if first_error.is_none() || matches!(first_error, Some(PipelineError::Aborted))
                    {
                        first_error = Some(e);
                    }
                }
                Err(e) => {
                    chunks_of.push((d, Vec::new()));
                    first_error = Some(e);
                }
            }
        }
        chunks_of.extend(elsewhere);
        chunks_of.sort_by_key(|(d, _)| *d);
        self.chunks = chunks_of.into_iter().map(|(_, c)| c).collect();
        match first_error {
            Some(e) => Err(e),
            None => Ok(reports),
        }
    }
}

impl Pipeline<CpuEngine> {
    /// Every part, in model order (replica 0's: every replica holds the same).
    pub fn parts(&self) -> Vec<&PartParams> {
        let mut all: Vec<_> = self.chunks[..self.plan.devices()]
            .iter()
            .flatten()
            .flat_map(|c| &c.parts)
            .collect();
        all.sort_by_key(|p| p.id);
        all
    }
}

/// Runs its closure when dropped by a panicking thread.
struct OnPanic<F: Fn()>(F);

impl<F: Fn()> Drop for OnPanic<F> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            (self.0)();
        }
    }
}

#[cfg(test)]
mod replica_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tied_tests;
