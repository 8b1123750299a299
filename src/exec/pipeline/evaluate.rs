//! Forward-only evaluation (validation loss) on the pipeline's own devices. Each micro-batch
//! runs through replica 0's chunks in model order, each on the device the plan put it on,
//! hidden states handed between devices as the plan's sends are; every part's stash is dropped
//! as soon as the part's forward returns. A device then holds what rests on it between steps
//! plus one part's forward of one micro-batch, which every training step's forward of the
//! same micro-batch holds too, so an evaluation never needs more than the plan's peak.

use crate::data::Microbatch;
use crate::exec::device::MemGroup;
use crate::exec::model::part::{MicroTokens, PartOutput};
use crate::plan::ir::Group;

use super::engine::{At, Engine};
use super::{Pipeline, PipelineError};

type Result<T> = std::result::Result<T, PipelineError>;

impl<E: Engine> Pipeline<E> {
    /// The summed cross-entropy over the counted targets of `batches` (any micro-batch
    /// shapes), with the current weights; nothing is trained and no gradient is touched.
    pub fn evaluate(&mut self, batches: &[Microbatch]) -> Result<f64> {
        let mut loss_sum = 0.0;
        for mb in batches {
            loss_sum += self.evaluate_one(mb)?;
        }
        Ok(loss_sum)
    }

    fn evaluate_one(&mut self, mb: &Microbatch) -> Result<f64> {
        let tokens = MicroTokens {
            input_ids: &mb.input_ids,
            targets: &mb.targets,
        };
        // The hidden states leaving the last chunk run, and the device they are on.
        let mut carry: Option<(u32, E::Tensor)> = None;
        for (index, spec) in self.plan.chunks.iter().enumerate() {
            let (chunk, device) = (index as u32, spec.device);
            let pool = self
                .devices
                .devices
                .get(device as usize)
                .ok_or(PipelineError::NoSuchDevice { device })?;
            let input = match carry.take() {
                None => None,
                Some((from, t)) if from == device => Some(t),
                Some((from, t)) => {
                    let message = self.engine.send(from, t)?;
                    Some(self.engine.receive(device, message, pool)?)
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
                return Ok(loss);
            }
            carry = Some((device, x.ok_or(PipelineError::EmptyChunk)?));
        }
        Err(PipelineError::Missing {
            what: "head (the loss) in the last chunk",
            mb: mb.index as u32,
            chunk: self.plan.chunks.len().saturating_sub(1) as u32,
        })
    }
}
