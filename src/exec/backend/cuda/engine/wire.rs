//! GPU tensors between processes, staged through host memory: what leaves is copied to the
//! host as f32 (bf16 activations widened, exactly, and marked so that they travel as bf16),
//! what arrives is copied onto the GPU in the activations' element type (narrowed back,
//! exact for values that were bf16).
//! Collectives between processes read f32 tensors (gradients, weights) range by range.

use std::borrow::Cow;
use std::ops::Range;

use half::bf16;

use crate::exec::backend::cuda::tensor::GpuTensor;
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::pipeline::PipelineError;
use crate::exec::transport::frame::WireTensor;
use crate::plan::inventory::DType;

use super::GpuEngine;

type Result<T> = std::result::Result<T, PipelineError>;

impl GpuEngine {
    pub(super) fn copy_out(&self, device: u32, t: GpuTensor) -> Result<WireTensor> {
        let gpu = self.gpu(device);
        let bf16 = t.dtype() == DType::Bf16;
        let data = match bf16 {
            true => (t.to_host::<bf16>(gpu)?.into_iter())
                .map(f32::from)
                .collect(),
            false => t.to_host::<f32>(gpu)?,
        };
        Ok(WireTensor {
            name: t.name().to_string(),
            shape: t.shape().to_vec(),
            data,
            bf16,
        })
    }

    pub(super) fn copy_in(&self, device: u32, m: WireTensor, pool: &PoolRef) -> Result<GpuTensor> {
        let gpu = self.gpu(device);
        let (name, shape, group) = (&m.name, &m.shape, MemGroup::Activations);
        Ok(match gpu.precision.activations() {
            DType::Bf16 => {
                let data: Vec<bf16> = m.data.iter().map(|&v| bf16::from_f32(v)).collect();
                GpuTensor::from_host(gpu, pool, name, shape, &data, group)?
            }
            _ => GpuTensor::from_host(gpu, pool, name, shape, &m.data, group)?,
        })
    }

    pub(super) fn read_values(
        &self,
        device: u32,
        t: &GpuTensor,
        within: Range<usize>,
    ) -> Result<Cow<'static, [f32]>> {
        let mut out = vec![0.0; within.len()];
        t.read_range(self.gpu(device), within, &mut out)?;
        Ok(Cow::Owned(out))
    }
}
