//! Moving tensors between a GPU and pinned host memory on the GPU's copy stream, so the copies
//! overlap the kernels on its compute stream.
//!
//! Ordering is explicit (the context does not track events per buffer):
//! - offload: the copy stream waits for what the compute stream has queued so far (which made
//!   the tensor), copies into a pinned buffer, and frees the device buffer on the copy stream
//!   after the copy, so the compute stream never waits for an offload;
//! - prefetch: the buffer is allocated on the compute stream, the copy stream waits for that
//!   point and copies into it, and the buffer comes back with the copy's [`Ready`]: its first
//!   reader waits for that, so the kernels queued between the prefetch and that use overlap
//!   the copy.
//!
//! Pinned buffers are kept for reuse per GPU: page-locking memory costs far more than a copy.
//! Each carries the event of the last copy queued into or out of it ([`Pinned`]): the host
//! reads or writes it, and frees it, only after that copy.

use cudarc::driver::CudaSlice;

use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::gpu::Gpu;
pub use crate::exec::backend::cuda::pinned::Pinned;
use crate::exec::backend::cuda::ready::Ready;

/// Copies the first `len` bytes of `buf` to pinned host memory on the copy stream and frees
/// `buf` there once copied. Returns at once; the host's reads of the result wait for the copy.
pub fn offload(gpu: &Gpu, buf: CudaSlice<u8>, len: usize) -> Result<Pinned, CudaError> {
    let mut pinned = gpu.pinned.take(&gpu.ctx, &gpu.copy, len)?;
    let made = gpu.stream.record_event(None)?;
    gpu.copy.wait(&made)?;
    gpu.copy.memcpy_dtoh(&buf.slice(0..len), &mut pinned.buf)?;
    pinned.copied = gpu.copy.record_event(None)?;
    let allocated = buf.len();
    let ptr = buf.leak();
    // SAFETY: `ptr` came from `buf`, which no longer exists; dropping the slice rebuilt on the
    // copy stream frees it there, after the copy just queued.
    drop(unsafe { gpu.copy.upgrade_device_ptr::<u8>(ptr, allocated) });
    Ok(pinned)
}

/// Copies pinned host memory into a new device buffer (of at least one byte) on the copy
/// stream. Returns the buffer and its [`Ready`]; the pinned buffer goes back to the cache
/// (later copies into it queue behind this one, and freeing it waits for this one).
pub fn prefetch(gpu: &Gpu, mut pinned: Pinned) -> Result<(CudaSlice<u8>, Ready), CudaError> {
    let len = pinned.buf.len();
    // SAFETY: the copy below writes every byte before a kernel reads it (they wait for
    // its event).
    let mut buf = unsafe { gpu.stream.alloc::<u8>(len.max(1))? };
    let allocated = gpu.stream.record_event(None)?;
    gpu.copy.wait(&allocated)?;
    if len > 0 {
        gpu.copy
            .memcpy_htod(&pinned.buf, &mut buf.slice_mut(0..len))?;
    }
    let ready = Ready::record(&gpu.copy, gpu)?;
    pinned.copied = gpu.copy.record_event(None)?;
    gpu.pinned.give_back(pinned);
    Ok((buf, ready))
}
