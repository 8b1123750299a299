//! One function per attention kernel of `kernels/attention.cu` and `flash_attention.cu`: the
//! causal softmax over scores, its backward's pieces, and the fused flash forward and
//! backward. The products around the scores are `gemm`'s.

use cudarc::driver::LaunchConfig;

use super::ops::{elementwise, int, len, per_row};
use crate::exec::backend::cpu::kernels::attention::AttnShape;
use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::dev_ptr::DevPtr;
use crate::exec::backend::cuda::gpu::{Gpu, Work};
use crate::exec::backend::cuda::kernel_args::Arg;
use crate::exec::backend::cuda::limits::{FLASH_ROWS, FLASH_THREADS, flash_shared_bytes};

use Arg::{F32, Ptr};

type R = Result<(), CudaError>;

impl Gpu {
    /// Scaled scores of `rows` rows of `seq` become causal probabilities; writes each lse.
    pub(crate) fn launch_softmax(&self, scores: DevPtr, lse: DevPtr, rows: usize, seq: usize) -> R {
        self.launch(
            "attn_softmax",
            per_row(rows),
            &[Ptr(scores), Ptr(lse), int(seq)],
            Work::moving(rows * seq, &[scores, scores]),
        )
    }

    /// Scaled scores become probabilities again from the kept lse.
    pub(crate) fn launch_probs(&self, scores: DevPtr, lse: DevPtr, rows: usize, seq: usize) -> R {
        self.launch(
            "attn_probs",
            per_row(rows),
            &[Ptr(scores), Ptr(lse), int(seq)],
            Work::moving(rows * seq, &[scores, scores]),
        )
    }

    /// `delta = Σ dO·O` per query row, for every sequence and head.
    pub(crate) fn launch_delta(
        &self,
        delta: DevPtr,
        d_out: DevPtr,
        out: DevPtr,
        sh: &AttnShape,
    ) -> R {
        let n = sh.batch * sh.heads * sh.seq;
        self.launch(
            "attn_delta",
            elementwise(n),
            &[
                Ptr(delta),
                Ptr(d_out),
                Ptr(out),
                len(sh.batch),
                int(sh.heads),
                int(sh.seq),
                int(sh.head_dim),
            ],
            Work::moving(n * sh.head_dim, &[d_out, out]),
        )
    }

    /// `dP` becomes `dS = P·(dP - delta)·scale` in place.
    pub(crate) fn launch_dscores(
        &self,
        d_scores: DevPtr,
        probs: DevPtr,
        delta: DevPtr,
        rows: usize,
        seq: usize,
        scale: f32,
    ) -> R {
        self.launch(
            "attn_dscores",
            per_row(rows),
            &[Ptr(d_scores), Ptr(probs), Ptr(delta), int(seq), F32(scale)],
            Work::moving(rows * seq, &[d_scores, probs, d_scores]),
        )
    }

    /// The flash forward for head dimension `hd`'s kernel: one block of four warps per 64
    /// queries, head and sequence.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_flash_forward(
        &self,
        kernel: &'static str,
        (out, lse): (DevPtr, DevPtr),
        (q, k, v): (DevPtr, DevPtr, DevPtr),
        sh: &AttnShape,
        scale: f32,
    ) -> R {
        // Q K^T and P V over the causal half.
        let work = Work::products(2.0 * 2.0 * causal_half_products(sh));
        self.launch(
            kernel,
            flash_grid(
                sh.seq,
                sh.heads,
                sh.batch,
                flash_shared_bytes(sh.head_dim, true),
            ),
            &[
                Ptr(out),
                Ptr(lse),
                Ptr(q),
                Ptr(k),
                Ptr(v),
                int(sh.seq),
                int(sh.heads),
                int(sh.kv_heads),
                F32(scale),
            ],
            work,
        )
    }

    /// The flash backward: one block per 64 keys, key/value head and sequence.
    pub(crate) fn launch_flash_backward(
        &self,
        kernel: &'static str,
        (dq_acc, dk, dv): (DevPtr, DevPtr, DevPtr),
        (q, k, v, d_out, lse, delta): (DevPtr, DevPtr, DevPtr, DevPtr, DevPtr, DevPtr),
        sh: &AttnShape,
        scale: f32,
    ) -> R {
        // Q K^T again, dO V^T, dS K, dS^T Q and P^T dO over the causal half.
        let work = Work::products(5.0 * 2.0 * causal_half_products(sh));
        self.launch(
            kernel,
            flash_grid(
                sh.seq,
                sh.kv_heads,
                sh.batch,
                flash_shared_bytes(sh.head_dim, false),
            ),
            &[
                Ptr(dq_acc),
                Ptr(dk),
                Ptr(dv),
                Ptr(q),
                Ptr(k),
                Ptr(v),
                Ptr(d_out),
                Ptr(lse),
                Ptr(delta),
                int(sh.seq),
                int(sh.heads),
                int(sh.kv_heads),
                F32(scale),
            ],
            work,
        )
    }
}

/// Multiply-adds of one `seq x seq x head_dim` product per head and sequence over the causal
/// half of the scores.
fn causal_half_products(sh: &AttnShape) -> f64 {
    (sh.batch * sh.heads * sh.seq * sh.seq * sh.head_dim) as f64 / 2.0
}

/// The flash kernels' grid: 64-row tiles of the sequence, by heads, by sequences, each block
/// with `shared_bytes` of dynamic shared memory.
fn flash_grid(seq: usize, heads: usize, batch: usize, shared_bytes: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (seq.div_ceil(FLASH_ROWS) as u32, heads as u32, batch as u32),
        block_dim: (FLASH_THREADS, 1, 1),
        shared_mem_bytes: shared_bytes as u32,
    }
}
