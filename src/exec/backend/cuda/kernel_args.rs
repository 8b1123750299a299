//! The arguments a kernel launch passes by value, laid out as `kernels/*.cu` declares them.

use crate::exec::backend::cuda::dev_ptr::DevPtr;
use crate::exec::backend::cuda::limits::{GROUP_MAX, ROPE_MAX_HALF};

/// A kernel argument by value.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg<'a> {
    Ptr(DevPtr),
    I32(i32),
    I64(i64),
    F32(f32),
    RopeFreqs(&'a RopeFreqs),
    GroupPointers(&'a GroupPointers),
}

/// `struct cp_rope_freqs` of kernels/rope.cu: a rotation's frequencies, passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct RopeFreqs(pub(crate) [f32; ROPE_MAX_HALF]);

// SAFETY: a plain array of f32, laid out as the kernel's struct of one float array.
unsafe impl cudarc::driver::DeviceRepr for RopeFreqs {}

/// `struct cp_group_pointers`: the A, B and C addresses of a group's products.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GroupPointers {
    pub(crate) a: [u64; GROUP_MAX],
    pub(crate) b: [u64; GROUP_MAX],
    pub(crate) c: [u64; GROUP_MAX],
}

// SAFETY: three plain arrays of u64, laid out as the kernel's struct (96 bytes, 8-aligned).
unsafe impl cudarc::driver::DeviceRepr for GroupPointers {}
const _: () = assert!(size_of::<GroupPointers>() == 3 * GROUP_MAX * 8);
