//! The compute backend: the kernels the model calls, behind one small trait. The CPU backend
//! works on host slices. The CUDA backend (`cuda`) has its own storage type and, for now, a
//! model of its own calling its kernels (`cuda::model`); making this trait generic over the
//! storage so one model serves both is the next step (docs/architecture.md).

pub mod cuda;

use thiserror::Error;

use crate::exec::kernels::attention::{self, AttnShape};
use crate::exec::kernels::cross_entropy::{self, HeadShape};
use crate::exec::kernels::matmul::{self, MatRef, Threads};
use crate::exec::kernels::rope::Rope;
use crate::exec::kernels::{embedding, residual, rmsnorm, rope, swiglu};

/// Which kind of device a backend drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    Cuda,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BackendError {
    #[error("the {backend} backend is unavailable: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
}

/// The operations of Llama training. Each forward has its backward; arguments are explicit.
#[allow(clippy::too_many_arguments)]
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;

    /// `dst (+)= a · b`.
    fn matmul(&self, dst: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, accumulate: bool);

    /// `dst = src` (the residual stream's copies).
    fn copy(&self, dst: &mut [f32], src: &[f32]);
    /// `dst += src` (the residual stream's sums).
    fn add(&self, dst: &mut [f32], src: &[f32]);

    fn rmsnorm_forward(&self, out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], eps: f32);
    fn rmsnorm_apply(&self, out: &mut [f32], rstd: &[f32], x: &[f32], w: &[f32]);
    fn rmsnorm_backward(
        &self,
        dy_to_dx: &mut [f32],
        dw: &mut [f32],
        x: &[f32],
        w: &[f32],
        rstd: &[f32],
    );

    fn rope(
        &self,
        x: &mut [f32],
        width: usize,
        seq: usize,
        head_dim: usize,
        rope: &Rope,
        inverse: bool,
    );

    fn swiglu_forward(&self, act: &mut [f32], gate: &[f32], up: &[f32]);
    /// Also recomputes `act` (the forward's output) in the same pass.
    fn swiglu_backward(
        &self,
        act: &mut [f32],
        d_gate: &mut [f32],
        d_act_to_d_up: &mut [f32],
        gate: &[f32],
        up: &[f32],
    );

    fn embedding_forward(&self, out: &mut [f32], table: &[f32], ids: &[i32], hidden: usize);
    fn embedding_backward(&self, d_table: &mut [f32], d_out: &[f32], ids: &[i32], hidden: usize);

    fn attention_forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: AttnShape,
    );
    fn attention_backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        delta: &mut [f32],
        d_out: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        shape: AttnShape,
    );

    fn head_ce_forward(
        &self,
        logits_block: &mut [f32],
        x: &[f32],
        w: &[f32],
        targets: &[i32],
        shape: HeadShape,
    ) -> f64;
    fn head_ce_backward(
        &self,
        dx: &mut [f32],
        dw: &mut [f32],
        logits_block: &mut [f32],
        x: &[f32],
        w: &[f32],
        targets: &[i32],
        scale: f32,
        shape: HeadShape,
    );
}

/// The f32 CPU backend; `threads` is what matrix products may use.
#[derive(Debug, Clone, Copy)]
pub struct CpuBackend {
    pub threads: usize,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend {
            threads: rayon::current_num_threads(),
        }
    }
}

/// Runs `work` on one of rayon's pool threads, the threads the CPU kernels split their loops
/// over. From outside the pool every parallel kernel (hundreds a step) hands its whole loop to
/// the pool and sleeps until it is done; from inside, the calling thread does a share itself and
/// only the other threads are woken (about 3% of a step on 2 cores). Only for a thread that
/// computes alone: a device thread that waits for other devices' messages would hold a pool
/// thread while it waits.
pub fn on_compute_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}

/// The backend for a device kind, or why it cannot run here.
pub fn backend_for(kind: BackendKind) -> Result<Box<dyn Backend>, BackendError> {
    match kind {
        BackendKind::Cpu => Ok(Box::new(CpuBackend::default())),
        BackendKind::Cuda => Err(BackendError::Unavailable {
            backend: "cuda",
            reason: "this build has no CUDA kernels yet".to_string(),
        }),
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn matmul(&self, dst: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
        matmul::matmul(dst, a, b, accumulate, Threads(self.threads));
    }
    fn copy(&self, dst: &mut [f32], src: &[f32]) {
        residual::copy(dst, src);
    }
    fn add(&self, dst: &mut [f32], src: &[f32]) {
        residual::add(dst, src);
    }
    fn rmsnorm_forward(&self, out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        rmsnorm::rmsnorm_forward(out, rstd, x, w, eps);
    }
    fn rmsnorm_apply(&self, out: &mut [f32], rstd: &[f32], x: &[f32], w: &[f32]) {
        rmsnorm::rmsnorm_apply(out, rstd, x, w);
    }
    fn rmsnorm_backward(&self, dy: &mut [f32], dw: &mut [f32], x: &[f32], w: &[f32], rstd: &[f32]) {
        rmsnorm::rmsnorm_backward(dy, dw, x, w, rstd);
    }
    fn rope(&self, x: &mut [f32], width: usize, seq: usize, hd: usize, rope: &Rope, inverse: bool) {
        rope::rope_apply(x, width, seq, hd, rope, inverse);
    }
    fn swiglu_forward(&self, act: &mut [f32], gate: &[f32], up: &[f32]) {
        swiglu::swiglu_forward(act, gate, up);
    }
    fn swiglu_backward(
        &self,
        act: &mut [f32],
        d_gate: &mut [f32],
        d_up: &mut [f32],
        gate: &[f32],
        up: &[f32],
    ) {
        swiglu::swiglu_backward(act, d_gate, d_up, gate, up);
    }
    fn embedding_forward(&self, out: &mut [f32], table: &[f32], ids: &[i32], hidden: usize) {
        embedding::embedding_forward(out, table, ids, hidden);
    }
    fn embedding_backward(&self, d_table: &mut [f32], d_out: &[f32], ids: &[i32], hidden: usize) {
        embedding::embedding_backward(d_table, d_out, ids, hidden);
    }
    fn attention_forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: AttnShape,
    ) {
        attention::attention_forward(out, lse, q, k, v, shape);
    }
    fn attention_backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        delta: &mut [f32],
        d_out: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        shape: AttnShape,
    ) {
        attention::attention_backward(dq, dk, dv, delta, d_out, q, k, v, out, lse, shape);
    }
    fn head_ce_forward(
        &self,
        logits_block: &mut [f32],
        x: &[f32],
        w: &[f32],
        targets: &[i32],
        shape: HeadShape,
    ) -> f64 {
        cross_entropy::head_ce_forward(logits_block, x, w, targets, shape, Threads(self.threads))
    }
    fn head_ce_backward(
        &self,
        dx: &mut [f32],
        dw: &mut [f32],
        logits_block: &mut [f32],
        x: &[f32],
        w: &[f32],
        targets: &[i32],
        scale: f32,
        shape: HeadShape,
    ) {
        cross_entropy::head_ce_backward(
            dx,
            dw,
            logits_block,
            x,
            w,
            targets,
            scale,
            shape,
            Threads(self.threads),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_is_a_typed_unavailable_error() {
        let err = backend_for(BackendKind::Cuda).err().unwrap();
        assert!(matches!(
            err,
            BackendError::Unavailable {
                backend: "cuda",
                ..
            }
        ));
        assert_eq!(backend_for(BackendKind::Cpu).unwrap().name(), "cpu");
    }
}
