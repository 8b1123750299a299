//! Device buffers counted in a pool, like host tensors: the lease gives the bytes back when
//! the buffer is dropped, so the pool's live bytes are exactly what exists on the device.

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, ValidAsZeroBits};

use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::tensor::{Element, Lease};
use crate::plan::inventory::TensorSpec;

/// A raw device address inside a [`GpuTensor`], for kernel arguments and cuBLAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevPtr(pub(crate) u64);

/// A dense tensor on one CUDA device.
pub struct GpuTensor<T: Element = f32> {
    buf: CudaSlice<T>,
    addr: u64,
    shape: Vec<usize>,
    _lease: Lease,
}

impl<T: Element + DeviceRepr + ValidAsZeroBits> GpuTensor<T> {
    /// A zero-filled tensor counted in `pool` under `group`.
    pub fn zeros(
        gpu: &Gpu,
        pool: &PoolRef,
        name: &str,
        shape: &[usize],
        group: MemGroup,
    ) -> Result<Self, CudaError> {
        let mut t = Self::scratch(gpu, pool, name, shape, group)?;
        t.fill_zero(gpu)?;
        Ok(t)
    }

    /// A tensor whose contents are unspecified, for buffers a kernel overwrites completely.
    pub fn scratch(
        gpu: &Gpu,
        pool: &PoolRef,
        name: &str,
        shape: &[usize],
        group: MemGroup,
    ) -> Result<Self, CudaError> {
        let len: usize = shape.iter().product();
        let lease = Lease::reserve(pool, name, group, len * T::DTYPE.bytes())?;
        // SAFETY: every user of a scratch tensor writes it before reading it.
        let buf = unsafe { gpu.stream.alloc::<T>(len.max(1))? };
        Ok(Self::wrap(gpu, buf, shape, lease))
    }

    /// A scratch tensor with the name and shape of an inventory entry.
    pub fn from_spec(
        gpu: &Gpu,
        pool: &PoolRef,
        spec: &TensorSpec,
        group: MemGroup,
    ) -> Result<Self, CudaError> {
        debug_assert_eq!(spec.dtype, T::DTYPE, "{}", spec.name);
        Self::scratch(gpu, pool, spec.name, &spec.shape, group)
    }

    /// A copy of host data.
    pub fn from_host(
        gpu: &Gpu,
        pool: &PoolRef,
        name: &str,
        shape: &[usize],
        data: &[T],
        group: MemGroup,
    ) -> Result<Self, CudaError> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(CudaError::Unsupported(format!(
                "{name}: {} values for shape {shape:?}",
                data.len()
            )));
        }
        let mut t = Self::scratch(gpu, pool, name, shape, group)?;
        if !data.is_empty() {
            gpu.stream.memcpy_htod(data, &mut t.buf)?;
        }
        Ok(t)
    }

    fn wrap(gpu: &Gpu, buf: CudaSlice<T>, shape: &[usize], lease: Lease) -> Self {
        let addr = buf.device_ptr(&gpu.stream).0;
        GpuTensor {
            buf,
            addr,
            shape: shape.to_vec(),
            _lease: lease,
        }
    }

    /// Copies the tensor to the host (waits for the stream).
    pub fn to_host(&self, gpu: &Gpu) -> Result<Vec<T>, CudaError> {
        let mut all = gpu.stream.clone_dtoh(&self.buf)?;
        all.truncate(self.len());
        Ok(all)
    }

    /// Overwrites the tensor with host data of the same length.
    pub fn copy_from_host(&mut self, gpu: &Gpu, data: &[T]) -> Result<(), CudaError> {
        if data.len() != self.len() {
            return Err(CudaError::Unsupported(format!(
                "copying {} values into a tensor of {}",
                data.len(),
                self.len()
            )));
        }
        if !data.is_empty() {
            gpu.stream.memcpy_htod(data, &mut self.buf)?;
        }
        Ok(())
    }

    /// Overwrites the tensor with another of the same length (device to device).
    pub fn copy_from(&mut self, gpu: &Gpu, src: &GpuTensor<T>) -> Result<(), CudaError> {
        if src.len() != self.len() {
            return Err(CudaError::Unsupported(format!(
                "copying a tensor of {} values into one of {}",
                src.len(),
                self.len()
            )));
        }
        gpu.stream.memcpy_dtod(&src.buf, &mut self.buf)?;
        Ok(())
    }

    pub fn fill_zero(&mut self, gpu: &Gpu) -> Result<(), CudaError> {
        gpu.stream.memset_zeros(&mut self.buf)?;
        Ok(())
    }
}

impl<T: Element> GpuTensor<T> {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The address of element 0.
    pub fn ptr(&self) -> DevPtr {
        DevPtr(self.addr)
    }

    /// The address of element `offset` (checked against the length).
    pub fn at(&self, offset: usize) -> DevPtr {
        assert!(offset <= self.len(), "offset {offset} past {}", self.len());
        DevPtr(self.addr + (offset * std::mem::size_of::<T>()) as u64)
    }
}
