//! Products of one shape over different buffers as one batched cuBLAS call
//! (`cublasGemmBatchedEx`): a layer's q, k and v projections of one input, its gate and up
//! projections, and their weight gradients. Larger launches fill more of the GPU than two or
//! three small ones; `selftest --gpu` times both ways before the layers use this by default.
//!
//! cuBLAS reads a batched product's operand addresses from device memory. Each [`Gpu`] keeps
//! one small buffer for them, written by a kernel (`kernels/product_group.cu`) on the compute
//! stream right before the product: stream order keeps the next group's addresses from
//! landing before this product has read them, so one buffer serves every group. Stages that
//! share a GPU launch from their own threads onto its one stream, so the table is locked from
//! its write until the product that reads it is queued.

use std::ffi::c_void;

use cudarc::cublas::sys::{cublasGemmAlgo_t, cublasGemmBatchedEx};
use cudarc::driver::{DevicePtr, LaunchConfig};

use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::dev_ptr::DevPtr;
use crate::exec::backend::cuda::gemm::{Gemm, ProductTypes, op};
use crate::exec::backend::cuda::gpu::{Gpu, Work};
use crate::exec::backend::cuda::kernel_args::{Arg, GroupPointers};
use crate::exec::backend::cuda::limits::GROUP_MAX;
use crate::plan::inventory::DType;

/// One product of a group: `c = op(a) op(b) (+ c)`.
#[derive(Debug, Clone, Copy)]
pub struct Product {
    pub c: DevPtr,
    pub a: DevPtr,
    pub b: DevPtr,
}

impl Gpu {
    /// Runs `g` (whose `batch` is 1) on each of `products`, of one element type each
    /// operand, as one batched call; one product runs as [`Gpu::gemm`] does.
    pub fn gemm_group(&self, products: &[Product], g: Gemm) -> Result<(), CudaError> {
        let [first, rest @ ..] = products else {
            return Ok(());
        };
        if rest.is_empty() {
            return self.gemm(first.c, first.a, first.b, g);
        }
        let count = products.len();
        let same_types = |p: &Product| {
            (p.a.dtype, p.b.dtype, p.c.dtype) == (first.a.dtype, first.b.dtype, first.c.dtype)
        };
        if count > GROUP_MAX || g.batch != 1 || !products.iter().all(same_types) {
            return Err(CudaError::Unsupported(format!(
                "a group of {count} products (at most {GROUP_MAX}, each of batch 1 and the same \
                 element types) of batch {}",
                g.batch
            )));
        }
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let ProductTypes { compute, a, b, c } = self.product_types(first.c, first.a, first.b)?;
        let mut pointers = GroupPointers::default();
        for (i, p) in products.iter().enumerate() {
            pointers.a[i] = p.a.addr;
            pointers.b[i] = p.b.addr;
            pointers.c[i] = p.c.addr;
        }
        let group_pointers = (self.group_pointers.lock()).unwrap_or_else(|e| e.into_inner());
        let (table, _sync) = group_pointers.device_ptr(&self.stream);
        let at = |i: usize| (table + (i * GROUP_MAX * size_of::<u64>()) as u64) as usize;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (GROUP_MAX as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            // The table's entries are 8 bytes, as an f64's.
            Arg::Ptr(DevPtr::new(table, DType::F64)),
            Arg::GroupPointers(&pointers),
            Arg::I32(count as i32),
        ];
        self.launch("set_group_pointers", cfg, &args, Work::default())?;
        self.ctx.bind_to_thread()?;
        let work = Work::products(2.0 * (count * g.m * g.n * g.k) as f64);
        let name = || g.name(&format!(" group of {count}"), first.a.dtype);
        // SAFETY: the table holds `count` addresses of buffers of the sizes and types `g` and
        // the products describe, written on this stream before the call; cuBLAS is
        // column-major, so it computes `C^T = op(B)^T op(A)^T` (as in `Gpu::gemm`).
        self.timed(name, work, || unsafe {
            cublasGemmBatchedEx(
                *self.blas.handle(),
                op(g.trans_b),
                op(g.trans_a),
                g.n as i32,
                g.m as i32,
                g.k as i32,
                (&g.alpha) as *const f32 as *const c_void,
                at(1) as *const *const c_void,
                b,
                g.ldb as i32,
                at(0) as *const *const c_void,
                a,
                g.lda as i32,
                (&g.beta) as *const f32 as *const c_void,
                at(2) as *const *mut c_void,
                c,
                g.ldc as i32,
                count as i32,
                compute,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .result()?;
            Ok(())
        })
    }
}
