//! Device buffers counted in a pool, like host tensors: the lease gives the bytes back when
//! the buffer is dropped, so the pool's live bytes are exactly what exists on the device.
//! A tensor the pipeline has offloaded keeps its values in host memory, counted in the host's
//! pool, until it is moved back ([`GpuTensor::relocate`]).

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, PinnedHostSlice, ValidAsZeroBits};

use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::offload::{self, Ready};
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::tensor::{Element, Lease};
use crate::plan::inventory::TensorSpec;

/// A raw device address inside a [`GpuTensor`], for kernel arguments and cuBLAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevPtr(pub(crate) u64);

/// Where a tensor's values are.
enum Storage<T> {
    Device(CudaSlice<T>),
    /// Never on a device yet (a part adopted from host weights, zeroed optimizer state).
    Host(Vec<T>),
    /// Offloaded: pinned host memory whose event marks the end of the copy into it.
    Pinned(PinnedHostSlice<T>),
}

/// A dense tensor on one CUDA device (or offloaded to the host).
pub struct GpuTensor<T: Element = f32> {
    /// After a prefetch: the end of its copy, which kernels reading the tensor wait for.
    /// Declared before `storage` so it is dropped first (see [`Ready`]).
    ready: Option<Ready>,
    storage: Storage<T>,
    /// The device address of element 0 (0 while on the host).
    addr: u64,
    name: String,
    shape: Vec<usize>,
    lease: Lease,
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
        Ok(Self::wrap(gpu, buf, name, shape, lease))
    }

    /// Host values counted in `pool` (the host's): a tensor that starts offloaded.
    pub fn on_host(
        pool: &PoolRef,
        name: &str,
        shape: &[usize],
        data: Vec<T>,
        group: MemGroup,
    ) -> Result<Self, CudaError> {
        check_len(name, shape, data.len())?;
        let lease = Lease::reserve(pool, name, group, data.len() * T::DTYPE.bytes())?;
        Ok(GpuTensor {
            storage: Storage::Host(data),
            addr: 0,
            name: name.to_string(),
            shape: shape.to_vec(),
            lease,
            ready: None,
        })
    }

    /// Moves the tensor into `to` under `group`, the destination charged before the source
    /// is given back: to pinned host memory when `to_host` (an offload, on the copy stream),
    /// else onto `gpu` (a prefetch on the copy stream, or a synchronous upload of values that
    /// were never on the device). Between pools on the same side only the counting moves.
    pub fn relocate(
        self,
        gpu: &Gpu,
        to: &PoolRef,
        group: MemGroup,
        to_host: bool,
    ) -> Result<Self, CudaError>
    where
        T: 'static,
    {
        let lease = Lease::reserve(to, &self.name, group, self.lease.bytes())?;
        let len = self.len();
        let GpuTensor {
            storage,
            addr,
            name,
            shape,
            lease: _given_back,
            ready,
        } = self;
        let (storage, addr, ready) = match (storage, to_host) {
            (Storage::Device(buf), true) if len > 0 => {
                if let Some(e) = &ready {
                    e.wait_on(&gpu.copy)?;
                }
                (Storage::Pinned(offload::offload(gpu, buf, len)?), 0, None)
            }
            (Storage::Device(_), true) => (Storage::Host(Vec::new()), 0, None),
            (Storage::Pinned(pinned), false) => {
                let (buf, ready) = offload::prefetch(gpu, pinned)?;
                let addr = buf.device_ptr(&gpu.stream).0;
                (Storage::Device(buf), addr, Some(ready))
            }
            (Storage::Host(data), false) => {
                // SAFETY: written completely below before any kernel reads it.
                let mut buf = unsafe { gpu.stream.alloc::<T>(data.len().max(1))? };
                if !data.is_empty() {
                    gpu.stream.memcpy_htod(&data, &mut buf)?;
                }
                let addr = buf.device_ptr(&gpu.stream).0;
                (Storage::Device(buf), addr, None)
            }
            (kept, _) => (kept, addr, ready),
        };
        Ok(GpuTensor {
            storage,
            addr,
            name,
            shape,
            lease,
            ready,
        })
    }

    /// Makes `gpu`'s compute stream wait until a prefetch into this tensor has landed (no-op
    /// otherwise). Every kernel that may read a prefetched tensor runs after this.
    pub fn await_ready(&self, gpu: &Gpu) -> Result<(), CudaError> {
        if let Some(e) = &self.ready {
            e.wait_on(&gpu.stream)?;
        }
        Ok(())
    }

    /// The same tensor counted under another group of its pool.
    pub fn regroup(mut self, group: MemGroup) -> Self {
        self.lease.regroup(group);
        self
    }

    /// Gives the tensor's bytes back to its pool, keeping its values: a tensor sent to
    /// another pipeline stage, counted nowhere until it is received.
    pub fn detach(self) -> Detached<T> {
        Detached {
            ready: self.ready,
            storage: self.storage,
            addr: self.addr,
            name: self.name,
            shape: self.shape,
        }
    }

    /// Whether the values are in host memory (offloaded).
    pub fn is_on_host(&self) -> bool {
        !matches!(self.storage, Storage::Device(_))
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
        check_len(name, shape, data.len())?;
        let mut t = Self::scratch(gpu, pool, name, shape, group)?;
        t.copy_from_host(gpu, data)?;
        Ok(t)
    }

    fn wrap(gpu: &Gpu, buf: CudaSlice<T>, name: &str, shape: &[usize], lease: Lease) -> Self {
        let addr = buf.device_ptr(&gpu.stream).0;
        GpuTensor {
            storage: Storage::Device(buf),
            addr,
            name: name.to_string(),
            shape: shape.to_vec(),
            lease,
            ready: None,
        }
    }

    /// Copies the tensor to the host (waits for the stream).
    pub fn to_host(&self, gpu: &Gpu) -> Result<Vec<T>, CudaError> {
        match &self.storage {
            Storage::Device(buf) => {
                let mut all = gpu.stream.clone_dtoh(buf)?;
                all.truncate(self.len());
                Ok(all)
            }
            Storage::Host(data) => Ok(data.clone()),
            Storage::Pinned(p) => Ok(p.as_slice()?.to_vec()),
        }
    }

    /// Copies elements `range` to `dst` (waits for the stream).
    pub fn read_range(
        &self,
        gpu: &Gpu,
        range: std::ops::Range<usize>,
        dst: &mut [T],
    ) -> Result<(), CudaError> {
        match &self.storage {
            Storage::Device(buf) => {
                self.await_ready(gpu)?;
                gpu.stream.memcpy_dtoh(&buf.slice(range), dst)?
            }
            Storage::Host(data) => dst.copy_from_slice(&data[range]),
            Storage::Pinned(p) => dst.copy_from_slice(&p.as_slice()?[range]),
        }
        Ok(())
    }

    /// Overwrites elements `range` with `src`.
    pub fn write_range(
        &mut self,
        gpu: &Gpu,
        range: std::ops::Range<usize>,
        src: &[T],
    ) -> Result<(), CudaError> {
        self.await_ready(gpu)?;
        match &mut self.storage {
            Storage::Device(buf) => gpu.stream.memcpy_htod(src, &mut buf.slice_mut(range))?,
            Storage::Host(data) => data[range].copy_from_slice(src),
            Storage::Pinned(p) => p.as_mut_slice()?[range].copy_from_slice(src),
        }
        Ok(())
    }

    /// Sets elements `range` to zero.
    pub fn zero_range(
        &mut self,
        gpu: &Gpu,
        range: std::ops::Range<usize>,
    ) -> Result<(), CudaError> {
        self.await_ready(gpu)?;
        match &mut self.storage {
            Storage::Device(buf) => gpu.stream.memset_zeros(&mut buf.slice_mut(range))?,
            Storage::Host(data) => data[range].fill(T::default()),
            Storage::Pinned(p) => p.as_mut_slice()?[range].fill(T::default()),
        }
        Ok(())
    }

    /// Overwrites the tensor with host data of the same length.
    pub fn copy_from_host(&mut self, gpu: &Gpu, data: &[T]) -> Result<(), CudaError> {
        if data.len() != self.len() {
            return Err(CudaError::Unsupported(format!(
                "copying {} values into {} of {}",
                data.len(),
                self.name,
                self.len()
            )));
        }
        if !data.is_empty() {
            self.write_range(gpu, 0..data.len(), data)?;
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
        src.await_ready(gpu)?;
        self.await_ready(gpu)?;
        match (&src.storage, &mut self.storage) {
            (Storage::Device(s), Storage::Device(d)) => gpu.stream.memcpy_dtod(s, d)?,
            _ => return Err(self.offloaded()),
        }
        Ok(())
    }

    pub fn fill_zero(&mut self, gpu: &Gpu) -> Result<(), CudaError> {
        let len = self.len();
        self.zero_range(gpu, 0..len)
    }

    fn offloaded(&self) -> CudaError {
        CudaError::Unsupported(format!(
            "{} is in host memory: a prefetch is missing",
            self.name
        ))
    }
}

/// A tensor's values counted in no pool (see [`GpuTensor::detach`]).
pub struct Detached<T: Element = f32> {
    ready: Option<Ready>,
    storage: Storage<T>,
    addr: u64,
    name: String,
    shape: Vec<usize>,
}

impl<T: Element + DeviceRepr + ValidAsZeroBits> Detached<T> {
    /// The tensor counted in `pool` on `to`. Its values stay where they are when they are on
    /// `to` already (`from` is `to`: stages sharing a GPU hand buffers over); otherwise they
    /// are copied from `from` through host memory.
    pub fn attach(
        self,
        from: &Gpu,
        to: &Gpu,
        pool: &PoolRef,
        group: MemGroup,
    ) -> Result<GpuTensor<T>, CudaError> {
        let lease = Lease::reserve(pool, &self.name, group, self.bytes())?;
        let data = match self.storage {
            Storage::Device(buf) if from.ordinal == to.ordinal => {
                return Ok(GpuTensor {
                    storage: Storage::Device(buf),
                    addr: self.addr,
                    name: self.name,
                    shape: self.shape,
                    lease,
                    ready: self.ready,
                });
            }
            Storage::Device(buf) => {
                if let Some(e) = &self.ready {
                    e.wait_on(&from.stream)?;
                }
                from.stream.clone_dtoh(&buf)?
            }
            Storage::Host(data) => data,
            Storage::Pinned(p) => p.as_slice()?.to_vec(),
        };
        // SAFETY: written completely before any kernel reads it.
        let mut copy = unsafe { to.stream.alloc::<T>(data.len().max(1))? };
        to.stream.memcpy_htod(&data, &mut copy)?;
        Ok(GpuTensor::wrap(to, copy, &self.name, &self.shape, lease))
    }

    fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * T::DTYPE.bytes()
    }
}

fn check_len(name: &str, shape: &[usize], len: usize) -> Result<(), CudaError> {
    if shape.iter().product::<usize>() != len {
        return Err(CudaError::Unsupported(format!(
            "{name}: {len} values for shape {shape:?}"
        )));
    }
    Ok(())
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

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address of element 0. The pipeline never computes on an offloaded tensor (it
    /// checks every group is on its device first), so a host tensor here is a bug.
    pub fn ptr(&self) -> DevPtr {
        assert!(self.addr != 0, "{} is in host memory", self.name);
        DevPtr(self.addr)
    }

    /// The address of element `offset` (checked against the length).
    pub fn at(&self, offset: usize) -> DevPtr {
        assert!(offset <= self.len(), "offset {offset} past {}", self.len());
        DevPtr(self.ptr().0 + (offset * std::mem::size_of::<T>()) as u64)
    }
}
