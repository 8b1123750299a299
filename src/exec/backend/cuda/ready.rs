//! The end of a copy into a device buffer (a prefetch on the copy stream, a receive on a
//! transfer stream), which the buffer's readers wait for.

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaStream};

use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::gpu::Gpu;

/// The end of a copy into a device buffer. Kernels that read the buffer wait for
/// it ([`Ready::wait_on`]); dropping it makes the compute stream wait too, so a buffer dropped
/// unused (a step that failed) is freed after the copy into it, never during.
pub struct Ready {
    event: CudaEvent,
    compute: Arc<CudaStream>,
}

impl Ready {
    /// The point `stream` has reached, which `gpu`'s compute stream waits for before the
    /// buffer it guards is read or freed.
    pub fn record(stream: &CudaStream, gpu: &Gpu) -> Result<Ready, CudaError> {
        Ok(Ready {
            event: stream.record_event(None)?,
            compute: gpu.stream.clone(),
        })
    }

    pub fn wait_on(&self, stream: &CudaStream) -> Result<(), CudaError> {
        Ok(stream.wait(&self.event)?)
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        // An error here has nowhere to go; the context records it for its next call.
        let _ = self.compute.wait(&self.event);
    }
}
