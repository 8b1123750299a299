//! Schedules: each one decides, per device, the order of forward and backward passes of
//! (micro-batch, chunk); shared passes then place the chunks' layers, add the sends and
//! receives, and add the optimizer steps. The result is a `Plan` in the IR.
//!
//! Every schedule runs each chunk's backward passes in micro-batch order, so gradients
//! accumulate in the same order whatever the schedule, and CPU runs give bit-identical weights
//! whatever the plan.

mod chronos;
mod gpipe;
mod interleaved;
mod kind;
mod one_f_one_b;
pub mod registry;

use super::error::PlanError;
use super::ir::{Action, ChunkSpec, Plan};
pub use kind::{Knob, Layout, Schedule, ScheduleKind, Slot};

/// Builds the plan of `kind` for `devices` pipeline devices, `microbatches` micro-batches and
/// a model of `layers` decoder layers. `Chronos { in_flight: 0 }` sets no bound.
pub fn build(
    kind: ScheduleKind,
    devices: u32,
    microbatches: u32,
    layers: u32,
) -> Result<Plan, PlanError> {
    super::error::require_positive("pipeline_devices", devices as u64)?;
    super::error::require_positive("microbatches", microbatches as u64)?;
    if devices > 4096 {
        return Err(PlanError::invalid("pipeline_devices", "at most 4096"));
    }
    if microbatches > 1 << 16 {
        return Err(PlanError::invalid("microbatches", "at most 65536"));
    }
    let v = kind.chunks_per_device();
    if v > 64 {
        return Err(PlanError::invalid(
            "schedule.chunks_per_device",
            "at most 64",
        ));
    }
    super::error::require_positive("schedule.chunks_per_device", v as u64)?;
    let chunks = devices * v;
    if chunks as u64 * microbatches as u64 > 1 << 22 {
        return Err(PlanError::invalid(
            "microbatches",
            format!(
                "{microbatches} micro-batches x {chunks} chunks is too many passes to plan (at most 4194304)"
            ),
        ));
    }
    if layers < chunks {
        return Err(PlanError::invalid(
            "model.layers",
            format!(
                "{layers} layers cannot fill {chunks} chunks ({devices} devices x {v} chunks each); need at least {chunks} layers or fewer devices"
            ),
        ));
    }
    let Layout { placement, order } = (kind.schedule().layout)(devices, kind.knob(), microbatches)?;
    let chunks = split_layers(layers, &placement);
    Ok(with_steps(with_communication(Plan {
        microbatches,
        optimizer_slices: 1,
        replicas: 1,
        chunks,
        programs: order
            .into_iter()
            .map(|slots| {
                slots
                    .into_iter()
                    .map(|s| match s {
                        Slot::F(mb, c) => Action::forward(mb, c),
                        Slot::B(mb, c) => Action::Backward { mb, chunk: c },
                    })
                    .collect()
            })
            .collect(),
    })))
}

/// Layers spread evenly over chunks; the spare ones go to the first chunks, never to the last
/// (it already carries the LM head, the most expensive part).
fn split_layers(layers: u32, placement: &[u32]) -> Vec<ChunkSpec> {
    let c = placement.len() as u32;
    let (base, spare) = (layers / c, layers % c);
    let mut first = 0;
    placement
        .iter()
        .enumerate()
        .map(|(i, &device)| {
            let n = base + u32::from((i as u32) < spare);
            let spec = ChunkSpec {
                device,
                embedding: i == 0,
                first_layer: first,
                end_layer: first + n,
                head: i as u32 == c - 1,
            };
            first += n;
            spec
        })
        .collect()
}

/// Adds a receive right before each forward or backward whose input comes from another
/// device, and a send right after each pass whose output goes to another device.
pub fn with_communication(plan: Plan) -> Plan {
    let last = plan.chunks.len() as u32 - 1;
    let dev = |c: u32| plan.chunks[c as usize].device;
    let programs = plan
        .programs
        .iter()
        .enumerate()
        .map(|(d, program)| {
            let d = d as u32;
            let mut out = Vec::with_capacity(program.len() * 2);
            for &a in program {
                match a {
                    Action::Forward { mb, chunk, .. } => {
                        if chunk > 0 && dev(chunk - 1) != d {
                            let peer = dev(chunk - 1);
                            out.push(Action::RecvAct {
                                mb,
                                chunk: chunk - 1,
                                peer,
                            });
                        }
                        out.push(a);
                        if chunk < last && dev(chunk + 1) != d {
                            let peer = dev(chunk + 1);
                            out.push(Action::SendAct { mb, chunk, peer });
                        }
                    }
                    Action::Backward { mb, chunk } => {
                        if chunk < last && dev(chunk + 1) != d {
                            let peer = dev(chunk + 1);
                            out.push(Action::RecvGrad {
                                mb,
                                chunk: chunk + 1,
                                peer,
                            });
                        }
                        out.push(a);
                        if chunk > 0 && dev(chunk - 1) != d {
                            let peer = dev(chunk - 1);
                            out.push(Action::SendGrad { mb, chunk, peer });
                        }
                    }
                    other => out.push(other),
                }
            }
            out
        })
        .collect();
    Plan { programs, ..plan }
}

/// Adds each chunk's optimizer steps (every slice) at the end of its device's program, in
/// the order of the chunks' last backwards. At the end, not right after each chunk's last
/// backward: a step whose state must first come back from the host would hold up the other
/// chunk's backwards, and every device downstream of them.
pub fn with_steps(mut plan: Plan) -> Plan {
    for program in &mut plan.programs {
        let mut last_backward: Vec<(usize, u32)> = Vec::new();
        for (i, a) in program.iter().enumerate() {
            if let Action::Backward { chunk, .. } = *a {
                match last_backward.iter_mut().find(|(_, c)| *c == chunk) {
                    Some(entry) => entry.0 = i,
                    None => last_backward.push((i, chunk)),
                }
            }
        }
        last_backward.sort();
        for (_, chunk) in last_backward {
            program.extend((0..plan.optimizer_slices).map(|slice| Action::Step { chunk, slice }));
        }
    }
    plan
}

#[cfg(test)]
mod tests;
