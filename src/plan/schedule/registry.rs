//! The table of schedules. A schedule is one file (its pass order and chunk placement, and
//! its entry here) plus its line in `SCHEDULES`; names, knobs, chunks per device, whether the
//! search tries it, the spec's `parallelism.schedule` values and the OpenAPI enum all come
//! from this table.

use super::super::error::PlanError;
use super::{ScheduleKind, Slot, chronos, gpipe, interleaved, one_f_one_b};

/// Every schedule, in the order users see them and the search tries them.
pub const SCHEDULES: &[&Schedule] = &[
    &gpipe::SCHEDULE,
    &one_f_one_b::SCHEDULE,
    &interleaved::SCHEDULE,
    &chronos::SCHEDULE,
];

/// One schedule's entry.
pub struct Schedule {
    /// The name users write: in a job spec, on the command line, in the plan's text.
    pub name: &'static str,
    /// Its one knob (`name:value` in the text form), if it has one.
    pub knob: Option<Knob>,
    /// Whether the search tries it (with its knob's default) when no schedule is named.
    pub searched: bool,
    /// The typed kind for a knob value.
    pub kind: fn(knob: u32) -> ScheduleKind,
    /// Model chunks each device holds, for a knob value.
    pub chunks_per_device: fn(knob: u32) -> u32,
    /// Which device holds each chunk and each device's order of passes, for `devices`
    /// devices, a knob value and `microbatches` micro-batches.
    pub layout: fn(devices: u32, knob: u32, microbatches: u32) -> Result<Layout, PlanError>,
}

/// A schedule's knob.
pub struct Knob {
    /// What the text form's placeholder stands for (`interleaved[:V]`).
    pub placeholder: &'static str,
    pub default: u32,
    /// The knob is the number of chunks per device (a job spec's `chunks_per_stage`).
    pub is_chunks_per_device: bool,
}

/// A schedule's pass order before communication and steps are added.
pub struct Layout {
    /// The device of each chunk, in model order.
    pub placement: Vec<u32>,
    /// Each device's forwards and backwards, in order.
    pub order: Vec<Vec<Slot>>,
}

impl Schedule {
    /// The schedule with its knob's default.
    pub fn default_kind(&self) -> ScheduleKind {
        (self.kind)(self.knob.as_ref().map_or(0, |k| k.default))
    }

    /// The text form's pattern: `gpipe`, `interleaved[:V]`.
    pub fn pattern(&self) -> String {
        match &self.knob {
            Some(k) => format!("{}[:{}]", self.name, k.placeholder),
            None => self.name.to_string(),
        }
    }
}

/// The schedule called `name`.
pub fn named(name: &str) -> Option<&'static Schedule> {
    SCHEDULES.iter().copied().find(|s| s.name == name)
}

/// Every schedule's name, in table order.
pub fn names() -> impl Iterator<Item = &'static str> {
    SCHEDULES.iter().map(|s| s.name)
}

/// `a, b, c or d`: the schedules' text patterns, for messages.
pub fn patterns() -> String {
    let all: Vec<String> = SCHEDULES.iter().map(|s| s.pattern()).collect();
    match all.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => all.join(""),
    }
}

/// The schedules the search tries on `devices` devices, each with its knob's default. One
/// device runs the one-chunk schedules only (more chunks there add nothing but hand-overs).
pub fn searched(devices: u32) -> Vec<ScheduleKind> {
    SCHEDULES
        .iter()
        .filter(|s| s.searched)
        .map(|s| s.default_kind())
        .filter(|k| devices > 1 || k.chunks_per_device() == 1)
        .collect()
}
