//! Chronos-Recomp and Chronos-Offload: a pass over a plan that, from its simulated timeline,
//! decides what to move to the host and what to recompute, inserts the actions and
//! re-simulates, until every device fits or nothing is left to try.
//!
//! Each tensor group is judged by its idle interval (reuse distance) on the timeline:
//! - optimizer state is idle for the whole step but its own optimizer step, so it goes to the
//!   host right after that step and is prefetched just early enough before the next one, when
//!   the round trip at the host link's bandwidth fits in the step;
//! - a chunk's stash is idle from the end of its forward to the start of its backward; the
//!   longest-lived chunks go first: offloaded after the forward and prefetched before the
//!   backward when the round trip fits in that interval (offload), or dropped and rebuilt from
//!   the kept input just before the backward (recompute).
//!
//! Offloading is tried before recomputing because a hidden copy costs no compute. Moves are
//! made per device, on the device furthest over its budget, one chunk at a time.
//!
//! This module decides; `realize` rewrites the programs for what it decided, and `options`
//! holds the options' types and text forms.

mod options;
mod realize;

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::Serialize;

use super::error::PlanError;
use super::hardware::Hardware;
use super::ir::{Action, Plan};
use super::simulate::{ChunkCost, Simulation, simulate, simulate_trusted};
pub use options::{Choices, Offload, Recompute};
use realize::realize;

/// Memory the plan must fit in, per device.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Budget {
    pub device_bytes: u64,
    pub host_bytes: u64,
}

/// A plan after the pass, its simulation, and whether it fits.
#[derive(Debug, Clone)]
pub struct Applied {
    pub plan: Plan,
    pub sim: Simulation,
    pub choices: Choices,
    pub fits: bool,
}

/// Fits `plan` (a plan from `schedule::build`, without offload or recompute) into `budget`.
pub fn apply(
    plan: &Plan,
    costs: &[ChunkCost],
    hw: &Hardware,
    budget: Budget,
    recompute: Recompute,
    offload: Offload,
) -> Result<Applied, PlanError> {
    let mut choices = Choices::default();
    if recompute == Recompute::Full {
        choices.recomputed_chunks = (0..plan.chunks.len() as u32).collect();
    }
    let mut timing = simulate(plan, costs, hw, false)?;
    let mut current = plan.clone();
    if !choices.recomputed_chunks.is_empty() {
        current = realize(plan, (plan, &timing), costs, hw, &choices);
        timing = simulate_trusted(&current, costs, hw, false)?;
    }
    // Every move is tried at most once, so this ends.
    let mut tried: HashSet<Move> = HashSet::new();
    loop {
        let over: Vec<usize> = (0..current.devices())
            .filter(|&d| over_budget(&timing, d, budget) > 0)
            .collect();
        if over.is_empty() {
            if recompute != Recompute::Full {
                (current, timing) =
                    take_back_recomputes(plan, (current, timing), costs, hw, budget, &mut choices)?;
            }
            return finish(current, timing, choices, true);
        }
        // One move on every device over budget, then one re-simulation for all of them.
        let mut made = Vec::new();
        for &d in &over {
            let was_offloaded = choices.offloaded_stash.clone();
            let found = next_move(
                &current,
                &timing,
                costs,
                hw,
                d as u32,
                recompute,
                offload,
                &tried,
                &mut choices,
            );
            if let Some(m) = found {
                tried.insert(m);
                made.push((d, m, was_offloaded));
            }
        }
        if made.is_empty() {
            return finish(current, timing, choices, false);
        }
        let next = realize(plan, (&current, &timing), costs, hw, &choices);
        let next_timing = simulate_trusted(&next, costs, hw, false)?;
        // A move that does not lower its device's overshoot (the peak is elsewhere, say in
        // the optimizer step) only costs time or bandwidth: undo it.
        let (mut kept, mut undone) = (0, 0);
        for (d, m, was_offloaded) in made {
            if over_budget(&next_timing, d, budget) < over_budget(&timing, d, budget) {
                kept += 1;
                continue;
            }
            undone += 1;
            match m {
                Move::OffloadOptimizer(c) => {
                    choices.offloaded_optimizer.remove(&c);
                }
                Move::OffloadStash(c) => {
                    choices.offloaded_stash.remove(&c);
                }
                Move::Recompute(c) => {
                    choices.recomputed_chunks.remove(&c);
                    if was_offloaded.contains(&c) {
                        choices.offloaded_stash.insert(c);
                    }
                }
            }
        }
        if kept == 0 {
            continue;
        }
        let (next, next_timing) = if undone == 0 {
            (next, next_timing)
        } else {
            let again = realize(plan, (&current, &timing), costs, hw, &choices);
            let t = simulate_trusted(&again, costs, hw, false)?;
            (again, t)
        };
        current = next;
        timing = next_timing;
    }
}

/// Once the plan fits, later moves (an optimizer offload, say) may have made earlier
/// recomputes unneeded. Each round takes back, on every device, the chunk recomputed with the
/// shortest-lived stash, keeps what still fits, and stops when nothing more can go.
fn take_back_recomputes(
    plan: &Plan,
    (mut current, mut timing): (Plan, Simulation),
    costs: &[ChunkCost],
    hw: &Hardware,
    budget: Budget,
    choices: &mut Choices,
) -> Result<(Plan, Simulation), PlanError> {
    let mut settled: BTreeSet<u32> = BTreeSet::new();
    loop {
        let lifetimes = stash_lifetimes(&current, &timing);
        let mut trial = Vec::new();
        for d in 0..current.devices() as u32 {
            let shortest = choices
                .recomputed_chunks
                .iter()
                .copied()
                .filter(|c| plan.chunks[*c as usize].device == d && !settled.contains(c))
                .min_by(|a, b| {
                    let la = lifetimes.get(a).copied().unwrap_or(0.0);
                    let lb = lifetimes.get(b).copied().unwrap_or(0.0);
                    la.total_cmp(&lb)
                });
            if let Some(c) = shortest {
                trial.push(c);
            }
        }
        if trial.is_empty() {
            return Ok((current, timing));
        }
        for c in &trial {
            choices.recomputed_chunks.remove(c);
        }
        let next = realize(plan, (&current, &timing), costs, hw, choices);
        let next_timing = simulate_trusted(&next, costs, hw, false)?;
        let mut restored = false;
        for &c in &trial {
            let d = plan.chunks[c as usize].device as usize;
            if over_budget(&next_timing, d, budget) > 0 {
                choices.recomputed_chunks.insert(c);
                settled.insert(c);
                restored = true;
            }
        }
        let all_fit = (0..next.devices()).all(|d| over_budget(&next_timing, d, budget) == 0);
        if !restored && all_fit {
            current = next;
            timing = next_timing;
            continue;
        }
        if !restored {
            for &c in &trial {
                choices.recomputed_chunks.insert(c);
                settled.insert(c);
            }
            return Ok((current, timing));
        }
        if trial.iter().all(|c| settled.contains(c)) {
            return Ok((current, timing));
        }
        // Some came back: rebuild with the ones that stayed out, and check the whole plan.
        let again = realize(plan, (&current, &timing), costs, hw, choices);
        let again_timing = simulate_trusted(&again, costs, hw, false)?;
        if (0..again.devices()).any(|d| over_budget(&again_timing, d, budget) > 0) {
            for &c in &trial {
                choices.recomputed_chunks.insert(c);
                settled.insert(c);
            }
            return Ok((current, timing));
        }
        current = again;
        timing = again_timing;
    }
}

/// The pass's result; the plan is validated once here rather than at every re-simulation.
fn finish(plan: Plan, sim: Simulation, choices: Choices, fits: bool) -> Result<Applied, PlanError> {
    super::validate::validate(&plan)?;
    Ok(Applied {
        plan,
        sim,
        choices,
        fits,
    })
}

/// Bytes over budget on device `d`: a step's or an evaluation's, whichever is higher.
fn over_budget(sim: &Simulation, d: usize, budget: Budget) -> u64 {
    let dev = &sim.devices[d];
    let peak = dev.peak_bytes.max(dev.eval_peak_bytes);
    peak.saturating_sub(budget.device_bytes) + dev.host_peak_bytes.saturating_sub(budget.host_bytes)
}

/// Mean idle interval of each chunk's stash (end of forward to start of backward), from
/// the timeline.
fn stash_lifetimes(plan: &Plan, sim: &Simulation) -> HashMap<u32, f64> {
    let mut f_end = HashMap::new();
    let mut sum: HashMap<u32, (f64, u32)> = HashMap::new();
    for (d, program) in plan.programs.iter().enumerate() {
        for (i, a) in program.iter().enumerate() {
            let (_, end) = sim.devices[d].spans[i];
            if let Action::Forward { mb, chunk, .. } = *a {
                f_end.insert((mb, chunk), end);
            }
        }
    }
    for (d, program) in plan.programs.iter().enumerate() {
        for (i, a) in program.iter().enumerate() {
            if let Action::Backward { mb, chunk } = *a {
                let start = sim.devices[d].spans[i].0;
                let e = sum.entry(chunk).or_default();
                e.0 += start - f_end.get(&(mb, chunk)).copied().unwrap_or(start);
                e.1 += 1;
            }
        }
    }
    sum.into_iter()
        .map(|(c, (t, n))| (c, t / n.max(1) as f64))
        .collect()
}

/// One decision of the pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Move {
    OffloadOptimizer(u32),
    OffloadStash(u32),
    Recompute(u32),
}

/// Picks one more thing to move off device `d`; `None` when nothing untried is left.
#[allow(clippy::too_many_arguments)]
fn next_move(
    plan: &Plan,
    sim: &Simulation,
    costs: &[ChunkCost],
    hw: &Hardware,
    d: u32,
    recompute: Recompute,
    offload: Offload,
    tried: &HashSet<Move>,
    choices: &mut Choices,
) -> Option<Move> {
    let mine: Vec<u32> = (0..plan.chunks.len() as u32)
        .filter(|&c| plan.chunks[c as usize].device == d)
        .collect();
    let round_trip = |bytes: u64| 2.0 * bytes as f64 / hw.host_bytes_per_s.max(1.0);
    if offload != Offload::None {
        let fresh = mine.iter().copied().find(|c| {
            !choices.offloaded_optimizer.contains(c)
                && !tried.contains(&Move::OffloadOptimizer(*c))
                && costs[*c as usize].optimizer_bytes > 0
                && round_trip(costs[*c as usize].optimizer_bytes) < sim.step_time_s
        });
        if let Some(c) = fresh {
            choices.offloaded_optimizer.insert(c);
            return Some(Move::OffloadOptimizer(c));
        }
    }
    let lifetimes = stash_lifetimes(plan, sim);
    let mut by_lifetime: Vec<u32> = mine.clone();
    by_lifetime.sort_by(|a, b| {
        let la = lifetimes.get(a).copied().unwrap_or(0.0);
        let lb = lifetimes.get(b).copied().unwrap_or(0.0);
        lb.total_cmp(&la)
    });
    if offload != Offload::None {
        let candidate = by_lifetime.iter().copied().find(|c| {
            !choices.offloaded_stash.contains(c)
                && !choices.recomputed_chunks.contains(c)
                && !tried.contains(&Move::OffloadStash(*c))
                && lifetimes.get(c).copied().unwrap_or(0.0)
                    > round_trip(costs[*c as usize].memory.stash_bytes)
        });
        if let Some(c) = candidate {
            choices.offloaded_stash.insert(c);
            return Some(Move::OffloadStash(c));
        }
    }
    if matches!(recompute, Recompute::Chronos | Recompute::Auto) {
        let candidate = by_lifetime.iter().copied().find(|c| {
            !choices.recomputed_chunks.contains(c) && !tried.contains(&Move::Recompute(*c))
        });
        if let Some(c) = candidate {
            choices.offloaded_stash.remove(&c);
            choices.recomputed_chunks.insert(c);
            return Some(Move::Recompute(c));
        }
    }
    None
}

#[cfg(test)]
mod tests;
