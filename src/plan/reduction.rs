//! The data-parallel pass: a plan for one pipeline becomes a plan for `replicas` copies of
//! it, each chunk's gradients reduced across the copies by an `AR<c>` action. One pass for
//! every schedule: it only reads where each chunk's last backward is. The sharding pass then
//! makes each replica keep 1/replicas of every chunk's optimizer state (ZeRO-1): `RS<c>` for
//! `AR<c>`, and `AG<c>` after the chunk's last step.

use std::ops::Range;

use super::error::PlanError;
use super::ir::{Action, Plan};

/// Elements of a chunk's flattened parameters (parts in model order, tensors in inventory
/// order) whose optimizer state a replica keeps when it is sharded over `replicas`: every
/// replica allocates this many (the last shard may own fewer, the rest of its state is
/// padding), so every replica's device holds the same bytes.
pub fn shard_len(params: usize, replicas: u32) -> usize {
    params.div_ceil(replicas.max(1) as usize)
}

/// The elements replica `replica` of `replicas` owns: it keeps their optimizer state, keeps
/// their summed gradients at a sharded reduction, updates their weights and hands them to
/// the other replicas. The one place that decides it, for the planner and the runtime.
pub fn shard(params: usize, replicas: u32, replica: u32) -> Range<usize> {
    let len = shard_len(params, replicas);
    let start = (replica as usize * len).min(params);
    start..(start + len).min(params)
}

/// `plan` run by `replicas` data-parallel copies: `AR<c>` goes right after chunk `c`'s last
/// backward (and the send of that backward's input gradient, so the upstream device is not
/// held up by the reduction), before any step on the device; for a chunk whose gradients
/// `TIE` sums (tied embeddings: the first and the last chunk), right after the device's
/// `TIE`. One replica is `plan` itself.
pub fn with_gradient_reduction(plan: Plan, replicas: u32) -> Result<Plan, PlanError> {
    if replicas == 0 {
        return Err(PlanError::invalid(
            "replicas",
            "must be at least 1 (1: no data parallelism)",
        ));
    }
    if plan.replicas != 1 || plan.programs.iter().flatten().any(is_reduce) {
        return Err(PlanError::invalid(
            "replicas",
            "the plan is replicated already; the pass takes a single pipeline's plan",
        ));
    }
    if replicas == 1 {
        return Ok(plan);
    }
    let tied_chunks = [0, plan.chunks.len().saturating_sub(1) as u32];
    let programs = plan
        .programs
        .iter()
        .map(|program| {
            let tie = program.iter().position(|a| *a == Action::Tie);
            let mut out = program.clone();
            // Where each reduction goes in `program`, inserted from the back so earlier
            // positions stay where they are.
            let mut at: Vec<(usize, u32)> = (last_backwards(program).into_iter())
                .map(|(i, chunk)| {
                    let after_send = match program.get(i + 1) {
                        Some(Action::SendGrad { chunk: c, .. }) if *c == chunk => i + 2,
                        _ => i + 1,
                    };
                    match tie.filter(|_| tied_chunks.contains(&chunk)) {
                        Some(t) => (after_send.max(t + 1), chunk),
                        None => (after_send, chunk),
                    }
                })
                .collect();
            at.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
            for (i, chunk) in at {
                let reduce = Action::Reduce {
                    chunk,
                    shard: false,
                };
                out.insert(i, reduce);
            }
            out
        })
        .collect();
    Ok(Plan {
        replicas,
        programs,
        ..plan
    })
}

/// `plan` (replicated by [`with_gradient_reduction`]) with every chunk's optimizer state
/// sharded over the replicas: each `AR<c>` becomes `RS<c>`, and `AG<c>` follows the chunk's
/// last step on its device (before anything can move its weights off the device).
pub fn with_sharded_optimizer(plan: Plan) -> Result<Plan, PlanError> {
    if plan.replicas < 2 {
        return Err(PlanError::invalid(
            "shard_optimizer",
            "sharding the optimizer state needs at least 2 replicas (data_parallel > 1)",
        ));
    }
    let mut programs = Vec::with_capacity(plan.programs.len());
    for program in &plan.programs {
        let mut out = Vec::with_capacity(program.len() + plan.chunks.len());
        for (i, &a) in program.iter().enumerate() {
            match a {
                Action::Reduce { chunk, .. } => out.push(Action::Reduce { chunk, shard: true }),
                Action::Gather { .. } => {
                    return Err(PlanError::invalid(
                        "shard_optimizer",
                        "the plan's optimizer state is sharded already",
                    ));
                }
                other => out.push(other),
            }
            if let Action::Step { chunk, .. } = a {
                let later = program[i + 1..]
                    .iter()
                    .any(|b| matches!(b, Action::Step { chunk: c, .. } if *c == chunk));
                if !later {
                    out.push(Action::Gather { chunk });
                }
            }
        }
        programs.push(out);
    }
    Ok(Plan { programs, ..plan })
}

fn is_reduce(a: &Action) -> bool {
    matches!(a, Action::Reduce { .. })
}

/// (position, chunk) of each chunk's last backward in `program`.
fn last_backwards(program: &[Action]) -> Vec<(usize, u32)> {
    let mut last: Vec<(usize, u32)> = Vec::new();
    for (i, a) in program.iter().enumerate() {
        if let Action::Backward { chunk, .. } = *a {
            match last.iter_mut().find(|(_, c)| *c == chunk) {
                Some(entry) => entry.0 = i,
                None => last.push((i, chunk)),
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::hardware::Hardware;
    use crate::plan::schedule::{ScheduleKind, build};
    use crate::plan::validate::validate;

    #[test]
    fn each_chunk_is_reduced_once_after_its_last_backward_and_before_the_steps() {
        let plan: Plan = "microbatches 2\nchunk 0 device 0 embedding layers 0..1\nchunk 1 device 1 layers 1..2 head\ndevice 0: F0.0 SA0.0>1 F1.0 SA1.0>1 RG0.1<1 B0.0 RG1.1<1 B1.0 STEP0\ndevice 1: RA0.0<0 F0.1 B0.1 SG0.1>0 RA1.0<0 F1.1 B1.1 SG1.1>0 STEP1\n"
            .parse()
            .unwrap();
        let two = with_gradient_reduction(plan, 2).unwrap();
        assert_eq!(
            two.to_string(),
            "microbatches 2\nreplicas 2\nchunk 0 device 0 embedding layers 0..1\nchunk 1 device 1 layers 1..2 head\ndevice 0: F0.0 SA0.0>1 F1.0 SA1.0>1 RG0.1<1 B0.0 RG1.1<1 B1.0 AR0 STEP0\ndevice 1: RA0.0<0 F0.1 B0.1 SG0.1>0 RA1.0<0 F1.1 B1.1 SG1.1>0 AR1 STEP1\n"
        );
        validate(&two).unwrap();
        let sharded = with_sharded_optimizer(two.clone()).unwrap();
        assert!(
            sharded.to_string().ends_with(
                "B1.0 RS0 STEP0 AG0\ndevice 1: RA0.0<0 F0.1 B0.1 SG0.1>0 RA1.0<0 F1.1 B1.1 SG1.1>0 RS1 STEP1 AG1\n"
            ),
            "{sharded}"
        );
        validate(&sharded).unwrap();
        assert!(sharded.sharded(0) && !two.sharded(0));
        let twice = with_sharded_optimizer(sharded).unwrap_err();
        assert_eq!(twice.field(), Some("shard_optimizer"));
        let again = with_gradient_reduction(two, 2).unwrap_err();
        assert_eq!(again.field(), Some("replicas"));
    }

    #[test]
    fn the_shards_cover_a_chunk_once_in_replica_order() {
        for params in [0, 1, 5, 7, 8, 1000, 1001] {
            for replicas in [1, 2, 3, 4, 8] {
                let mut next = 0;
                for r in 0..replicas {
                    let owned = shard(params, replicas, r);
                    assert_eq!(owned.start, next, "{params} over {replicas}");
                    assert!(owned.len() <= shard_len(params, replicas));
                    next = owned.end;
                }
                assert_eq!(next, params, "{params} over {replicas}");
            }
        }
        assert_eq!(shard(10, 4, 3), 9..10);
        assert_eq!(shard_len(10, 4), 3);
    }

    #[test]
    fn every_schedule_shards_into_a_valid_plan_with_a_gathering_after_each_chunks_steps() {
        for kind in ScheduleKind::EACH {
            let plan = build(kind, 2, 4, 4).unwrap();
            let two = with_gradient_reduction(plan.clone(), 2).unwrap();
            let sharded = with_sharded_optimizer(two).unwrap();
            validate(&sharded).unwrap_or_else(|e| panic!("{kind}: {e}"));
            for c in 0..plan.chunks.len() as u32 {
                assert!(sharded.sharded(c), "{kind}");
            }
            let one = with_sharded_optimizer(plan).unwrap_err();
            assert_eq!(one.field(), Some("shard_optimizer"));
        }
    }

    #[test]
    fn the_validator_refuses_a_missing_early_or_unsharded_gathering() {
        let head = "microbatches 2\nreplicas 2\noptimizer_slices 2\nchunk 0 device 0 embedding layers 0..1 head\n";
        let err = |program: &str| {
            let text = format!("{head}device 0: {program}\n");
            validate(&text.parse().unwrap()).unwrap_err().to_string()
        };
        validate(
            &format!("{head}device 0: F0.0 F1.0 B0.0 B1.0 RS0 STEP0 STEP0.1 AG0\n")
                .parse()
                .unwrap(),
        )
        .unwrap();
        let never = err("F0.0 F1.0 B0.0 B1.0 RS0 STEP0 STEP0.1");
        assert!(never.contains("never gathered"), "{never}");
        let early = err("F0.0 F1.0 B0.0 B1.0 RS0 STEP0 AG0 STEP0.1");
        assert!(early.contains("before all its optimizer slices"), "{early}");
        let whole = err("F0.0 F1.0 B0.0 B1.0 AR0 STEP0 STEP0.1 AG0");
        assert!(whole.contains("reduce chunk 0 by RS0 first"), "{whole}");
        let twice = err("F0.0 F1.0 B0.0 B1.0 RS0 STEP0 STEP0.1 AG0 AG0");
        assert!(twice.contains("second gathering"), "{twice}");
        let away = err("F0.0 F1.0 B0.0 B1.0 RS0 STEP0 STEP0.1 OFF:W0 AG0 PRE:W0");
        assert!(away.contains("AG0<<"), "{away}");
        assert!(
            away.contains("weights of chunk 0 are on the host"),
            "{away}"
        );
    }

    #[test]
    fn every_schedule_replicates_into_a_valid_plan() {
        for kind in ScheduleKind::EACH {
            for replicas in [1, 2, 4] {
                let plan = build(kind, 2, 4, 4).unwrap();
                let replicated = with_gradient_reduction(plan.clone(), replicas).unwrap();
                validate(&replicated).unwrap_or_else(|e| panic!("{kind} x{replicas}: {e}"));
                let reductions = replicated
                    .programs
                    .iter()
                    .flatten()
                    .filter(|a| is_reduce(a));
                let expected = if replicas == 1 { 0 } else { plan.chunks.len() };
                assert_eq!(reductions.count(), expected, "{kind} x{replicas}");
                assert_eq!(replicated.total_devices(), 2 * replicas as usize);
            }
        }
    }

    #[test]
    fn the_validator_refuses_a_missing_late_early_or_lonely_reduction() {
        let head = "microbatches 2\nreplicas 2\nchunk 0 device 0 embedding layers 0..1 head\n";
        let err = |program: &str, replicas: &str| {
            let text = format!(
                "{}device 0: {program}\n",
                head.replace("2\nchunk", &format!("{replicas}\nchunk"))
            );
            validate(&text.parse().unwrap()).unwrap_err().to_string()
        };
        let missing = err("F0.0 F1.0 B0.0 B1.0 STEP0", "2");
        assert!(missing.contains("before AR0"), "{missing}");
        let early = err("F0.0 F1.0 B0.0 AR0 B1.0 STEP0", "2");
        assert!(
            early.contains("reduction of chunk 0 before all its 2 backwards"),
            "{early}"
        );
        let twice = err("F0.0 F1.0 B0.0 B1.0 AR0 AR0 STEP0", "2");
        assert!(twice.contains("second reduction of chunk 0"), "{twice}");
        let lonely = err("F0.0 F1.0 B0.0 B1.0 AR0 STEP0", "1");
        assert!(lonely.contains("one replica"), "{lonely}");
        let never = err("F0.0 F1.0 B0.0 B1.0", "2");
        assert!(never.contains("never reduced"), "{never}");
    }

    #[test]
    fn the_simulator_holds_the_program_for_a_ring_all_reduce_and_adds_no_memory() {
        use crate::plan::memory::{ActionMemory, ChunkMemory};
        use crate::plan::simulate::{simulate, uniform_costs};
        let act = ActionMemory {
            peak_above_start: 1,
            net: 1,
        };
        let memory = ChunkMemory {
            input_bytes: 0,
            output_bytes: 0,
            stash_bytes: 1,
            kept_bytes: 0,
            grad_in_bytes: 0,
            grad_out_bytes: 0,
            forward: act,
            forward_dropping: act,
            recompute: act,
            backward: ActionMemory {
                peak_above_start: 0,
                net: -1,
            },
            evaluate: act,
        };
        let hw = Hardware {
            peak_flops: 1.0,
            efficiency: 1.0,
            hbm_bytes_per_s: 1e30,
            p2p_bytes_per_s: 1e6,
            p2p_latency_s: 0.0,
            host_bytes_per_s: 1e30,
        };
        let one = build(ScheduleKind::OneFOneB, 1, 2, 2).unwrap();
        let mut costs = uniform_costs(1, memory, 1.0);
        costs[0].grad_bytes = 1_000_000;
        let four = with_gradient_reduction(one.clone(), 4).unwrap();
        let (a, b) = (
            simulate(&one, &costs, &hw, false).unwrap(),
            simulate(&four, &costs, &hw, false).unwrap(),
        );
        // Each device moves 2 (4 - 1) / 4 of the gradients' megabyte at a megabyte a second.
        assert!(
            (b.step_time_s - a.step_time_s - 1.5).abs() < 1e-9,
            "{} vs {}",
            b.step_time_s,
            a.step_time_s
        );
        assert_eq!(a.peak_bytes(), b.peak_bytes());
        // Sharded: a reduce-scatter of the gradients (0.75 s) and an all-gather of the 2 MB
        // of weights (1.5 s) for the all-reduce's 1.5 s.
        costs[0].weight_bytes = 2_000_000;
        let sharded = with_sharded_optimizer(four.clone()).unwrap();
        let (b, c) = (
            simulate(&four, &costs, &hw, false).unwrap(),
            simulate(&sharded, &costs, &hw, false).unwrap(),
        );
        assert!(
            (c.step_time_s - b.step_time_s - 0.75).abs() < 1e-9,
            "{} vs {}",
            c.step_time_s,
            b.step_time_s
        );
    }
}
