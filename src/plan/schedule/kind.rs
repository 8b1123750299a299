//! The types of the schedule table: the typed kind with its knob, an entry's fields and what
//! a schedule's layout returns. A leaf: the schedules' files and the table build on it.

use serde::{Deserialize, Serialize};

use super::super::error::PlanError;

/// A pipeline schedule and its knob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// All forwards, then all backwards; one chunk per device.
    Gpipe,
    /// One forward, one backward; one chunk per device.
    OneFOneB,
    /// Megatron's interleaved 1F1B: `chunks_per_device` chunks per device, placed round-robin.
    Interleaved { chunks_per_device: u32 },
    /// V-shaped placement (device d holds chunks d and 2p-1-d, the loss on device 0), backward
    /// passes as early as the devices allow, about `in_flight` micro-batches at most between
    /// their first forward and their last backward (0: no bound).
    Chronos { in_flight: u32 },
}

impl ScheduleKind {
    /// One of each schedule (interleaved with 2 chunks per device, chronos unbounded), for
    /// checks that run them all.
    pub const EACH: [ScheduleKind; 4] = [
        ScheduleKind::Gpipe,
        ScheduleKind::OneFOneB,
        ScheduleKind::Interleaved {
            chunks_per_device: 2,
        },
        ScheduleKind::Chronos { in_flight: 0 },
    ];

    /// The knob's value (0 for a schedule without one).
    pub fn knob(self) -> u32 {
        match self {
            ScheduleKind::Gpipe | ScheduleKind::OneFOneB => 0,
            ScheduleKind::Interleaved { chunks_per_device } => chunks_per_device,
            ScheduleKind::Chronos { in_flight } => in_flight,
        }
    }
}

/// A compute slot before communication is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    F(u32, u32),
    B(u32, u32),
}

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
