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
//! adds no memory. A sharded reduction `RS<c>` and the gathering `AG<c>` of the weights after
//! the steps each hold it for one half of that ring, in place too; a sharded chunk's
//! optimizer state is its replica's shard (`reduction::shard_len` of its parameters).

use serde::Serialize;

mod costs;
mod curve;
mod evaluation;
mod timeline;

use super::error::PlanError;
pub use super::hardware::Hardware;
use super::ir::Plan;
use super::validate;
pub use costs::{ChunkCost, chunk_costs, slice_bytes, uniform_costs};
pub use curve::MemoryPoint;
use curve::replay;
use timeline::Timeline;

/// One device's results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceReport {
    pub peak_bytes: u64,
    /// The peak of an evaluation (validation loss, forward only) between steps; a plan fits
    /// only when this fits too (`evaluation`).
    pub eval_peak_bytes: u64,
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
    /// The highest device peak of an evaluation between steps.
    pub fn eval_peak_bytes(&self) -> u64 {
        (self.devices.iter())
            .map(|d| d.eval_peak_bytes)
            .max()
            .unwrap_or(0)
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
    let eval_peaks = evaluation::evaluation_peaks(plan, costs);
    let devices = (0..p)
        .map(|d| {
            let replayed = replay(&mut timeline.events[d], curve);
            DeviceReport {
                peak_bytes: replayed.peak,
                eval_peak_bytes: eval_peaks[d],
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

#[cfg(test)]
mod tests;
