//! The copy of an f32 weight in the activations' type (bf16) that products read, kept beside
//! the weight while it is on its device and counted with it (same pool and group). The
//! optimizer's update kernels write it as they update the weight; any other write to the
//! weight (a checkpoint loaded, a prefetch) leaves it stale, and the next product that reads it
//! casts it afresh first. An offload gives its bytes back; the prefetch that brings the weight
//! back allocates it again.

use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::{CudaSlice, DevicePtr};

use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::dev_ptr::DevPtr;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::tensor::Lease;

/// Whether and where a tensor has its copy.
pub(crate) enum ActCopy {
    /// The tensor has none (activations, gradients, optimizer state, norm weights).
    No,
    /// The tensor gets one whenever it is on a device; it is on the host now.
    Wanted,
    /// Boxed: most tensors have no copy, and every tensor carries this.
    Held(Box<Held>),
}

/// A copy on the device.
pub(crate) struct Held {
    /// Freed on the compute stream, after the kernels queued to read it.
    buf: CudaSlice<u8>,
    ptr: DevPtr,
    /// Whether the copy holds the weight's current values.
    current: AtomicBool,
    lease: Lease,
}

impl ActCopy {
    /// A stale copy of `len` elements on `gpu`, counted in `pool` under `group`.
    pub(crate) fn allocate(
        gpu: &Gpu,
        pool: &PoolRef,
        name: &str,
        group: MemGroup,
        len: usize,
    ) -> Result<ActCopy, CudaError> {
        let dtype = gpu.precision.activations();
        let bytes = len * dtype.bytes();
        let lease = Lease::reserve(pool, &format!("{name} ({dtype:?} copy)"), group, bytes)?;
        // SAFETY: the copy is marked stale; it is written (a cast, or an update that covers
        // it) before a product reads it.
        let buf = unsafe { gpu.stream.alloc::<u8>(bytes.max(1))? };
        let ptr = DevPtr::new(buf.device_ptr(&gpu.stream).0, dtype);
        Ok(ActCopy::Held(Box::new(Held {
            buf,
            ptr,
            current: AtomicBool::new(false),
            lease,
        })))
    }

    /// What the tensor keeps once it is in host memory.
    pub(crate) fn on_host(&self) -> ActCopy {
        match self {
            ActCopy::No => ActCopy::No,
            ActCopy::Wanted | ActCopy::Held(_) => ActCopy::Wanted,
        }
    }

    /// Counts the copy under `group`, as its weight is.
    pub(crate) fn regroup(&mut self, group: MemGroup) {
        if let ActCopy::Held(h) = self {
            h.lease.regroup(group);
        }
    }

    /// The copy's element `offset` (for an update that writes it), if there is a copy.
    pub(crate) fn at(&self, offset: usize) -> Option<DevPtr> {
        match self {
            ActCopy::Held(h) => Some(h.ptr.offset(offset)),
            _ => None,
        }
    }

    /// The weight's values changed other than through an update that wrote the copy too.
    pub(crate) fn mark_stale(&self) {
        if let ActCopy::Held(h) = self {
            h.current.store(false, Ordering::Relaxed);
        }
    }

    /// The copy, cast now from `weight` (`len` f32 values) if it is stale; `None` without one.
    pub(crate) fn current(
        &self,
        gpu: &Gpu,
        weight: DevPtr,
        len: usize,
    ) -> Result<Option<DevPtr>, CudaError> {
        let ActCopy::Held(h) = self else {
            return Ok(None);
        };
        if !h.current.load(Ordering::Relaxed) {
            gpu.cast_to_act(h.ptr, weight, len)?;
            h.current.store(true, Ordering::Relaxed);
        }
        debug_assert!(h.buf.len() >= len * h.ptr.dtype.bytes());
        Ok(Some(h.ptr))
    }
}
