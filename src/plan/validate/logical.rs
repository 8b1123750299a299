//! The validator's logical run, one method per action: each checks the action's place and
//! inputs and records what it makes. `Ok(false)`: the action waits on another device.

use std::collections::HashSet;

use super::super::ir::{Action, Group, Plan};
use super::super::residence::StartingPlaces;

/// Where a group lives during the logical run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    Device,
    Host,
}

impl Place {
    fn starting(on_host: bool) -> Self {
        if on_host { Place::Host } else { Place::Device }
    }
}

/// What the logical run knows.
pub(super) struct State<'a> {
    plan: &'a Plan,
    pub m: usize,
    pub chunks: usize,
    pub forward: Vec<bool>,
    dropped: Vec<bool>,
    recomputed: Vec<bool>,
    pub backward: Vec<bool>,
    /// The output of F(mb, c) is on the device that consumes it (received, or produced there).
    act_sent: HashSet<(u32, u32)>,
    act_here: Vec<bool>,
    grad_sent: HashSet<(u32, u32)>,
    grad_here: Vec<bool>,
    next_backward_mb: Vec<u32>,
    backwards_done: Vec<u32>,
    pub slices: usize,
    pub steps_done: Vec<u32>,
    pub replicas: u32,
    pub reduced: Vec<bool>,
    /// Chunks reduced by `RS<c>`, and those of them whose weights `AG<c>` gathered.
    pub sharded: Vec<bool>,
    pub gathered: Vec<bool>,
    /// Whether the plan sums tied embeddings' gradients (`TIE`), and the devices that have
    /// reached and passed their `TIE`.
    pub tied: bool,
    tie_posted: Vec<bool>,
    pub tie_done: Vec<bool>,
    stash: Vec<Place>,
    weights: Vec<Place>,
    grads: Vec<Place>,
    optimizer: Vec<Place>,
}

type Checked = Result<bool, String>;

impl<'a> State<'a> {
    /// The step's start: no pass run, persistent groups where the programs leave them.
    pub fn new(plan: &'a Plan) -> Self {
        let (m, chunks) = (plan.microbatches as usize, plan.chunks.len());
        let slices = plan.optimizer_slices as usize;
        let places = StartingPlaces::of(plan);
        let per_chunk = |group: fn(u32) -> Group| -> Vec<Place> {
            (0..chunks as u32)
                .map(|c| Place::starting(places.on_host(group(c))))
                .collect()
        };
        let optimizer = (0..chunks * slices)
            .map(|i| {
                let (chunk, slice) = ((i / slices) as u32, (i % slices) as u32);
                Place::starting(places.on_host(Group::Optimizer { chunk, slice }))
            })
            .collect();
        State {
            plan,
            m,
            chunks,
            forward: vec![false; m * chunks],
            dropped: vec![false; m * chunks],
            recomputed: vec![false; m * chunks],
            backward: vec![false; m * chunks],
            act_sent: HashSet::new(),
            act_here: vec![false; m * chunks],
            grad_sent: HashSet::new(),
            grad_here: vec![false; m * chunks],
            next_backward_mb: vec![0; chunks],
            backwards_done: vec![0; chunks],
            slices,
            steps_done: vec![0; chunks * slices],
            replicas: plan.replicas,
            reduced: vec![false; chunks],
            sharded: vec![false; chunks],
            gathered: vec![false; chunks],
            tied: plan.programs.iter().flatten().any(|a| *a == Action::Tie),
            tie_posted: vec![false; plan.programs.len()],
            tie_done: vec![false; plan.programs.len()],
            stash: vec![Place::Host; m * chunks],
            weights: per_chunk(|chunk| Group::Weights { chunk }),
            grads: per_chunk(|chunk| Group::Grads { chunk }),
            optimizer,
        }
    }

    pub fn at(&self, mb: u32, c: u32) -> usize {
        mb as usize * self.chunks + c as usize
    }

    /// Runs `a` on device `d` if it can.
    pub fn run(&mut self, d: usize, a: Action) -> Checked {
        match a {
            Action::Forward {
                mb,
                chunk,
                drop_stash,
            } => self.forward(d, mb, chunk, drop_stash),
            Action::Recompute { mb, chunk } => self.recompute(d, mb, chunk),
            Action::Backward { mb, chunk } => self.backward(d, mb, chunk),
            Action::SendAct { mb, chunk, peer } => self.send_act(d, mb, chunk, peer),
            Action::RecvAct { mb, chunk, peer } => self.recv_act(d, mb, chunk, peer),
            Action::SendGrad { mb, chunk, peer } => self.send_grad(d, mb, chunk, peer),
            Action::RecvGrad { mb, chunk, peer } => self.recv_grad(d, mb, chunk, peer),
            Action::Offload(g) => self.relocate(d, g, Place::Host),
            Action::Prefetch(g) => self.relocate(d, g, Place::Device),
            Action::Step { chunk, slice } => self.step(d, chunk, slice),
            Action::Reduce { chunk, shard } => self.reduction(d, chunk, shard),
            Action::Gather { chunk } => self.gather(d, chunk),
            Action::Tie => self.tie(d),
        }
    }

    fn dev(&self, c: u32) -> Option<usize> {
        self.plan.device_of(c).map(|d| d as usize)
    }

    fn last(&self) -> u32 {
        self.chunks as u32 - 1
    }

    /// The index of (mb, c), both checked to exist.
    fn check_mc(&self, mb: u32, c: u32) -> Result<usize, String> {
        if mb as usize >= self.m {
            return Err(format!(
                "micro-batch {mb} does not exist ({} micro-batches)",
                self.m
            ));
        }
        if c as usize >= self.chunks {
            return Err(format!("chunk {c} does not exist ({} chunks)", self.chunks));
        }
        Ok(self.at(mb, c))
    }

    fn holds(&self, d: usize, c: u32) -> Result<(), String> {
        if self.dev(c) == Some(d) {
            Ok(())
        } else {
            Err(format!(
                "chunk {c} is on device {}, not this one",
                self.dev(c).unwrap_or(usize::MAX)
            ))
        }
    }

    fn resident(place: &[Place], c: u32, what: &str) -> Result<(), String> {
        if place[c as usize] == Place::Device {
            Ok(())
        } else {
            Err(format!(
                "{what} of chunk {c} are on the host here; prefetch them first"
            ))
        }
    }

    fn forward(&mut self, d: usize, mb: u32, c: u32, drop_stash: bool) -> Checked {
        let i = self.check_mc(mb, c)?;
        self.holds(d, c)?;
        Self::resident(&self.weights, c, "the weights")?;
        if self.forward[i] {
            return Err(format!("second forward of ({mb}, {c})"));
        }
        if c > 0 && !self.act_here[self.at(mb, c - 1)] {
            if self.dev(c - 1) == Some(d) {
                return Err(format!("its input, from F{mb}.{}, is not made yet", c - 1));
            }
            return Err(format!(
                "its input is never received: RA{mb}.{}<{} must come first",
                c - 1,
                self.dev(c - 1).unwrap_or(0)
            ));
        }
        self.forward[i] = true;
        self.dropped[i] = drop_stash;
        self.stash[i] = Place::Device;
        // Handing over to the next chunk on this device needs no transfer.
        if c < self.last() && self.dev(c + 1) == Some(d) {
            self.act_here[i] = true;
        }
        Ok(true)
    }

    fn recompute(&mut self, d: usize, mb: u32, c: u32) -> Checked {
        let i = self.check_mc(mb, c)?;
        self.holds(d, c)?;
        Self::resident(&self.weights, c, "the weights")?;
        if !self.forward[i] || !self.dropped[i] {
            return Err(format!(
                "recompute of ({mb}, {c}) needs an earlier FD{mb}.{c}"
            ));
        }
        if self.recomputed[i] || self.backward[i] {
            return Err(format!("recompute of ({mb}, {c}) comes too late or twice"));
        }
        if self.stash[i] != Place::Device {
            return Err(format!("the kept input of ({mb}, {c}) is on the host"));
        }
        self.recomputed[i] = true;
        Ok(true)
    }

    fn backward(&mut self, d: usize, mb: u32, c: u32) -> Checked {
        let i = self.check_mc(mb, c)?;
        self.holds(d, c)?;
        Self::resident(&self.weights, c, "the weights")?;
        Self::resident(&self.grads, c, "the gradients")?;
        if !self.forward[i] {
            return Err(format!("backward before forward of ({mb}, {c})"));
        }
        if self.backward[i] {
            return Err(format!("second backward of ({mb}, {c})"));
        }
        if self.dropped[i] && !self.recomputed[i] {
            return Err(format!(
                "the stash of ({mb}, {c}) was dropped; R{mb}.{c} first"
            ));
        }
        if self.stash[i] != Place::Device {
            return Err(format!(
                "the stash of ({mb}, {c}) is on the host; PRE:S{mb}.{c} first"
            ));
        }
        if self.next_backward_mb[c as usize] != mb {
            return Err(format!(
                "chunk {c}'s backwards must run in micro-batch order; expected {}",
                self.next_backward_mb[c as usize]
            ));
        }
        if c < self.last() && !self.grad_here[self.at(mb, c + 1)] {
            if self.dev(c + 1) == Some(d) {
                return Err(format!(
                    "its gradient, from B{mb}.{}, is not made yet",
                    c + 1
                ));
            }
            return Err(format!(
                "its gradient is never received: RG{mb}.{}<{} must come first",
                c + 1,
                self.dev(c + 1).unwrap_or(0)
            ));
        }
        self.backward[i] = true;
        self.next_backward_mb[c as usize] += 1;
        self.backwards_done[c as usize] += 1;
        if c > 0 && self.dev(c - 1) == Some(d) {
            self.grad_here[i] = true;
        }
        Ok(true)
    }

    fn send_act(&mut self, d: usize, mb: u32, c: u32, peer: u32) -> Checked {
        let i = self.check_mc(mb, c)?;
        self.holds(d, c)?;
        if c == self.last() || self.dev(c + 1) != Some(peer as usize) {
            return Err(format!(
                "the output of chunk {c} does not go to device {peer}"
            ));
        }
        if !self.forward[i] {
            return Err(format!("sends the output of F{mb}.{c} before making it"));
        }
        if !self.act_sent.insert((mb, c)) {
            return Err("sent twice".into());
        }
        Ok(true)
    }

    fn recv_act(&mut self, d: usize, mb: u32, c: u32, peer: u32) -> Checked {
        let i = self.check_mc(mb, c)?;
        if c == self.last() || self.dev(c + 1) != Some(d) || self.dev(c) != Some(peer as usize) {
            return Err(format!(
                "the output of chunk {c} comes from device {} to the holder of chunk {}",
                self.dev(c).unwrap_or(0),
                c + 1
            ));
        }
        if !self.act_sent.contains(&(mb, c)) {
            return Ok(false);
        }
        self.act_here[i] = true;
        Ok(true)
    }

    fn send_grad(&mut self, d: usize, mb: u32, c: u32, peer: u32) -> Checked {
        let i = self.check_mc(mb, c)?;
        self.holds(d, c)?;
        if c == 0 || self.dev(c - 1) != Some(peer as usize) {
            return Err(format!(
                "the input gradient of chunk {c} does not go to device {peer}"
            ));
        }
        if !self.backward[i] {
            return Err(format!("sends the gradient of B{mb}.{c} before making it"));
        }
        if !self.grad_sent.insert((mb, c)) {
            return Err("sent twice".into());
        }
        Ok(true)
    }

    fn recv_grad(&mut self, d: usize, mb: u32, c: u32, peer: u32) -> Checked {
        let i = self.check_mc(mb, c)?;
        if c == 0 || self.dev(c - 1) != Some(d) || self.dev(c) != Some(peer as usize) {
            return Err(format!(
                "the input gradient of chunk {c} comes from device {} to the holder of chunk {}",
                self.dev(c).unwrap_or(0),
                c.saturating_sub(1)
            ));
        }
        if !self.grad_sent.contains(&(mb, c)) {
            return Ok(false);
        }
        self.grad_here[i] = true;
        Ok(true)
    }

    /// An offload (`to` the host) or a prefetch (`to` the device).
    fn relocate(&mut self, d: usize, g: Group, to: Place) -> Checked {
        let c = g.chunk();
        if c as usize >= self.chunks {
            return Err(format!("chunk {c} does not exist"));
        }
        self.holds(d, c)?;
        let place = match g {
            Group::Stash { mb, chunk } => {
                let i = self.check_mc(mb, chunk)?;
                if !self.forward[i] || self.backward[i] {
                    return Err(format!(
                        "the stash of ({mb}, {chunk}) exists only between its forward and backward"
                    ));
                }
                &mut self.stash[i]
            }
            Group::Weights { chunk } => &mut self.weights[chunk as usize],
            Group::Grads { chunk } => &mut self.grads[chunk as usize],
            Group::Optimizer { chunk, slice } => {
                if slice as usize >= self.slices {
                    return Err(format!("optimizer slice {slice} does not exist"));
                }
                &mut self.optimizer[chunk as usize * self.slices + slice as usize]
            }
        };
        if *place == to {
            return Err(format!("{g} is already there"));
        }
        *place = to;
        Ok(true)
    }

    fn step(&mut self, d: usize, c: u32, slice: u32) -> Checked {
        if c as usize >= self.chunks || slice as usize >= self.slices {
            return Err(format!("chunk {c}, optimizer slice {slice} does not exist"));
        }
        self.holds(d, c)?;
        Self::resident(&self.weights, c, "the weights")?;
        Self::resident(&self.grads, c, "the gradients")?;
        self.tied_before(d, c, "optimizer step")?;
        let i = c as usize * self.slices + slice as usize;
        if self.optimizer[i] != Place::Device {
            return Err(format!(
                "optimizer state slice {slice} of chunk {c} is on the host; prefetch it first"
            ));
        }
        if self.steps_done[i] > 0 {
            return Err(format!("second step of chunk {c} slice {slice}"));
        }
        self.steps_done[i] += 1;
        if self.backwards_done[c as usize] as usize != self.m {
            return Err(format!(
                "optimizer step of chunk {c} before all its {} backwards",
                self.m
            ));
        }
        // The device's first step takes the norm of all of its chunks' gradients.
        let unfinished = (0..self.chunks).find(|&other| {
            self.dev(other as u32) == Some(d) && self.backwards_done[other] as usize != self.m
        });
        if let Some(other) = unfinished {
            return Err(format!(
                "optimizer step of chunk {c} before all {} backwards of chunk {other} on the \
                 same device (a device's steps clip by the gradient norm of all its chunks)",
                self.m
            ));
        }
        let unreduced = (0..self.chunks).find(|&other| {
            self.replicas > 1 && self.dev(other as u32) == Some(d) && !self.reduced[other]
        });
        if let Some(other) = unreduced {
            return Err(format!(
                "optimizer step of chunk {c} before AR{other}: a device steps on the \
                 gradients summed over the replicas, all of its chunks'"
            ));
        }
        Ok(true)
    }

    /// `AR<c>` / `RS<c>`: after all of the chunk's backwards, once, on its device.
    fn reduction(&mut self, d: usize, c: u32, shard: bool) -> Checked {
        if c as usize >= self.chunks {
            return Err(format!("chunk {c} does not exist ({} chunks)", self.chunks));
        }
        if self.dev(c) != Some(d) {
            return Err(format!("chunk {c} is not on this device"));
        }
        if self.replicas < 2 {
            return Err("a plan with one replica has no gradients to reduce".into());
        }
        if self.grads[c as usize] != Place::Device {
            return Err(format!(
                "the gradients of chunk {c} are on the host here; prefetch them first"
            ));
        }
        if self.backwards_done[c as usize] as usize != self.m {
            return Err(format!(
                "reduction of chunk {c} before all its {} backwards",
                self.m
            ));
        }
        self.tied_before(d, c, "reduction")?;
        if std::mem::replace(&mut self.reduced[c as usize], true) {
            return Err(format!("second reduction of chunk {c}"));
        }
        self.sharded[c as usize] = shard;
        Ok(true)
    }

    /// `AG<c>`: after every step of a chunk reduced by `RS<c>`, once, its weights on the
    /// device.
    fn gather(&mut self, d: usize, c: u32) -> Checked {
        if c as usize >= self.chunks {
            return Err(format!("chunk {c} does not exist ({} chunks)", self.chunks));
        }
        if self.dev(c) != Some(d) {
            return Err(format!("chunk {c} is not on this device"));
        }
        if !self.sharded[c as usize] {
            return Err(format!(
                "AG{c} gathers the shards of a sharded chunk: reduce chunk {c} by RS{c} first"
            ));
        }
        let slices = c as usize * self.slices..(c as usize + 1) * self.slices;
        if self.steps_done[slices].contains(&0) {
            return Err(format!(
                "weights of chunk {c} gathered before all its optimizer slices stepped"
            ));
        }
        Self::resident(&self.weights, c, "the weights")?;
        if std::mem::replace(&mut self.gathered[c as usize], true) {
            return Err(format!("second gathering of chunk {c}"));
        }
        Ok(true)
    }

    /// The chunks whose gradients `TIE` sums (the embedding's and the head's) on device `d`.
    fn tied_here(&self, d: usize) -> Vec<u32> {
        let mut ends = vec![0, self.last()];
        ends.dedup();
        ends.retain(|&c| self.dev(c) == Some(d));
        ends
    }

    /// In a plan with `TIE`, a tied chunk's `what` comes after its device's `TIE`.
    fn tied_before(&self, d: usize, c: u32, what: &str) -> Result<(), String> {
        if self.tied && self.tied_here(d).contains(&c) && !self.tie_done[d] {
            return Err(format!(
                "{what} of chunk {c} before the device's TIE: it needs the tied gradients summed"
            ));
        }
        Ok(())
    }

    /// `TIE`: once on each device holding the embedding's or the head's chunk, after all their
    /// backwards, their gradients on the device; waits for the other device's `TIE`.
    fn tie(&mut self, d: usize) -> Checked {
        let here = self.tied_here(d);
        if here.is_empty() {
            return Err(
                "TIE runs only on the devices holding chunk 0 (the embedding) and the last \
                 chunk (the head)"
                    .into(),
            );
        }
        if self.tie_done[d] {
            return Err("second TIE on this device".into());
        }
        if !self.tie_posted[d] {
            for &c in &here {
                if self.backwards_done[c as usize] as usize != self.m {
                    return Err(format!("TIE before all {} backwards of chunk {c}", self.m));
                }
                Self::resident(&self.grads, c, "the gradients")?;
            }
            self.tie_posted[d] = true;
        }
        let ends = [0, self.last()].map(|c| self.dev(c));
        if !ends.iter().flatten().all(|&p| self.tie_posted[p]) {
            return Ok(false);
        }
        self.tie_done[d] = true;
        Ok(true)
    }
}
