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

use super::error::PlanError;
use super::inventory::{MicroShape, ModelDims, Profile, act_copy_bytes};
use super::ir::{Action, Group, Plan};
use super::memory::{ChunkMemory, chunk_memory};
use super::reduction::reduction_s;
use super::{cost, validate};

/// What a device and its links can do.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Hardware {
    /// Peak FLOP/s of one device (one tensor-parallel rank) at the profile's precision.
    pub peak_flops: f64,
    /// Fraction of peak that model FLOPs achieve (matmul shapes, kernels, tensor-parallel
    /// communication all folded in).
    pub efficiency: f64,
    /// Device memory bandwidth, for the memory-bound optimizer step.
    pub hbm_bytes_per_s: f64,
    /// Point-to-point bandwidth between pipeline neighbours, per device.
    pub p2p_bytes_per_s: f64,
    pub p2p_latency_s: f64,
    /// Host link bandwidth, each direction.
    pub host_bytes_per_s: f64,
}

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

const WEIGHTS: usize = 0;
const GRADS: usize = 1;
const OPTIMIZER: usize = 2;
const ACTIVATIONS: usize = 3;
const COMM: usize = 4;
const HOST: usize = 5;

#[derive(Clone, Copy)]
struct MemEvent {
    t: f64,
    delta: i64,
    category: usize,
}

/// Where a group is: on the device since `Some(t)`, or on the host since the copy ended.
#[derive(Clone, Copy)]
struct Residence {
    device_since: Option<f64>,
    host_since: f64,
}

impl Residence {
    fn on_device() -> Self {
        Residence {
            device_since: Some(0.0),
            host_since: 0.0,
        }
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
    let (m, nc) = (plan.microbatches as usize, plan.chunks.len());
    let at = |mb: u32, c: u32| mb as usize * nc + c as usize;
    let dev = |c: u32| plan.chunks[c as usize].device as usize;
    let last = nc as u32 - 1;
    let p2p = |bytes: u64| bytes as f64 / hw.p2p_bytes_per_s.max(1.0);
    let copy = |bytes: u64| bytes as f64 / hw.host_bytes_per_s.max(1.0);

    let mut f_end = vec![f64::NAN; m * nc];
    let mut b_end = vec![f64::NAN; m * nc];
    let mut act_arrive = vec![f64::NAN; m * nc];
    let mut grad_arrive = vec![f64::NAN; m * nc];
    let mut stash = vec![Residence::on_device(); m * nc];
    let mut stash_bytes = vec![0u64; m * nc];
    // Persistent groups start where the program leaves them (programs repeat): weights and
    // gradients per chunk, optimizer state per (chunk, slice).
    let k = plan.optimizer_slices.max(1) as usize;
    let mut persistent = vec![[Residence::on_device(); 2]; nc];
    let mut optimizer = vec![Residence::on_device(); nc * k];
    let mut events: Vec<Vec<MemEvent>> = vec![Vec::new(); p];
    for program in &plan.programs {
        for a in program {
            let (g, host) = match *a {
                Action::Offload(g) => (g, true),
                Action::Prefetch(g) => (g, false),
                _ => continue,
            };
            let place = if host { None } else { Some(0.0) };
            match g {
                Group::Weights { chunk } => {
                    persistent[chunk as usize][WEIGHTS].device_since = place
                }
                Group::Grads { chunk } => persistent[chunk as usize][GRADS].device_since = place,
                Group::Optimizer { chunk, slice } => {
                    optimizer[chunk as usize * k + slice as usize].device_since = place
                }
                Group::Stash { .. } => {}
            }
        }
    }
    for (c, cost) in costs.iter().enumerate() {
        let d = dev(c as u32);
        let mut start = |on_device: bool, bytes: u64, category: usize| {
            events[d].push(MemEvent {
                t: 0.0,
                delta: bytes as i64,
                category: if on_device { category } else { HOST },
            });
        };
        let weights_on_device = persistent[c][WEIGHTS].device_since.is_some();
        let copies = if weights_on_device {
            cost.act_copy_bytes
        } else {
            0
        };
        start(weights_on_device, cost.weight_bytes + copies, WEIGHTS);
        start(
            persistent[c][GRADS].device_since.is_some(),
            cost.grad_bytes,
            GRADS,
        );
        for slice in 0..k {
            let bytes = slice_bytes(cost, k, slice);
            start(
                optimizer[c * k + slice].device_since.is_some(),
                bytes,
                OPTIMIZER,
            );
        }
    }

    let mut pc = vec![0usize; p];
    let mut cursor = vec![0f64; p];
    let mut d2h_free = vec![0f64; p];
    let mut h2d_free = vec![0f64; p];
    // When the last offload of weights, gradients or optimizer state issued so far ends.
    let mut state_offloaded = vec![0f64; p];
    let mut link_free = vec![0f64; p * p];
    let mut busy = vec![0f64; p];
    let mut stall = vec![0f64; p];
    let mut spans: Vec<Vec<(f64, f64)>> = plan
        .programs
        .iter()
        .map(|pr| vec![(0.0, 0.0); pr.len()])
        .collect();

    loop {
        let mut progress = false;
        for d in 0..p {
            'program: while pc[d] < plan.programs[d].len() {
                let a = plan.programs[d][pc[d]];
                let now = cursor[d];
                let ev = &mut events;
                let push =
                    |ev: &mut Vec<Vec<MemEvent>>, dd: usize, t: f64, delta: i64, category| {
                        if delta != 0 {
                            ev[dd].push(MemEvent { t, delta, category });
                        }
                    };
                let span = match a {
                    Action::Forward {
                        mb,
                        chunk: c,
                        drop_stash,
                    } => {
                        let input = if c == 0 {
                            0.0
                        } else if dev(c - 1) == d {
                            f_end[at(mb, c - 1)]
                        } else {
                            act_arrive[at(mb, c - 1)]
                        };
                        if input.is_nan() {
                            break 'program;
                        }
                        let ready = now.max(input);
                        let w = group_ready(&persistent[c as usize][WEIGHTS]);
                        let start = ready.max(w);
                        stall[d] += start - ready;
                        let cost = &costs[c as usize];
                        let mm = &cost.memory;
                        let end = start + cost.forward_s;
                        let (action, kept) = if drop_stash {
                            (mm.forward_dropping, mm.kept_bytes)
                        } else {
                            (mm.forward, mm.stash_bytes)
                        };
                        let peak = action.peak_above_start as i64;
                        push(ev, d, start, peak, ACTIVATIONS);
                        push(ev, d, end, -peak, ACTIVATIONS);
                        push(ev, d, end, (kept - mm.input_bytes) as i64, ACTIVATIONS);
                        let out_category = if c < last && dev(c + 1) == d {
                            ACTIVATIONS
                        } else {
                            COMM
                        };
                        push(ev, d, end, mm.output_bytes as i64, out_category);
                        let i = at(mb, c);
                        f_end[i] = end;
                        stash[i] = Residence {
                            device_since: Some(end),
                            host_since: end,
                        };
                        stash_bytes[i] = kept;
                        busy[d] += cost.forward_s;
                        cursor[d] = end;
                        (start, end)
                    }
                    Action::Recompute { mb, chunk: c } => {
                        let i = at(mb, c);
                        let Some(ready_at) = stash[i].device_since else {
                            break 'program;
                        };
                        let w = group_ready(&persistent[c as usize][WEIGHTS]);
                        let start = now.max(ready_at).max(w);
                        stall[d] += start - now;
                        let cost = &costs[c as usize];
                        let mm = &cost.memory;
                        let end = start + cost.forward_s;
                        let peak = mm.recompute.peak_above_start as i64;
                        push(ev, d, start, peak, ACTIVATIONS);
                        push(ev, d, end, -peak, ACTIVATIONS);
                        push(ev, d, end, mm.recompute.net, ACTIVATIONS);
                        stash_bytes[i] = mm.stash_bytes;
                        busy[d] += cost.forward_s;
                        cursor[d] = end;
                        (start, end)
                    }
                    Action::Backward { mb, chunk: c } => {
                        let grad = if c == last {
                            0.0
                        } else if dev(c + 1) == d {
                            b_end[at(mb, c + 1)]
                        } else {
                            grad_arrive[at(mb, c + 1)]
                        };
                        if grad.is_nan() {
                            break 'program;
                        }
                        let i = at(mb, c);
                        let ready = now.max(grad);
                        let groups = [
                            stash[i].device_since.unwrap_or(f64::INFINITY),
                            group_ready(&persistent[c as usize][WEIGHTS]),
                            group_ready(&persistent[c as usize][GRADS]),
                        ];
                        let start = groups.into_iter().fold(ready, f64::max);
                        stall[d] += start - ready;
                        let cost = &costs[c as usize];
                        let mm = &cost.memory;
                        let end = start + cost.backward_s;
                        let peak = mm.backward.peak_above_start as i64;
                        push(ev, d, start, peak, ACTIVATIONS);
                        push(ev, d, end, -peak, ACTIVATIONS);
                        push(ev, d, end, -(stash_bytes[i] as i64), ACTIVATIONS);
                        push(ev, d, end, -(mm.grad_in_bytes as i64), COMM);
                        push(ev, d, end, mm.grad_out_bytes as i64, COMM);
                        stash_bytes[i] = 0;
                        b_end[i] = end;
                        busy[d] += cost.backward_s;
                        cursor[d] = end;
                        (start, end)
                    }
                    Action::Step { chunk: c, slice } => {
                        let g = &persistent[c as usize];
                        let ready = [
                            group_ready(&g[WEIGHTS]),
                            group_ready(&g[GRADS]),
                            group_ready(&optimizer[c as usize * k + slice as usize]),
                        ]
                        .into_iter()
                        .fold(now, f64::max);
                        stall[d] += ready - now;
                        let end = ready + costs[c as usize].step_s / k as f64;
                        cursor[d] = end;
                        (ready, end)
                    }
                    Action::Reduce { chunk: c } => {
                        let start = now.max(group_ready(&persistent[c as usize][GRADS]));
                        stall[d] += start - now;
                        let bytes = costs[c as usize].grad_bytes;
                        let end = start + reduction_s(plan.replicas, bytes, hw);
                        cursor[d] = end;
                        (start, end)
                    }
                    Action::SendAct { mb, chunk: c, peer } => {
                        let bytes = costs[c as usize].memory.output_bytes;
                        let link = d * p + peer as usize;
                        let start = now.max(link_free[link]).max(f_end[at(mb, c)]);
                        let end = start + p2p(bytes);
                        link_free[link] = end;
                        let arrive = end + hw.p2p_latency_s;
                        act_arrive[at(mb, c)] = arrive;
                        push(ev, d, arrive, -(bytes as i64), COMM);
                        (start, arrive)
                    }
                    Action::SendGrad { mb, chunk: c, peer } => {
                        let bytes = costs[c as usize].memory.grad_out_bytes;
                        let link = d * p + peer as usize;
                        let start = now.max(link_free[link]).max(b_end[at(mb, c)]);
                        let end = start + p2p(bytes);
                        link_free[link] = end;
                        let arrive = end + hw.p2p_latency_s;
                        grad_arrive[at(mb, c)] = arrive;
                        push(ev, d, arrive, -(bytes as i64), COMM);
                        (start, arrive)
                    }
                    Action::RecvAct { mb, chunk: c, .. }
                    | Action::RecvGrad { mb, chunk: c, .. } => {
                        let arrive = if matches!(a, Action::RecvAct { .. }) {
                            act_arrive[at(mb, c)]
                        } else {
                            grad_arrive[at(mb, c)]
                        };
                        if arrive.is_nan() {
                            break 'program;
                        }
                        // The receiver's buffer is taken when its program posts the receive.
                        let memory = &costs[c as usize].memory;
                        let (bytes, category) = if matches!(a, Action::RecvAct { .. }) {
                            (memory.output_bytes, ACTIVATIONS)
                        } else {
                            (memory.grad_out_bytes, COMM)
                        };
                        push(ev, d, now, bytes as i64, category);
                        cursor[d] = now.max(arrive);
                        (now, cursor[d])
                    }
                    Action::Offload(g) => {
                        let (res, bytes, category) = group_of(
                            g,
                            &mut stash,
                            &stash_bytes,
                            &mut persistent,
                            &mut optimizer,
                            &costs[g.chunk() as usize],
                            (nc, k),
                        );
                        let since = res.device_since.unwrap_or(now);
                        let start = now.max(d2h_free[d]).max(since);
                        let end = start + copy(bytes);
                        d2h_free[d] = end;
                        if !matches!(g, Group::Stash { .. }) {
                            state_offloaded[d] = end;
                        }
                        res.device_since = None;
                        res.host_since = end;
                        push(ev, d, start, bytes as i64, HOST);
                        push(ev, d, start, -(act_copies(g, costs) as i64), WEIGHTS);
                        push(ev, d, end, -(bytes as i64), category);
                        (start, end)
                    }
                    Action::Prefetch(g) => {
                        let (res, bytes, category) = group_of(
                            g,
                            &mut stash,
                            &stash_bytes,
                            &mut persistent,
                            &mut optimizer,
                            &costs[g.chunk() as usize],
                            (nc, k),
                        );
                        let mut start = now.max(h2d_free[d]).max(res.host_since);
                        if !matches!(g, Group::Stash { .. }) {
                            start = start.max(state_offloaded[d]);
                        }
                        let end = start + copy(bytes);
                        h2d_free[d] = end;
                        res.device_since = Some(end);
                        push(ev, d, start, bytes as i64, category);
                        push(ev, d, start, act_copies(g, costs) as i64, WEIGHTS);
                        push(ev, d, end, -(bytes as i64), HOST);
                        (start, end)
                    }
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

    let fb_end = b_end.iter().cloned().fold(0.0, f64::max);
    let step_time_s = cursor.iter().cloned().fold(fb_end, f64::max);
    let bubble_ratio = if fb_end > 0.0 {
        1.0 - busy.iter().sum::<f64>() / (p as f64 * fb_end)
    } else {
        0.0
    };
    let devices = (0..p)
        .map(|d| {
            let (peak, at_peak, host_peak, points) = replay(&mut events[d], curve);
            DeviceReport {
                peak_bytes: peak,
                at_peak,
                host_peak_bytes: host_peak,
                busy_s: busy[d],
                prefetch_stall_s: stall[d],
                spans: std::mem::take(&mut spans[d]),
                curve: points,
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

/// When a group used by compute is on the device; never, if it stays on the host.
fn group_ready(r: &Residence) -> f64 {
    r.device_since.unwrap_or(f64::INFINITY)
}

fn group_of<'a>(
    g: Group,
    stash: &'a mut [Residence],
    stash_bytes: &[u64],
    persistent: &'a mut [[Residence; 2]],
    optimizer: &'a mut [Residence],
    cost: &ChunkCost,
    (nc, k): (usize, usize),
) -> (&'a mut Residence, u64, usize) {
    match g {
        Group::Stash { mb, chunk } => {
            let i = mb as usize * nc + chunk as usize;
            (&mut stash[i], stash_bytes[i], ACTIVATIONS)
        }
        Group::Weights { chunk } => (
            &mut persistent[chunk as usize][WEIGHTS],
            cost.weight_bytes,
            WEIGHTS,
        ),
        Group::Grads { chunk } => (
            &mut persistent[chunk as usize][GRADS],
            cost.grad_bytes,
            GRADS,
        ),
        Group::Optimizer { chunk, slice } => (
            &mut optimizer[chunk as usize * k + slice as usize],
            slice_bytes(cost, k, slice as usize),
            OPTIMIZER,
        ),
    }
}

/// The bf16 weight copies an offload of `g` drops or its prefetch allocates.
fn act_copies(g: Group, costs: &[ChunkCost]) -> u64 {
    match g {
        Group::Weights { chunk } => costs[chunk as usize].act_copy_bytes,
        _ => 0,
    }
}

/// Replays a device's memory events in time order (frees before allocations at the same
/// instant) and returns the device peak, the split at the peak, the host peak and the curve.
fn replay(events: &mut [MemEvent], curve: bool) -> (u64, MemoryPoint, u64, Vec<MemoryPoint>) {
    events.sort_by(|a, b| a.t.total_cmp(&b.t).then((a.delta > 0).cmp(&(b.delta > 0))));
    let mut level = [0i64; 6];
    let (mut peak, mut host_peak) = (0u64, 0u64);
    let mut at_peak = MemoryPoint::default();
    let mut points = Vec::new();
    let point = |t: f64, level: &[i64; 6]| {
        let u = |x: i64| x.max(0) as u64;
        MemoryPoint {
            t,
            weights: u(level[WEIGHTS]),
            grads: u(level[GRADS]),
            optimizer: u(level[OPTIMIZER]),
            activations: u(level[ACTIVATIONS]),
            comm: u(level[COMM]),
            host: u(level[HOST]),
        }
    };
    for (i, e) in events.iter().enumerate() {
        level[e.category] += e.delta;
        let now = point(e.t, &level);
        let total = now.device_total();
        if total > peak {
            peak = total;
            at_peak = now;
        }
        host_peak = host_peak.max(now.host);
        let last_at_t = events.get(i + 1).is_none_or(|n| n.t > e.t);
        if curve && last_at_t {
            points.push(now);
        }
    }
    (peak, at_peak, host_peak, points)
}

#[cfg(test)]
mod tests;
