//! The data-parallel pass: a plan for one pipeline becomes a plan for `replicas` copies of
//! it, each chunk's gradients reduced across the copies by an `AR<c>` action. One pass for
//! every schedule: it only reads where each chunk's last backward is.

use super::error::PlanError;
use super::ir::{Action, Plan};

/// `plan` run by `replicas` data-parallel copies: `AR<c>` goes right after chunk `c`'s last
/// backward (and the send of that backward's input gradient, so the upstream device is not
/// held up by the reduction), before any step on the device. One replica is `plan` itself.
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
    let programs = plan
        .programs
        .iter()
        .map(|program| {
            let mut out = program.clone();
            // Insert from the back so earlier positions stay where they are.
            let mut at: Vec<(usize, u32)> = last_backwards(program);
            at.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
            for (i, chunk) in at {
                let after_send = match program.get(i + 1) {
                    Some(Action::SendGrad { chunk: c, .. }) if *c == chunk => i + 2,
                    _ => i + 1,
                };
                out.insert(after_send, Action::Reduce { chunk });
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
        let again = with_gradient_reduction(two, 2).unwrap_err();
        assert_eq!(again.field(), Some("replicas"));
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
    }
}
