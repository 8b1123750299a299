//! Megatron-LM's interleaved 1F1B. Device d holds chunks d, d+p, ..., d+(v-1)p. Micro-batches
//! go in groups of p: forward visits a group on chunk-slot 0, then the same group on slot 1,
//! and so on; backward visits slots in reverse. Device d warms up with `2(p-d-1) + (v-1)p`
//! forwards (capped at m*v), then alternates, then drains. Megatron requires m to be a
//! multiple of p, and so do we: otherwise the groups do not line up.

use super::kind::{Knob, Layout, Schedule, ScheduleKind, Slot};
use crate::plan::error::PlanError;

pub(super) const SCHEDULE: Schedule = Schedule {
    name: "interleaved",
    knob: Some(Knob {
        placeholder: "V",
        default: 2,
        is_chunks_per_device: true,
    }),
    searched: true,
    kind: |v| ScheduleKind::Interleaved {
        chunks_per_device: v,
    },
    chunks_per_device: |v| v,
    layout: |p, v, m| {
        Ok(Layout {
            placement: (0..p * v).map(|c| c % p).collect(),
            order: order(p, v, m)?,
        })
    },
};

/// The warm-up forward count of device d.
pub fn warmup(p: u32, v: u32, m: u32, d: u32) -> u32 {
    (2 * (p - d - 1) + (v - 1) * p).min(m * v)
}

/// (micro-batch, chunk) of device d's i-th forward or backward.
fn slot(p: u32, v: u32, d: u32, i: u32, backward: bool) -> (u32, u32) {
    let group = i / (p * v);
    let within = i % (p * v);
    let k = within / p;
    let k = if backward { v - 1 - k } else { k };
    (group * p + within % p, k * p + d)
}

fn order(p: u32, v: u32, m: u32) -> Result<Vec<Vec<Slot>>, PlanError> {
    if v < 2 {
        return Err(PlanError::invalid(
            "schedule.chunks_per_device",
            "interleaved needs at least 2 chunks per device (1 is plain 1f1b)",
        ));
    }
    if !m.is_multiple_of(p) {
        let up = m.div_ceil(p) * p;
        return Err(PlanError::invalid(
            "microbatches",
            format!(
                "interleaved needs a multiple of the {p} pipeline devices; {m} is not (try {up})"
            ),
        ));
    }
    let total = m * v;
    Ok((0..p)
        .map(|d| {
            let warm = warmup(p, v, m, d);
            let f = |i| {
                let (mb, c) = slot(p, v, d, i, false);
                Slot::F(mb, c)
            };
            let b = |i| {
                let (mb, c) = slot(p, v, d, i, true);
                Slot::B(mb, c)
            };
            let mut slots: Vec<Slot> = (0..warm).map(f).collect();
            for i in 0..total - warm {
                slots.push(f(warm + i));
                slots.push(b(i));
            }
            slots.extend((total - warm..total).map(b));
            slots
        })
        .collect())
}
