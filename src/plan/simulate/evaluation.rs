//! The evaluation pass's memory (validation loss, `exec::pipeline::evaluate`): one
//! micro-batch at a time runs forward through the chunks in model order, each part's stash
//! dropped when its forward ends. A device then holds what rests on it between steps (the
//! groups where the programs leave them, `residence`), and, while one of its chunks runs, that
//! chunk's weights if they rest on the host (brought in for the forward, sent back after it),
//! the chunk's input and the chunk's evaluation peak (`ChunkMemory::evaluate`). Nothing else
//! overlaps: the hidden states handed to the next device are the sending chunk's output,
//! already counted in its peak.

use super::super::ir::{Group, Plan};
use super::super::residence::StartingPlaces;
use super::costs::{ChunkCost, slice_bytes};

/// Each device's peak bytes during an evaluation.
pub(super) fn evaluation_peaks(plan: &Plan, costs: &[ChunkCost]) -> Vec<u64> {
    let places = StartingPlaces::of(plan);
    let k = plan.optimizer_slices.max(1) as usize;
    let mut resting = vec![0u64; plan.devices()];
    let mut widest = vec![0u64; plan.devices()];
    for (c, (spec, cost)) in plan.chunks.iter().zip(costs).enumerate() {
        let (d, chunk) = (spec.device as usize, c as u32);
        let weights = cost.weight_bytes + cost.act_copy_bytes;
        let weights_on_host = places.on_host(Group::Weights { chunk });
        if !weights_on_host {
            resting[d] += weights;
        }
        if !places.on_host(Group::Grads { chunk }) {
            resting[d] += cost.grad_bytes;
        }
        for slice in 0..k as u32 {
            if !places.on_host(Group::Optimizer { chunk, slice }) {
                resting[d] += slice_bytes(cost, k, slice as usize);
            }
        }
        let brought = if weights_on_host { weights } else { 0 };
        let running = brought + cost.memory.input_bytes + cost.memory.evaluate.peak_above_start;
        widest[d] = widest[d].max(running);
    }
    resting.iter().zip(&widest).map(|(r, w)| r + w).collect()
}
