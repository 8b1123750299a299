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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::error::PlanError;
use super::ir::{Action, Group, Plan};
use super::simulate::{ChunkCost, Hardware, Simulation, simulate, simulate_trusted, slice_bytes};

/// Which stashes to drop and recompute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    None,
    /// Every chunk, every micro-batch.
    Full,
    /// The longest-lived chunks first, until the plan fits.
    Chronos,
    /// The search picks among the above; to this pass it means `Chronos`.
    Auto,
}

/// What to offload to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Offload {
    None,
    /// Optimizer state, then long-lived stashes, until the plan fits.
    Chronos,
    /// The search picks; to this pass it means `Chronos`.
    Auto,
}

macro_rules! text_enum {
    ($ty:ty, $field:literal, $($name:literal => $v:expr),+) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                $(if *self == $v { return f.write_str($name); })+
                Ok(())
            }
        }
        impl FromStr for $ty {
            type Err = PlanError;
            fn from_str(s: &str) -> Result<Self, PlanError> {
                match s {
                    $($name => Ok($v),)+
                    _ => Err(PlanError::invalid($field, format!(
                        "unknown value `{s}`; use one of: {}", [$($name),+].join(", ")))),
                }
            }
        }
    };
}
text_enum!(Recompute, "recompute", "none" => Recompute::None, "full" => Recompute::Full,
    "chronos" => Recompute::Chronos, "auto" => Recompute::Auto);
text_enum!(Offload, "offload", "none" => Offload::None, "chronos" => Offload::Chronos,
    "auto" => Offload::Auto);

/// Memory the plan must fit in, per device.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Budget {
    pub device_bytes: u64,
    pub host_bytes: u64,
}

/// What the pass chose.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Choices {
    pub recomputed_chunks: BTreeSet<u32>,
    pub offloaded_optimizer: BTreeSet<u32>,
    pub offloaded_stash: BTreeSet<u32>,
}

impl fmt::Display for Choices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |s: &BTreeSet<u32>| s.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let mut parts = Vec::new();
        if !self.recomputed_chunks.is_empty() {
            parts.push(format!(
                "recompute chunks {}",
                list(&self.recomputed_chunks)
            ));
        }
        if !self.offloaded_stash.is_empty() {
            parts.push(format!(
                "offload stashes of chunks {}",
                list(&self.offloaded_stash)
            ));
        }
        if !self.offloaded_optimizer.is_empty() {
            parts.push(format!(
                "offload optimizer state of chunks {}",
                list(&self.offloaded_optimizer)
            ));
        }
        if parts.is_empty() {
            write!(f, "nothing recomputed or offloaded")
        } else {
            write!(f, "{}", parts.join("; "))
        }
    }
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

fn over_budget(sim: &Simulation, d: usize, budget: Budget) -> u64 {
    let dev = &sim.devices[d];
    dev.peak_bytes.saturating_sub(budget.device_bytes)
        + dev.host_peak_bytes.saturating_sub(budget.host_bytes)
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

/// Compute actions are unique per device; a forward is known by (mb, chunk) whatever it drops.
fn key(a: Action) -> Action {
    match a {
        Action::Forward { mb, chunk, .. } => Action::forward(mb, chunk),
        other => other,
    }
}

/// Rebuilds `base` with the chosen recomputes, offloads and prefetches; prefetches go before
/// the last compute action that starts, on the `timing` timeline, at least one copy time
/// (plus a tenth for safety) before the action that needs the group.
fn realize(
    base: &Plan,
    timed: (&Plan, &Simulation),
    costs: &[ChunkCost],
    hw: &Hardware,
    choices: &Choices,
) -> Plan {
    let copy = |bytes: u64| 1.1 * bytes as f64 / hw.host_bytes_per_s.max(1.0);
    let slices = optimizer_slices(costs, choices);
    let mut programs = Vec::with_capacity(base.devices());
    for (d, program) in base.programs.iter().enumerate() {
        let when = compute_starts(d, timed.0, timed.1);
        // (position in base program, order, action): inserted before that position.
        let mut inserts: Vec<(usize, usize, Action)> = Vec::new();
        // Compute actions start in program order, so their times are sorted.
        let timed_compute: Vec<(usize, f64)> = program
            .iter()
            .enumerate()
            .filter_map(|(i, a)| when.get(&key(*a)).map(|&t| (i, t)))
            .collect();
        let compute_before = |target: f64, not_before: usize| -> usize {
            let n = timed_compute.partition_point(|&(_, t)| t <= target);
            let pos = if n == 0 { 0 } else { timed_compute[n - 1].0 };
            pos.max(not_before)
        };
        // What each base action becomes (a step may become several slices).
        let mut out_actions: Vec<Vec<Action>> = Vec::with_capacity(program.len());
        // Optimizer states come back one chunk at a time: each prefetch after the previous
        // chunk's offload.
        let mut after_last_state_offload = 0;
        let backward_at: HashMap<(u32, u32), usize> = program
            .iter()
            .enumerate()
            .filter_map(|(i, a)| match *a {
                Action::Backward { mb, chunk } => Some(((mb, chunk), i)),
                _ => None,
            })
            .collect();
        let position_of = |a: Action| match a {
            Action::Backward { mb, chunk } => backward_at.get(&(mb, chunk)).copied(),
            _ => None,
        };
        for (i, &a) in program.iter().enumerate() {
            match a {
                Action::Forward { mb, chunk, .. } => {
                    if choices.offloaded_stash.contains(&chunk)
                        && !choices.recomputed_chunks.contains(&chunk)
                        && let Some(b) = position_of(Action::Backward { mb, chunk })
                    {
                        let after_f = i
                            + 1
                            + usize::from(matches!(
                                program.get(i + 1),
                                Some(Action::SendAct { .. })
                            ));
                        let need = when
                            .get(&Action::Backward { mb, chunk })
                            .copied()
                            .unwrap_or(0.0);
                        let lead = copy(costs[chunk as usize].memory.stash_bytes);
                        let pre = compute_before(need - lead, after_f).min(b);
                        let g = Group::Stash { mb, chunk };
                        // Only when the prefetch can come after the offload with room to spare.
                        if pre > after_f {
                            inserts.push((after_f, 0, Action::Offload(g)));
                            inserts.push((pre, 1, Action::Prefetch(g)));
                        }
                    }
                    if choices.recomputed_chunks.contains(&chunk) {
                        if let Some(b) = position_of(Action::Backward { mb, chunk }) {
                            // Before the gradient's receive, so the recompute overlaps its wait.
                            let at = if b > 0 && matches!(program[b - 1], Action::RecvGrad { .. }) {
                                b - 1
                            } else {
                                b
                            };
                            inserts.push((at, 2, Action::Recompute { mb, chunk }));
                        }
                        out_actions.push(vec![Action::Forward {
                            mb,
                            chunk,
                            drop_stash: true,
                        }]);
                        continue;
                    }
                }
                Action::Step { chunk, .. } => {
                    let step = |slice| Action::Step { chunk, slice };
                    if !choices.offloaded_optimizer.contains(&chunk) {
                        out_actions.push((0..slices).map(step).collect());
                        continue;
                    }
                    let o = |slice| Group::Optimizer { chunk, slice };
                    let need = when.get(&a).copied().unwrap_or(0.0);
                    let lead = copy(slice_bytes(&costs[chunk as usize], slices as usize, 0));
                    let pre = compute_before(need - lead, after_last_state_offload);
                    inserts.push((pre.min(i), 1, Action::Prefetch(o(0))));
                    // Slice s+1 comes in while slice s is stepped and goes out: at most two
                    // slices of state on the device.
                    let mut seq = vec![step(0)];
                    for slice in 1..slices {
                        seq.extend([
                            Action::Prefetch(o(slice)),
                            Action::Offload(o(slice - 1)),
                            step(slice),
                        ]);
                    }
                    seq.push(Action::Offload(o(slices - 1)));
                    out_actions.push(seq);
                    after_last_state_offload = i + 1;
                    continue;
                }
                _ => {}
            }
            out_actions.push(vec![a]);
        }
        // Merge: stable by (position, order), inserted before the base action at `position`.
        inserts.sort_by_key(|&(pos, order, _)| (pos, order));
        let mut merged = Vec::with_capacity(out_actions.len() + inserts.len());
        let mut k = 0;
        for (i, seq) in out_actions.into_iter().enumerate() {
            while k < inserts.len() && inserts[k].0 == i {
                merged.push(inserts[k].2);
                k += 1;
            }
            merged.extend(seq);
        }
        merged.extend(inserts[k..].iter().map(|x| x.2));
        programs.push(merged);
    }
    Plan {
        programs,
        optimizer_slices: slices,
        ..base.clone()
    }
}

/// Offloaded optimizer state moves in slices of about this size, so that the optimizer step
/// needs only two slices on the device, not a whole chunk's state.
const OPTIMIZER_SLICE_BYTES: u64 = 1 << 30;

/// How many slices each chunk's optimizer state is cut into.
fn optimizer_slices(costs: &[ChunkCost], choices: &Choices) -> u32 {
    if choices.offloaded_optimizer.is_empty() {
        return 1;
    }
    let largest = costs.iter().map(|c| c.optimizer_bytes).max().unwrap_or(0);
    largest.div_ceil(OPTIMIZER_SLICE_BYTES).clamp(1, 64) as u32
}

/// Start times of device `d`'s compute actions on a simulated timeline.
fn compute_starts(d: usize, plan: &Plan, sim: &Simulation) -> HashMap<Action, f64> {
    plan.programs[d]
        .iter()
        .zip(&sim.devices[d].spans)
        .filter(|(a, _)| a.is_compute())
        .map(|(a, span)| (key(*a), span.0))
        .collect()
}

#[cfg(test)]
mod tests {
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
}
