//! Tensors: a flat buffer, a shape and a lease on the pool that counts their bytes.

use crate::exec::device::{DeviceError, MemGroup, PoolRef};
use crate::plan::inventory::{DType, TensorSpec};

/// An element type a tensor may hold (plain bytes, so device buffers can hold any of them).
pub trait Element: bytemuck::Pod + Default + Send + Sync + 'static {
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}

impl Element for i32 {
    const DTYPE: DType = DType::I32;
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::Bf16;
}

/// Returns the bytes to the pool when the tensor goes away. Device buffers of other backends
/// (CUDA) hold one too, so every backend counts memory the same way.
#[derive(Debug)]
pub(crate) struct Lease {
    pool: PoolRef,
    group: MemGroup,
    bytes: usize,
}

impl Lease {
    /// Charges `bytes` for `tensor` to `pool` under `group`, or fails with the device's state.
    pub(crate) fn reserve(
        pool: &PoolRef,
        tensor: &str,
        group: MemGroup,
        bytes: usize,
    ) -> Result<Lease, DeviceError> {
        pool.reserve(tensor, group, bytes)?;
        Ok(Lease {
            pool: pool.clone(),
            group,
            bytes,
        })
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn group(&self) -> MemGroup {
        self.group
    }

    /// Counts the same bytes under another group.
    pub(crate) fn regroup(&mut self, group: MemGroup) {
        self.pool.move_between(self.group, group, self.bytes);
        self.group = group;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(self.group, self.bytes);
    }
}

/// A dense row-major tensor living in one pool.
#[derive(Debug)]
pub struct Tensor<T: Element = f32> {
    name: String,
    shape: Vec<usize>,
    data: Vec<T>,
    lease: Lease,
}

impl<T: Element> Tensor<T> {
    /// A zero-filled tensor counted in `pool` under `group`.
    pub fn zeros(
        pool: &PoolRef,
        name: impl Into<String>,
        shape: &[usize],
        group: MemGroup,
    ) -> Result<Self, DeviceError> {
        let mut t = Self::scratch(pool, name, shape, group)?;
        t.fill_zero();
        Ok(t)
    }

    /// A tensor whose contents are whatever its recycled buffer held: for buffers a kernel
    /// overwrites completely (activations, scratch), saving a pass over memory.
    pub fn scratch(
        pool: &PoolRef,
        name: impl Into<String>,
        shape: &[usize],
        group: MemGroup,
    ) -> Result<Self, DeviceError> {
        let name = name.into();
        let elements: usize = shape.iter().product();
        let bytes = elements * T::DTYPE.bytes();
        let lease = Lease::reserve(pool, &name, group, bytes)?;
        Ok(Tensor {
            name,
            shape: shape.to_vec(),
            data: pool.take_buffer(elements),
            lease,
        })
    }

    /// A scratch tensor (contents unspecified) with the name and shape of an inventory entry.
    pub fn from_spec(
        pool: &PoolRef,
        spec: &TensorSpec,
        group: MemGroup,
    ) -> Result<Self, DeviceError> {
        debug_assert_eq!(spec.dtype, T::DTYPE, "{}", spec.name);
        Self::scratch(pool, spec.name, &spec.shape, group)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.lease.bytes
    }

    pub fn group(&self) -> MemGroup {
        self.lease.group
    }

    pub fn pool(&self) -> &PoolRef {
        &self.lease.pool
    }

    pub fn data(&self) -> &[T] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [T] {
        &mut self.data
    }

    /// Renames the tensor, e.g. when a part's output becomes the next part's stashed input.
    pub fn renamed(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Counts the tensor under another group of the same pool (an output becoming a
    /// communication buffer, say). The bytes stay where they are, so the total never rises.
    pub fn regroup(mut self, group: MemGroup) -> Self {
        self.lease.regroup(group);
        self
    }

    /// A tensor of `data` counted in `pool` (a received message, say).
    pub fn from_data(
        pool: &PoolRef,
        name: impl Into<String>,
        shape: &[usize],
        data: Vec<T>,
        group: MemGroup,
    ) -> Result<Self, DeviceError> {
        let name = name.into();
        debug_assert_eq!(shape.iter().product::<usize>(), data.len(), "{name}");
        let bytes = data.len() * T::DTYPE.bytes();
        let lease = Lease::reserve(pool, &name, group, bytes)?;
        Ok(Tensor {
            name,
            shape: shape.to_vec(),
            data,
            lease,
        })
    }

    /// Gives the bytes back to the pool and returns name, shape and data (a message in
    /// flight between devices belongs to neither).
    pub fn into_data(mut self) -> (String, Vec<usize>, Vec<T>) {
        let name = std::mem::take(&mut self.name);
        let shape = std::mem::take(&mut self.shape);
        let data = std::mem::take(&mut self.data);
        (name, shape, data)
    }

    /// Moves the tensor to another pool (offload to the host, prefetch back, a send between
    /// devices). The destination is charged before the source is released, as a real copy is.
    pub fn transfer(mut self, to: &PoolRef, group: MemGroup) -> Result<Self, DeviceError> {
        let lease = Lease::reserve(to, &self.name, group, self.lease.bytes)?;
        let moved = Tensor {
            name: std::mem::take(&mut self.name),
            shape: std::mem::take(&mut self.shape),
            data: std::mem::take(&mut self.data),
            lease,
        };
        drop(self); // releases the source bytes; its buffer was moved out
        Ok(moved)
    }

    /// Sets every element to zero (gradients before a step's first microbatch).
    pub fn fill_zero(&mut self) {
        self.data.fill(T::default());
    }
}

impl<T: Element> Drop for Tensor<T> {
    fn drop(&mut self) {
        self.lease.pool.recycle(std::mem::take(&mut self.data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::device::Pool;

    #[test]
    fn tensors_are_counted_while_alive() {
        let dev = Pool::new("cpu:0", 1 << 20);
        let host = Pool::new("host", usize::MAX);
        let t = Tensor::<f32>::zeros(&dev, "x", &[4, 8], MemGroup::Activations).unwrap();
        let ids = Tensor::<i32>::zeros(&dev, "ids", &[8], MemGroup::Activations).unwrap();
        assert_eq!(dev.live().get(MemGroup::Activations), 4 * 32 + 32);
        let t = t.transfer(&host, MemGroup::Activations).unwrap();
        assert_eq!(dev.live_bytes(), 32);
        assert_eq!(host.live_bytes(), 128);
        drop((t, ids));
        assert_eq!(dev.live_bytes() + host.live_bytes(), 0);
        assert_eq!(dev.peak_bytes(), 160);
    }
}
