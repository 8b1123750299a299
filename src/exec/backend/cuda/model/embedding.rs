//! The token embedding on the GPU.

use super::{Alloc, GpuCtx, GpuPart, Result};
use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::tensor::GpuTensor;
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::model::check_tokens;
use crate::plan::inventory::Part;

pub struct EmbeddingStash {
    token_ids: GpuTensor,
}

impl EmbeddingStash {
    /// The token ids moved into `to` (see [`GpuTensor::relocate`]).
    pub fn relocate(self, gpu: &Gpu, to: &PoolRef, to_host: bool) -> Result<Self> {
        let token_ids = self
            .token_ids
            .relocate(gpu, to, MemGroup::Activations, to_host)?;
        Ok(EmbeddingStash { token_ids })
    }
}

impl EmbeddingStash {
    /// Makes the compute stream wait for any prefetch into the stash.
    pub fn await_ready(&self, gpu: &Gpu) -> Result<()> {
        self.token_ids.await_ready(gpu)
    }
}

pub fn embedding_forward(
    ctx: GpuCtx<'_>,
    p: &GpuPart,
    ids: &[i32],
) -> Result<(EmbeddingStash, GpuTensor)> {
    let d = ctx.config.dims;
    check_tokens("input_ids", ids, d.vocab)?;
    let a = Alloc::new(ctx, Part::Embedding);
    let mut token_ids = a.stash("token_ids")?;
    if ids.len() != token_ids.len() {
        return Err(CudaError::Unsupported(format!(
            "{} input ids for a micro-batch of {} tokens",
            ids.len(),
            token_ids.len()
        )));
    }
    token_ids.copy_from_host(ctx.gpu, ids)?;
    let out = a.output()?;
    let table = &p.weights[0];
    ctx.gpu
        .embedding_forward(out.ptr(), table.ptr(), token_ids.ptr(), ids.len(), d.hidden)?;
    Ok((EmbeddingStash { token_ids }, out))
}

pub fn embedding_backward(
    ctx: GpuCtx<'_>,
    p: &mut GpuPart,
    st: EmbeddingStash,
    grad_output: GpuTensor,
) -> Result<()> {
    let n = st.token_ids.len();
    ctx.gpu.embedding_backward(
        p.grads[0].ptr(),
        grad_output.ptr(),
        st.token_ids.ptr(),
        n,
        ctx.config.dims.hidden,
    )
}
