//! A plan's devices on several machines: what one step moves between each pair of run-wide
//! devices (activations and gradients between pipeline neighbours, each chunk's gradient
//! reduction and weight gathering among its replicas, as the ranks' TCP transport or NCCL
//! sends them: `Collectives`), what that costs where a pair
//! sits on two machines (the bandwidth and latency of the link between those two, which may
//! differ from pair to pair: `Links`), and the placement that keeps the pairs that talk most
//! on one machine. Devices on one machine are taken to talk for free.

use std::collections::BTreeMap;

use super::cost::part_params;
use super::inventory::Profile;
use super::ir::{Action, Plan};
use super::tensors::{MicroShape, ModelDims};

/// The link between two machines.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Network {
    pub bytes_per_s: f64,
    pub latency_s: f64,
}

impl Default for Network {
    /// A 10 Gb/s Ethernet link with 50 us per message.
    fn default() -> Self {
        Network {
            bytes_per_s: 1.25e9,
            latency_s: 50e-6,
        }
    }
}

/// The link between each pair of a placement's machines (by their index in the placement).
pub trait Links {
    /// The network between machines `a` and `b` (`a != b`).
    fn between(&self, a: usize, b: usize) -> Network;
}

/// One network between every pair of machines.
impl Links for Network {
    fn between(&self, _: usize, _: usize) -> Network {
        *self
    }
}

/// How the replicas of a stage exchange a reduction or a gathering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collectives {
    /// As the ranks over TCP do (`pipeline::tcp_ranks`): a replica sends every other its whole
    /// gradient for a whole reduction (each then sums all copies in replica order), and the
    /// share the receiver owns for a sharded one (`RS`) or a gathering (`AG`).
    AllToAll,
    /// As a ring (NCCL between GPUs, `cuda::nccl_ranks`): a replica sends only to the next
    /// one, `2(r-1)/r` of the gradient in `2(r-1)` messages for a whole reduction, `(r-1)/r`
    /// in `r-1` for `RS` or `AG`.
    Ring,
}

/// What one step moves from one run-wide device to another: bytes and messages.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Traffic {
    pub links: BTreeMap<(u32, u32), (f64, u32)>,
}

impl Traffic {
    fn add(&mut self, from: u32, to: u32, bytes: f64, messages: u32) {
        let link = self.links.entry((from, to)).or_default();
        link.0 += bytes;
        link.1 += messages;
    }

    /// Seconds a step spends on the links between machines, `machine[d]` being run-wide
    /// device `d`'s, each pair of machines paying its own link's figures (no overlap with
    /// compute assumed: an upper bound).
    pub fn network_s(&self, machine: &[usize], links: &dyn Links) -> f64 {
        (self.links.iter())
            .map(|((a, b), link)| (machine[*a as usize], machine[*b as usize], link))
            .filter(|(a, b, _)| a != b)
            .map(|(a, b, (bytes, messages))| {
                let network = links.between(a, b);
                bytes / network.bytes_per_s.max(1.0) + *messages as f64 * network.latency_s
            })
            .sum()
    }
}

/// The traffic of `plan`, run by `plan.replicas` replicas (run-wide device `d` is stage
/// `d % stages` of replica `d / stages`), for a model of `dims` laid out as `profile` (which
/// says the bytes of an activation, a gradient and a weight), in micro-batches of `micro`,
/// the replicas' collectives sent as `collectives` says.
pub fn traffic(
    plan: &Plan,
    profile: Profile,
    dims: &ModelDims,
    micro: MicroShape,
    collectives: Collectives,
) -> Traffic {
    let stages = plan.devices() as u32;
    let replicas = plan.replicas.max(1);
    let activation = profile.activation_dtype().bytes() as f64;
    let state = profile.state_bytes();
    let boundary = (micro.batch * micro.seq * dims.hidden) as f64 * activation;
    // A chunk's parameters: its gradients are reduced, its weights gathered.
    let chunk_params: Vec<f64> = (plan.chunks.iter())
        .map(|c| {
            let params: u64 = (c.parts().into_iter())
                .map(|p| part_params(profile, dims, p))
                .sum();
            params as f64
        })
        .collect();
    // What one replica of a stage sends for a collective over `bytes` (a whole reduction or
    // not), to which replicas: (receiving replica, bytes, messages).
    let r = replicas as f64;
    let sends = |replica: u32, bytes: f64, whole: bool| -> Vec<(u32, f64, u32)> {
        let others = (0..replicas).filter(move |&o| o != replica);
        match (collectives, whole) {
            (Collectives::AllToAll, true) => others.map(|o| (o, bytes, 1)).collect(),
            (Collectives::AllToAll, false) => others.map(|o| (o, bytes / r, 1)).collect(),
            (Collectives::Ring, _) if replicas < 2 => Vec::new(),
            (Collectives::Ring, whole) => {
                let rounds = if whole {
                    2 * (replicas - 1)
                } else {
                    replicas - 1
                };
                let next = (replica + 1) % replicas;
                vec![(next, bytes * f64::from(rounds) / r, rounds)]
            }
        }
    };
    // Tied embeddings: the two devices holding the table's uses each send it once a step.
    let tie_devices: Vec<u32> = (0..stages)
        .filter(|&d| plan.programs[d as usize].contains(&Action::Tie))
        .collect();
    // The tied table's gradient.
    let table = (dims.vocab * dims.hidden) as f64 * state.grad as f64;
    let mut traffic = Traffic::default();
    for replica in 0..replicas {
        let base = replica * stages;
        for (device, program) in plan.programs.iter().enumerate() {
            let device = device as u32;
            for action in program {
                let (bytes, whole) = match *action {
                    Action::SendAct { peer, .. } | Action::SendGrad { peer, .. } => {
                        traffic.add(base + device, base + peer, boundary, 1);
                        continue;
                    }
                    Action::Reduce { chunk, shard } => {
                        (chunk_params[chunk as usize] * state.grad as f64, !shard)
                    }
                    Action::Gather { chunk } => {
                        (chunk_params[chunk as usize] * state.weight as f64, false)
                    }
                    Action::Tie => {
                        if let Some(&peer) = tie_devices.iter().find(|&&d| d != device) {
                            traffic.add(base + device, base + peer, table, 1);
                        }
                        continue;
                    }
                    _ => continue,
                };
                for (other, bytes, messages) in sends(replica, bytes, whole) {
                    traffic.add(base + device, other * stages + device, bytes, messages);
                }
            }
        }
    }
    traffic
}

/// Where each run-wide device goes among the slots, and what the network costs a step then.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// `slot[d]`: the slot of run-wide device `d`.
    pub slot: Vec<usize>,
    pub network_s: f64,
    /// `replicas` (a replica's stages side by side) or `stages` (a stage's replicas side by
    /// side).
    pub order: &'static str,
}

/// Places `stages x replicas` run-wide devices on slots whose machines are `slot_machine`
/// (machines filled in turn, so slots of one machine are consecutive): either each replica's
/// pipeline side by side (its neighbours share machines) or each stage's replicas side by side
/// (its gradient ring shares machines), whichever sends less time over the network; a tie
/// keeps replicas together.
pub fn place(
    stages: u32,
    replicas: u32,
    traffic: &Traffic,
    slot_machine: &[usize],
    links: &dyn Links,
) -> Placement {
    let devices = (stages * replicas) as usize;
    let by_replica: Vec<usize> = (0..devices).collect();
    // Slot k holds stage k / replicas of replica k % replicas.
    let mut by_stage = vec![0; devices];
    for slot in 0..devices {
        let (stage, replica) = (slot as u32 / replicas, slot as u32 % replicas);
        by_stage[(replica * stages + stage) as usize] = slot;
    }
    let cost = |slot: &[usize]| {
        let machine: Vec<usize> = slot.iter().map(|s| slot_machine[*s]).collect();
        traffic.network_s(&machine, links)
    };
    let (a, b) = (cost(&by_replica), cost(&by_stage));
    if b < a {
        Placement {
            slot: by_stage,
            network_s: b,
            order: "stages",
        }
    } else {
        Placement {
            slot: by_replica,
            network_s: a,
            order: "replicas",
        }
    }
}

#[cfg(test)]
mod tests;
