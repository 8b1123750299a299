//! What one chunk costs per micro-batch: its forward, backward and optimizer-step times, its
//! activation memory per action, and its state's bytes.

use serde::Serialize;

use super::super::cost;
use super::super::hardware::Hardware;
use super::super::inventory::{MicroShape, ModelDims, Profile, act_copy_bytes};
use super::super::ir::Plan;
use super::super::memory::{ChunkMemory, chunk_memory};
use super::super::reduction::shard_len;

/// Time and memory of one chunk per micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ChunkCost {
    pub forward_s: f64,
    pub backward_s: f64,
    pub step_s: f64,
    pub memory: ChunkMemory,
    pub params: u64,
    /// The weights as stored: what an offload moves and host memory holds.
    pub weight_bytes: u64,
    /// The bf16 copies the products read beside the weights (`cuda-bf16`; 0 elsewhere): on
    /// the device with the weights, never moved; an offload drops them when it starts and a
    /// prefetch allocates them when it starts (the runtime casts them afresh).
    pub act_copy_bytes: u64,
    pub grad_bytes: u64,
    /// The parameters whose optimizer state the device keeps: all of the chunk's, or its
    /// replica's shard of them (padded to the same length on every replica).
    pub optimizer_params: u64,
    pub optimizer_bytes: u64,
    /// The head's chunk of a model with tied embeddings: the bytes of the table's gradient
    /// that `TIE` hands between the embedding's device and the head's (0 elsewhere).
    pub tie_bytes: u64,
}

/// Costs of every chunk of `plan` for a model, micro-batch shape and device.
pub fn chunk_costs(
    plan: &Plan,
    profile: Profile,
    dims: &ModelDims,
    micro: MicroShape,
    hw: &Hardware,
) -> Vec<ChunkCost> {
    let rate = (hw.peak_flops * hw.efficiency).max(1.0);
    let flops = |p| cost::part_forward_flops(profile, dims, micro, p);
    let params = |p| cost::part_params(profile, dims, p);
    let state = profile.state_bytes();
    let per_param = (state.weight + state.grad + state.optimizer) as f64;
    plan.chunks
        .iter()
        .enumerate()
        .map(|(c, spec)| {
            let parts = spec.parts();
            let fwd: f64 = parts.iter().map(|&p| flops(p)).sum::<f64>() / rate;
            let n: u64 = parts.iter().map(|&p| params(p)).sum();
            let kept = if plan.sharded(c as u32) {
                shard_len(n as usize, plan.replicas) as u64
            } else {
                n
            };
            let act_copies: u64 = (parts.iter())
                .map(|&p| act_copy_bytes(profile, dims, p))
                .sum();
            ChunkCost {
                forward_s: fwd,
                backward_s: 2.0 * fwd,
                // Adam reads and writes every state byte of the parameters it steps once.
                step_s: 2.0 * per_param * kept as f64 / hw.hbm_bytes_per_s.max(1.0),
                memory: chunk_memory(profile, dims, micro, &parts),
                params: n,
                weight_bytes: n * state.weight as u64,
                act_copy_bytes: act_copies,
                grad_bytes: n * state.grad as u64,
                optimizer_params: kept,
                optimizer_bytes: kept * state.optimizer as u64,
                tie_bytes: match dims.tied_embeddings && spec.head {
                    true => (dims.vocab * dims.hidden) as u64 * state.grad as u64,
                    false => 0,
                },
            }
        })
        .collect()
}

/// Equal chunks with no state: for closed-form checks of the schedule alone.
pub fn uniform_costs(chunks: usize, memory: ChunkMemory, forward_s: f64) -> Vec<ChunkCost> {
    vec![
        ChunkCost {
            forward_s,
            backward_s: 2.0 * forward_s,
            step_s: 0.0,
            memory,
            params: 0,
            weight_bytes: 0,
            act_copy_bytes: 0,
            grad_bytes: 0,
            optimizer_params: 0,
            optimizer_bytes: 0,
            tie_bytes: 0,
        };
        chunks
    ]
}

/// Bytes of slice `slice` of `k` of a chunk's optimizer state. Slices split the parameters
/// the device keeps state for (not bytes): `optimizer_params / k` each, the first ones one
/// more, as the executor does. Costs given in bytes alone (no parameter count) split the
/// bytes instead.
pub fn slice_bytes(cost: &ChunkCost, k: usize, slice: usize) -> u64 {
    let k = k.max(1) as u64;
    let share = |total: u64| total / k + u64::from((slice as u64) < total % k);
    match cost.optimizer_bytes.checked_div(cost.optimizer_params) {
        Some(per_param) => share(cost.optimizer_params) * per_param,
        None => share(cost.optimizer_bytes),
    }
}
