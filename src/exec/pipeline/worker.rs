//! One device's thread: runs its program from the plan, action by action, in order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::data::Microbatch;
use crate::exec::backend::Backend;
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::model::part::{MicroTokens, PartOutput, PartStash, backward_part, forward_part};
use crate::exec::model::{LlamaConfig, PartCtx, PartParams};

use super::chunk::ChunkState;
use crate::exec::optim::OptimizerConfig;
use crate::exec::optim::clip::{clip_factor, part_squares};
use crate::exec::optim::schedule::LrSchedule;
use crate::exec::tensor::Tensor;
use crate::plan::ir::{Action, Group};

use super::PipelineError;
use super::mailbox::{Abort, Mailbox, Message, MessageKey, MessageKind};
use super::step_sync::{StepSync, StepTotals};

/// What a forward leaves for its backward.
#[derive(Debug)]
enum Stash {
    /// Every part's kept activations.
    Full(Vec<PartStash>),
    /// Only what a recompute starts from: the chunk input (or the embedding's token ids).
    Kept(KeptInput),
}

#[derive(Debug)]
enum KeptInput {
    Hidden(Tensor),
    Tokens(Box<PartStash>),
}

/// Everything a device thread needs that is shared by the whole step.
pub struct StepContext<'a> {
    pub config: &'a LlamaConfig,
    pub microbatches: &'a [Microbatch],
    pub loss_scale: f32,
    pub mailboxes: &'a [Mailbox],
    pub abort: &'a Abort,
    pub sync: &'a StepSync,
    pub optimizer: &'a OptimizerConfig,
    pub schedule: &'a LrSchedule,
    pub grad_clip: Option<f32>,
    /// The step being taken, from 0.
    pub step: u64,
    pub host: &'a PoolRef,
}

/// What one device measured during the step.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceStep {
    pub totals: Option<StepTotals>,
    pub compute: Duration,
    pub waiting: Duration,
}

type Key = (u32, u32);

pub struct DeviceWorker<'a> {
    pub device: u32,
    pub pool: &'a PoolRef,
    pub backend: &'a dyn Backend,
    pub program: &'a [Action],
    pub chunks: Vec<ChunkState>,
    /// Inputs of forwards: received, or the output of the previous chunk on this device.
    inputs: HashMap<Key, Tensor>,
    /// Forward outputs not yet sent or handed on.
    outputs: HashMap<Key, Tensor>,
    stashes: HashMap<Key, (Stash, bool)>,
    /// Gradients of chunk outputs: received, or made by the next chunk on this device.
    grads_in: HashMap<Key, Tensor>,
    /// Gradients of chunk inputs not yet sent or handed on.
    grads_out: HashMap<Key, Tensor>,
    losses: Vec<(u32, f64)>,
    totals: Option<StepTotals>,
    report: DeviceStep,
}

impl<'a> DeviceWorker<'a> {
    pub fn new(
        device: u32,
        pool: &'a PoolRef,
        backend: &'a dyn Backend,
        program: &'a [Action],
        chunks: Vec<ChunkState>,
    ) -> Self {
        DeviceWorker {
            device,
            pool,
            backend,
            program,
            chunks,
            inputs: HashMap::new(),
            outputs: HashMap::new(),
            stashes: HashMap::new(),
            grads_in: HashMap::new(),
            grads_out: HashMap::new(),
            losses: Vec::new(),
            totals: None,
            report: DeviceStep::default(),
        }
    }

    /// Runs the program once (one training step). On error the caller aborts the step.
    pub fn run(&mut self, cx: &StepContext<'_>) -> Result<DeviceStep, PipelineError> {
        for (index, &action) in self.program.iter().enumerate() {
            self.run_action(cx, action)
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

    fn chunk(&mut self, index: u32) -> Result<&mut ChunkState, PipelineError> {
        self.chunks
            .iter_mut()
            .find(|c| c.index == index)
            .ok_or(PipelineError::NotHere { chunk: index })
    }

    fn ctx<'c>(&'c self, cx: &'c StepContext<'_>, mb: u32) -> PartCtx<'c> {
        PartCtx {
            backend: self.backend,
            pool: self.pool,
            config: cx.config,
            micro: cx.microbatches[mb as usize].shape,
        }
    }

    fn run_action(&mut self, cx: &StepContext<'_>, action: Action) -> Result<(), PipelineError> {
        match action {
            Action::Forward {
                mb,
                chunk,
                drop_stash,
            } => self.timed(|w| w.forward(cx, mb, chunk, drop_stash)),
            Action::Recompute { mb, chunk } => self.timed(|w| w.recompute(cx, mb, chunk)),
            Action::Backward { mb, chunk } => self.timed(|w| w.backward(cx, mb, chunk)),
            Action::SendAct { mb, chunk, peer } => {
                let t = take(&mut self.outputs, (mb, chunk), "activation to send")?;
                send(cx, peer, MessageKind::Activation, mb, chunk, t)
            }
            Action::SendGrad { mb, chunk, peer } => {
                let t = take(&mut self.grads_out, (mb, chunk), "gradient to send")?;
                send(cx, peer, MessageKind::Gradient, mb, chunk, t)
            }
            Action::RecvAct { mb, chunk, .. } => {
                let t = self.receive(cx, MessageKind::Activation, mb, chunk)?;
                self.inputs.insert((mb, chunk + 1), t);
                Ok(())
            }
            Action::RecvGrad { mb, chunk, .. } => {
                let t = self.receive(cx, MessageKind::Gradient, mb, chunk)?;
                // The validator only lets a chunk's input gradient come from chunk 1 or later.
                self.grads_in.insert((mb, chunk.saturating_sub(1)), t);
                Ok(())
            }
            Action::Offload(group) => self.relocate(cx, group, true),
            Action::Prefetch(group) => self.relocate(cx, group, false),
            Action::Step { chunk, slice } => self.timed(|w| w.optimizer_step(cx, chunk, slice)),
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

    fn receive(
        &mut self,
        cx: &StepContext<'_>,
        kind: MessageKind,
        mb: u32,
        chunk: u32,
    ) -> Result<Tensor, PipelineError> {
        let start = Instant::now();
        let key = MessageKey { kind, mb, chunk };
        let message = cx.mailboxes[self.device as usize]
            .take(key, cx.abort)
            .ok_or(PipelineError::Aborted)?;
        self.report.waiting += start.elapsed();
        Ok(Tensor::from_data(
            self.pool,
            message.name,
            &message.shape,
            message.data,
            MemGroup::Activations,
        )?)
    }

    /// The forward's input: the chunk input received or handed over (none with the embedding).
    fn forward_input(&mut self, mb: u32, chunk: u32) -> Result<Option<Tensor>, PipelineError> {
        let first = self
            .chunk(chunk)?
            .parts
            .first()
            .ok_or(PipelineError::EmptyChunk)?;
        if first.id.kind() == crate::plan::inventory::Part::Embedding {
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
        Ok(Some(handed.regroup(MemGroup::Activations)))
    }

    /// Runs the chunk's parts forward from `input`; returns the stashes and the output.
    fn run_parts_forward(
        &mut self,
        cx: &StepContext<'_>,
        mb: u32,
        chunk: u32,
        input: Option<Tensor>,
    ) -> Result<(Vec<PartStash>, PartOutput), PipelineError> {
        self.require_weights(chunk)?;
        let batch = &cx.microbatches[mb as usize];
        let tokens = MicroTokens {
            input_ids: &batch.input_ids,
            targets: &batch.targets,
        };
        let ctx = self.ctx(cx, mb);
        let state = self
            .chunks
            .iter()
            .find(|c| c.index == chunk)
            .ok_or(PipelineError::NotHere { chunk })?;
        let mut carry = input;
        let mut stashes = Vec::with_capacity(state.parts.len());
        let mut last = None;
        for part in &state.parts {
            let (stash, out) = forward_part(&ctx, part, carry.take(), tokens)?;
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
        cx: &StepContext<'_>,
        mb: u32,
        chunk: u32,
        drop_stash: bool,
    ) -> Result<(), PipelineError> {
        let input = self.forward_input(mb, chunk)?;
        let (stashes, output) = self.run_parts_forward(cx, mb, chunk, input)?;
        match output {
            PartOutput::LossSum(loss) => self.losses.push((mb, loss)),
            PartOutput::Hidden(t) => {
                self.outputs
                    .insert((mb, chunk), t.regroup(MemGroup::Communication));
            }
        }
        let stash = if drop_stash {
            Stash::Kept(keep_input(stashes)?)
        } else {
            Stash::Full(stashes)
        };
        self.stashes.insert((mb, chunk), (stash, false));
        Ok(())
    }

    fn recompute(
        &mut self,
        cx: &StepContext<'_>,
        mb: u32,
        chunk: u32,
    ) -> Result<(), PipelineError> {
        let stash = self.take_stash_on_device(mb, chunk, "stash to recompute from")?;
        let input = match stash {
            Stash::Kept(KeptInput::Hidden(x)) => Some(x),
            // The embedding's forward rebuilds its token ids from the micro-batch.
            Stash::Kept(KeptInput::Tokens(ids)) => {
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

    fn backward(&mut self, cx: &StepContext<'_>, mb: u32, chunk: u32) -> Result<(), PipelineError> {
        self.require_weights(chunk)?;
        let stash = self.take_stash_on_device(mb, chunk, "stash")?;
        let Stash::Full(stashes) = stash else {
            return Err(PipelineError::Missing {
                what: "a recompute before this backward (the stash was dropped)",
                mb,
                chunk,
            });
        };
        let ends_with_head = self.chunk(chunk)?.parts.last().map(|p| p.id.kind())
            == Some(crate::plan::inventory::Part::Head);
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
            Some(handed.regroup(MemGroup::Activations))
        };
        let ctx = PartCtx {
            backend: self.backend,
            pool: self.pool,
            config: cx.config,
            micro: cx.microbatches[mb as usize].shape,
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
            grad = backward_part(&ctx, part, stash, grad.take(), cx.loss_scale)?;
        }
        if let Some(g) = grad {
            self.grads_out
                .insert((mb, chunk), g.regroup(MemGroup::Communication));
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
    ) -> Result<Stash, PipelineError> {
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
        cx: &StepContext<'_>,
        chunk: u32,
        slice: u32,
    ) -> Result<(), PipelineError> {
        let totals = match self.totals {
            Some(t) => t,
            None => {
                let squares = self
                    .chunks
                    .iter()
                    .flat_map(|c| c.parts.iter().map(part_squares))
                    .collect();
                let start = Instant::now();
                let totals = cx
                    .sync
                    .meet(squares, std::mem::take(&mut self.losses), cx.abort)
                    .ok_or(PipelineError::Aborted)?;
                self.report.waiting += start.elapsed();
                self.totals = Some(totals);
                totals
            }
        };
        let state = self.chunk(chunk)?;
        if !totals.grad_norm.is_finite() || !totals.loss_sum.is_finite() {
            // Leave the weights as they were; the caller reports which value went bad.
            state.parts.iter_mut().for_each(PartParams::zero_grads);
            return Ok(());
        }
        let factor = cx
            .grad_clip
            .map_or(1.0, |c| clip_factor(totals.grad_norm, c));
        let coeffs = cx.optimizer.coeffs(cx.step + 1, cx.schedule.lr_at(cx.step));
        state.step_slice(cx.optimizer, &coeffs, factor, slice)
    }

    /// Offload (`to_host`) or prefetch a group. The device's bytes are given back or taken
    /// at this point of the program, so the measured peak does not depend on thread timing.
    fn relocate(
        &mut self,
        cx: &StepContext<'_>,
        group: Group,
        to_host: bool,
    ) -> Result<(), PipelineError> {
        let target = if to_host { cx.host } else { self.pool };
        match group {
            Group::Stash { mb, chunk } => {
                let (stash, on_host) =
                    self.stashes
                        .remove(&(mb, chunk))
                        .ok_or(PipelineError::Missing {
                            what: "stash to move",
                            mb,
                            chunk,
                        })?;
                if on_host == to_host {
                    return Err(PipelineError::AlreadyThere { group, on_host });
                }
                let moved = match stash {
                    Stash::Full(parts) => Stash::Full(
                        parts
                            .into_iter()
                            .map(|s| s.transfer(target))
                            .collect::<Result<_, _>>()?,
                    ),
                    Stash::Kept(KeptInput::Hidden(t)) => Stash::Kept(KeptInput::Hidden(
                        t.transfer(target, MemGroup::Activations)?,
                    )),
                    Stash::Kept(KeptInput::Tokens(s)) => {
                        Stash::Kept(KeptInput::Tokens(Box::new(s.transfer(target)?)))
                    }
                };
                self.stashes.insert((mb, chunk), (moved, to_host));
            }
            Group::Weights { chunk } | Group::Grads { chunk } | Group::Optimizer { chunk, .. } => {
                let state = self.chunk(chunk)?;
                if state.on_host(group) == to_host {
                    return Err(PipelineError::AlreadyThere {
                        group,
                        on_host: to_host,
                    });
                }
                state.place(group, target, to_host)?;
            }
        }
        Ok(())
    }
}

/// What a forward that drops its stash keeps: the first part's input, or the embedding's
/// token ids.
fn keep_input(stashes: Vec<PartStash>) -> Result<KeptInput, PipelineError> {
    let first = stashes
        .into_iter()
        .next()
        .ok_or(PipelineError::EmptyChunk)?;
    Ok(match first {
        PartStash::Embedding(_) => KeptInput::Tokens(Box::new(first)),
        PartStash::Layer(layer) => KeptInput::Hidden(layer.input),
        PartStash::Head(head) => KeptInput::Hidden(head.input),
    })
}

fn take(
    map: &mut HashMap<Key, Tensor>,
    key: Key,
    what: &'static str,
) -> Result<Tensor, PipelineError> {
    map.remove(&key).ok_or(PipelineError::Missing {
        what,
        mb: key.0,
        chunk: key.1,
    })
}

fn send(
    cx: &StepContext<'_>,
    peer: u32,
    kind: MessageKind,
    mb: u32,
    chunk: u32,
    tensor: Tensor,
) -> Result<(), PipelineError> {
    let mailbox = cx
        .mailboxes
        .get(peer as usize)
        .ok_or(PipelineError::NoSuchDevice { device: peer })?;
    let (name, shape, data) = tensor.into_data();
    mailbox.post(
        MessageKey { kind, mb, chunk },
        Message { name, shape, data },
    );
    Ok(())
}
