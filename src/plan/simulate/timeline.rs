//! The simulator's state, one method per action: each runs the action at the device's cursor
//! if its inputs are there and returns its span, or `None` while it waits on another device.

use super::super::hardware::Hardware;
use super::super::ir::{Action, Group, Plan};
use super::super::residence::StartingPlaces;
use super::costs::{ChunkCost, slice_bytes};
use super::curve::{ACTIVATIONS, COMM, GRADS, HOST, MemEvent, OPTIMIZER, WEIGHTS};

/// Where a group is: on the device since `Some(t)`, or on the host since the copy ended.
#[derive(Clone, Copy)]
struct Residence {
    device_since: Option<f64>,
    host_since: f64,
}

impl Residence {
    fn starting(on_host: bool) -> Self {
        Residence {
            device_since: if on_host { None } else { Some(0.0) },
            host_since: 0.0,
        }
    }

    /// When a group used by compute is on the device; never, if it stays on the host.
    fn ready(&self) -> f64 {
        self.device_since.unwrap_or(f64::INFINITY)
    }
}

/// Everything the simulated step knows so far.
pub(super) struct Timeline<'a> {
    plan: &'a Plan,
    costs: &'a [ChunkCost],
    hw: &'a Hardware,
    chunks: usize,
    slices: usize,
    f_end: Vec<f64>,
    b_end: Vec<f64>,
    act_arrive: Vec<f64>,
    grad_arrive: Vec<f64>,
    stash: Vec<Residence>,
    stash_bytes: Vec<u64>,
    /// Weights and gradients per chunk.
    persistent: Vec<[Residence; 2]>,
    /// Per (chunk, slice).
    optimizer: Vec<Residence>,
    pub events: Vec<Vec<MemEvent>>,
    /// When each device's program can go on.
    pub cursor: Vec<f64>,
    d2h_free: Vec<f64>,
    h2d_free: Vec<f64>,
    /// When the last offload of weights, gradients or optimizer state issued so far ends.
    state_offloaded: Vec<f64>,
    link_free: Vec<f64>,
    pub busy: Vec<f64>,
    pub stall: Vec<f64>,
    /// When each device reached its `TIE`.
    tie_posted: Vec<Option<f64>>,
}

impl<'a> Timeline<'a> {
    /// The step's start: persistent groups where the program leaves them, their bytes
    /// counted on the device or the host.
    pub fn new(plan: &'a Plan, costs: &'a [ChunkCost], hw: &'a Hardware) -> Self {
        let p = plan.devices();
        let (m, nc) = (plan.microbatches as usize, plan.chunks.len());
        let k = plan.optimizer_slices.max(1) as usize;
        let places = StartingPlaces::of(plan);
        let persistent: Vec<[Residence; 2]> = (0..nc as u32)
            .map(|chunk| {
                [
                    Residence::starting(places.on_host(Group::Weights { chunk })),
                    Residence::starting(places.on_host(Group::Grads { chunk })),
                ]
            })
            .collect();
        let optimizer: Vec<Residence> = (0..nc * k)
            .map(|i| {
                let (chunk, slice) = ((i / k) as u32, (i % k) as u32);
                Residence::starting(places.on_host(Group::Optimizer { chunk, slice }))
            })
            .collect();
        let mut events: Vec<Vec<MemEvent>> = vec![Vec::new(); p];
        for (c, cost) in costs.iter().enumerate() {
            let d = plan.chunks[c].device as usize;
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
        Timeline {
            plan,
            costs,
            hw,
            chunks: nc,
            slices: k,
            f_end: vec![f64::NAN; m * nc],
            b_end: vec![f64::NAN; m * nc],
            act_arrive: vec![f64::NAN; m * nc],
            grad_arrive: vec![f64::NAN; m * nc],
            stash: vec![Residence::starting(false); m * nc],
            stash_bytes: vec![0u64; m * nc],
            persistent,
            optimizer,
            events,
            cursor: vec![0f64; p],
            d2h_free: vec![0f64; p],
            h2d_free: vec![0f64; p],
            state_offloaded: vec![0f64; p],
            link_free: vec![0f64; p * p],
            busy: vec![0f64; p],
            stall: vec![0f64; p],
            tie_posted: vec![None; p],
        }
    }

    /// When every forward and backward has ended.
    pub fn compute_end(&self) -> f64 {
        self.b_end.iter().cloned().fold(0.0, f64::max)
    }

    /// Runs `a` on device `d` if it can: its span, or `None` while it waits.
    pub fn run(&mut self, d: usize, a: Action) -> Option<(f64, f64)> {
        match a {
            Action::Forward {
                mb,
                chunk,
                drop_stash,
            } => self.forward(d, mb, chunk, drop_stash),
            Action::Recompute { mb, chunk } => self.recompute(d, mb, chunk),
            Action::Backward { mb, chunk } => self.backward(d, mb, chunk),
            Action::Step { chunk, slice } => Some(self.step(d, chunk, slice)),
            Action::Reduce { chunk, shard } => Some(self.reduce(d, chunk, shard)),
            Action::Gather { chunk } => Some(self.gather(d, chunk)),
            Action::Tie => self.tie(d),
            Action::SendAct { mb, chunk, peer } => Some(self.send(d, mb, chunk, peer, true)),
            Action::SendGrad { mb, chunk, peer } => Some(self.send(d, mb, chunk, peer, false)),
            Action::RecvAct { mb, chunk, .. } => self.receive(d, mb, chunk, true),
            Action::RecvGrad { mb, chunk, .. } => self.receive(d, mb, chunk, false),
            Action::Offload(g) => Some(self.offload(d, g)),
            Action::Prefetch(g) => Some(self.prefetch(d, g)),
        }
    }

    fn at(&self, mb: u32, c: u32) -> usize {
        mb as usize * self.chunks + c as usize
    }

    fn dev(&self, c: u32) -> usize {
        self.plan.chunks[c as usize].device as usize
    }

    fn last(&self) -> u32 {
        self.chunks as u32 - 1
    }

    fn push(&mut self, d: usize, t: f64, delta: i64, category: usize) {
        if delta != 0 {
            self.events[d].push(MemEvent { t, delta, category });
        }
    }

    fn forward(&mut self, d: usize, mb: u32, c: u32, drop_stash: bool) -> Option<(f64, f64)> {
        let input = if c == 0 {
            0.0
        } else if self.dev(c - 1) == d {
            self.f_end[self.at(mb, c - 1)]
        } else {
            self.act_arrive[self.at(mb, c - 1)]
        };
        if input.is_nan() {
            return None;
        }
        let ready = self.cursor[d].max(input);
        let start = ready.max(self.persistent[c as usize][WEIGHTS].ready());
        self.stall[d] += start - ready;
        let cost = self.costs[c as usize];
        let mm = cost.memory;
        let end = start + cost.forward_s;
        let (action, kept) = if drop_stash {
            (mm.forward_dropping, mm.kept_bytes)
        } else {
            (mm.forward, mm.stash_bytes)
        };
        let peak = action.peak_above_start as i64;
        self.push(d, start, peak, ACTIVATIONS);
        self.push(d, end, -peak, ACTIVATIONS);
        self.push(d, end, (kept - mm.input_bytes) as i64, ACTIVATIONS);
        let out_category = if c < self.last() && self.dev(c + 1) == d {
            ACTIVATIONS
        } else {
            COMM
        };
        self.push(d, end, mm.output_bytes as i64, out_category);
        let i = self.at(mb, c);
        self.f_end[i] = end;
        self.stash[i] = Residence {
            device_since: Some(end),
            host_since: end,
        };
        self.stash_bytes[i] = kept;
        self.busy[d] += cost.forward_s;
        self.cursor[d] = end;
        Some((start, end))
    }

    fn recompute(&mut self, d: usize, mb: u32, c: u32) -> Option<(f64, f64)> {
        let i = self.at(mb, c);
        let ready_at = self.stash[i].device_since?;
        let now = self.cursor[d];
        let w = self.persistent[c as usize][WEIGHTS].ready();
        let start = now.max(ready_at).max(w);
        self.stall[d] += start - now;
        let cost = self.costs[c as usize];
        let mm = cost.memory;
        let end = start + cost.forward_s;
        let peak = mm.recompute.peak_above_start as i64;
        self.push(d, start, peak, ACTIVATIONS);
        self.push(d, end, -peak, ACTIVATIONS);
        self.push(d, end, mm.recompute.net, ACTIVATIONS);
        self.stash_bytes[i] = mm.stash_bytes;
        self.busy[d] += cost.forward_s;
        self.cursor[d] = end;
        Some((start, end))
    }

    fn backward(&mut self, d: usize, mb: u32, c: u32) -> Option<(f64, f64)> {
        let grad = if c == self.last() {
            0.0
        } else if self.dev(c + 1) == d {
            self.b_end[self.at(mb, c + 1)]
        } else {
            self.grad_arrive[self.at(mb, c + 1)]
        };
        if grad.is_nan() {
            return None;
        }
        let i = self.at(mb, c);
        let ready = self.cursor[d].max(grad);
        let [weights, grads] = self.persistent[c as usize];
        let groups = [
            self.stash[i].device_since.unwrap_or(f64::INFINITY),
            weights.ready(),
            grads.ready(),
        ];
        let start = groups.into_iter().fold(ready, f64::max);
        self.stall[d] += start - ready;
        let cost = self.costs[c as usize];
        let mm = cost.memory;
        let end = start + cost.backward_s;
        let peak = mm.backward.peak_above_start as i64;
        self.push(d, start, peak, ACTIVATIONS);
        self.push(d, end, -peak, ACTIVATIONS);
        self.push(d, end, -(self.stash_bytes[i] as i64), ACTIVATIONS);
        self.push(d, end, -(mm.grad_in_bytes as i64), COMM);
        self.push(d, end, mm.grad_out_bytes as i64, COMM);
        self.stash_bytes[i] = 0;
        self.b_end[i] = end;
        self.busy[d] += cost.backward_s;
        self.cursor[d] = end;
        Some((start, end))
    }

    fn step(&mut self, d: usize, c: u32, slice: u32) -> (f64, f64) {
        let now = self.cursor[d];
        let [weights, grads] = self.persistent[c as usize];
        let ready = [
            weights.ready(),
            grads.ready(),
            self.optimizer[c as usize * self.slices + slice as usize].ready(),
        ]
        .into_iter()
        .fold(now, f64::max);
        self.stall[d] += ready - now;
        let end = ready + self.costs[c as usize].step_s / self.slices as f64;
        self.cursor[d] = end;
        (ready, end)
    }

    /// An all-reduce of the chunk's gradients, or (`shard`) its reduce-scatter half.
    fn reduce(&mut self, d: usize, c: u32, shard: bool) -> (f64, f64) {
        let now = self.cursor[d];
        let start = now.max(self.persistent[c as usize][GRADS].ready());
        self.stall[d] += start - now;
        let (replicas, bytes) = (self.plan.replicas, self.costs[c as usize].grad_bytes);
        let end = start
            + if shard {
                self.hw.ring_half_s(replicas, bytes)
            } else {
                self.hw.reduction_s(replicas, bytes)
            };
        self.cursor[d] = end;
        (start, end)
    }

    /// The all-gather of the chunk's updated weights: in place, no memory added.
    fn gather(&mut self, d: usize, c: u32) -> (f64, f64) {
        let now = self.cursor[d];
        let start = now.max(self.persistent[c as usize][WEIGHTS].ready());
        self.stall[d] += start - now;
        let bytes = self.costs[c as usize].weight_bytes;
        let end = start + self.hw.ring_half_s(self.plan.replicas, bytes);
        self.cursor[d] = end;
        (start, end)
    }

    /// `TIE`: the embedding's device and the head's meet; the table's gradient goes to the
    /// head's device, which adds it to its copy's and sends the sum back, holding the one it
    /// received meanwhile. On one device, a local sum.
    fn tie(&mut self, d: usize) -> Option<(f64, f64)> {
        let posted = *self.tie_posted[d].get_or_insert(self.cursor[d]);
        let (e, h) = (self.dev(0), self.dev(self.last()));
        let start = self.tie_posted[e]?.max(self.tie_posted[h]?);
        let bytes = self.costs[self.last() as usize].tie_bytes;
        let mut end = start;
        if e != h {
            let link = self.hw.p2p_s(bytes) + self.hw.p2p_latency_s;
            end += 2.0 * link;
            if d == h {
                self.push(h, start + link, bytes as i64, COMM);
                self.push(h, end - link, -(bytes as i64), COMM);
            }
        }
        self.stall[d] += start - posted;
        self.cursor[d] = end;
        Some((posted, end))
    }

    /// A send is queued on its link when the program reaches it and does not hold the
    /// program; the sender's copy is freed when it arrives.
    fn send(&mut self, d: usize, mb: u32, c: u32, peer: u32, activation: bool) -> (f64, f64) {
        let memory = &self.costs[c as usize].memory;
        let (bytes, made) = if activation {
            (memory.output_bytes, self.f_end[self.at(mb, c)])
        } else {
            (memory.grad_out_bytes, self.b_end[self.at(mb, c)])
        };
        let p = self.plan.devices();
        let link = d * p + peer as usize;
        let start = self.cursor[d].max(self.link_free[link]).max(made);
        let end = start + self.hw.p2p_s(bytes);
        self.link_free[link] = end;
        let arrive = end + self.hw.p2p_latency_s;
        let i = self.at(mb, c);
        if activation {
            self.act_arrive[i] = arrive;
        } else {
            self.grad_arrive[i] = arrive;
        }
        self.push(d, arrive, -(bytes as i64), COMM);
        (start, arrive)
    }

    /// A receive holds the program until its data arrives; its buffer is taken when the
    /// program posts it.
    fn receive(&mut self, d: usize, mb: u32, c: u32, activation: bool) -> Option<(f64, f64)> {
        let i = self.at(mb, c);
        let arrive = if activation {
            self.act_arrive[i]
        } else {
            self.grad_arrive[i]
        };
        if arrive.is_nan() {
            return None;
        }
        let memory = &self.costs[c as usize].memory;
        let (bytes, category) = if activation {
            (memory.output_bytes, ACTIVATIONS)
        } else {
            (memory.grad_out_bytes, COMM)
        };
        let now = self.cursor[d];
        self.push(d, now, bytes as i64, category);
        self.cursor[d] = now.max(arrive);
        Some((now, self.cursor[d]))
    }

    fn offload(&mut self, d: usize, g: Group) -> (f64, f64) {
        let now = self.cursor[d];
        let (res, bytes, category) = self.group(g);
        let since = res.device_since.unwrap_or(now);
        let start = now.max(self.d2h_free[d]).max(since);
        let end = start + self.hw.host_copy_s(bytes);
        self.d2h_free[d] = end;
        if !matches!(g, Group::Stash { .. }) {
            self.state_offloaded[d] = end;
        }
        let res = self.residence(g);
        res.device_since = None;
        res.host_since = end;
        self.push(d, start, bytes as i64, HOST);
        self.push(d, start, -(self.act_copies(g) as i64), WEIGHTS);
        self.push(d, end, -(bytes as i64), category);
        (start, end)
    }

    fn prefetch(&mut self, d: usize, g: Group) -> (f64, f64) {
        let now = self.cursor[d];
        let (res, bytes, category) = self.group(g);
        let mut start = now.max(self.h2d_free[d]).max(res.host_since);
        if !matches!(g, Group::Stash { .. }) {
            start = start.max(self.state_offloaded[d]);
        }
        let end = start + self.hw.host_copy_s(bytes);
        self.h2d_free[d] = end;
        self.residence(g).device_since = Some(end);
        self.push(d, start, bytes as i64, category);
        self.push(d, start, self.act_copies(g) as i64, WEIGHTS);
        self.push(d, end, -(bytes as i64), HOST);
        (start, end)
    }

    /// A group's residence (a copy), its bytes and its memory category.
    fn group(&mut self, g: Group) -> (Residence, u64, usize) {
        let cost = &self.costs[g.chunk() as usize];
        let (bytes, category) = match g {
            Group::Stash { mb, chunk } => (self.stash_bytes[self.at(mb, chunk)], ACTIVATIONS),
            Group::Weights { .. } => (cost.weight_bytes, WEIGHTS),
            Group::Grads { .. } => (cost.grad_bytes, GRADS),
            Group::Optimizer { slice, .. } => {
                (slice_bytes(cost, self.slices, slice as usize), OPTIMIZER)
            }
        };
        (*self.residence(g), bytes, category)
    }

    fn residence(&mut self, g: Group) -> &mut Residence {
        match g {
            Group::Stash { mb, chunk } => {
                let i = self.at(mb, chunk);
                &mut self.stash[i]
            }
            Group::Weights { chunk } => &mut self.persistent[chunk as usize][WEIGHTS],
            Group::Grads { chunk } => &mut self.persistent[chunk as usize][GRADS],
            Group::Optimizer { chunk, slice } => {
                &mut self.optimizer[chunk as usize * self.slices + slice as usize]
            }
        }
    }

    /// The bf16 weight copies an offload of `g` drops or its prefetch allocates.
    fn act_copies(&self, g: Group) -> u64 {
        match g {
            Group::Weights { chunk } => self.costs[chunk as usize].act_copy_bytes,
            _ => 0,
        }
    }
}
