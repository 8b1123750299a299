//! The validator: proves a plan complete and deadlock-free before anything runs.
//!
//! It checks every action's place (the device holds the chunk, the peer is the right device),
//! that every (micro-batch, chunk) has exactly one forward and one backward, each chunk's
//! backwards run in micro-batch order, a dropping forward has exactly one recompute before its
//! backward, groups are on the device when used. Then it runs the programs logically: sends
//! never block, a receive waits for its send; an action whose own-device input is not there
//! yet can never get it (its device is the only producer), so that is an error at once; when
//! every unfinished device waits on a receive, that is a deadlock.
//!
//! Replicas run the same programs, and a reduction `AR<c>` waits only for the same action in
//! the other replicas. So the replicas can run in lockstep, and a plan whose single pipeline
//! finishes with each `AR` taken as local finishes replicated: the logical run checks one
//! replica. It proves each chunk reduced exactly once, after all its backwards and before any
//! step on its device (the first step takes the norm of the reduced gradients), and each
//! chunk reduced by a sharded `RS<c>` gathered by `AG<c>` once, after all its steps, its
//! weights on the device. With tied embeddings, `TIE` comes once on each device holding the
//! embedding's or the head's chunk, after their backwards and before their reductions and
//! steps, and waits for the other device's.

mod logical;

use super::error::PlanError;
use super::ir::Plan;
use logical::State;

/// Prints every device's program, the action at (`device`, `index`) marked `>>F1.0<<`.
pub fn grid(plan: &Plan, device: usize, index: usize) -> String {
    let mut out = String::new();
    for (d, program) in plan.programs.iter().enumerate() {
        out.push_str(&format!("device {d}:"));
        for (i, a) in program.iter().enumerate() {
            if d == device && i == index {
                out.push_str(&format!(" >>{a}<<"));
            } else {
                out.push_str(&format!(" {a}"));
            }
        }
        out.push('\n');
    }
    out
}

fn fail(plan: &Plan, device: usize, index: usize, message: impl Into<String>) -> PlanError {
    PlanError::InvalidPlan {
        device,
        index,
        message: message.into(),
        grid: grid(plan, device, index),
    }
}

/// Checks `plan`; `Ok` means every device finishes and every pass ran once.
pub fn validate(plan: &Plan) -> Result<(), PlanError> {
    check_layout(plan)?;
    let mut s = State::new(plan);
    run_programs(plan, &mut s)?;
    check_everything_ran(plan, &s)
}

/// The plan's counts and chunks: at least one of each, chunks on existing devices, the
/// embedding and head where they belong, a chunk on every device.
fn check_layout(plan: &Plan) -> Result<(), PlanError> {
    let (m, chunks, devices) = (
        plan.microbatches as usize,
        plan.chunks.len(),
        plan.programs.len(),
    );
    if chunks == 0 || devices == 0 || m == 0 || plan.optimizer_slices == 0 || plan.replicas == 0 {
        return Err(PlanError::invalid(
            "plan",
            "a plan needs at least one chunk, one device, one micro-batch, one optimizer slice \
             and one replica",
        ));
    }
    for (c, spec) in plan.chunks.iter().enumerate() {
        if spec.device as usize >= devices {
            return Err(PlanError::invalid(
                format!("plan.chunks[{c}].device"),
                format!("device {} does not exist ({devices} devices)", spec.device),
            ));
        }
        if spec.embedding != (c == 0) || spec.head != (c == chunks - 1) {
            return Err(PlanError::invalid(
                format!("plan.chunks[{c}]"),
                "the embedding starts chunk 0 and the head ends the last chunk, nowhere else",
            ));
        }
    }
    // A step waits for every device's gradient norm, so a device without a chunk (which
    // never steps) would keep the others waiting.
    if let Some(d) = (0..devices).find(|&d| plan.chunks.iter().all(|c| c.device as usize != d)) {
        return Err(PlanError::invalid(
            format!("plan.programs[{d}]"),
            format!("device {d} holds no chunk: every device needs at least one"),
        ));
    }
    Ok(())
}

/// Runs every device's program in turn, each as far as its receives allow, until all end or
/// none can go on (a deadlock).
fn run_programs(plan: &Plan, s: &mut State) -> Result<(), PlanError> {
    let devices = plan.programs.len();
    let mut pc = vec![0usize; devices];
    loop {
        let mut progress = false;
        #[allow(clippy::needless_range_loop)] // `d` also names the device to `run`
        for d in 0..devices {
            while pc[d] < plan.programs[d].len() {
                match s.run(d, plan.programs[d][pc[d]]) {
                    Ok(true) => {
                        pc[d] += 1;
                        progress = true;
                    }
                    Ok(false) => break,
                    Err(message) => return Err(fail(plan, d, pc[d], message)),
                }
            }
        }
        if (0..devices).all(|d| pc[d] == plan.programs[d].len()) {
            break;
        }
        if !progress {
            let d = (0..devices)
                .find(|&d| pc[d] < plan.programs[d].len())
                .unwrap_or(0);
            return Err(fail(
                plan,
                d,
                pc[d],
                "deadlock: every unfinished device waits on a receive whose send never comes",
            ));
        }
    }
    Ok(())
}

/// After the programs: every micro-batch ran both passes on every chunk, and each sum,
/// reduction, gather and optimizer slice the plan needs happened.
fn check_everything_ran(plan: &Plan, s: &State) -> Result<(), PlanError> {
    let (m, chunks) = (plan.microbatches as usize, plan.chunks.len());
    for mb in 0..m as u32 {
        for c in 0..chunks as u32 {
            let i = s.at(mb, c);
            if !s.forward[i] || !s.backward[i] {
                let (d, _) = last_place(plan, c);
                let what = if s.forward[i] { "backward" } else { "forward" };
                return Err(fail(
                    plan,
                    d,
                    plan.programs[d].len(),
                    format!("micro-batch {mb} never runs its {what} on chunk {c}"),
                ));
            }
        }
    }
    let last = chunks as u32 - 1;
    for c in [0, last] {
        let d = plan.chunks[c as usize].device as usize;
        if s.tied && !s.tie_done[d] {
            return Err(fail(
                plan,
                d,
                plan.programs[d].len(),
                format!(
                    "the plan sums tied gradients (TIE) but device {d}, holding chunk {c}, \
                     never does"
                ),
            ));
        }
    }
    if let Some(c) = (0..chunks).find(|&c| s.replicas > 1 && !s.reduced[c]) {
        let (d, end) = last_place(plan, c as u32);
        return Err(fail(
            plan,
            d,
            end,
            format!(
                "chunk {c}'s gradients are never reduced across the {} replicas (AR{c})",
                s.replicas
            ),
        ));
    }
    if let Some(c) = (0..chunks).find(|&c| s.sharded[c] && !s.gathered[c]) {
        let (d, end) = last_place(plan, c as u32);
        return Err(fail(
            plan,
            d,
            end,
            format!(
                "chunk {c}'s optimizer state is sharded (RS{c}) but its weights are never \
                 gathered after its steps (AG{c})"
            ),
        ));
    }
    if let Some(i) = s.steps_done.iter().position(|&n| n == 0) {
        let (c, k) = (i / s.slices, i % s.slices);
        let (d, end) = last_place(plan, c as u32);
        return Err(fail(
            plan,
            d,
            end,
            format!("chunk {c}'s optimizer slice {k} is never stepped"),
        ));
    }
    Ok(())
}

fn last_place(plan: &Plan, c: u32) -> (usize, usize) {
    let d = plan.chunks[c as usize].device as usize;
    (d, plan.programs[d].len())
}
