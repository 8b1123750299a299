//! The table of schedules. A schedule is one file (its pass order and chunk placement, and
//! its `Schedule` entry) plus its line in `SCHEDULES` and its `ScheduleKind` variant; names, knobs, chunks per device, whether the
//! search tries it, the spec's `parallelism.schedule` values and the OpenAPI enum all come
//! from this table.

use std::fmt;
use std::str::FromStr;

use super::super::error::PlanError;
use super::kind::{Schedule, ScheduleKind};
use super::{chronos, gpipe, interleaved, one_f_one_b};

/// Every schedule, in the order users see them and the search tries them.
pub const SCHEDULES: &[&Schedule] = &[
    &gpipe::SCHEDULE,
    &one_f_one_b::SCHEDULE,
    &interleaved::SCHEDULE,
    &chronos::SCHEDULE,
];

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

impl ScheduleKind {
    /// The schedule's entry in the table.
    pub fn schedule(self) -> &'static Schedule {
        match self {
            ScheduleKind::Gpipe => &gpipe::SCHEDULE,
            ScheduleKind::OneFOneB => &one_f_one_b::SCHEDULE,
            ScheduleKind::Interleaved { .. } => &interleaved::SCHEDULE,
            ScheduleKind::Chronos { .. } => &chronos::SCHEDULE,
        }
    }

    pub fn chunks_per_device(self) -> u32 {
        (self.schedule().chunks_per_device)(self.knob())
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let schedule = self.schedule();
        match schedule.knob {
            Some(_) => write!(f, "{}:{}", schedule.name, self.knob()),
            None => write!(f, "{}", schedule.name),
        }
    }
}

impl FromStr for ScheduleKind {
    type Err = PlanError;
    /// A schedule's name, with `:KNOB` where it has a knob (its default when left out):
    /// `gpipe`, `1f1b`, `interleaved[:V]`, `chronos[:K]`.
    fn from_str(s: &str) -> Result<Self, PlanError> {
        let (name, knob) = match s.split_once(':') {
            Some((n, k)) => (n, Some(k)),
            None => (s, None),
        };
        let Some(schedule) = named(name) else {
            return Err(PlanError::invalid(
                "schedule",
                format!("unknown schedule `{s}`; use {}", patterns()),
            ));
        };
        let value = match (&schedule.knob, knob) {
            (Some(k), None) => k.default,
            (Some(_), Some(k)) => k.parse().map_err(|_| {
                PlanError::invalid("schedule", format!("`{k}` is not a number in `{s}`"))
            })?,
            (None, None) => 0,
            (None, Some(_)) => {
                return Err(PlanError::invalid(
                    "schedule",
                    format!("`{name}` has no knob; write it without `:` (`{s}`)"),
                ));
            }
        };
        Ok((schedule.kind)(value))
    }
}
