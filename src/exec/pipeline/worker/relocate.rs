//! Offload and prefetch: a group of tensors (a stash, a chunk's weights, gradients or
//! optimizer state) moved between the device and the host.

use super::{DeviceWorker, PipelineError, Stash, StepContext};
use crate::exec::device::MemGroup;
use crate::exec::pipeline::engine::{Engine, Kept};
use crate::plan::ir::Group;

impl<E: Engine> DeviceWorker<'_, E> {
    /// Offload (`to_host`) or prefetch a group. The device's bytes are given back or taken
    /// at this point of the program, so the measured peak does not depend on thread timing.
    pub(super) fn relocate(
        &mut self,
        cx: &StepContext<'_, E>,
        group: Group,
        to_host: bool,
    ) -> Result<(), PipelineError> {
        let (engine, device) = (cx.engine, self.device);
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
                let move_stash = |s| engine.move_stash(device, s, target, to_host);
                let moved = match stash {
                    Stash::Full(parts) => Stash::Full(
                        parts
                            .into_iter()
                            .map(move_stash)
                            .collect::<Result<_, _>>()?,
                    ),
                    Stash::Kept(Kept::Input(t)) => Stash::Kept(Kept::Input(engine.move_tensor(
                        device,
                        t,
                        target,
                        MemGroup::Activations,
                        to_host,
                    )?)),
                    Stash::Kept(Kept::Stash(s)) => Stash::Kept(Kept::Stash(move_stash(s)?)),
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
                state.place(engine, device, group, target, to_host)?;
            }
        }
        Ok(())
    }
}
