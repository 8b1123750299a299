//! Chronos-Pipe, as we reconstruct it: a V-shaped placement and backward-first list
//! scheduling.
//!
//! Device d holds chunk d (shallow) and chunk 2p-1-d (deep), so a micro-batch's forward runs
//! down the devices and back up, and the loss is computed on device 0. The order is built by
//! simulating unit-time passes (forward 1, backward 2, no link time): whenever a device is
//! free it starts the ready pass that can start earliest, preferring a backward, then the
//! deeper chunk. So deep chunks' stashes, produced close to the loss, are consumed almost at
//! once; only the shallow chunks hold activations for long, which Chronos-Recomp then drops.
//! A new micro-batch enters only while fewer than `in_flight` are between their first forward
//! and their last backward: fewer in flight, less memory and more bubble.

use super::Slot;
use crate::plan::error::PlanError;

pub(super) fn placement(p: u32) -> Vec<u32> {
    (0..2 * p)
        .map(|c| if c < p { c } else { 2 * p - 1 - c })
        .collect()
}

pub(super) fn order(p: u32, m: u32, in_flight: u32) -> Result<Vec<Vec<Slot>>, PlanError> {
    const F_TIME: u64 = 1;
    const B_TIME: u64 = 2;
    let chunks = 2 * p;
    let dev = placement(p);
    let (mu, cu) = (m as usize, chunks as usize);
    let mut f_end = vec![None::<u64>; mu * cu];
    let mut b_end = vec![None::<u64>; mu * cu];
    // The next micro-batch each chunk will run forward / backward: per-chunk order is mb order.
    let mut next_f = vec![0u32; cu];
    let mut next_b = vec![0u32; cu];
    let mut free = vec![0u64; p as usize];
    let mut admitted_end: Vec<u64> = Vec::new(); // end times of finished micro-batches
    let mut order = vec![Vec::new(); p as usize];
    let at = |mb: u32, c: u32| mb as usize * cu + c as usize;
    for _ in 0..2 * mu * cu {
        // (start, backward-first key, deeper-first key, device, slot)
        let mut best: Option<(u64, u8, u32, u32, Slot)> = None;
        for c in 0..chunks {
            let d = dev[c as usize];
            let mut consider = |start: u64, is_b: bool, slot: Slot| {
                let key = (start, u8::from(!is_b), chunks - c, d, slot);
                if best.is_none_or(|b| (key.0, key.1, key.2, key.3) < (b.0, b.1, b.2, b.3)) {
                    best = Some(key);
                }
            };
            let mb = next_b[c as usize];
            if mb < m
                && let Some(f) = f_end[at(mb, c)]
            {
                let grad = if c + 1 == chunks {
                    Some(f)
                } else {
                    b_end[at(mb, c + 1)]
                };
                if let Some(g) = grad {
                    consider(g.max(free[d as usize]), true, Slot::B(mb, c));
                }
            }
            let mb = next_f[c as usize];
            if mb < m {
                let input = if c == 0 {
                    // Admission: the micro-batch that would exceed `in_flight` waits for the
                    // earliest finish among those in flight.
                    let finished = admitted_end.len() as u32;
                    if mb < finished + in_flight {
                        Some(0)
                    } else {
                        None
                    }
                } else {
                    f_end[at(mb, c - 1)]
                };
                if let Some(i) = input {
                    consider(i.max(free[d as usize]), false, Slot::F(mb, c));
                }
            }
        }
        let Some((start, _, _, d, slot)) = best else {
            return Err(PlanError::invalid(
                "schedule.in_flight",
                "chronos schedule stalled; in_flight must be at least 1",
            ));
        };
        let d = d as usize;
        match slot {
            Slot::F(mb, c) => {
                free[d] = start + F_TIME;
                f_end[at(mb, c)] = Some(free[d]);
                next_f[c as usize] += 1;
            }
            Slot::B(mb, c) => {
                free[d] = start + B_TIME;
                b_end[at(mb, c)] = Some(free[d]);
                next_b[c as usize] += 1;
                if c == 0 {
                    admitted_end.push(free[d]);
                }
            }
        }
        order[d].push(slot);
    }
    Ok(order)
}
