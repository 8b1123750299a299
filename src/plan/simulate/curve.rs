//! A device's memory over the simulated step: events (bytes added to or taken from a
//! category at a time), replayed in time order into the peak, the split at the peak, the
//! host peak and, when asked, the curve.

use serde::Serialize;

/// Memory categories of the curve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MemoryPoint {
    pub t: f64,
    pub weights: u64,
    pub grads: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub comm: u64,
    /// Bytes of this device's groups held on the host.
    pub host: u64,
}

impl MemoryPoint {
    pub fn device_total(&self) -> u64 {
        self.weights + self.grads + self.optimizer + self.activations + self.comm
    }
}

pub(super) const WEIGHTS: usize = 0;
pub(super) const GRADS: usize = 1;
pub(super) const OPTIMIZER: usize = 2;
pub(super) const ACTIVATIONS: usize = 3;
pub(super) const COMM: usize = 4;
pub(super) const HOST: usize = 5;

#[derive(Clone, Copy)]
pub(super) struct MemEvent {
    pub t: f64,
    pub delta: i64,
    pub category: usize,
}

/// What a device's replayed events come to.
pub(super) struct Replayed {
    pub peak: u64,
    pub at_peak: MemoryPoint,
    pub host_peak: u64,
    pub curve: Vec<MemoryPoint>,
}

/// Replays a device's memory events in time order (frees before allocations at the same
/// instant).
pub(super) fn replay(events: &mut [MemEvent], curve: bool) -> Replayed {
    events.sort_by(|a, b| a.t.total_cmp(&b.t).then((a.delta > 0).cmp(&(b.delta > 0))));
    let mut level = [0i64; 6];
    let (mut peak, mut host_peak) = (0u64, 0u64);
    let mut at_peak = MemoryPoint::default();
    let mut points = Vec::new();
    let point = |t: f64, level: &[i64; 6]| {
        let u = |x: i64| x.max(0) as u64;
        MemoryPoint {
            t,
            weights: u(level[WEIGHTS]),
            grads: u(level[GRADS]),
            optimizer: u(level[OPTIMIZER]),
            activations: u(level[ACTIVATIONS]),
            comm: u(level[COMM]),
            host: u(level[HOST]),
        }
    };
    for (i, e) in events.iter().enumerate() {
        level[e.category] += e.delta;
        let now = point(e.t, &level);
        let total = now.device_total();
        if total > peak {
            peak = total;
            at_peak = now;
        }
        host_peak = host_peak.max(now.host);
        let last_at_t = events.get(i + 1).is_none_or(|n| n.t > e.t);
        if curve && last_at_t {
            points.push(now);
        }
    }
    Replayed {
        peak,
        at_peak,
        host_peak,
        curve: points,
    }
}
