use proptest::prelude::*;

use super::*;
use crate::plan::validate::validate;

/// The most (micro-batch, chunk) stashes alive at once on each device, in program order.
fn in_flight(plan: &Plan) -> Vec<u32> {
    plan.programs
        .iter()
        .map(|program| {
            let (mut now, mut most) = (0i64, 0i64);
            for a in program {
                match a {
                    Action::Forward { .. } => now += 1,
                    Action::Backward { .. } => now -= 1,
                    _ => {}
                }
                most = most.max(now);
            }
            most as u32
        })
        .collect()
}

#[test]
fn one_f_one_b_holds_min_of_p_minus_d_and_m() {
    for (p, m) in [(4, 8), (4, 2), (8, 8), (1, 3), (6, 5)] {
        let plan = build(ScheduleKind::OneFOneB, p, m, 2 * p).unwrap();
        validate(&plan).unwrap();
        let want: Vec<u32> = (0..p).map(|d| (p - d).min(m)).collect();
        assert_eq!(in_flight(&plan), want, "p={p} m={m}");
    }
}

#[test]
fn gpipe_holds_every_micro_batch() {
    let plan = build(ScheduleKind::Gpipe, 4, 6, 8).unwrap();
    validate(&plan).unwrap();
    assert_eq!(in_flight(&plan), vec![6; 4]);
}

#[test]
fn interleaved_warm_up_and_memory_factor_match_megatron() {
    for (p, v, m) in [(4, 2, 8), (4, 4, 16), (8, 2, 32)] {
        let plan = build(
            ScheduleKind::Interleaved {
                chunks_per_device: v,
            },
            p,
            m,
            p * v,
        )
        .unwrap();
        validate(&plan).unwrap();
        // Device 0's warm-up is 2(p-1) + (v-1)p forwards; the first steady step adds one more
        // before the first backward.
        let first_b = plan.programs[0]
            .iter()
            .filter(|a| matches!(a, Action::Forward { .. } | Action::Backward { .. }))
            .position(|a| matches!(a, Action::Backward { .. }))
            .unwrap() as u32;
        assert_eq!(first_b, 2 * (p - 1) + (v - 1) * p + 1);
        assert_eq!(first_b, interleaved::warmup(p, v, m, 0) + 1);
        // Peak stash on device 0, in units of a 1F1B stage's stash (p micro-batches of L/p
        // layers), is 1 + (p-1)/(p v) (Korthikanti et al. §4.2.3).
        let chunks_alive = in_flight(&plan)[0] as f64;
        let factor = chunks_alive / v as f64 / p as f64;
        let want = 1.0 + (p as f64 - 1.0) / (p as f64 * v as f64);
        assert!((factor - want).abs() < 1e-12, "{factor} vs {want}");
    }
}

#[test]
fn chronos_is_v_shaped_with_the_loss_on_device_0() {
    let plan = build(ScheduleKind::Chronos { in_flight: 0 }, 4, 8, 16).unwrap();
    validate(&plan).unwrap();
    let devices: Vec<u32> = plan.chunks.iter().map(|c| c.device).collect();
    assert_eq!(devices, vec![0, 1, 2, 3, 3, 2, 1, 0]);
    assert!(plan.chunks[7].head);
    // The deep chunk's stash on device 0 never waits: its backward follows its forward.
    let p0 = &plan.programs[0];
    let f = p0.iter().position(|a| *a == Action::forward(0, 7)).unwrap();
    let b = p0
        .iter()
        .position(|a| *a == Action::Backward { mb: 0, chunk: 7 })
        .unwrap();
    assert_eq!(b, f + 1);
}

#[test]
fn chronos_in_flight_knob_bounds_memory() {
    let tight = build(ScheduleKind::Chronos { in_flight: 1 }, 4, 8, 16).unwrap();
    let loose = build(ScheduleKind::Chronos { in_flight: 8 }, 4, 8, 16).unwrap();
    validate(&tight).unwrap();
    validate(&loose).unwrap();
    assert!(in_flight(&tight)[0] <= 2);
    assert!(in_flight(&loose)[0] > in_flight(&tight)[0]);
}

#[test]
fn bad_settings_are_typed_errors() {
    let e = build(ScheduleKind::OneFOneB, 4, 8, 3).unwrap_err();
    assert_eq!(e.field(), Some("model.layers"));
    let e = build(ScheduleKind::Chronos { in_flight: 0 }, 4, 8, 7).unwrap_err();
    assert_eq!(e.field(), Some("model.layers"));
    let e = build(
        ScheduleKind::Interleaved {
            chunks_per_device: 2,
        },
        4,
        6,
        16,
    )
    .unwrap_err();
    assert_eq!(e.field(), Some("microbatches"));
    assert!(e.to_string().contains("try 8"), "{e}");
    let e = build(ScheduleKind::Gpipe, 4, 0, 16).unwrap_err();
    assert_eq!(e.field(), Some("microbatches"));
    let e = build(ScheduleKind::Gpipe, 0, 4, 16).unwrap_err();
    assert_eq!(e.field(), Some("pipeline_devices"));
    assert!("zigzag".parse::<ScheduleKind>().is_err());
    assert_eq!(
        "interleaved:4".parse::<ScheduleKind>().unwrap(),
        ScheduleKind::Interleaved {
            chunks_per_device: 4
        }
    );
}

#[test]
fn validator_marks_the_failing_action() {
    let mut plan = build(ScheduleKind::OneFOneB, 2, 2, 2).unwrap();
    // Swap device 1's first receive after its forward: the forward has no input yet.
    plan.programs[1].swap(0, 1);
    let err = validate(&plan).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(">>F0.1<<"), "{text}");
    assert!(text.contains("device 0:"), "{text}");

    // Two devices each waiting to receive first: a deadlock.
    let plan: Plan = "microbatches 1\nchunk 0 device 0 embedding layers 0..1\nchunk 1 device 1 layers 1..2 head\ndevice 0: RG0.1<1 F0.0 SA0.0>1 B0.0\ndevice 1: RA0.0<0 F0.1 B0.1 SG0.1>0\n".parse().unwrap();
    let err = validate(&plan).unwrap_err();
    assert!(err.to_string().contains("deadlock"), "{err}");

    // A device's step before another of its chunks has run all its backwards: the step
    // clips by the norm of every chunk's gradients on the device, so it must wait.
    let mut plan = build(
        ScheduleKind::Interleaved {
            chunks_per_device: 2,
        },
        2,
        2,
        4,
    )
    .unwrap();
    let program = &mut plan.programs[0];
    let is_step_2 = |a: &Action| matches!(a, Action::Step { chunk: 2, .. });
    let step = program.iter().position(is_step_2).unwrap();
    let last_backward_2 = (program.iter())
        .rposition(|a| matches!(a, Action::Backward { chunk: 2, .. }))
        .unwrap();
    let moved = program.remove(step);
    program.insert(last_backward_2 + 1, moved);
    let err = validate(&plan).unwrap_err().to_string();
    assert!(
        err.contains("all 2 backwards of chunk 0 on the same device"),
        "{err}"
    );

    // A device without a chunk never steps, and every step waits for it.
    let plan: Plan = "microbatches 1\nchunk 0 device 0 embedding layers 0..1 head\n\
                      device 0: F0.0 B0.0 STEP0\ndevice 1:\n"
        .parse()
        .unwrap();
    let err = validate(&plan).unwrap_err().to_string();
    assert!(err.contains("device 1 holds no chunk"), "{err}");

    // A missing backward.
    let plan: Plan =
        "microbatches 1\nchunk 0 device 0 embedding layers 0..1 head\ndevice 0: F0.0\n"
            .parse()
            .unwrap();
    assert!(
        validate(&plan)
            .unwrap_err()
            .to_string()
            .contains("never runs its backward")
    );
}

fn any_schedule() -> impl Strategy<Value = (ScheduleKind, u32, u32, u32)> {
    (1u32..6, 1u32..13, 0u32..3, 2u32..4, 1u32..6).prop_map(|(p, m, kind, v, k)| {
        let kind = match kind {
            0 => ScheduleKind::OneFOneB,
            1 => ScheduleKind::Interleaved {
                chunks_per_device: v,
            },
            _ => ScheduleKind::Chronos { in_flight: k },
        };
        // Interleaved needs whole groups of p micro-batches.
        let m = match kind {
            ScheduleKind::Interleaved { .. } => m.div_ceil(p) * p,
            _ => m,
        };
        (kind, p, m, p * kind.chunks_per_device() + m % 3)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn every_schedule_validates((kind, p, m, layers) in any_schedule()) {
        let plan = build(kind, p, m, layers).unwrap();
        prop_assert!(validate(&plan).is_ok(), "{}", validate(&plan).unwrap_err());
        let text = plan.to_string();
        prop_assert_eq!(text.parse::<Plan>().unwrap(), plan);
    }

    #[test]
    fn gpipe_validates(p in 1u32..6, m in 1u32..10) {
        let plan = build(ScheduleKind::Gpipe, p, m, p).unwrap();
        prop_assert!(validate(&plan).is_ok());
    }
}

#[test]
fn chronos_builds_quickly_for_deep_pipelines() {
    for p in [16u32, 32, 64] {
        let started = std::time::Instant::now();
        let plan = build(ScheduleKind::Chronos { in_flight: 0 }, p, 2 * p, 2 * p).unwrap();
        validate(&plan).unwrap();
        assert!(
            started.elapsed().as_secs_f64() < 5.0,
            "p={p}: {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn the_table_gives_every_schedule_its_name_knob_and_chunks() {
    let defaults: Vec<ScheduleKind> = registry::SCHEDULES
        .iter()
        .map(|s| s.default_kind())
        .collect();
    assert_eq!(defaults, ScheduleKind::EACH.to_vec());
    for kind in ScheduleKind::EACH {
        let text = kind.to_string();
        assert_eq!(text.parse::<ScheduleKind>().unwrap(), kind, "{text}");
        assert_eq!(
            registry::named(kind.schedule().name).unwrap().name,
            kind.schedule().name
        );
    }
    assert_eq!(
        "interleaved:3"
            .parse::<ScheduleKind>()
            .unwrap()
            .chunks_per_device(),
        3
    );
    let knobless = "1f1b:2".parse::<ScheduleKind>().unwrap_err().to_string();
    assert!(knobless.contains("`1f1b` has no knob"), "{knobless}");
    let unknown = "zigzag".parse::<ScheduleKind>().unwrap_err().to_string();
    assert!(
        unknown.contains("use gpipe, 1f1b, interleaved[:V] or chronos[:K]"),
        "{unknown}"
    );
    assert_eq!(
        registry::searched(4),
        vec![
            ScheduleKind::OneFOneB,
            ScheduleKind::Interleaved {
                chunks_per_device: 2
            },
            ScheduleKind::Chronos { in_flight: 0 }
        ]
    );
    assert_eq!(registry::searched(1), vec![ScheduleKind::OneFOneB]);
}
