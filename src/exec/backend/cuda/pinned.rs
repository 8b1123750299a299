//! Pinned host memory for offloaded tensors, kept for reuse per GPU: page-locking memory
//! costs far more than a copy. A leaf: it names no GPU, only a context and a stream.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaEvent, CudaStream, PinnedHostSlice};

use crate::exec::backend::cuda::CudaError;

/// Pinned host memory and the end of the last copy queued into or out of it, which host
/// access and the free wait for. (cudarc's pinned slices carry an event too, but record it
/// only when the context tracks events, which `Gpu::open` turns off: without this one, a
/// checkpoint could read offloaded optimizer state while its copy was still in flight.)
pub struct Pinned {
    pub(crate) buf: PinnedHostSlice<u8>,
    pub(crate) copied: CudaEvent,
}

impl Pinned {
    /// The bytes, once the last copy queued into them has landed.
    pub fn as_slice(&self) -> Result<&[u8], CudaError> {
        self.copied.synchronize()?;
        Ok(self.buf.as_slice()?)
    }

    /// The bytes to write, once the last copy queued into or out of them is done.
    pub fn as_mut_slice(&mut self) -> Result<&mut [u8], CudaError> {
        self.copied.synchronize()?;
        Ok(self.buf.as_mut_slice()?)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // An error here has nowhere to go; the context records it for its next call.
        let _ = self.copied.synchronize();
    }
}

/// Pinned host buffers not in use, of any length.
#[derive(Default)]
pub struct PinnedCache {
    free: Mutex<Vec<Pinned>>,
}

impl PinnedCache {
    /// A buffer of `len` bytes, kept or newly pinned in `ctx`; `copy` is the stream its
    /// copies run on.
    pub(crate) fn take(
        &self,
        ctx: &Arc<CudaContext>,
        copy: &CudaStream,
        len: usize,
    ) -> Result<Pinned, CudaError> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = free.iter().position(|p| p.buf.len() == len) {
            return Ok(free.swap_remove(i));
        }
        drop(free);
        // SAFETY: every byte is written by the copy that follows before anything reads it.
        // Flags 0: ordinary (not write-combined) pinned memory, which the host reads at full
        // speed (checkpoints read offloaded optimizer state).
        let buf = unsafe { ctx.alloc_pinned_with_flags::<u8>(len, 0)? };
        Ok(Pinned {
            buf,
            copied: copy.record_event(None)?,
        })
    }

    pub(crate) fn give_back(&self, p: Pinned) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(p);
    }
}
