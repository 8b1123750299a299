//! A device address with the type of its elements: what kernels and cuBLAS take.

use crate::plan::inventory::DType;

/// A raw device address inside a `GpuTensor` and the type of its elements, for kernel
/// arguments and cuBLAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevPtr {
    pub(crate) addr: u64,
    pub dtype: DType,
}

impl DevPtr {
    pub(crate) fn new(addr: u64, dtype: DType) -> DevPtr {
        DevPtr { addr, dtype }
    }

    /// The address `elements` further on.
    pub fn offset(self, elements: usize) -> DevPtr {
        DevPtr::new(
            self.addr + (elements * self.dtype.bytes()) as u64,
            self.dtype,
        )
    }
}
