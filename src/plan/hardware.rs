//! What a device and its links can do, and the time of the transfers the simulator and the
//! search charge on them. A leaf: the simulator, the data-parallel pass and the presets read it.

use serde::Serialize;

/// What a device and its links can do.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Hardware {
    /// Peak FLOP/s of one device (one tensor-parallel rank) at the profile's precision.
    pub peak_flops: f64,
    /// Fraction of peak that model FLOPs achieve (matmul shapes, kernels, tensor-parallel
    /// communication all folded in).
    pub efficiency: f64,
    /// Device memory bandwidth, for the memory-bound optimizer step.
    pub hbm_bytes_per_s: f64,
    /// Point-to-point bandwidth between pipeline neighbours, per device.
    pub p2p_bytes_per_s: f64,
    pub p2p_latency_s: f64,
    /// Host link bandwidth, each direction.
    pub host_bytes_per_s: f64,
}

impl Hardware {
    /// Seconds `bytes` take on a point-to-point link (latency not included).
    pub fn p2p_s(&self, bytes: u64) -> f64 {
        bytes as f64 / self.p2p_bytes_per_s.max(1.0)
    }

    /// Seconds `bytes` take on the host link, one way.
    pub fn host_copy_s(&self, bytes: u64) -> f64 {
        bytes as f64 / self.host_bytes_per_s.max(1.0)
    }

    /// Seconds of a ring all-reduce of `bytes` over `replicas` devices on the p2p links:
    /// each device sends and receives `2 (r - 1) / r` of them.
    pub fn reduction_s(&self, replicas: u32, bytes: u64) -> f64 {
        if replicas < 2 {
            return 0.0;
        }
        let r = replicas as f64;
        let moved = 2.0 * (r - 1.0) / r * bytes as f64;
        moved / self.p2p_bytes_per_s.max(1.0) + 2.0 * (r - 1.0) * self.p2p_latency_s
    }

    /// Seconds for one half of a ring all-reduce of `bytes` over `replicas`: a
    /// reduce-scatter (`RS<c>`) or an all-gather (`AG<c>`), each device sending and
    /// receiving `(r - 1) / r` of them.
    pub fn ring_half_s(&self, replicas: u32, bytes: u64) -> f64 {
        if replicas < 2 {
            return 0.0;
        }
        let r = replicas as f64;
        let moved = (r - 1.0) / r * bytes as f64;
        moved / self.p2p_bytes_per_s.max(1.0) + (r - 1.0) * self.p2p_latency_s
    }
}
