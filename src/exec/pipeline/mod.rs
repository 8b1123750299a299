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
mod reduce_point;
mod seat;
mod step_sync;
mod worker;

use std::time::Duration;

use thiserror::Error;

use crate::data::Microbatch;
use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::on_compute_pool;
use crate::exec::checkpoint::CheckpointError;
use crate::exec::device::{DeviceError, DeviceSet};
use crate::exec::model::{LlamaConfig, ModelError, PartId, PartParams};
use crate::exec::optim::schedule::LrSchedule;
use crate::exec::optim::{OptimizerConfig, PartOptimState};
use crate::exec::train::StepReport;
use crate::plan::ir::{Action, Group, Plan};
use crate::plan::residence::StartingPlaces;
use crate::plan::validate::validate;

pub use chunk::ChunkState;
use engine::HostPart;
pub use engine::{CpuEngine, Engine};
use mailbox::{Abort, Mailbox};
use reduce_point::ReducePoint;
use seat::Seat;
use step_sync::StepSync;
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
    #[error("stopped because another device failed")]
    Aborted,
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
        validate(&plan)?;
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
        let copies = (1..plan.replicas)
            .map(|_| copy_parts(&parts, &config, &devices.host))
            .collect::<Result<Vec<_>, _>>()?;
        let stages = plan.devices() as u32;
        for (replica, parts) in std::iter::once(parts).chain(copies).enumerate() {
            let first_device = replica as u32 * stages;
            place_replica(&plan, &devices, &engine, &optimizer, first_device, parts)?
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
        })
    }

    /// Calls `write` with every part and its optimizer state, in model order, as host
    /// tensors (lent where they are host memory already, copied into the host pool otherwise).
    pub fn with_state<R>(
        &self,
        write: impl FnOnce(&[(&PartParams, &PartOptimState)]) -> R,
    ) -> Result<R, PipelineError> {
        let host = &self.devices.host;
        let mut all: Vec<(HostPart<'_>, PartOptimState)> = Vec::new();
        // Every replica holds the same state: replica 0's devices come first.
        let replica_zero = self.chunks[..self.plan.devices()].iter().enumerate();
        for (device, chunk) in
            replica_zero.flat_map(|(d, cs)| cs.iter().map(move |c| (d as u32, c)))
        {
            let parts = chunk
                .parts
                .iter()
                .map(|p| self.engine.host_part(device, p, host, &self.config))
                .collect::<Result<Vec<_>, _>>()?;
            let lent: Vec<&PartParams> = parts.iter().map(|p| &**p).collect();
            let states = chunk.gather_states(&self.engine, device, &self.optimizer, &lent, host)?;
            all.extend(parts.into_iter().zip(states));
        }
        all.sort_by_key(|(p, _)| p.id);
        let pairs: Vec<_> = all.iter().map(|(p, s)| (&**p, s)).collect();
        Ok(write(&pairs))
    }

    /// Runs `load` on host copies of each chunk's parts and optimizer state, then keeps what
    /// it loaded (a checkpoint, say).
    pub fn load_state(
        &mut self,
        mut load: impl FnMut(&mut [PartParams], &mut [PartOptimState]) -> Result<(), CheckpointError>,
    ) -> Result<(), PipelineError> {
        let host = &self.devices.host;
        // Every replica loads the same state.
        let held = self.chunks.iter_mut().enumerate();
        for (device, chunk) in held.flat_map(|(d, cs)| cs.iter_mut().map(move |c| (d as u32, c))) {
            let mut parts = Vec::with_capacity(chunk.parts.len());
            for p in &chunk.parts {
                let lent = self.engine.host_part(device, p, host, &self.config)?;
                let mut copy = PartParams::allocate(host, &self.config, lent.id)?;
                copy.copy_weights_from(&lent);
                parts.push(copy);
            }
            let mut states = {
                let lent: Vec<&PartParams> = parts.iter().collect();
                chunk.gather_states(&self.engine, device, &self.optimizer, &lent, host)?
            };
            load(&mut parts, &mut states)?;
            for (p, loaded) in chunk.parts.iter_mut().zip(&parts) {
                self.engine.load_part(device, p, loaded)?;
            }
            chunk.scatter_states(&self.engine, device, &states)?;
        }
        Ok(())
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
        let mailboxes: Vec<Mailbox<E::Message>> =
            (0..devices).map(|_| Mailbox::default()).collect();
        let abort = Abort::default();
        let sync = StepSync::new(devices);
        let reduce = ReducePoint::new(self.plan.replicas as usize);
        let cx = StepContext {
            engine: &self.engine,
            config: &self.config,
            microbatches,
            loss_scale: 1.0 / total_tokens as f32,
            mailboxes: &mailboxes,
            abort: &abort,
            sync: &sync,
            reduce: &reduce,
            optimizer: &self.optimizer,
            schedule: &self.schedule,
            grad_clip: self.grad_clip,
            step: self.step,
            host: &self.devices.host,
        };
        let alone = devices == 1;
        let stages = self.plan.devices() as u32;
        let held = std::mem::take(&mut self.chunks);
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = held
                .into_iter()
                .enumerate()
                .map(|(d, chunks)| {
                    let pool = &self.devices.devices[d];
                    let seat = Seat {
                        replica: d as u32 / stages,
                        stage: d as u32 % stages,
                        stages,
                        microbatches: self.plan.microbatches,
                    };
                    let program = &self.plan.programs[seat.stage as usize];
                    let cx = &cx;
                    scope.spawn(move || {
                        let work = move || {
                            let stop = || {
                                cx.abort.raise(cx.mailboxes);
                                cx.sync.wake();
                                cx.reduce.wake();
                            };
                            // A panic here stops the step at once: the other devices would
                            // otherwise wait for this one until it is joined (in device order).
                            let _on_panic = OnPanic(stop);
                            let mut w = DeviceWorker::new(seat, pool, program, chunks);
                            let result = w.run(cx);
                            if result.is_err() {
                                stop();
                            }
                            (result, w.chunks)
                        };
                        if alone { on_compute_pool(work) } else { work() }
                    })
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(d, h)| {
                    h.join().map_err(|_| {
                        abort.raise(&mailboxes);
                        sync.wake();
                        reduce.wake();
                        PipelineError::Panicked { device: d as u32 }
                    })
                })
                .collect()
        });
        let reports = self.take_back(results)?;
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
    ) -> Result<Vec<worker::DeviceStep>, PipelineError> {
        let mut first_error = None;
        let mut reports = Vec::new();
        for result in results {
            match result {
                Ok((Ok(report), chunks)) => {
                    self.chunks.push(chunks);
                    reports.push(report);
                }
                Ok((Err(e), chunks)) => {
                    self.chunks.push(chunks);
                    // The device that failed first names the cause; the others were aborted.
                    if first_error.is_none() || matches!(first_error, Some(PipelineError::Aborted))
                    {
                        first_error = Some(e);
                    }
                }
                Err(e) => first_error = Some(e),
            }
        }
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

/// Host copies of `parts`' weights, for another replica.
fn copy_parts(
    parts: &[PartParams],
    config: &LlamaConfig,
    host: &crate::exec::device::PoolRef,
) -> Result<Vec<PartParams>, DeviceError> {
    parts
        .iter()
        .map(|p| {
            let mut copy = PartParams::allocate(host, config, p.id)?;
            copy.copy_weights_from(p);
            Ok(copy)
        })
        .collect()
}

/// One replica's chunks, each with the run-wide device it goes to (`first_device` is the
/// replica's device 0). Built on the host, then each group goes to the device unless the
/// program leaves it on the host (a program is one step that repeats), so no device ever
/// holds more than it will in a step.
fn place_replica<E: Engine>(
    plan: &Plan,
    devices: &DeviceSet,
    engine: &E,
    optimizer: &OptimizerConfig,
    first_device: u32,
    parts: Vec<PartParams>,
) -> Result<Vec<(u32, ChunkState<E>)>, PipelineError> {
    let mut placed = Vec::with_capacity(plan.chunks.len());
    let mut parts = parts.into_iter();
    let starting = StartingPlaces::of(plan);
    for (index, spec) in plan.chunks.iter().enumerate() {
        let count = spec.layers() as usize + usize::from(spec.embedding) + usize::from(spec.head);
        let device = first_device + spec.device;
        let pool = &devices.devices[device as usize];
        let chunk_parts = parts
            .by_ref()
            .take(count)
            .map(|part| engine.adopt(part, &devices.host))
            .collect::<Result<Vec<_>, _>>()?;
        let chunk = index as u32;
        let mut state = ChunkState::new_on_host(
            engine,
            chunk,
            chunk_parts,
            optimizer,
            plan.optimizer_slices,
            &devices.host,
        )?;
        let groups = [Group::Weights { chunk }, Group::Grads { chunk }]
            .into_iter()
            .chain((0..plan.optimizer_slices).map(|slice| Group::Optimizer { chunk, slice }));
        for group in groups {
            if !starting.on_host(group) {
                state.place(engine, device, group, pool, false)?;
            }
        }
        placed.push((device, state));
    }
    Ok(placed)
}

/// Every part of a model in forward order, allocated in `pool` and initialised from `seed`.
pub fn seeded_parts(
    config: &LlamaConfig,
    pool: &crate::exec::device::PoolRef,
    seed: u64,
) -> Result<Vec<PartParams>, DeviceError> {
    PartId::all(config.dims.layers)
        .into_iter()
        .map(|id| {
            let mut p = PartParams::allocate(pool, config, id)?;
            p.init_from_seed(seed);
            Ok(p)
        })
        .collect()
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
