//! Chronos-Pipe, as we reconstruct it: a V-shaped placement and a repeating per-micro-batch
//! block that runs each backward as early as the devices allow.
//!
//! Device d holds chunk d (shallow) and chunk 2p-1-d (deep), so a micro-batch's forward runs
//! down the devices and back up, and the loss is computed on device 0. In units where a
//! chunk's forward takes 1 and its backward 2, every device spends 6 units per micro-batch.
//! We place one micro-batch's passes (the block) at the earliest times their inputs allow such
//! that, repeated every `period` units, no device runs two passes at once: forwards in chain
//! order, then backwards from the loss back to chunk 0, each at its earliest free slot
//! (backtracking when a choice leaves a device no room). With period 6 nothing idles in the
//! steady state, and the bubble is the block's fill and drain, like 1F1B's. A deep chunk's
//! stash lives only while the micro-batch goes to the loss and back, so the devices hold about
//! half of 1F1B's activations; the shallow chunks hold most of it, which Chronos-Recomp then
//! drops.
//!
//! The in-flight knob k (0: unlimited) stretches the period to at least block length / k, so
//! that at most about k micro-batches are in the pipe: less memory, more bubble. Each device runs its
//! passes in the order of their planned times; since a pass's inputs are planned strictly
//! earlier, that order cannot deadlock.

use super::kind::{Knob, Layout, Schedule, ScheduleKind, Slot};
use crate::plan::error::PlanError;

pub(super) const SCHEDULE: Schedule = Schedule {
    name: "chronos",
    knob: Some(Knob {
        placeholder: "K",
        default: 0,
        is_chunks_per_device: false,
    }),
    searched: true,
    kind: |k| ScheduleKind::Chronos { in_flight: k },
    chunks_per_device: |_| 2,
    layout: |p, k, m| {
        Ok(Layout {
            placement: placement(p),
            order: order(p, m, k)?,
        })
    },
};

const F_UNITS: u64 = 1;
const B_UNITS: u64 = 2;

fn placement(p: u32) -> Vec<u32> {
    (0..2 * p)
        .map(|c| if c < p { c } else { 2 * p - 1 - c })
        .collect()
}

/// Planned start of each forward and backward of one micro-batch, and the period.
struct Block {
    forward: Vec<u64>,
    backward: Vec<u64>,
    period: u64,
}

impl Block {
    fn length(&self) -> u64 {
        self.backward[0] + B_UNITS
    }
}

/// A pass of the block in placement order: (chunk, is_backward).
fn passes(p: u32) -> Vec<(u32, bool)> {
    let c = 2 * p;
    (0..c)
        .map(|k| (k, false))
        .chain((0..c).rev().map(|k| (k, true)))
        .collect()
}

fn block(p: u32) -> Block {
    let dev = placement(p);
    let order = passes(p);
    let per_device = 2 * (F_UNITS + B_UNITS);
    let mut period = per_device;
    loop {
        let mut search = Search {
            order: &order,
            dev: &dev,
            period,
            busy: vec![vec![false; period as usize]; p as usize],
            times: vec![0; order.len()],
            best: None,
            nodes: 0,
        };
        search.place(0);
        if let Some(times) = search.best {
            let c = 2 * p as usize;
            return Block {
                forward: times[..c].to_vec(),
                backward: (0..c).map(|k| times[order.len() - 1 - k]).collect(),
                period,
            };
        }
        // A longer period always leaves room; it only costs throughput.
        period += 1;
    }
}

/// Branch and bound over the passes' start times: the shortest block (fill and drain, and so
/// the stash lifetimes) found within a budget of search nodes.
struct Search<'a> {
    order: &'a [(u32, bool)],
    dev: &'a [u32],
    period: u64,
    busy: Vec<Vec<bool>>,
    times: Vec<u64>,
    best: Option<Vec<u64>>,
    nodes: u32,
}

/// Enough to find the shortest block for the pipeline depths we plan (up to 64 devices)
/// in well under the search's time budget.
const NODE_BUDGET: u32 = 20_000;

impl Search<'_> {
    fn length(times: &[u64]) -> u64 {
        times.last().map_or(0, |t| t + B_UNITS)
    }

    fn place(&mut self, i: usize) {
        let Some(&(chunk, backward)) = self.order.get(i) else {
            let better = self
                .best
                .as_ref()
                .is_none_or(|b| Self::length(&self.times) < Self::length(b));
            if better {
                self.best = Some(self.times.clone());
            }
            return;
        };
        self.nodes += 1;
        if self.nodes > NODE_BUDGET && self.best.is_some() {
            return;
        }
        let c = self.dev.len();
        // The input: the previous forward, or the next chunk's backward (the loss for the
        // last chunk).
        let ready = match (backward, i) {
            (false, 0) => 0,
            (false, _) => self.times[i - 1] + F_UNITS,
            (true, _) if chunk as usize == c - 1 => self.times[c - 1] + F_UNITS,
            (true, _) => self.times[i - 1] + B_UNITS,
        };
        let len = if backward { B_UNITS } else { F_UNITS };
        let backwards_left = if backward { self.order.len() - i } else { c } as u64;
        let d = self.dev[chunk as usize] as usize;
        for t in ready..ready + self.period {
            // Every remaining backward takes at least its own time.
            let bound = t + if backward { 0 } else { F_UNITS } + B_UNITS * backwards_left;
            if self.best.as_ref().is_some_and(|b| bound >= Self::length(b)) {
                return;
            }
            let slots: Vec<usize> = (t..t + len).map(|x| (x % self.period) as usize).collect();
            if slots.iter().any(|&s| self.busy[d][s]) {
                continue;
            }
            for &s in &slots {
                self.busy[d][s] = true;
            }
            self.times[i] = t;
            self.place(i + 1);
            for &s in &slots {
                self.busy[d][s] = false;
            }
        }
    }
}

fn order(p: u32, m: u32, in_flight: u32) -> Result<Vec<Vec<Slot>>, PlanError> {
    let b = block(p);
    // 0: as many in flight as the steady state takes.
    let period = match in_flight {
        0 => b.period,
        k => b.period.max(b.length().div_ceil(k as u64)),
    };
    let dev = placement(p);
    let mut planned: Vec<Vec<(u64, Slot)>> = vec![Vec::new(); p as usize];
    for mb in 0..m {
        let start = mb as u64 * period;
        for c in 0..2 * p {
            let d = dev[c as usize] as usize;
            planned[d].push((start + b.forward[c as usize], Slot::F(mb, c)));
            planned[d].push((start + b.backward[c as usize], Slot::B(mb, c)));
        }
    }
    Ok(planned
        .into_iter()
        .map(|mut v| {
            // Ties (only when the period was stretched) go to the backward: it frees memory.
            v.sort_by_key(|&(t, s)| (t, matches!(s, Slot::F(..))));
            v.into_iter().map(|(_, s)| s).collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_tiles_the_period_without_overlap() {
        for p in 1..=16 {
            let b = block(p);
            let dev = placement(p);
            let mut busy = vec![vec![0u32; b.period as usize]; p as usize];
            for (c, &d) in dev.iter().enumerate() {
                let d = d as usize;
                for t in b.forward[c]..b.forward[c] + F_UNITS {
                    busy[d][(t % b.period) as usize] += 1;
                }
                for t in b.backward[c]..b.backward[c] + B_UNITS {
                    busy[d][(t % b.period) as usize] += 1;
                }
                if c > 0 {
                    assert!(b.forward[c] > b.forward[c - 1]);
                    assert!(b.backward[c - 1] >= b.backward[c] + B_UNITS);
                }
            }
            assert!(busy.iter().flatten().all(|&n| n <= 1), "p={p}");
            assert_eq!(b.period, 6, "p={p}: no idle slot in the steady state");
        }
    }
}
