//! Devices with a byte budget and the pool that counts every tensor allocated on them.
//!
//! A pool counts live bytes by [`MemGroup`] and remembers its peak. Tensors hold a lease on
//! their pool and give their bytes back when dropped, so "live bytes" is exactly what exists.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

/// What a tensor is for; the pool counts each group separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemGroup {
    Weights,
    Gradients,
    OptimizerState,
    Activations,
    Communication,
}

impl MemGroup {
    pub const ALL: [MemGroup; 5] = [
        MemGroup::Weights,
        MemGroup::Gradients,
        MemGroup::OptimizerState,
        MemGroup::Activations,
        MemGroup::Communication,
    ];

    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            MemGroup::Weights => "weights",
            MemGroup::Gradients => "gradients",
            MemGroup::OptimizerState => "optimizer_state",
            MemGroup::Activations => "activations",
            MemGroup::Communication => "communication",
        }
    }
}

/// Live bytes per group at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupBytes(pub [usize; 5]);

impl GroupBytes {
    pub fn get(&self, group: MemGroup) -> usize {
        self.0[group.index()]
    }
    pub fn total(&self) -> usize {
        self.0.iter().sum()
    }
}

impl fmt::Display for GroupBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = MemGroup::ALL
            .iter()
            .map(|g| format!("{} {}", g.name(), self.get(*g)))
            .collect();
        write!(f, "{}", parts.join(", "))
    }
}

/// The state of a device when an allocation did not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfMemory {
    pub device: String,
    pub tensor: String,
    pub group: &'static str,
    pub requested: usize,
    pub budget: usize,
    pub live_total: usize,
    pub live: GroupBytes,
}

impl fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "out of memory on {}: cannot allocate {} bytes for {} ({}); budget {} bytes, \
             live {} bytes ({}), {} bytes free",
            self.device,
            self.requested,
            self.tensor,
            self.group,
            self.budget,
            self.live_total,
            self.live,
            self.budget.saturating_sub(self.live_total)
        )
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DeviceError {
    #[error("{0}")]
    OutOfMemory(Box<OutOfMemory>),
    #[error("bad device set {spec:?}: {reason} (expected e.g. `cpu:4x256MiB`)")]
    BadDeviceSpec { spec: String, reason: String },
}

#[derive(Debug, Default)]
struct Counters {
    live: GroupBytes,
    peak: usize,
    peak_by_group: GroupBytes,
}

/// Free buffers by (element type, length).
type BufferCache = HashMap<(TypeId, usize), Vec<Box<dyn Any + Send>>>;

/// One memory pool: a device's "HBM" or the host.
#[derive(Debug)]
pub struct Pool {
    name: String,
    budget: usize,
    counters: Mutex<Counters>,
    /// Buffers of dropped tensors kept for reuse, by element type and length, like PyTorch's
    /// caching allocator: training repeats the same shapes every micro-batch, and reusing
    /// them avoids the page faults of fresh allocations. Cached buffers are not live bytes.
    cache: Mutex<BufferCache>,
}

/// Shared handle to a pool; tensors keep one.
pub type PoolRef = Arc<Pool>;

impl Pool {
    pub fn new(name: impl Into<String>, budget: usize) -> PoolRef {
        Arc::new(Pool {
            name: name.into(),
            budget,
            counters: Mutex::new(Counters::default()),
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    fn counters(&self) -> MutexGuard<'_, Counters> {
        // A panic elsewhere cannot leave the counters half-updated: each update is one statement.
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `bytes` for `tensor` or fails with the device's state.
    pub(crate) fn reserve(
        &self,
        tensor: &str,
        group: MemGroup,
        bytes: usize,
    ) -> Result<(), DeviceError> {
        let mut c = self.counters();
        let live_total = c.live.total();
        if live_total + bytes > self.budget {
            return Err(DeviceError::OutOfMemory(Box::new(OutOfMemory {
                device: self.name.clone(),
                tensor: tensor.to_string(),
                group: group.name(),
                requested: bytes,
                budget: self.budget,
                live_total,
                live: c.live,
            })));
        }
        c.live.0[group.index()] += bytes;
        let total = live_total + bytes;
        if total > c.peak {
            c.peak = total;
            c.peak_by_group = c.live;
        }
        Ok(())
    }

    /// Recounts `bytes` from one group to another; the total is unchanged.
    pub(crate) fn move_between(&self, from: MemGroup, to: MemGroup, bytes: usize) {
        let mut c = self.counters();
        c.live.0[from.index()] -= bytes;
        c.live.0[to.index()] += bytes;
    }

    /// A buffer of `len` elements with unspecified (finite, previously written) contents.
    pub(crate) fn take_buffer<T: Copy + Default + Send + 'static>(&self, len: usize) -> Vec<T> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get_mut(&(TypeId::of::<T>(), len))
            .and_then(Vec::pop)
            .and_then(|b| b.downcast::<Vec<T>>().ok())
            .map(|b| *b)
            .unwrap_or_else(|| vec![T::default(); len])
    }

    /// Keeps a dropped tensor's buffer for the next tensor of the same size.
    pub(crate) fn recycle<T: Copy + Default + Send + 'static>(&self, buffer: Vec<T>) {
        if buffer.is_empty() {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry((TypeId::of::<T>(), buffer.len()))
            .or_default()
            .push(Box::new(buffer));
    }

    /// Returns cached buffers to the system allocator.
    pub fn trim_cache(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub(crate) fn release(&self, group: MemGroup, bytes: usize) {
        let mut c = self.counters();
        c.live.0[group.index()] -= bytes;
    }

    pub fn live(&self) -> GroupBytes {
        self.counters().live
    }

    pub fn live_bytes(&self) -> usize {
        self.counters().live.total()
    }

    /// The largest total of live bytes seen so far.
    pub fn peak_bytes(&self) -> usize {
        self.counters().peak
    }

    /// Live bytes by group at the moment of the peak.
    pub fn peak_by_group(&self) -> GroupBytes {
        self.counters().peak_by_group
    }

    /// Starts a new peak measurement from what is live now.
    pub fn reset_peak(&self) {
        let mut c = self.counters();
        c.peak = c.live.total();
        c.peak_by_group = c.live;
    }
}

/// The devices of a run and the host pool that offloaded tensors go to.
#[derive(Debug, Clone)]
pub struct DeviceSet {
    pub devices: Vec<PoolRef>,
    pub host: PoolRef,
}

impl DeviceSet {
    /// `count` CPU devices named `cpu:0`.. with `budget` bytes each, and an unbounded host.
    pub fn cpu(count: usize, budget: usize) -> DeviceSet {
        DeviceSet {
            devices: (0..count)
                .map(|i| Pool::new(format!("cpu:{i}"), budget))
                .collect(),
            host: Pool::new("host", usize::MAX),
        }
    }
}

/// Parses a byte size such as `256MiB`, `1GB` or `4096`.
pub fn parse_size(text: &str) -> Option<usize> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let num: usize = num.parse().ok()?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    num.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_groups_and_peak_and_refuses_over_budget() {
        let pool = Pool::new("cpu:0", 100);
        pool.reserve("w", MemGroup::Weights, 60).unwrap();
        pool.reserve("a", MemGroup::Activations, 30).unwrap();
        pool.release(MemGroup::Activations, 30);
        assert_eq!(pool.peak_bytes(), 90);
        assert_eq!(pool.live().get(MemGroup::Weights), 60);
        let err = pool.reserve("big", MemGroup::Gradients, 41).unwrap_err();
        let msg = err.to_string();
        for want in ["cpu:0", "41 bytes", "big", "budget 100", "weights 60"] {
            assert!(msg.contains(want), "{msg} lacks {want}");
        }
    }
}
