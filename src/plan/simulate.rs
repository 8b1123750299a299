//! A discrete-event simulator of a plan. Each device has a compute stream that runs its
//! program in order, a device-to-host and a host-to-device copy engine, and one link to each
//! peer (latency + bytes / bandwidth, transfers on one link in send order).
//!
//! Time semantics follow the IR (see `ir`): a compute action starts when the stream is free
//! and its inputs and groups are there; a receive holds the program until its data arrives;
//! sends, offloads and prefetches are queued on their engine when the program reaches them
//! and do not hold it. Memory follows `memory::chunk_memory`: at a compute action's start its
//! transient peak is added, at its end replaced by its net; the receiver of a transfer
//! allocates its buffer when its program posts the receive, the sender frees its copy when
//! the transfer ends; an
//! offload frees device memory when its copy ends, a prefetch allocates when its copy starts.
//!
//! Replicas run the same programs in lockstep, so one replica is simulated. A reduction
//! `AR<c>` holds the program for a ring all-reduce of the chunk's gradients over the
//! replicas (each device sends and receives `2 (r - 1) / r` of them); it sums in place, so it
//! adds no memory.

use serde::Serialize;

mod curve;
mod timeline;

use super::error::PlanError;
pub use super::hardware::Hardware;
use super::inventory::{MicroShape, ModelDims, Profile, act_copy_bytes};
use super::ir::Plan;
use super::memory::{ChunkMemory, chunk_memory};
use super::{cost, validate};
use curve::replay;
use timeline::Timeline;

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
    pub optimizer_bytes: u64,
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
        .map(|spec| {
            let parts = spec.parts();
            let fwd: f64 = parts.iter().map(|&p| flops(p)).sum::<f64>() / rate;
            let n: u64 = parts.iter().map(|&p| params(p)).sum();
            let act_copies: u64 = (parts.iter())
                .map(|&p| act_copy_bytes(profile, dims, p))
                .sum();
            ChunkCost {
                forward_s: fwd,
                backward_s: 2.0 * fwd,
                // Adam reads and writes every state byte once.
                step_s: 2.0 * per_param * n as f64 / hw.hbm_bytes_per_s.max(1.0),
                memory: chunk_memory(profile, dims, micro, &parts),
                params: n,
                weight_bytes: n * state.weight as u64,
                act_copy_bytes: act_copies,
                grad_bytes: n * state.grad as u64,
                optimizer_bytes: n * state.optimizer as u64,
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
            optimizer_bytes: 0,
        };
        chunks
    ]
}

/// Memory categories of the curve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MemoryPoint {
    pub t: f64,
    pub weights: u64,
    pub grads: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub comm: u64,
    /// Bytes of this device's groups held on the host.
    pub host: u64,
}

impl MemoryPoint {
    pub fn device_total(&self) -> u64 {
        self.weights + self.grads + self.optimizer + self.activations + self.comm
    }
}

/// One device's results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceReport {
    pub peak_bytes: u64,
    /// The split of memory at the peak.
    pub at_peak: MemoryPoint,
    pub host_peak_bytes: u64,
    /// Seconds of forward, backward and recompute.
    pub busy_s: f64,
    /// Seconds compute waited for a prefetch to land.
    pub prefetch_stall_s: f64,
    /// Start and end of every action of the program (sends: on the link; offload/prefetch: on
    /// the copy engine; receives: when the data arrived).
    pub spans: Vec<(f64, f64)>,
    /// The memory curve (only when asked for).
    pub curve: Vec<MemoryPoint>,
}

/// The simulated step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Simulation {
    pub step_time_s: f64,
    pub bubble_ratio: f64,
    pub devices: Vec<DeviceReport>,
}

impl Simulation {
    pub fn peak_bytes(&self) -> u64 {
        self.devices.iter().map(|d| d.peak_bytes).max().unwrap_or(0)
    }
    pub fn prefetch_stall_s(&self) -> f64 {
        self.devices
            .iter()
            .map(|d| d.prefetch_stall_s)
            .fold(0.0, f64::max)
    }
}

/// Simulates one training step of `plan`. The plan must validate (this checks it first).
pub fn simulate(
    plan: &Plan,
    costs: &[ChunkCost],
    hw: &Hardware,
    curve: bool,
) -> Result<Simulation, PlanError> {
    validate::validate(plan)?;
    simulate_trusted(plan, costs, hw, curve)
}

/// `simulate` without validating first, for passes that only ever derive valid plans from
/// a validated one (the policy re-simulates many times). A broken plan can still come back
/// as a stall error, never a hang.
pub fn simulate_trusted(
    plan: &Plan,
    costs: &[ChunkCost],
    hw: &Hardware,
    curve: bool,
) -> Result<Simulation, PlanError> {
    if costs.len() != plan.chunks.len() {
        return Err(PlanError::invalid(
            "costs",
            format!(
                "{} chunk costs for {} chunks",
                costs.len(),
                plan.chunks.len()
            ),
        ));
    }
    let p = plan.devices();
    let mut timeline = Timeline::new(plan, costs, hw);
    let mut pc = vec![0usize; p];
    let mut spans: Vec<Vec<(f64, f64)>> = plan
        .programs
        .iter()
        .map(|pr| vec![(0.0, 0.0); pr.len()])
        .collect();
    loop {
        let mut progress = false;
        for d in 0..p {
            while pc[d] < plan.programs[d].len() {
                let Some(span) = timeline.run(d, plan.programs[d][pc[d]]) else {
                    break;
                };
                spans[d][pc[d]] = span;
                pc[d] += 1;
                progress = true;
            }
        }
        if (0..p).all(|d| pc[d] == plan.programs[d].len()) {
            break;
        }
        if !progress {
            let d = (0..p)
                .find(|&d| pc[d] < plan.programs[d].len())
                .unwrap_or(0);
            return Err(PlanError::InvalidPlan {
                device: d,
                index: pc[d],
                message: "the simulation stalled on a receive".into(),
                grid: validate::grid(plan, d, pc[d]),
            });
        }
    }

    let fb_end = timeline.compute_end();
    let step_time_s = timeline.cursor.iter().cloned().fold(fb_end, f64::max);
    let bubble_ratio = if fb_end > 0.0 {
        1.0 - timeline.busy.iter().sum::<f64>() / (p as f64 * fb_end)
    } else {
        0.0
    };
    let devices = (0..p)
        .map(|d| {
            let replayed = replay(&mut timeline.events[d], curve);
            DeviceReport {
                peak_bytes: replayed.peak,
                at_peak: replayed.at_peak,
                host_peak_bytes: replayed.host_peak,
                busy_s: timeline.busy[d],
                prefetch_stall_s: timeline.stall[d],
                spans: std::mem::take(&mut spans[d]),
                curve: replayed.curve,
            }
        })
        .collect();
    Ok(Simulation {
        step_time_s,
        bubble_ratio,
        devices,
    })
}

/// Bytes of slice `slice` of `k` of a chunk's optimizer state. Slices split the chunk's
/// parameters (not bytes): `params / k` each, the first ones one more, as the executor does.
/// Costs given in bytes alone (no parameter count) split the bytes instead.
pub fn slice_bytes(cost: &ChunkCost, k: usize, slice: usize) -> u64 {
    let k = k.max(1) as u64;
    let share = |total: u64| total / k + u64::from((slice as u64) < total % k);
    match cost.optimizer_bytes.checked_div(cost.params) {
        Some(per_param) => share(cost.params) * per_param,
        None => share(cost.optimizer_bytes),
    }
}

#[cfg(test)]
mod tests;
