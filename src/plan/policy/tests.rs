use super::*;
use crate::plan::memory::{ActionMemory, ChunkMemory};
use crate::plan::schedule::{ScheduleKind, build};
use crate::plan::simulate::uniform_costs;

fn hw(host_bytes_per_s: f64) -> Hardware {
    Hardware {
        peak_flops: 1.0,
        efficiency: 1.0,
        hbm_bytes_per_s: 1e30,
        p2p_bytes_per_s: 1e30,
        p2p_latency_s: 0.0,
        host_bytes_per_s,
    }
}

/// A stash of 10 bytes of which 1 is the input kept for recompute.
fn memory() -> ChunkMemory {
    ChunkMemory {
        input_bytes: 0,
        output_bytes: 0,
        stash_bytes: 10,
        kept_bytes: 1,
        grad_in_bytes: 0,
        grad_out_bytes: 0,
        forward: ActionMemory {
            peak_above_start: 10,
            net: 10,
        },
        forward_dropping: ActionMemory {
            peak_above_start: 10,
            net: 1,
        },
        recompute: ActionMemory {
            peak_above_start: 9,
            net: 9,
        },
        backward: ActionMemory {
            peak_above_start: 0,
            net: -10,
        },
        // The evaluation holds one byte at a time: it never decides a fit here.
        evaluate: ActionMemory {
            peak_above_start: 1,
            net: 0,
        },
    }
}

fn budget(device_bytes: u64) -> Budget {
    Budget {
        device_bytes,
        host_bytes: u64::MAX,
    }
}

#[test]
fn chronos_recompute_drops_the_longest_lived_chunks_until_it_fits() {
    let plan = build(ScheduleKind::Chronos { in_flight: 0 }, 4, 8, 8).unwrap();
    let costs = uniform_costs(8, memory(), 1.0);
    let none = apply(
        &plan,
        &costs,
        &hw(1.0),
        budget(1000),
        Recompute::None,
        Offload::None,
    )
    .unwrap();
    assert!(none.fits);
    let need = none.sim.peak_bytes();
    let tight = apply(
        &plan,
        &costs,
        &hw(1.0),
        budget(need - 1),
        Recompute::Chronos,
        Offload::None,
    )
    .unwrap();
    assert!(tight.fits, "{:?}", tight.choices);
    // On each device the shallow chunk (c < p) lives longest and goes first.
    assert!(
        tight.choices.recomputed_chunks.iter().all(|&c| c < 4),
        "{}",
        tight.choices
    );
    assert!(tight.choices.recomputed_chunks.len() < 8);
    let full = apply(
        &plan,
        &costs,
        &hw(1.0),
        budget(need - 1),
        Recompute::Full,
        Offload::None,
    )
    .unwrap();
    assert_eq!(full.choices.recomputed_chunks.len(), 8);
    assert!(full.sim.step_time_s > tight.sim.step_time_s);
    assert!(tight.sim.step_time_s >= none.sim.step_time_s);
    crate::plan::validate::validate(&full.plan).unwrap();
    let nothing = apply(
        &plan,
        &costs,
        &hw(1.0),
        budget(1),
        Recompute::Chronos,
        Offload::None,
    )
    .unwrap();
    assert!(!nothing.fits);
}

#[test]
fn chronos_offload_moves_optimizer_state_and_hides_the_copy() {
    let plan = build(ScheduleKind::OneFOneB, 2, 16, 2).unwrap();
    let mut costs = uniform_costs(2, memory(), 1.0);
    for c in &mut costs {
        c.optimizer_bytes = 100;
    }
    let base = apply(
        &plan,
        &costs,
        &hw(100.0),
        budget(u64::MAX),
        Recompute::None,
        Offload::None,
    )
    .unwrap();
    let need = base.sim.peak_bytes();
    // The state must be back for the step, while the last backward's stash is still there.
    let off = apply(
        &plan,
        &costs,
        &hw(100.0),
        budget(need - 5),
        Recompute::None,
        Offload::Chronos,
    )
    .unwrap();
    assert!(off.fits, "{}", off.choices);
    // Only device 0 (two stashes in flight) is over.
    assert!(off.choices.offloaded_optimizer.contains(&0));
    assert!(off.sim.devices[0].host_peak_bytes >= 100);
    // 1 s each way, prefetched early enough: no stall.
    assert!(
        off.sim.prefetch_stall_s() < 1e-6,
        "{}",
        off.sim.prefetch_stall_s()
    );
    assert!(off.plan.to_string().contains("OFF:O0"));
    crate::plan::validate::validate(&off.plan).unwrap();
}

#[test]
fn long_lived_stashes_are_offloaded_when_the_link_is_fast_enough() {
    let plan = build(ScheduleKind::OneFOneB, 4, 16, 4).unwrap();
    let costs = uniform_costs(4, memory(), 1.0);
    let base = apply(
        &plan,
        &costs,
        &hw(1e3),
        budget(u64::MAX),
        Recompute::None,
        Offload::None,
    )
    .unwrap();
    let need = base.sim.peak_bytes();
    let off = apply(
        &plan,
        &costs,
        &hw(1e3),
        budget(need - 10),
        Recompute::Chronos,
        Offload::Chronos,
    )
    .unwrap();
    assert!(off.fits, "{}", off.choices);
    assert!(off.choices.offloaded_stash.contains(&0));
    assert!(off.choices.recomputed_chunks.is_empty());
    crate::plan::validate::validate(&off.plan).unwrap();
    // A slow link: the copy cannot be hidden, so it recomputes instead.
    let slow = apply(
        &plan,
        &costs,
        &hw(1.0),
        budget(need - 10),
        Recompute::Chronos,
        Offload::Chronos,
    )
    .unwrap();
    assert!(slow.choices.offloaded_stash.is_empty(), "{}", slow.choices);
    assert!(slow.fits);
}

#[test]
fn large_optimizer_state_moves_in_slices_two_at_a_time() {
    let plan = build(ScheduleKind::Chronos { in_flight: 0 }, 2, 4, 4).unwrap();
    let mut costs = uniform_costs(4, memory(), 1.0);
    for c in &mut costs {
        c.optimizer_bytes = 4 << 30; // four 1 GiB slices per chunk
    }
    let hw = hw(1e12);
    let base = apply(
        &plan,
        &costs,
        &hw,
        budget(u64::MAX),
        Recompute::None,
        Offload::None,
    )
    .unwrap();
    let need = base.sim.peak_bytes();
    let off = apply(
        &plan,
        &costs,
        &hw,
        budget(need - (4 << 30)),
        Recompute::None,
        Offload::Chronos,
    )
    .unwrap();
    assert!(off.fits, "{}", off.choices);
    assert_eq!(off.plan.optimizer_slices, 4);
    crate::plan::validate::validate(&off.plan).unwrap();
    let text = off.plan.to_string();
    assert!(
        text.contains("STEP0.3") && text.contains("PRE:O0.1"),
        "{text}"
    );
    assert_eq!(text.parse::<Plan>().unwrap(), off.plan);
    // Never more than three slices (stepping, arriving, leaving) of state on a device.
    let most = off
        .sim
        .devices
        .iter()
        .map(|d| d.at_peak.optimizer)
        .max()
        .unwrap();
    assert!(most <= 3 << 30, "{most}");
}

/// A plan whose step fits but whose evaluation does not is not a fit.
#[test]
fn an_evaluation_over_budget_does_not_fit() {
    let plan = build(ScheduleKind::OneFOneB, 2, 4, 2).unwrap();
    let mut wide = memory();
    wide.evaluate.peak_above_start = 1000;
    let costs = uniform_costs(2, wide, 1.0);
    let roomy = apply(
        &plan,
        &costs,
        &hw(1.0),
        budget(1000),
        Recompute::None,
        Offload::None,
    )
    .unwrap();
    assert!(roomy.fits);
    let step = roomy.sim.peak_bytes();
    assert!(step < 1000, "the step alone fits in {step}");
    let tight = apply(
        &plan,
        &costs,
        &hw(1.0),
        budget(999),
        Recompute::Chronos,
        Offload::Chronos,
    )
    .unwrap();
    assert!(!tight.fits, "an evaluation of 1000 bytes in 999");
}

#[test]
fn options_parse_and_print() {
    for s in ["none", "full", "chronos", "auto"] {
        assert_eq!(s.parse::<Recompute>().unwrap().to_string(), s);
    }
    assert_eq!(
        "some".parse::<Offload>().unwrap_err().field(),
        Some("offload")
    );
}
