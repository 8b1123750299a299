use std::collections::BTreeMap;

use super::*;
use crate::plan::reduction::{with_gradient_reduction, with_sharded_optimizer};
use crate::plan::schedule::{ScheduleKind, build};

/// `plan`'s traffic as the ranks over TCP send it.
fn over_tcp(plan: &Plan, profile: Profile, dims: &ModelDims, micro: MicroShape) -> Traffic {
    traffic(plan, profile, dims, micro, Collectives::AllToAll)
}

fn dims(hidden: usize, ffn: usize, vocab: usize) -> ModelDims {
    ModelDims {
        hidden,
        layers: 4,
        heads: 4,
        kv_heads: 4,
        ffn,
        vocab,
        qkv_bias: false,
        tied_embeddings: false,
    }
}

/// Two stages, two replicas, 1F1B over `microbatches`.
fn pp2_dp2(microbatches: u32) -> Plan {
    let one = build(ScheduleKind::OneFOneB, 2, microbatches, 4).unwrap();
    with_gradient_reduction(one, 2).unwrap()
}

#[test]
fn neighbours_send_each_micro_batch_once_each_way() {
    let plan = pp2_dp2(4);
    let micro = MicroShape { batch: 2, seq: 8 };
    let t = over_tcp(&plan, Profile::CpuF32, &dims(16, 32, 64), micro);
    let boundary = (2 * 8 * 16 * 4) as f64;
    // Replica 0 is devices 0 and 1, replica 1 devices 2 and 3.
    for (a, b) in [(0, 1), (1, 0), (2, 3), (3, 2)] {
        assert_eq!(t.links[&(a, b)], (4.0 * boundary, 4), "{a}->{b}");
    }
    // Each stage's replicas: 0 <-> 2, 1 <-> 3, each sending the other its chunk's gradient.
    for (a, b) in [(0, 2), (2, 0), (1, 3), (3, 1)] {
        let (bytes, messages) = t.links[&(a, b)];
        assert!(bytes > 0.0 && messages == 1, "{a}->{b}");
    }
    assert!(!t.links.contains_key(&(0, 3)));
    // All on one machine: nothing crosses.
    assert_eq!(t.network_s(&[0, 0, 0, 0], &Network::default()), 0.0);
}

#[test]
fn the_pairs_that_talk_most_share_a_machine() {
    // Two machines of two slots each.
    let machines = [0, 0, 1, 1];
    let network = Network::default();
    // Wide activations, few parameters: pipeline neighbours talk most.
    let plan = pp2_dp2(16);
    let wide = MicroShape { batch: 8, seq: 512 };
    let t = over_tcp(&plan, Profile::CpuF32, &dims(64, 64, 32), wide);
    let p = place(2, 2, &t, &machines, &network);
    assert_eq!(p.order, "replicas");
    assert_eq!(p.slot, [0, 1, 2, 3]);
    // Many parameters, small micro-batches: the gradient rings talk most.
    let plan = pp2_dp2(1);
    let small = MicroShape { batch: 1, seq: 4 };
    let t = over_tcp(&plan, Profile::CpuF32, &dims(256, 4096, 32000), small);
    let p = place(2, 2, &t, &machines, &network);
    assert_eq!(p.order, "stages");
    // Stage 0 of both replicas (devices 0 and 2) on machine 0.
    assert_eq!(p.slot, [0, 2, 1, 3]);
    let replica_major = t.network_s(&[0, 0, 1, 1], &network);
    assert!(p.network_s < replica_major);
    // What crosses now is the neighbours' sends: a micro-batch each way per replica, each
    // message paying the latency.
    let boundary = (4 * 256 * 4) as f64;
    let crossing = 4.0 * (boundary / network.bytes_per_s + network.latency_s);
    assert!(
        (p.network_s - crossing).abs() < 1e-12,
        "{} vs {crossing}",
        p.network_s
    );
}

#[test]
fn tied_embeddings_send_the_table_between_first_and_last_stage() {
    let one = build(ScheduleKind::OneFOneB, 2, 4, 4).unwrap();
    let tied = crate::plan::tying::with_tied_embeddings(one.clone()).unwrap();
    let micro = MicroShape { batch: 2, seq: 8 };
    let untied = over_tcp(&one, Profile::CpuF32, &dims(16, 32, 64), micro);
    let t = over_tcp(&tied, Profile::CpuF32, &dims(16, 32, 64), micro);
    let table = (64 * 16 * 4) as f64;
    for (a, b) in [(0, 1), (1, 0)] {
        let (bytes, messages) = untied.links[&(a, b)];
        assert_eq!(t.links[&(a, b)], (bytes + table, messages + 1), "{a}->{b}");
    }
}

/// Machine 0 to 1 is fast, 1 to 2 slow.
struct TwoLinks;

impl Links for TwoLinks {
    fn between(&self, a: usize, b: usize) -> Network {
        match (a.min(b), a.max(b)) {
            (0, 1) => Network {
                bytes_per_s: 1e10,
                latency_s: 1e-6,
            },
            _ => Network {
                bytes_per_s: 1e8,
                latency_s: 1e-3,
            },
        }
    }
}

#[test]
fn each_pair_of_machines_pays_its_own_link() {
    let plan = pp2_dp2(4);
    let micro = MicroShape { batch: 2, seq: 8 };
    let t = over_tcp(&plan, Profile::CpuF32, &dims(16, 32, 64), micro);
    let boundary = (2 * 8 * 16 * 4) as f64;
    // Each stage's replicas share a machine, so only the pipelines cross: four micro-batches
    // each way in each of the two replicas.
    let sends = |n: &Network| 16.0 * (boundary / n.bytes_per_s + n.latency_s);
    let fast = t.network_s(&[0, 1, 0, 1], &TwoLinks);
    assert!(
        (fast - sends(&TwoLinks.between(0, 1))).abs() < 1e-12,
        "{fast}"
    );
    let slow = t.network_s(&[1, 2, 1, 2], &TwoLinks);
    assert!(
        (slow - sends(&TwoLinks.between(1, 2))).abs() < 1e-12,
        "{slow}"
    );
    assert!(slow > 100.0 * fast);
    // The same machines with one network everywhere cost what that network says.
    let flat = Network::default();
    assert!((t.network_s(&[1, 2, 1, 2], &flat) - sends(&flat)).abs() < 1e-12);
}

#[test]
fn a_placement_is_costed_by_the_link_it_crosses() {
    // Two slots on each of two machines: the rings talk most, so a stage's replicas share a
    // machine either way, and the pipelines' crossing costs what the link between says.
    let plan = pp2_dp2(1);
    let small = MicroShape { batch: 1, seq: 4 };
    let t = over_tcp(&plan, Profile::CpuF32, &dims(256, 4096, 32000), small);
    let fast = place(2, 2, &t, &[0, 0, 1, 1], &TwoLinks);
    let slow = place(2, 2, &t, &[1, 1, 2, 2], &TwoLinks);
    assert_eq!((fast.order, slow.order), ("stages", "stages"));
    assert!(slow.network_s > fast.network_s * 10.0, "{slow:?} {fast:?}");
}

/// Over four replicas, a whole reduction sends each other replica the whole gradient (the
/// ranks over TCP sum every copy in replica order), a sharded one and the gathering only
/// the share the receiver owns: a quarter each.
#[test]
fn replicas_send_each_other_what_the_tcp_ranks_send() {
    let one = build(ScheduleKind::OneFOneB, 1, 4, 4).unwrap();
    let whole = with_gradient_reduction(one, 4).unwrap();
    let micro = MicroShape { batch: 1, seq: 8 };
    let t = over_tcp(&whole, Profile::CpuF32, &dims(16, 32, 64), micro);
    let grads = t.links[&(0, 1)].0;
    for a in 0..4u32 {
        for b in (0..4u32).filter(|&b| b != a) {
            assert_eq!(t.links[&(a, b)], (grads, 1), "{a}->{b}");
        }
    }
    let sharded = with_sharded_optimizer(whole).unwrap();
    let t = over_tcp(&sharded, Profile::CpuF32, &dims(16, 32, 64), micro);
    // A reduce-scatter and a gathering, a quarter each (f32 gradients and weights alike).
    for a in 0..4u32 {
        for b in (0..4u32).filter(|&b| b != a) {
            assert_eq!(t.links[&(a, b)], (grads / 2.0, 2), "{a}->{b}");
        }
    }
}

/// With bf16 activations (the CUDA backend's bf16 layout) neighbours send half the bytes of
/// f32's; the gradient rings stay f32.
#[test]
fn bf16_halves_the_sends_and_not_the_gradients() {
    let plan = pp2_dp2(4);
    let micro = MicroShape { batch: 2, seq: 8 };
    let f32_cuda = over_tcp(&plan, Profile::CudaF32, &dims(16, 32, 64), micro);
    let bf16 = over_tcp(&plan, Profile::CudaBf16, &dims(16, 32, 64), micro);
    let cpu = over_tcp(&plan, Profile::CpuF32, &dims(16, 32, 64), micro);
    let boundary = (2 * 8 * 16 * 2) as f64;
    for (a, b) in [(0, 1), (1, 0), (2, 3), (3, 2)] {
        assert_eq!(bf16.links[&(a, b)], (4.0 * boundary, 4), "{a}->{b}");
        assert_eq!(f32_cuda.links[&(a, b)], (8.0 * boundary, 4), "{a}->{b}");
    }
    for (a, b) in [(0, 2), (2, 0), (1, 3), (3, 1)] {
        assert_eq!(bf16.links[&(a, b)], f32_cuda.links[&(a, b)], "{a}->{b}");
        assert_eq!(cpu.links[&(a, b)], f32_cuda.links[&(a, b)], "{a}->{b}");
    }
}

/// As a ring (NCCL between GPUs), a replica sends only to the next: a whole reduction
/// 2(r-1)/r of the gradient in 2(r-1) messages, a sharded one and the gathering (r-1)/r each.
#[test]
fn ring_replicas_send_only_to_the_next() {
    let one = build(ScheduleKind::OneFOneB, 1, 4, 4).unwrap();
    let whole = with_gradient_reduction(one, 4).unwrap();
    let micro = MicroShape { batch: 1, seq: 8 };
    let all = over_tcp(&whole, Profile::CpuF32, &dims(16, 32, 64), micro);
    let grads = all.links[&(0, 1)].0;
    let ring = traffic(
        &whole,
        Profile::CpuF32,
        &dims(16, 32, 64),
        micro,
        Collectives::Ring,
    );
    let next = |a: u32| (a, (a + 1) % 4);
    let want: BTreeMap<(u32, u32), (f64, u32)> =
        (0..4).map(|a| (next(a), (grads * 1.5, 6))).collect();
    assert_eq!(ring.links, want);
    let sharded = with_sharded_optimizer(whole).unwrap();
    let ring = traffic(
        &sharded,
        Profile::CpuF32,
        &dims(16, 32, 64),
        micro,
        Collectives::Ring,
    );
    assert_eq!(
        ring.links, want,
        "a reduce-scatter and a gathering, 3/4 each"
    );
}
