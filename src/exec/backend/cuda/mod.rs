//! The CUDA backend: kernels from `kernels/*.cu` compiled by NVRTC when a device is first
//! opened, matrix products through cuBLAS (TF32 tensor cores on f32 activations, or bf16
//! tensor cores on bf16 activations). A [`gpu::Gpu`] is the model's `Backend`
//! ([`backend`]): the one model of `exec::model` runs on it with the CPU executor's stash
//! tensors (the `cuda-f32` inventory: `cpu-f32` plus attention scores; `cuda-bf16`: the same
//! with activations in bf16, and flash-attention kernels in place of the scores where the head
//! dimension suits them; projection weights keep a bf16 copy beside them, [`act_copy`]).
//!
//! Everything loads at run time (cudarc's dynamic loading), so the crate builds and its tests
//! run on machines without CUDA; opening a device there is a typed [`CudaError::Unavailable`]
//! naming the missing library, never a panic.
//!
//! - [`libs`]: which CUDA libraries this machine has, and their versions.
//! - [`gpu::Gpu`]: one device: context, stream, cuBLAS handle, compiled kernels.
//! - [`tensor::GpuTensor`]: a device buffer counted in a [`crate::exec::device::Pool`]; an f32
//!   weight's bf16 copy for the products ([`act_copy`]).
//! - [`ops`]: one function per kernel; [`gemm`]: matrix products through cuBLAS;
//!   [`product_group`]: products of one shape over several buffers in one call;
//!   [`projection`]: the projections' products, grouped by shape.
//! - [`backend`]: the model's operations on a GPU's tensors.
//! - [`selftest`]: `chronospipe selftest --gpu`: parity with the CPU backend and timings.
//!
//! - [`engine::GpuEngine`]: the pipeline runtime's engine (the only way a model trains on
//!   GPUs; the whole model on one GPU is a one-stage plan): plan devices as stages on GPUs,
//!   offload and prefetch through pinned host memory on a copy stream ([`offload`]), sends
//!   between GPUs through NCCL ([`nccl`]); a buffer copied in either way carries the copy's
//!   end ([`ready::Ready`]), which its readers wait for. A rank of a run spread over
//!   processes links its replicas to the other ranks' GPU to GPU where it can
//!   ([`nccl_ranks`]).

pub mod act_copy;
pub mod attention;
mod attention_kernels;
pub mod backend;
pub mod dev_ptr;
pub mod engine;
pub mod gemm;
pub mod gpu;
pub mod kernel_args;
pub mod libs;
pub mod limits;
pub mod nccl;
pub mod nccl_ranks;
pub mod offload;
pub mod ops;
pub mod pinned;
pub mod product_group;
pub mod projection;
pub mod ready;
pub mod selftest;
pub mod tensor;

use thiserror::Error;

use crate::exec::device::DeviceError;
use crate::plan::inventory::{DType, Profile};
use crate::plan::presets::ProfileName;

#[derive(Debug, Error)]
pub enum CudaError {
    #[error("CUDA unavailable: {library} was not found ({hint})")]
    Unavailable { library: &'static str, hint: String },
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error("cuBLAS: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    #[error("NVRTC could not compile kernels/*.cu: {0}")]
    Compile(String),
    #[error("no kernel named {0} in kernels/*.cu")]
    NoKernel(&'static str),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(
        "step {step}: loss {loss}, gradient norm {grad_norm} (not finite); parameters were \
         left unchanged"
    )]
    Diverged {
        step: u64,
        loss: f64,
        grad_norm: f64,
    },
    #[error("{0}")]
    Unsupported(String),
    /// What the model refused (a token outside the vocabulary, a step with no counted
    /// target): the same error, and the same blame, as on CPU devices.
    #[error(transparent)]
    Model(Box<crate::exec::model::ModelError>),
}

impl From<crate::exec::model::ModelError> for CudaError {
    fn from(e: crate::exec::model::ModelError) -> Self {
        match e {
            crate::exec::model::ModelError::Device(d) => CudaError::Device(d),
            other => CudaError::Model(Box::new(other)),
        }
    }
}

impl CudaError {
    /// Whether a GPU ran out of memory: a pool's budget, or the driver's or cuBLAS's own
    /// allocation (memory the pools do not count, or fragmentation).
    pub fn is_out_of_memory(&self) -> bool {
        use cudarc::cublas::sys::cublasStatus_t;
        use cudarc::driver::sys::CUresult;
        match self {
            CudaError::Device(DeviceError::OutOfMemory(_)) => true,
            CudaError::Driver(e) => e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY,
            CudaError::Blas(e) => e.0 == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED,
            _ => false,
        }
    }
}

/// How activations are stored and what the matrix products compute in. Weights, gradients
/// and optimizer state are f32 in every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 activations, f32 products on CUDA cores: the strict reference the parity checks
    /// hold to 1e-5.
    F32,
    /// f32 activations; products on tensor cores with inputs rounded to TF32, f32
    /// accumulation.
    Tf32,
    /// bf16 activations (statistics such as 1/rms, log-sum-exp and losses stay f32);
    /// products on tensor cores from bf16 inputs (projection weights read from bf16 copies
    /// kept beside them and written by the optimizer's update), f32 accumulation.
    Bf16,
}

impl Precision {
    pub const EACH: [Precision; 3] = [Precision::F32, Precision::Tf32, Precision::Bf16];

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The element type activations are stored in.
    pub fn activations(self) -> DType {
        match self {
            Precision::F32 | Precision::Tf32 => DType::F32,
            Precision::Bf16 => DType::Bf16,
        }
    }

    /// The planner's name for what this backend allocates at this precision.
    pub fn profile_name(self) -> ProfileName {
        match self {
            Precision::F32 | Precision::Tf32 => ProfileName::CudaF32,
            Precision::Bf16 => ProfileName::CudaBf16,
        }
    }

    /// The planner's inventory of what this backend allocates at this precision.
    pub fn profile(self) -> Profile {
        match self {
            Precision::F32 | Precision::Tf32 => Profile::CudaF32,
            Precision::Bf16 => Profile::CudaBf16,
        }
    }
}
