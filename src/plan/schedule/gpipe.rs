//! GPipe: every device runs all forwards, then all backwards; one chunk per device.

use super::kind::{Layout, Schedule, ScheduleKind, Slot};

pub(super) const SCHEDULE: Schedule = Schedule {
    name: "gpipe",
    knob: None,
    searched: false,
    kind: |_| ScheduleKind::Gpipe,
    chunks_per_device: |_| 1,
    layout: |p, _, m| {
        Ok(Layout {
            placement: (0..p).collect(),
            order: order(p, m),
        })
    },
};

fn order(p: u32, m: u32) -> Vec<Vec<Slot>> {
    (0..p)
        .map(|d| {
            (0..m)
                .map(|mb| Slot::F(mb, d))
                .chain((0..m).map(|mb| Slot::B(mb, d)))
                .collect()
        })
        .collect()
}
