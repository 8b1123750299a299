//! 1F1B: device d runs `min(p-d-1, m)` warm-up forwards, then alternates one forward and one
//! backward, then drains the remaining backwards. At most `min(p-d, m)` micro-batches are in
//! flight on device d.

use super::kind::{Layout, Schedule, ScheduleKind, Slot};

pub(super) const SCHEDULE: Schedule = Schedule {
    name: "1f1b",
    knob: None,
    searched: true,
    kind: |_| ScheduleKind::OneFOneB,
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
            let warm = (p - d - 1).min(m);
            let mut slots: Vec<Slot> = (0..warm).map(|mb| Slot::F(mb, d)).collect();
            for i in 0..m - warm {
                slots.push(Slot::F(warm + i, d));
                slots.push(Slot::B(i, d));
            }
            slots.extend((m - warm..m).map(|mb| Slot::B(mb, d)));
            slots
        })
        .collect()
}
