//! Rewriting the programs for what the policy decided: forwards that drop their stash and
//! the recomputes before their backwards, stash offloads after forwards with their prefetches
//! before backwards, optimizer steps in slices with their state brought in and sent back.
//! Prefetches go before the last compute action that starts, on a simulated timeline, at
//! least one copy time (plus a tenth for safety) before the action that needs the group.

use std::collections::HashMap;

use super::super::hardware::Hardware;
use super::super::ir::{Action, Group, Plan};
use super::super::simulate::{ChunkCost, Simulation, slice_bytes};
use super::options::Choices;

/// Compute actions are unique per device; a forward is known by (mb, chunk) whatever it drops.
pub(super) fn key(a: Action) -> Action {
    match a {
        Action::Forward { mb, chunk, .. } => Action::forward(mb, chunk),
        other => other,
    }
}

/// `base` (a plan without recompute or offload) rebuilt with `choices`, its prefetches timed
/// on `timed` (a plan of the same base and its simulation).
pub(super) fn realize(
    base: &Plan,
    timed: (&Plan, &Simulation),
    costs: &[ChunkCost],
    hw: &Hardware,
    choices: &Choices,
) -> Plan {
    let slices = optimizer_slices(costs, choices);
    let programs = (0..base.devices())
        .map(|d| {
            let rewrite = Rewrite {
                program: &base.programs[d],
                when: compute_starts(d, timed.0, timed.1),
                costs,
                hw,
                choices,
                slices,
            };
            rewrite.program()
        })
        .collect();
    Plan {
        programs,
        optimizer_slices: slices,
        ..base.clone()
    }
}

/// One device's program being rewritten.
struct Rewrite<'a> {
    program: &'a [Action],
    /// Start times of its compute actions on the timeline (by `key`).
    when: HashMap<Action, f64>,
    costs: &'a [ChunkCost],
    hw: &'a Hardware,
    choices: &'a Choices,
    slices: u32,
}

/// An action inserted before position `.0` of the base program, ordered by `.1` there.
type Insert = (usize, usize, Action);

impl Rewrite<'_> {
    fn copy_s(&self, bytes: u64) -> f64 {
        1.1 * bytes as f64 / self.hw.host_bytes_per_s.max(1.0)
    }

    fn program(&self) -> Vec<Action> {
        let program = self.program;
        // Compute actions start in program order, so their times are sorted.
        let timed_compute: Vec<(usize, f64)> = program
            .iter()
            .enumerate()
            .filter_map(|(i, a)| self.when.get(&key(*a)).map(|&t| (i, t)))
            .collect();
        // The position of the last compute action starting by `target`, not before `not_before`.
        let compute_before = |target: f64, not_before: usize| -> usize {
            let n = timed_compute.partition_point(|&(_, t)| t <= target);
            let pos = if n == 0 { 0 } else { timed_compute[n - 1].0 };
            pos.max(not_before)
        };
        let backward_at: HashMap<(u32, u32), usize> = program
            .iter()
            .enumerate()
            .filter_map(|(i, a)| match *a {
                Action::Backward { mb, chunk } => Some(((mb, chunk), i)),
                _ => None,
            })
            .collect();
        let mut inserts: Vec<Insert> = Vec::new();
        // What each base action becomes (a step may become several slices).
        let mut out_actions: Vec<Vec<Action>> = Vec::with_capacity(program.len());
        // Optimizer states come back one chunk at a time: each prefetch after the previous
        // chunk's offload.
        let mut after_last_state_offload = 0;
        for (i, &a) in program.iter().enumerate() {
            let replaced = match a {
                Action::Forward { mb, chunk, .. } => {
                    let b = backward_at.get(&(mb, chunk)).copied();
                    self.forward(i, (mb, chunk), b, &compute_before, &mut inserts)
                }
                Action::Step { chunk, .. } => {
                    let seq = self.step(i, a, chunk, after_last_state_offload, &compute_before);
                    if self.choices.offloaded_optimizer.contains(&chunk) {
                        after_last_state_offload = i + 1;
                    }
                    Some(seq.map_or_else(
                        || {
                            (0..self.slices)
                                .map(|slice| Action::Step { chunk, slice })
                                .collect()
                        },
                        |(prefetch, seq)| {
                            inserts.push(prefetch);
                            seq
                        },
                    ))
                }
                _ => None,
            };
            out_actions.push(replaced.unwrap_or_else(|| vec![a]));
        }
        merge(out_actions, inserts)
    }

    /// The stash offload and prefetch or the recompute of forward `i` of (mb, chunk), whose
    /// backward is at `b`; the forward's replacement when it drops its stash.
    fn forward(
        &self,
        i: usize,
        (mb, chunk): (u32, u32),
        b: Option<usize>,
        compute_before: &dyn Fn(f64, usize) -> usize,
        inserts: &mut Vec<Insert>,
    ) -> Option<Vec<Action>> {
        let program = self.program;
        let recomputed = self.choices.recomputed_chunks.contains(&chunk);
        if self.choices.offloaded_stash.contains(&chunk)
            && !recomputed
            && let Some(b) = b
        {
            let after_f =
                i + 1 + usize::from(matches!(program.get(i + 1), Some(Action::SendAct { .. })));
            let need = self
                .when
                .get(&Action::Backward { mb, chunk })
                .copied()
                .unwrap_or(0.0);
            let lead = self.copy_s(self.costs[chunk as usize].memory.stash_bytes);
            let pre = compute_before(need - lead, after_f).min(b);
            let g = Group::Stash { mb, chunk };
            // Only when the prefetch can come after the offload with room to spare.
            if pre > after_f {
                inserts.push((after_f, 0, Action::Offload(g)));
                inserts.push((pre, 1, Action::Prefetch(g)));
            }
        }
        if !recomputed {
            return None;
        }
        if let Some(b) = b {
            // Before the gradient's receive, so the recompute overlaps its wait.
            let at = if b > 0 && matches!(program[b - 1], Action::RecvGrad { .. }) {
                b - 1
            } else {
                b
            };
            inserts.push((at, 2, Action::Recompute { mb, chunk }));
        }
        Some(vec![Action::Forward {
            mb,
            chunk,
            drop_stash: true,
        }])
    }

    /// For a step `a` at `i` of a chunk whose optimizer state is offloaded: the first slice's
    /// prefetch and the sliced steps with their moves. `None` when the state stays.
    fn step(
        &self,
        i: usize,
        a: Action,
        chunk: u32,
        after_last_state_offload: usize,
        compute_before: &dyn Fn(f64, usize) -> usize,
    ) -> Option<(Insert, Vec<Action>)> {
        if !self.choices.offloaded_optimizer.contains(&chunk) {
            return None;
        }
        let slices = self.slices;
        let step = |slice| Action::Step { chunk, slice };
        let o = |slice| Group::Optimizer { chunk, slice };
        let need = self.when.get(&a).copied().unwrap_or(0.0);
        let lead = self.copy_s(slice_bytes(&self.costs[chunk as usize], slices as usize, 0));
        let pre = compute_before(need - lead, after_last_state_offload);
        // Slice s+1 comes in while slice s is stepped and goes out: at most two slices of
        // state on the device.
        let mut seq = vec![step(0)];
        for slice in 1..slices {
            seq.extend([
                Action::Prefetch(o(slice)),
                Action::Offload(o(slice - 1)),
                step(slice),
            ]);
        }
        seq.push(Action::Offload(o(slices - 1)));
        Some(((pre.min(i), 1, Action::Prefetch(o(0))), seq))
    }
}

/// The rewritten actions with the inserts, stable by (position, order), each before the base
/// action at its position.
fn merge(out_actions: Vec<Vec<Action>>, mut inserts: Vec<Insert>) -> Vec<Action> {
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
    merged
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
