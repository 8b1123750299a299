//! The tied-embeddings pass: a model whose LM head reads the embedding's table holds the table
//! twice where the two sit in different chunks (the embedding's in chunk 0, the head's copy in
//! the last chunk), and `TIE` keeps the copies equal. It goes on each device holding one of
//! the two chunks, after that device's last backward (and the send of its input gradient):
//! by then every backward adding to either copy has run, and nothing another device waits
//! for comes later on this one, so the two devices can meet there without a deadlock.
//! Reductions across replicas (`reduction`) come after it and sum the tied sums.

use super::error::PlanError;
use super::ir::{Action, Plan};

/// `plan` (one pipeline, not yet reduced across replicas) with `TIE` on the devices of its
/// first and last chunks.
pub fn with_tied_embeddings(plan: Plan) -> Result<Plan, PlanError> {
    let found = |a: &Action| matches!(a, Action::Tie | Action::Reduce { .. });
    if plan.replicas != 1 || plan.programs.iter().flatten().any(found) {
        return Err(PlanError::invalid(
            "tie_embeddings",
            "the pass takes one pipeline's plan before its reductions and without TIE",
        ));
    }
    let last =
        plan.chunks.len().checked_sub(1).ok_or_else(|| {
            PlanError::invalid("tie_embeddings", "a plan needs at least one chunk")
        })?;
    let mut devices = vec![plan.chunks[0].device, plan.chunks[last].device];
    devices.dedup();
    let mut programs = plan.programs.clone();
    for d in devices {
        let program = programs.get_mut(d as usize).ok_or_else(|| {
            PlanError::invalid("tie_embeddings", format!("device {d} has no program"))
        })?;
        let at = after_last_backward(program).ok_or_else(|| {
            PlanError::invalid("tie_embeddings", format!("device {d} runs no backward"))
        })?;
        program.insert(at, Action::Tie);
    }
    Ok(Plan { programs, ..plan })
}

/// The position after the program's last backward and the send of its input gradient.
fn after_last_backward(program: &[Action]) -> Option<usize> {
    let last = program
        .iter()
        .rposition(|a| matches!(a, Action::Backward { .. }))?;
    Some(match (program[last], program.get(last + 1)) {
        (
            Action::Backward { mb, chunk },
            Some(&Action::SendGrad {
                mb: m, chunk: c, ..
            }),
        ) if (m, c) == (mb, chunk) => last + 2,
        _ => last + 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::reduction::{with_gradient_reduction, with_sharded_optimizer};
    use crate::plan::schedule::{ScheduleKind, build};
    use crate::plan::validate::validate;

    #[test]
    fn tie_follows_the_last_backward_on_the_embeddings_and_the_heads_devices() {
        let plan: Plan = "microbatches 2\nchunk 0 device 0 embedding layers 0..1\nchunk 1 device 1 layers 1..2 head\ndevice 0: F0.0 SA0.0>1 F1.0 SA1.0>1 RG0.1<1 B0.0 RG1.1<1 B1.0 STEP0\ndevice 1: RA0.0<0 F0.1 B0.1 SG0.1>0 RA1.0<0 F1.1 B1.1 SG1.1>0 STEP1\n"
            .parse()
            .unwrap();
        let tied = with_tied_embeddings(plan.clone()).unwrap();
        assert!(tied.to_string().ends_with(
            "B1.0 TIE STEP0\ndevice 1: RA0.0<0 F0.1 B0.1 SG0.1>0 RA1.0<0 F1.1 B1.1 SG1.1>0 TIE STEP1\n"
        ), "{tied}");
        validate(&tied).unwrap();
        // Reductions across replicas come after the tied sum.
        let two = with_gradient_reduction(tied.clone(), 2).unwrap();
        assert!(two.to_string().ends_with("B1.0 TIE AR0 STEP0\ndevice 1: RA0.0<0 F0.1 B0.1 SG0.1>0 RA1.0<0 F1.1 B1.1 SG1.1>0 TIE AR1 STEP1\n"), "{two}");
        validate(&two).unwrap();
        let again = with_tied_embeddings(tied).unwrap_err();
        assert_eq!(again.field(), Some("tie_embeddings"));
    }

    #[test]
    fn a_plan_missing_or_misplacing_tie_is_refused() {
        let text = "microbatches 1\nchunk 0 device 0 embedding layers 0..1\nchunk 1 device 1 layers 1..2 head\n";
        let check = |programs: &str| validate(&format!("{text}{programs}").parse().unwrap());
        check("device 0: F0.0 SA0.0>1 RG0.1<1 B0.0 TIE STEP0\ndevice 1: RA0.0<0 F0.1 B0.1 SG0.1>0 TIE STEP1\n").unwrap();
        let missing = check("device 0: F0.0 SA0.0>1 RG0.1<1 B0.0 TIE STEP0\ndevice 1: RA0.0<0 F0.1 B0.1 SG0.1>0 STEP1\n").unwrap_err();
        assert!(missing.to_string().contains("TIE"), "{missing}");
        let early = check("device 0: F0.0 SA0.0>1 TIE RG0.1<1 B0.0 STEP0\ndevice 1: RA0.0<0 F0.1 B0.1 SG0.1>0 TIE STEP1\n").unwrap_err();
        assert!(early.to_string().contains("backwards"), "{early}");
        let late = check("device 0: F0.0 SA0.0>1 RG0.1<1 B0.0 STEP0 TIE\ndevice 1: RA0.0<0 F0.1 B0.1 SG0.1>0 TIE STEP1\n").unwrap_err();
        assert!(
            late.to_string().contains("before the device's TIE"),
            "{late}"
        );
    }

    /// Every schedule, on one device and on several, tied then reduced (sharded or not),
    /// validates: no deadlock where the head's device holds other chunks after it.
    #[test]
    fn every_schedule_ties_into_a_valid_plan() {
        for kind in ScheduleKind::EACH {
            for devices in [1, 2, 4] {
                let Ok(plan) = build(kind, devices, 4, 8) else {
                    continue;
                };
                let tied = with_tied_embeddings(plan).unwrap();
                validate(&tied).unwrap_or_else(|e| panic!("{kind} on {devices}: {e}"));
                let ties = tied
                    .programs
                    .iter()
                    .flatten()
                    .filter(|a| **a == Action::Tie);
                let holders = [tied.chunks[0].device, tied.chunks.last().unwrap().device];
                let want = if holders[0] == holders[1] { 1 } else { 2 };
                assert_eq!(ties.count(), want, "{kind} on {devices}");
                let two = with_gradient_reduction(tied, 2).unwrap();
                validate(&two).unwrap_or_else(|e| panic!("{kind} on {devices}: {e}"));
                let sharded = with_sharded_optimizer(two).unwrap();
                validate(&sharded).unwrap_or_else(|e| panic!("{kind} on {devices}: {e}"));
            }
        }
    }
}
