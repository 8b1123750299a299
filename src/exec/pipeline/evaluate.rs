//! Forward-only evaluation (validation loss) on the pipeline's own devices. Each micro-batch
//! runs through replica 0's chunks in model order, each on the device the plan put it on,
//! hidden states handed between devices as the plan's sends are; every part's stash is dropped
//! as soon as the part's forward returns. A device then holds what rests on it between steps
//! plus one part's forward of one micro-batch, which every training step's forward of the
//! same micro-batch holds too, so an evaluation never needs more than the plan's peak.
//!
//! Spread over ranks, each process runs the chunks on its devices: hidden states cross to
//! another process's device through the ranks' transport, and the heads' losses meet as a
//! step's do, so every rank learns the same sum, added in micro-batch order (the bits of one
//! process). An evaluation's messages are numbered by the steps done with the top bit set
//! ([`EVALUATION`]), so they never meet a training step's.

use std::ops::Range;

use crate::data::Microbatch;
use crate::exec::device::MemGroup;
use crate::exec::model::part::{MicroTokens, PartOutput};
use crate::exec::transport::{MessageKey, MessageKind};
use crate::plan::ir::Group;

use super::engine::{At, Engine};
use super::transport::{InProcess, Transport};
use super::{Pipeline, PipelineError};

type Result<T> = std::result::Result<T, PipelineError>;

/// Set in the step number of an evaluation's messages between ranks.
pub const EVALUATION: u64 = 1 << 63;

impl<E: Engine> Pipeline<E> {
    /// The summed cross-entropy over the counted targets of `batches` (any micro-batch
    /// shapes), with the current weights; nothing is trained and no gradient is touched.
    /// Spread over ranks, every rank calls it at the same point and gets the same sum.
    pub fn evaluate(&mut self, batches: &[Microbatch]) -> Result<f64> {
        let Some(ranks) = self.ranks.take() else {
            let everywhere = 0..self.plan.total_devices() as u32;
            let mut loss_sum = 0.0;
            for mb in batches {
                // Every chunk is here, the head too: each micro-batch gives its loss.
                loss_sum += self.evaluate_one(mb, 0, &everywhere, None)?.unwrap_or(0.0);
            }
            return Ok(loss_sum);
        };
        let local = ranks.local();
        let stages = self.plan.devices() as u32;
        let in_process = InProcess::on_one_thread(self.plan.replicas, stages, local.clone());
        let transport = ranks.transport(EVALUATION | self.step, in_process);
        let losses = (batches.iter().enumerate())
            .map(|(i, mb)| {
                let loss = self.evaluate_one(mb, i as u32, &local, Some(&*transport))?;
                Ok(loss.map(|l| (i as u32, l)))
            })
            .collect::<Result<Vec<_>>>()
            .map(|losses| losses.into_iter().flatten().collect());
        let totals = losses.and_then(|losses| transport.meet(Vec::new(), losses));
        if let Err(e) = &totals {
            transport.abort(e);
        }
        drop(transport);
        self.ranks = Some(ranks);
        Ok(totals?.loss_sum)
    }

    /// Micro-batch `mb` (the `nth` of the evaluation) through the chunks on `local`'s devices;
    /// `None` when its loss is taken in another process (`ranks` reaches the others).
    fn evaluate_one(
        &mut self,
        mb: &Microbatch,
        nth: u32,
        local: &Range<u32>,
        ranks: Option<&dyn Transport<E>>,
    ) -> Result<Option<f64>> {
        let tokens = MicroTokens {
            input_ids: &mb.input_ids,
            targets: &mb.targets,
        };
        // Only a spread run has chunks on other processes' devices.
        let elsewhere = || ranks.ok_or(PipelineError::Aborted);
        // The message carrying the hidden states chunk `chunk` made.
        let key = |chunk: u32| MessageKey {
            kind: MessageKind::Activation,
            mb: nth,
            chunk,
        };
        // The hidden states leaving the last chunk run here, and the device they are on.
        let mut carry: Option<(u32, E::Tensor)> = None;
        for (index, spec) in self.plan.chunks.iter().enumerate() {
            let (chunk, device) = (index as u32, spec.device);
            if !local.contains(&device) {
                if let Some((from, t)) = carry.take() {
                    elsewhere()?.send(&self.engine, from, device, key(chunk - 1), t)?;
                }
                continue;
            }
            let pool = self
                .devices
                .devices
                .get(device as usize)
                .ok_or(PipelineError::NoSuchDevice { device })?;
            let input = match (carry.take(), chunk.checked_sub(1)) {
                (_, None) => None,
                (Some((from, t)), _) if from == device => Some(t),
                (Some((from, t)), _) => {
                    let message = self.engine.send(from, t)?;
                    Some(self.engine.receive(device, message, pool)?)
                }
                (None, Some(previous)) => {
                    let from = self.plan.chunks[previous as usize].device;
                    Some(elsewhere()?.receive(&self.engine, from, device, key(previous), pool)?)
                }
            };
            let state = self.chunks[device as usize]
                .iter_mut()
                .find(|c| c.index == chunk)
                .ok_or(PipelineError::NotHere { chunk })?;
            // Weights resting on the host come in for the forward and go back after it.
            let brought = state.weights_on_host;
            let weights = Group::Weights { chunk };
            if brought {
                state.place(&self.engine, device, weights, pool, false)?;
            }
            let at = At {
                device,
                pool,
                config: &self.config,
                micro: mb.shape,
            };
            let mut x = input;
            let mut loss = None;
            for part in &state.parts {
                let (stash, out) = self.engine.forward(at, part, x.take(), tokens)?;
                drop(stash);
                match out {
                    PartOutput::Hidden(t) => {
                        x = Some(self.engine.regroup(t, MemGroup::Activations))
                    }
                    PartOutput::LossSum(l) => loss = Some(l),
                }
            }
            if brought {
                state.place(&self.engine, device, weights, &self.devices.host, true)?;
            }
            if let Some(loss) = loss {
                return Ok(Some(loss));
            }
            carry = Some((device, x.ok_or(PipelineError::EmptyChunk)?));
        }
        let last = self.plan.chunks.last().map(|c| c.device);
        if last.is_some_and(|d| !local.contains(&d)) {
            return Ok(None);
        }
        Err(PipelineError::Missing {
            what: "head (the loss) in the last chunk",
            mb: mb.index as u32,
            chunk: self.plan.chunks.len().saturating_sub(1) as u32,
        })
    }
}
