//! Row-major matrix products through cuBLAS (`cublasGemmStridedBatchedEx`): f32 operands in
//! strict f32 or TF32 as the GPU's [`Precision`] says, bf16 operands with f32 accumulation
//! into a bf16 or f32 result. Products of one shape over several buffers in one call are
//! `product_group`'s.

use std::ffi::c_void;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};

use crate::exec::backend::cuda::dev_ptr::DevPtr;
use crate::exec::backend::cuda::gpu::{Gpu, Work};
use crate::exec::backend::cuda::{CudaError, Precision};
use crate::plan::inventory::DType;

/// A row-major product `C[m, n] = alpha · op(A)[m, k] · op(B)[k, n] + beta · C`, repeated
/// `batch` times at the given element strides.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl Gemm {
    /// One product of contiguous matrices; `accumulate` adds to C.
    pub fn dense(
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    ) -> Gemm {
        Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            lda: if trans_a { m } else { k },
            ldb: if trans_b { k } else { n },
            ldc: n,
            alpha: 1.0,
            beta: if accumulate { 1.0 } else { 0.0 },
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }

    /// The product's name in the profile: its shape, batch, transposes and element type.
    pub(crate) fn name(&self, kind: &str, dtype: DType) -> String {
        format!(
            "gemm {}x{}x{} x{}{kind} ({}{}) {dtype:?}",
            self.m,
            self.n,
            self.k,
            self.batch,
            if self.trans_a { "T" } else { "N" },
            if self.trans_b { "T" } else { "N" },
        )
    }
}

/// cuBLAS's element types of a product's operands and the type it computes in.
pub(crate) struct ProductTypes {
    pub compute: cublasComputeType_t,
    pub a: cudaDataType,
    pub b: cudaDataType,
    pub c: cudaDataType,
}

pub(crate) fn op(trans: bool) -> cublasOperation_t {
    if trans {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

/// cuBLAS's name for an operand's element type, if it can take part in a product.
fn blas_type(p: DevPtr) -> Result<cudaDataType, CudaError> {
    match p.dtype {
        DType::F32 => Ok(cudaDataType::CUDA_R_32F),
        DType::Bf16 => Ok(cudaDataType::CUDA_R_16BF),
        other => Err(CudaError::Unsupported(format!(
            "a matrix product on {other:?} values"
        ))),
    }
}

impl Gpu {
    /// The types of a product of `a` and `b` into `c`.
    pub(crate) fn product_types(
        &self,
        c: DevPtr,
        a: DevPtr,
        b: DevPtr,
    ) -> Result<ProductTypes, CudaError> {
        if a.dtype != b.dtype {
            return Err(CudaError::Unsupported(format!(
                "a product of {:?} and {:?} matrices",
                a.dtype, b.dtype
            )));
        }
        let compute = match (a.dtype, self.precision) {
            (DType::Bf16, _) | (_, Precision::F32) => cublasComputeType_t::CUBLAS_COMPUTE_32F,
            (_, Precision::Tf32 | Precision::Bf16) => {
                cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
            }
        };
        Ok(ProductTypes {
            compute,
            a: blas_type(a)?,
            b: blas_type(b)?,
            c: blas_type(c)?,
        })
    }

    /// Runs `g`. A and B share an element type: f32 (computed as [`Precision`] says) or bf16
    /// (f32 accumulation); C is f32 or bf16 (gradients of weights accumulate in f32 from bf16
    /// activations). cuBLAS is column-major, so it computes `C^T = op(B)^T op(A)^T`.
    pub fn gemm(&self, c: DevPtr, a: DevPtr, b: DevPtr, g: Gemm) -> Result<(), CudaError> {
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        let ProductTypes {
            compute,
            a: a_t,
            b: b_t,
            c: c_t,
        } = self.product_types(c, a, b)?;
        // cuBLAS launches on the calling thread's current context: pipeline stages call this
        // from their own threads, so make this GPU's current first.
        self.ctx.bind_to_thread()?;
        // SAFETY: the pointers address buffers of the sizes and types `g`, `a`, `b` and `c`
        // describe.
        let work = Work::products(2.0 * (g.m * g.n * g.k * g.batch) as f64);
        self.timed(
            || g.name("", a.dtype),
            work,
            || unsafe {
                cudarc::cublas::result::gemm_strided_batched_ex(
                    *self.blas.handle(),
                    op(g.trans_b),
                    op(g.trans_a),
                    g.n as i32,
                    g.m as i32,
                    g.k as i32,
                    (&g.alpha) as *const f32 as *const c_void,
                    b.addr as *const c_void,
                    b_t,
                    g.ldb as i32,
                    g.stride_b as i64,
                    a.addr as *const c_void,
                    a_t,
                    g.lda as i32,
                    g.stride_a as i64,
                    (&g.beta) as *const f32 as *const c_void,
                    c.addr as *mut c_void,
                    c_t,
                    g.ldc as i32,
                    g.stride_c as i64,
                    g.batch as i32,
                    compute,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )?;
                Ok(())
            },
        )
    }
}
