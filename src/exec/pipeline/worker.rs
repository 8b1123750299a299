//! One device's thread: runs its program from the plan, action by action, in order.

mod head_pass;
mod reduce;
mod relocate;
mod tie;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::data::Microbatch;
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::model::LlamaConfig;
use crate::exec::model::part::{MicroTokens, PartOutput};
use crate::exec::optim::OptimizerConfig;
use crate::exec::optim::clip::{PartSquares, clip_factor};
use crate::exec::optim::schedule::LrSchedule;
use crate::plan::inventory::Part;
use crate::plan::ir::{Action, Group};

use super::PipelineError;
use super::chunk::ChunkState;
use super::engine::{At, Engine, Kept, Update};
use super::seat::Seat;
use super::step_sync::StepTotals;
use super::transport::Transport;
use crate::exec::transport::{MessageKey, MessageKind};

/// What a forward leaves for its backward.
enum Stash<E: Engine> {
    /// Every part's kept activations.
    Full(Vec<E::Stash>),
    /// Only what a recompute starts from: the chunk input (or the embedding's token ids).
    Kept(Kept<E::Tensor, E::Stash>),
}

/// Everything a device thread needs that is shared by the whole step.
pub struct StepContext<'a, E: Engine> {
    pub engine: &'a E,
    pub config: &'a LlamaConfig,
    pub microbatches: &'a [Microbatch],
    pub loss_scale: f32,
    pub transport: &'a dyn Transport<E>,
    pub optimizer: &'a OptimizerConfig,
    pub schedule: &'a LrSchedule,
    pub grad_clip: Option<f32>,
    /// The step being taken, from 0.
    pub step: u64,
    pub host: &'a PoolRef,
    /// The stages holding chunk 0 (the embedding) and the last chunk (the head), which `TIE`
    /// joins, and the last chunk's index.
    pub tie_stages: [u32; 2],
    pub last_chunk: u32,
}

/// What one device measured during the step.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceStep {
    pub totals: Option<StepTotals>,
    pub compute: Duration,
    pub waiting: Duration,
    /// Time in gradient reductions (waiting for the other replicas included).
    pub reducing: Duration,
}

type Key = (u32, u32);

pub struct DeviceWorker<'a, E: Engine> {
    /// The run-wide device index (`seat.device(seat.stage)`).
    pub device: u32,
    pub seat: Seat,
    pub pool: &'a PoolRef,
    pub program: &'a [Action],
    pub chunks: Vec<ChunkState<E>>,
    /// Inputs of forwards: received, or the output of the previous chunk on this device.
    inputs: HashMap<Key, E::Tensor>,
    /// Forward outputs not yet sent or handed on.
    outputs: HashMap<Key, E::Tensor>,
    stashes: HashMap<Key, (Stash<E>, bool)>,
    /// Gradients of chunk outputs: received, or made by the next chunk on this device.
    grads_in: HashMap<Key, E::Tensor>,
    /// Gradients of chunk inputs not yet sent or handed on.
    grads_out: HashMap<Key, E::Tensor>,
    losses: Vec<(u32, f64)>,
    /// A backward already run with its forward in one pass ([`head_pass`]).
    done_backward: Option<Key>,
    totals: Option<StepTotals>,
    report: DeviceStep,
}

impl<'a, E: Engine> DeviceWorker<'a, E> {
    pub fn new(
        seat: Seat,
        pool: &'a PoolRef,
        program: &'a [Action],
        chunks: Vec<ChunkState<E>>,
    ) -> Self {
        DeviceWorker {
            device: seat.device(seat.stage),
            seat,
            pool,
            program,
            chunks,
            inputs: HashMap::new(),
            outputs: HashMap::new(),
            stashes: HashMap::new(),
            grads_in: HashMap::new(),
            grads_out: HashMap::new(),
            losses: Vec::new(),
            done_backward: None,
            totals: None,
            report: DeviceStep::default(),
        }
    }

    /// Runs the program once (one training step). On error the caller aborts the step.
    pub fn run(&mut self, cx: &StepContext<'_, E>) -> Result<DeviceStep, PipelineError> {
        for (index, &action) in self.program.iter().enumerate() {
            let next = self.program.get(index + 1).copied();
            self.run_action(cx, action, next)
                .map_err(|e| e.at(self.device, index, action))?;
        }
        let leftovers = self.inputs.len()
            + self.outputs.len()
            + self.stashes.len()
            + self.grads_in.len()
            + self.grads_out.len();
        if leftovers > 0 {
            return Err(PipelineError::Incomplete {
                device: self.device,
                leftovers,
            });
        }
        self.report.totals = self.totals;
        Ok(self.report)
    }

    fn chunk(&mut self, index: u32) -> Result<&mut ChunkState<E>, PipelineError> {
        self.chunks
            .iter_mut()
            .find(|c| c.index == index)
            .ok_or(PipelineError::NotHere { chunk: index })
    }

    fn at<'c>(&'c self, cx: &'c StepContext<'_, E>, mb: u32) -> At<'c> {
        At {
            device: self.device,
            pool: self.pool,
            config: cx.config,
            micro: self.batch(cx, mb).shape,
        }
    }

    /// This replica's micro-batch `mb`.
    fn batch<'c>(&self, cx: &'c StepContext<'_, E>, mb: u32) -> &'c Microbatch {
        &cx.microbatches[self.seat.microbatch(mb)]
    }

    /// Runs `action`; `next` is the program's next action.
    fn run_action(
        &mut self,
        cx: &StepContext<'_, E>,
        action: Action,
        next: Option<Action>,
    ) -> Result<(), PipelineError> {
        match action {
            Action::Forward {
                mb,
                chunk,
                drop_stash,
            } if !drop_stash && self.one_pass(cx, mb, chunk, next)? => {
                self.timed(|w| w.forward_backward(cx, mb, chunk))
            }
            Action::Forward {
                mb,
                chunk,
                drop_stash,
            } => self.timed(|w| w.forward(cx, mb, chunk, drop_stash)),
            Action::Recompute { mb, chunk } => self.timed(|w| w.recompute(cx, mb, chunk)),
            Action::Backward { mb, chunk } if self.done_backward == Some((mb, chunk)) => {
                self.done_backward = None;
                Ok(())
            }
            Action::Backward { mb, chunk } => self.timed(|w| w.backward(cx, mb, chunk)),
            Action::SendAct { mb, chunk, peer } => {
                let t = take(&mut self.outputs, (mb, chunk), "activation to send")?;
                self.send(cx, peer, MessageKind::Activation, mb, chunk, t)
            }
            Action::SendGrad { mb, chunk, peer } => {
                let t = take(&mut self.grads_out, (mb, chunk), "gradient to send")?;
                self.send(cx, peer, MessageKind::Gradient, mb, chunk, t)
            }
            Action::RecvAct { mb, chunk, peer } => {
                let t = self.receive(cx, peer, MessageKind::Activation, mb, chunk)?;
                self.inputs.insert((mb, chunk + 1), t);
                Ok(())
            }
            Action::RecvGrad { mb, chunk, peer } => {
                let t = self.receive(cx, peer, MessageKind::Gradient, mb, chunk)?;
                // The validator only lets a chunk's input gradient come from chunk 1 or later.
                self.grads_in.insert((mb, chunk.saturating_sub(1)), t);
                Ok(())
            }
            Action::Offload(group) => self.relocate(cx, group, true),
            Action::Prefetch(group) => self.relocate(cx, group, false),
            Action::Step { chunk, slice } => self.timed(|w| w.optimizer_step(cx, chunk, slice)),
            Action::Reduce { chunk, shard } => self.reduce(cx, chunk, shard),
            Action::Gather { chunk } => self.gather(cx, chunk),
            Action::Tie => self.tie(cx),
        }
    }

    fn timed(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<(), PipelineError>,
    ) -> Result<(), PipelineError> {
        let start = Instant::now();
        let result = f(self);
        self.report.compute += start.elapsed();
        result
    }

    /// Waits for the message from this replica's device `peer`.
    fn receive(
        &mut self,
        cx: &StepContext<'_, E>,
        peer: u32,
        kind: MessageKind,
        mb: u32,
        chunk: u32,
    ) -> Result<E::Tensor, PipelineError> {
        let start = Instant::now();
        let key = MessageKey { kind, mb, chunk };
        let from = self.seat.device(peer);
        let received = cx
            .transport
            .receive(cx.engine, from, self.device, key, self.pool);
        self.report.waiting += start.elapsed();
        received
    }

    fn send(
        &self,
        cx: &StepContext<'_, E>,
        peer: u32,
        kind: MessageKind,
        mb: u32,
        chunk: u32,
        tensor: E::Tensor,
    ) -> Result<(), PipelineError> {
        let key = MessageKey { kind, mb, chunk };
        let to = self.seat.device(peer);
        cx.transport.send(cx.engine, self.device, to, key, tensor)
    }

    /// The kind of the chunk's first (or `last`) part.
    fn end_kind(
        &self,
        cx: &StepContext<'_, E>,
        chunk: u32,
        last: bool,
    ) -> Result<Part, PipelineError> {
        let state = self.chunks.iter().find(|c| c.index == chunk);
        let parts = &state.ok_or(PipelineError::NotHere { chunk })?.parts;
        let part = if last { parts.last() } else { parts.first() };
        let part = part.ok_or(PipelineError::EmptyChunk)?;
        Ok(cx.engine.part_id(part).kind())
    }

    /// The forward's input: the chunk input received or handed over (none with the embedding).
    fn forward_input(
        &mut self,
        cx: &StepContext<'_, E>,
        mb: u32,
        chunk: u32,
    ) -> Result<Option<E::Tensor>, PipelineError> {
        if self.end_kind(cx, chunk, false)? == Part::Embedding {
            return Ok(None);
        }
        if let Some(t) = self.inputs.remove(&(mb, chunk)) {
            return Ok(Some(t));
        }
        let previous = chunk.checked_sub(1).ok_or(PipelineError::Missing {
            what: "input of the forward",
            mb,
            chunk,
        })?;
        let handed = take(&mut self.outputs, (mb, previous), "input of the forward")?;
        Ok(Some(cx.engine.regroup(handed, MemGroup::Activations)))
    }

    /// Runs the chunk's parts forward from `input`; returns the stashes and the output.
    #[allow(clippy::type_complexity)]
    fn run_parts_forward(
        &mut self,
        cx: &StepContext<'_, E>,
        mb: u32,
        chunk: u32,
        input: Option<E::Tensor>,
    ) -> Result<(Vec<E::Stash>, PartOutput<E::Tensor>), PipelineError> {
        self.require_weights(chunk)?;
        let batch = self.batch(cx, mb);
        let tokens = MicroTokens {
            input_ids: &batch.input_ids,
            targets: &batch.targets,
        };
        let at = self.at(cx, mb);
        let state = self
            .chunks
            .iter()
            .find(|c| c.index == chunk)
            .ok_or(PipelineError::NotHere { chunk })?;
        let mut carry = input;
        let mut stashes = Vec::with_capacity(state.parts.len());
        let mut last = None;
        for part in &state.parts {
            let (stash, out) = cx.engine.forward(at, part, carry.take(), tokens)?;
            stashes.push(stash);
            match out {
                PartOutput::Hidden(t) => carry = Some(t),
                PartOutput::LossSum(l) => last = Some(PartOutput::LossSum(l)),
            }
        }
        let output = match (last, carry) {
            (Some(loss), _) => loss,
            (None, Some(hidden)) => PartOutput::Hidden(hidden),
            (None, None) => return Err(PipelineError::EmptyChunk),
        };
        Ok((stashes, output))
    }

    fn forward(
        &mut self,
        cx: &StepContext<'_, E>,
        mb: u32,
        chunk: u32,
        drop_stash: bool,
    ) -> Result<(), PipelineError> {
        let input = self.forward_input(cx, mb, chunk)?;
        let (stashes, output) = self.run_parts_forward(cx, mb, chunk, input)?;
        match output {
            PartOutput::LossSum(loss) => self.losses.push((self.seat.microbatch(mb) as u32, loss)),
            PartOutput::Hidden(t) => {
                let t = cx.engine.regroup(t, MemGroup::Communication);
                self.outputs.insert((mb, chunk), t);
            }
        }
        let stash = if drop_stash {
            let first = stashes
                .into_iter()
                .next()
                .ok_or(PipelineError::EmptyChunk)?;
            Stash::Kept(cx.engine.keep_input(first))
        } else {
            Stash::Full(stashes)
        };
        self.stashes.insert((mb, chunk), (stash, false));
        Ok(())
    }

    fn recompute(
        &mut self,
        cx: &StepContext<'_, E>,
        mb: u32,
        chunk: u32,
    ) -> Result<(), PipelineError> {
        let stash = self.take_stash_on_device(mb, chunk, "stash to recompute from")?;
        let input = match stash {
            Stash::Kept(Kept::Input(x)) => Some(x),
            // The embedding's forward rebuilds its token ids from the micro-batch.
            Stash::Kept(Kept::Stash(ids)) => {
                drop(ids);
                None
            }
            Stash::Full(_) => {
                return Err(PipelineError::Missing {
                    what: "a dropped stash (the stash is whole already)",
                    mb,
                    chunk,
                });
            }
        };
        let (stashes, _output) = self.run_parts_forward(cx, mb, chunk, input)?;
        self.stashes
            .insert((mb, chunk), (Stash::Full(stashes), false));
        Ok(())
    }

    fn backward(
        &mut self,
        cx: &StepContext<'_, E>,
        mb: u32,
        chunk: u32,
    ) -> Result<(), PipelineError> {
        self.require_weights(chunk)?;
        let stash = self.take_stash_on_device(mb, chunk, "stash")?;
        let Stash::Full(stashes) = stash else {
            return Err(PipelineError::Missing {
                what: "a recompute before this backward (the stash was dropped)",
                mb,
                chunk,
            });
        };
        let ends_with_head = self.end_kind(cx, chunk, true)? == Part::Head;
        let mut grad = if ends_with_head {
            None
        } else if let Some(g) = self.grads_in.remove(&(mb, chunk)) {
            Some(g)
        } else {
            let handed = take(
                &mut self.grads_out,
                (mb, chunk + 1),
                "gradient of the output",
            )?;
            Some(cx.engine.regroup(handed, MemGroup::Activations))
        };
        let at = At {
            device: self.device,
            pool: self.pool,
            config: cx.config,
            micro: self.batch(cx, mb).shape,
        };
        let state = self
            .chunks
            .iter_mut()
            .find(|c| c.index == chunk)
            .ok_or(PipelineError::NotHere { chunk })?;
        if state.grads_on_host {
            return Err(PipelineError::GroupOnHost {
                group: Group::Grads { chunk },
            });
        }
        for (part, stash) in state.parts.iter_mut().zip(stashes).rev() {
            grad = cx
                .engine
                .backward(at, part, stash, grad.take(), cx.loss_scale)?;
        }
        if let Some(g) = grad {
            let g = cx.engine.regroup(g, MemGroup::Communication);
            self.grads_out.insert((mb, chunk), g);
        }
        Ok(())
    }

    /// Removes the stash of (mb, chunk), which must be on the device (prefetched if it was
    /// offloaded).
    fn take_stash_on_device(
        &mut self,
        mb: u32,
        chunk: u32,
        what: &'static str,
    ) -> Result<Stash<E>, PipelineError> {
        match self.stashes.remove(&(mb, chunk)) {
            None => Err(PipelineError::Missing { what, mb, chunk }),
            Some((_, true)) => Err(PipelineError::OnHost { what, mb, chunk }),
            Some((stash, false)) => Ok(stash),
        }
    }

    fn require_weights(&mut self, chunk: u32) -> Result<(), PipelineError> {
        if self.chunk(chunk)?.weights_on_host {
            return Err(PipelineError::GroupOnHost {
                group: Group::Weights { chunk },
            });
        }
        Ok(())
    }

    /// The first step action meets the other devices for the global norm and loss; every
    /// step action then updates its slice of its chunk.
    fn optimizer_step(
        &mut self,
        cx: &StepContext<'_, E>,
        chunk: u32,
        slice: u32,
    ) -> Result<(), PipelineError> {
        let engine = cx.engine;
        let device = self.device;
        let totals = match self.totals {
            Some(t) => t,
            None => {
                let mut squares = Vec::new();
                // Every replica holds the same all-reduced gradients: replica 0's count
                // once. A sharded reduction leaves each replica its shard's sums and zeros
                // elsewhere: every replica counts its own.
                let replica = self.seat.replica;
                let counted = (self.chunks.iter())
                    .filter(|c| replica == 0 || self.sharded(c.index))
                    .flat_map(|c| &c.parts);
                for part in counted {
                    squares.push(PartSquares {
                        part: engine.part_id(part),
                        sum_of_squares: engine.grad_squares(device, part)?,
                    });
                }
                let start = Instant::now();
                let losses = std::mem::take(&mut self.losses);
                let totals = cx.transport.meet(squares, losses)?;
                self.report.waiting += start.elapsed();
                self.totals = Some(totals);
                totals
            }
        };
        let state = self.chunk(chunk)?;
        if !totals.grad_norm.is_finite() || !totals.loss_sum.is_finite() {
            // Leave the weights as they were; the caller reports which value went bad.
            for part in &mut state.parts {
                engine.zero_grads(device, part)?;
            }
            return Ok(());
        }
        let factor = cx
            .grad_clip
            .map_or(1.0, |c| clip_factor(totals.grad_norm, c));
        let coeffs = cx.optimizer.coeffs(cx.step + 1, cx.schedule.lr_at(cx.step));
        let update = Update {
            config: cx.optimizer,
            coeffs: &coeffs,
            clip_factor: factor,
        };
        state.step_slice(engine, device, update, slice)
    }
}

fn take<T>(map: &mut HashMap<Key, T>, key: Key, what: &'static str) -> Result<T, PipelineError> {
    map.remove(&key).ok_or(PipelineError::Missing {
        what,
        mb: key.0,
        chunk: key.1,
    })
}
