//! Device buffers counted in a pool, like host tensors: the lease gives the bytes back when
//! the buffer is dropped, so the pool's live bytes are exactly what exists on the device.
//! A tensor the pipeline has offloaded keeps its values in host memory, counted in the host's
//! pool, until it is moved back ([`GpuTensor::relocate`]).
//!
//! A tensor holds bytes and an element type ([`DType`]) chosen at run time: activations are f32
//! or bf16 by the run's precision, parameters f32, token ids i32. Host reads and writes name
//! their element type and are checked against it.

use cudarc::driver::{CudaSlice, DevicePtr};

use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::act_copy::ActCopy;
use crate::exec::backend::cuda::dev_ptr::DevPtr;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::offload;
use crate::exec::backend::cuda::pinned::Pinned;
use crate::exec::backend::cuda::ready::Ready;
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::tensor::{Element, Lease};
use crate::plan::inventory::{DType, TensorSpec};

mod detached;
pub use detached::Detached;

/// Where a tensor's bytes are.
enum Storage {
    Device(CudaSlice<u8>),
    /// Never on a device yet (a part adopted from host weights, zeroed optimizer state).
    Host(Vec<u8>),
    /// Offloaded: pinned host memory, read once the copy into it has landed.
    Pinned(Pinned),
}

/// A dense tensor on one CUDA device (or offloaded to the host).
pub struct GpuTensor {
    /// After a prefetch: the end of its copy, which kernels reading the tensor wait for.
    /// Declared before `storage` so it is dropped first (see [`Ready`]).
    ready: Option<Ready>,
    storage: Storage,
    /// The device address of element 0 (0 while on the host).
    addr: u64,
    name: String,
    shape: Vec<usize>,
    dtype: DType,
    lease: Lease,
    /// An f32 weight's copy for the products, with bf16 activations (see [`ActCopy`]).
    act_copy: ActCopy,
}

/// Checks that host values of type `T` fit a tensor of `dtype`.
fn check_dtype<T: Element>(name: &str, dtype: DType) -> Result<(), CudaError> {
    if T::DTYPE != dtype {
        return Err(CudaError::Unsupported(format!(
            "{name} holds {dtype:?} values, not {:?}",
            T::DTYPE
        )));
    }
    Ok(())
}

/// Device memory for `bytes` bytes (at least one), contents unspecified.
fn alloc(gpu: &Gpu, bytes: usize) -> Result<CudaSlice<u8>, CudaError> {
    // SAFETY: every caller writes the buffer before a kernel reads it.
    Ok(unsafe { gpu.stream.alloc::<u8>(bytes.max(1))? })
}

impl GpuTensor {
    /// A zero-filled tensor counted in `pool` under `group`.
    pub fn zeros(
        gpu: &Gpu,
        pool: &PoolRef,
        name: &str,
        shape: &[usize],
        dtype: DType,
        group: MemGroup,
    ) -> Result<Self, CudaError> {
        let mut t = Self::scratch(gpu, pool, name, shape, dtype, group)?;
        t.fill_zero(gpu)?;
        Ok(t)
    }

    /// A tensor whose contents are unspecified, for buffers a kernel overwrites completely.
    pub fn scratch(
        gpu: &Gpu,
        pool: &PoolRef,
        name: &str,
        shape: &[usize],
        dtype: DType,
        group: MemGroup,
    ) -> Result<Self, CudaError> {
        let bytes = shape.iter().product::<usize>() * dtype.bytes();
        let lease = Lease::reserve(pool, name, group, bytes)?;
        let buf = alloc(gpu, bytes)?;
        Ok(Self::wrap(gpu, buf, name, shape, dtype, lease))
    }

    /// A scratch tensor with the name, shape and element type of an inventory entry.
    pub fn from_spec(
        gpu: &Gpu,
        pool: &PoolRef,
        spec: &TensorSpec,
        group: MemGroup,
    ) -> Result<Self, CudaError> {
        Self::scratch(gpu, pool, spec.name, &spec.shape, spec.dtype, group)
    }

    /// Host values counted in `pool` (the host's): a tensor that starts offloaded.
    pub fn on_host<T: Element>(
        pool: &PoolRef,
        name: &str,
        shape: &[usize],
        data: Vec<T>,
        group: MemGroup,
    ) -> Result<Self, CudaError> {
        check_len(name, shape, data.len())?;
        let bytes: Vec<u8> = bytemuck::cast_slice(&data).to_vec();
        Self::host_bytes(pool, name, shape, T::DTYPE, bytes, group)
    }

    /// Zeros in host memory counted in `pool` (the host's): a tensor that starts offloaded.
    pub fn zeros_on_host(
        pool: &PoolRef,
        name: &str,
        shape: &[usize],
        dtype: DType,
        group: MemGroup,
    ) -> Result<Self, CudaError> {
        let bytes = vec![0u8; shape.iter().product::<usize>() * dtype.bytes()];
        Self::host_bytes(pool, name, shape, dtype, bytes, group)
    }

    fn host_bytes(
        pool: &PoolRef,
        name: &str,
        shape: &[usize],
        dtype: DType,
        bytes: Vec<u8>,
        group: MemGroup,
    ) -> Result<Self, CudaError> {
        let lease = Lease::reserve(pool, name, group, bytes.len())?;
        Ok(GpuTensor {
            storage: Storage::Host(bytes),
            addr: 0,
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype,
            lease,
            ready: None,
            act_copy: ActCopy::No,
        })
    }

    /// A copy of host data.
    pub fn from_host<T: Element>(
        gpu: &Gpu,
        pool: &PoolRef,
        name: &str,
        shape: &[usize],
        data: &[T],
        group: MemGroup,
    ) -> Result<Self, CudaError> {
        check_len(name, shape, data.len())?;
        let mut t = Self::scratch(gpu, pool, name, shape, T::DTYPE, group)?;
        t.copy_from_host(gpu, data)?;
        Ok(t)
    }

    fn wrap(
        gpu: &Gpu,
        buf: CudaSlice<u8>,
        name: &str,
        shape: &[usize],
        dtype: DType,
        lease: Lease,
    ) -> Self {
        let addr = buf.device_ptr(&gpu.stream).0;
        GpuTensor {
            storage: Storage::Device(buf),
            addr,
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype,
            lease,
            ready: None,
            act_copy: ActCopy::No,
        }
    }

    /// From now on the tensor, an f32 weight, keeps a copy in `gpu`'s activation type for the
    /// products whenever it is on a device, counted beside it (allocated now if it is on
    /// `gpu`, counted in `pool`).
    pub fn keep_act_copy(mut self, gpu: &Gpu, pool: &PoolRef) -> Result<Self, CudaError> {
        self.act_copy = match self.storage {
            Storage::Device(_) => {
                ActCopy::allocate(gpu, pool, &self.name, self.lease.group(), self.len())?
            }
            _ => ActCopy::Wanted,
        };
        Ok(self)
    }

    /// The weight in the activations' type for a product: its copy, cast first if the weight
    /// changed since (`None` for a tensor without one).
    pub fn act_copy(&self, gpu: &Gpu) -> Result<Option<DevPtr>, CudaError> {
        self.await_ready(gpu)?;
        self.act_copy.current(gpu, self.ptr(), self.len())
    }

    /// Element `offset` of the copy, for an update kernel that writes it with the weight.
    pub fn act_copy_at(&self, offset: usize) -> Option<DevPtr> {
        self.act_copy.at(offset)
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
    ) -> Result<Self, CudaError> {
        let lease = Lease::reserve(to, &self.name, group, self.lease.bytes())?;
        let bytes = self.bytes();
        // A weight's copy: given back in host memory, a fresh (stale) one on the device.
        let act_copy = match (&self.act_copy, to_host) {
            (ActCopy::No, _) => ActCopy::No,
            (copy, true) => copy.on_host(),
            (_, false) => ActCopy::allocate(gpu, to, &self.name, group, self.len())?,
        };
        let GpuTensor {
            storage,
            addr,
            name,
            shape,
            dtype,
            lease: _given_back,
            ready,
            act_copy: given_back,
        } = self;
        let (storage, addr, ready) = match (storage, to_host) {
            (Storage::Device(buf), true) if bytes > 0 => {
                if let Some(e) = &ready {
                    e.wait_on(&gpu.copy)?;
                }
                (Storage::Pinned(offload::offload(gpu, buf, bytes)?), 0, None)
            }
            (Storage::Device(_), true) => (Storage::Host(Vec::new()), 0, None),
            (Storage::Pinned(pinned), false) => {
                let (buf, ready) = offload::prefetch(gpu, pinned)?;
                let addr = buf.device_ptr(&gpu.stream).0;
                (Storage::Device(buf), addr, Some(ready))
            }
            (Storage::Host(data), false) => {
                let mut buf = alloc(gpu, data.len())?;
                if !data.is_empty() {
                    gpu.stream.memcpy_htod(&data, &mut buf)?;
                }
                let addr = buf.device_ptr(&gpu.stream).0;
                (Storage::Device(buf), addr, None)
            }
            (kept, _) => (kept, addr, ready),
        };
        drop(given_back);
        Ok(GpuTensor {
            storage,
            addr,
            name,
            shape,
            dtype,
            lease,
            ready,
            act_copy,
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

    /// The end of work queued on another stream that wrote the tensor (an all-reduce), which
    /// kernels reading it wait for as for a prefetch. Replaces the previous one, which that
    /// work waited for.
    pub fn set_ready(&mut self, ready: Ready) {
        self.ready = Some(ready);
    }

    /// The prefetch or all-reduce that kernels reading the tensor wait for, if any.
    pub fn ready(&self) -> Option<&Ready> {
        self.ready.as_ref()
    }

    /// The same tensor counted under another group of its pool.
    pub fn regroup(mut self, group: MemGroup) -> Self {
        self.lease.regroup(group);
        self.act_copy.regroup(group);
        self
    }

    /// Gives the tensor's bytes back to its pool, keeping its values: a tensor sent to
    /// another pipeline stage, counted nowhere until it is received. With `record_sent`, it
    /// keeps an event recorded now on `gpu`'s compute stream (which made it): a transfer to
    /// another GPU waits for that point, and for nothing queued later.
    pub fn detach(self, gpu: &Gpu, record_sent: bool) -> Result<Detached, CudaError> {
        let sent = (record_sent.then(|| gpu.stream.record_event(None))).transpose()?;
        Ok(Detached {
            sent,
            ready: self.ready,
            storage: self.storage,
            addr: self.addr,
            name: self.name,
            shape: self.shape,
            dtype: self.dtype,
        })
    }

    /// Whether the values are in host memory (offloaded).
    pub fn is_on_host(&self) -> bool {
        !matches!(self.storage, Storage::Device(_))
    }

    /// Copies the tensor to the host (waits for the stream).
    pub fn to_host<T: Element>(&self, gpu: &Gpu) -> Result<Vec<T>, CudaError> {
        let mut out = vec![T::default(); self.len()];
        self.read_range(gpu, 0..self.len(), &mut out)?;
        Ok(out)
    }

    /// Copies elements `range` to `dst` (waits for the stream).
    pub fn read_range<T: Element>(
        &self,
        gpu: &Gpu,
        range: std::ops::Range<usize>,
        dst: &mut [T],
    ) -> Result<(), CudaError> {
        check_dtype::<T>(&self.name, self.dtype)?;
        let bytes = self.byte_range(range, Some(dst.len()))?;
        if bytes.is_empty() {
            return Ok(());
        }
        let dst: &mut [u8] = bytemuck::cast_slice_mut(dst);
        match &self.storage {
            Storage::Device(buf) => {
                self.await_ready(gpu)?;
                gpu.stream.memcpy_dtoh(&buf.slice(bytes), dst)?
            }
            Storage::Host(data) => dst.copy_from_slice(&data[bytes]),
            Storage::Pinned(p) => dst.copy_from_slice(&p.as_slice()?[bytes]),
        }
        Ok(())
    }

    /// Overwrites elements `range` with `src`.
    pub fn write_range<T: Element>(
        &mut self,
        gpu: &Gpu,
        range: std::ops::Range<usize>,
        src: &[T],
    ) -> Result<(), CudaError> {
        check_dtype::<T>(&self.name, self.dtype)?;
        self.await_ready(gpu)?;
        self.act_copy.mark_stale();
        let bytes = self.byte_range(range, Some(src.len()))?;
        if bytes.is_empty() {
            return Ok(());
        }
        let src: &[u8] = bytemuck::cast_slice(src);
        match &mut self.storage {
            Storage::Device(buf) => gpu.stream.memcpy_htod(src, &mut buf.slice_mut(bytes))?,
            Storage::Host(data) => data[bytes].copy_from_slice(src),
            Storage::Pinned(p) => p.as_mut_slice()?[bytes].copy_from_slice(src),
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
        self.act_copy.mark_stale();
        let bytes = self.byte_range(range, None)?;
        if bytes.is_empty() {
            return Ok(());
        }
        match &mut self.storage {
            Storage::Device(buf) => gpu.stream.memset_zeros(&mut buf.slice_mut(bytes))?,
            Storage::Host(data) => data[bytes].fill(0),
            Storage::Pinned(p) => p.as_mut_slice()?[bytes].fill(0),
        }
        Ok(())
    }

    /// Overwrites the tensor with host data of the same length.
    pub fn copy_from_host<T: Element>(&mut self, gpu: &Gpu, data: &[T]) -> Result<(), CudaError> {
        if data.len() != self.len() {
            return Err(CudaError::Unsupported(format!(
                "copying {} values into {} of {}",
                data.len(),
                self.name,
                self.len()
            )));
        }
        self.write_range(gpu, 0..data.len(), data)
    }

    /// Overwrites the tensor with another of the same length and type (device to device).
    pub fn copy_from(&mut self, gpu: &Gpu, src: &GpuTensor) -> Result<(), CudaError> {
        self.copy_range_from(gpu, src, 0..src.len())
    }

    /// Overwrites elements `range` with `src`'s (same length and type, same GPU).
    pub fn copy_range_from(
        &mut self,
        gpu: &Gpu,
        src: &GpuTensor,
        range: std::ops::Range<usize>,
    ) -> Result<(), CudaError> {
        if src.len() != self.len() || src.dtype != self.dtype || range.end > self.len() {
            return Err(CudaError::Unsupported(format!(
                "copying elements {range:?} of {} ({} {:?}) into {} ({} {:?})",
                src.name,
                src.len(),
                src.dtype,
                self.name,
                self.len(),
                self.dtype
            )));
        }
        src.await_ready(gpu)?;
        self.await_ready(gpu)?;
        self.act_copy.mark_stale();
        let bytes = self.byte_range(range, None)?;
        match (&src.storage, &mut self.storage) {
            _ if bytes.is_empty() => {}
            (Storage::Device(s), Storage::Device(d)) => gpu
                .stream
                .memcpy_dtod(&s.slice(bytes.clone()), &mut d.slice_mut(bytes))?,
            _ => return Err(self.offloaded()),
        }
        Ok(())
    }

    /// Its values were written from outside (an NCCL collective): its copy is stale.
    pub fn mark_written(&mut self) {
        self.act_copy.mark_stale();
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

    /// The bytes of elements `range`, refused by name unless the tensor holds them and
    /// `given` host values (where there are some) are as many.
    fn byte_range(
        &self,
        range: std::ops::Range<usize>,
        given: Option<usize>,
    ) -> Result<std::ops::Range<usize>, CudaError> {
        let inside = range.start <= range.end && range.end <= self.len();
        if !inside || given.is_some_and(|n| n != range.len()) {
            return Err(CudaError::Unsupported(format!(
                "elements {range:?} of {} ({} elements){}",
                self.name,
                self.len(),
                given.map_or(String::new(), |n| format!(" with {n} host values"))
            )));
        }
        let size = self.dtype.bytes();
        Ok(range.start * size..range.end * size)
    }

    fn bytes(&self) -> usize {
        self.len() * self.dtype.bytes()
    }

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

    /// The same tensor under another name (a part's output becoming the next one's input).
    pub fn renamed(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The address of element 0. The pipeline never computes on an offloaded tensor (it
    /// checks every group is on its device first), so a host tensor here is a bug.
    pub fn ptr(&self) -> DevPtr {
        assert!(self.addr != 0, "{} is in host memory", self.name);
        DevPtr::new(self.addr, self.dtype)
    }

    /// The address of element `offset` (checked against the length).
    pub fn at(&self, offset: usize) -> DevPtr {
        assert!(offset <= self.len(), "offset {offset} past {}", self.len());
        self.ptr().offset(offset)
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
