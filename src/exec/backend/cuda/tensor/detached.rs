//! A tensor between two GPUs (or two stages of one): its values counted in no pool until it
//! is attached on the receiving side.

use cudarc::driver::CudaEvent;

use super::{GpuTensor, Storage, alloc};
use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::act_copy::ActCopy;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::nccl::Nccl;
use crate::exec::backend::cuda::ready::Ready;
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::tensor::Lease;
use crate::plan::inventory::DType;

/// A tensor's values counted in no pool (see [`GpuTensor::detach`]).
pub struct Detached {
    /// The sender's compute stream when it sent the tensor (see [`GpuTensor::detach`]).
    pub(super) sent: Option<CudaEvent>,
    pub(super) ready: Option<Ready>,
    pub(super) storage: Storage,
    pub(super) addr: u64,
    pub(super) name: String,
    pub(super) shape: Vec<usize>,
    pub(super) dtype: DType,
}

impl Detached {
    /// The tensor counted in `pool` on `to`. Its values stay where they are when they are on
    /// `to` already (`from` is `to`: stages sharing a GPU hand buffers over); otherwise they
    /// move from `from` through NCCL when the job has a communicator (`nccl`), or else
    /// through host memory.
    pub fn attach(
        self,
        from: &Gpu,
        to: &Gpu,
        nccl: Option<&Nccl>,
        pool: &PoolRef,
        group: MemGroup,
    ) -> Result<GpuTensor, CudaError> {
        let bytes = self.shape.iter().product::<usize>() * self.dtype.bytes();
        let lease = Lease::reserve(pool, &self.name, group, bytes)?;
        let data = match (self.storage, nccl) {
            (Storage::Device(buf), _) if from.ordinal == to.ordinal => {
                return Ok(GpuTensor {
                    storage: Storage::Device(buf),
                    addr: self.addr,
                    name: self.name,
                    shape: self.shape,
                    dtype: self.dtype,
                    lease,
                    ready: self.ready,
                    act_copy: ActCopy::No,
                });
            }
            (Storage::Device(_), _) if bytes == 0 => Vec::new(),
            (Storage::Device(buf), Some(nccl)) => {
                let sent = self.sent.as_ref();
                let (copy, ready) =
                    nccl.transfer(from, to, buf, bytes, sent, self.ready.as_ref())?;
                let mut t = GpuTensor::wrap(to, copy, &self.name, &self.shape, self.dtype, lease);
                t.ready = Some(ready);
                return Ok(t);
            }
            (Storage::Device(buf), None) => {
                if let Some(e) = &self.ready {
                    e.wait_on(&from.stream)?;
                }
                let mut host = vec![0u8; bytes];
                from.stream.memcpy_dtoh(&buf.slice(0..bytes), &mut host)?;
                host
            }
            (Storage::Host(data), _) => data,
            (Storage::Pinned(p), _) => p.as_slice()?.to_vec(),
        };
        let mut copy = alloc(to, data.len())?;
        if !data.is_empty() {
            to.stream.memcpy_htod(&data, &mut copy)?;
        }
        Ok(GpuTensor::wrap(
            to,
            copy,
            &self.name,
            &self.shape,
            self.dtype,
            lease,
        ))
    }
}
