//! Causal grouped-query attention on the GPU. The products run on tensor cores through cuBLAS,
//! one sequence at a time: scores of all heads of a sequence, `[heads, seq, seq]`, exist only
//! as scratch; the forward keeps the output and each row's log-sum-exp, and the backward
//! recomputes the probabilities from them, as a flash kernel does.
//!
//! With bf16 activations and a head dimension of [`FLASH_KERNELS`], the flash kernels
//! (`kernels/flash_attention.cu`) do the same work with the scores kept on chip: no scratch
//! but an f32 dQ accumulator in the backward.
//!
//! Query head `hd` reads key/value head `hd / group`. Heads are batched per `sub` in
//! `0..group`: the batch runs over key/value heads `g`, query head `g * group + sub`, so every
//! operand advances by a constant stride.

use crate::exec::backend::cpu::kernels::attention::AttnShape;
use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::dev_ptr::DevPtr;
use crate::exec::backend::cuda::gemm::Gemm;
use crate::exec::backend::cuda::gpu::{FLASH_KERNELS, FlashLoads, Gpu};
use crate::plan::inventory::DType;

type R = Result<(), CudaError>;

/// Element offsets of sequence `b` and the strides the batched products use.
struct Layout {
    seq: usize,
    hd: usize,
    width: usize,
    kv_width: usize,
    group: usize,
    kv_heads: usize,
    heads: usize,
    scores: usize,
}

impl Layout {
    fn new(sh: &AttnShape) -> Layout {
        Layout {
            seq: sh.seq,
            hd: sh.head_dim,
            width: sh.heads * sh.head_dim,
            kv_width: sh.kv_heads * sh.head_dim,
            group: sh.heads / sh.kv_heads,
            kv_heads: sh.kv_heads,
            heads: sh.heads,
            scores: sh.seq * sh.seq,
        }
    }

    /// `op(A)[m,k] · op(B)[k,n]` batched over key/value heads.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        (trans_a, trans_b): (bool, bool),
        (lda, ldb, ldc): (usize, usize, usize),
        (stride_a, stride_b, stride_c): (usize, usize, usize),
        alpha: f32,
        accumulate: bool,
    ) -> Gemm {
        Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            lda,
            ldb,
            ldc,
            alpha,
            beta: if accumulate { 1.0 } else { 0.0 },
            batch: self.kv_heads,
            stride_a,
            stride_b,
            stride_c,
        }
    }

    /// `scale · Q K^T` for query heads `g·group + sub`: `[seq, seq]` per head.
    fn q_kt(&self, scale: f32) -> Gemm {
        let l = self;
        l.gemm(
            (l.seq, l.seq, l.hd),
            (false, true),
            (l.width, l.kv_width, l.seq),
            (l.group * l.hd, l.hd, l.group * l.scores),
            scale,
            false,
        )
    }

    /// `scores · KV` into a query head's columns: `P V` (the output) and `dS K` (`dQ`).
    fn scores_kv(&self) -> Gemm {
        let l = self;
        l.gemm(
            (l.seq, l.hd, l.seq),
            (false, false),
            (l.seq, l.kv_width, l.width),
            (l.group * l.scores, l.hd, l.group * l.hd),
            1.0,
            false,
        )
    }

    /// `scores^T · X` summed over the group into a key/value head: `P^T dO` (`dV`) and
    /// `dS^T Q` (`dK`); the first query head of the group overwrites, the others add.
    fn scores_t_x(&self, sub: usize) -> Gemm {
        let l = self;
        l.gemm(
            (l.seq, l.hd, l.seq),
            (true, false),
            (l.seq, l.width, l.kv_width),
            (l.group * l.scores, l.group * l.hd, l.hd),
            1.0,
            sub > 0,
        )
    }

    /// `dO V^T` (`dP`) for query heads `g·group + sub`.
    fn dout_vt(&self) -> Gemm {
        let l = self;
        l.gemm(
            (l.seq, l.seq, l.hd),
            (false, true),
            (l.width, l.kv_width, l.seq),
            (l.group * l.hd, l.hd, l.group * l.scores),
            1.0,
            false,
        )
    }
}

impl Gpu {
    /// Scaled scores of every head of one sequence into `scores`.
    fn sequence_scores(&self, scores: DevPtr, qb: DevPtr, kb: DevPtr, l: &Layout, scale: f32) -> R {
        for sub in 0..l.group {
            let q_sub = qb.offset(sub * l.hd);
            self.gemm(scores.offset(sub * l.scores), q_sub, kb, l.q_kt(scale))?;
        }
        Ok(())
    }

    /// Fills `out` [n, heads·hd] and `lse` [batch, heads, seq]; `scores` holds
    /// `heads·seq·seq` floats of scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_forward(
        &self,
        out: DevPtr,
        lse: DevPtr,
        q: DevPtr,
        k: DevPtr,
        v: DevPtr,
        scores: DevPtr,
        sh: AttnShape,
    ) -> R {
        let l = Layout::new(&sh);
        let scale = 1.0 / (sh.head_dim as f32).sqrt();
        let rows = l.heads * l.seq;
        for b in 0..sh.batch {
            let tok = b * l.seq;
            let (qb, kb, vb) = (
                q.offset(tok * l.width),
                k.offset(tok * l.kv_width),
                v.offset(tok * l.kv_width),
            );
            self.sequence_scores(scores, qb, kb, &l, scale)?;
            self.launch_softmax(scores, lse.offset(b * rows), rows, l.seq)?;
            for sub in 0..l.group {
                let out_sub = out.offset(tok * l.width + sub * l.hd);
                self.gemm(out_sub, scores.offset(sub * l.scores), vb, l.scores_kv())?;
            }
        }
        Ok(())
    }

    /// Writes `dq`, `dk`, `dv` and `delta` [batch, heads, seq]; `scores` and `d_scores` hold
    /// `heads·seq·seq` floats of scratch each.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        (dq, dk, dv, delta): (DevPtr, DevPtr, DevPtr, DevPtr),
        d_out: DevPtr,
        (q, k, v, out, lse): (DevPtr, DevPtr, DevPtr, DevPtr, DevPtr),
        (scores, d_scores): (DevPtr, DevPtr),
        sh: AttnShape,
    ) -> R {
        let l = Layout::new(&sh);
        let scale = 1.0 / (sh.head_dim as f32).sqrt();
        self.launch_delta(delta, d_out, out, &sh)?;
        let rows = l.heads * l.seq;
        for b in 0..sh.batch {
            let tok = b * l.seq;
            let (qb, kb, vb) = (
                q.offset(tok * l.width),
                k.offset(tok * l.kv_width),
                v.offset(tok * l.kv_width),
            );
            let (dqb, dkb, dvb, dob) = (
                dq.offset(tok * l.width),
                dk.offset(tok * l.kv_width),
                dv.offset(tok * l.kv_width),
                d_out.offset(tok * l.width),
            );
            self.sequence_scores(scores, qb, kb, &l, scale)?;
            self.launch_probs(scores, lse.offset(b * rows), rows, l.seq)?;
            for sub in 0..l.group {
                let (p_sub, dp_sub) = (
                    scores.offset(sub * l.scores),
                    d_scores.offset(sub * l.scores),
                );
                let do_sub = dob.offset(sub * l.hd);
                self.gemm(dvb, p_sub, do_sub, l.scores_t_x(sub))?;
                self.gemm(dp_sub, do_sub, vb, l.dout_vt())?;
            }
            self.launch_dscores(d_scores, scores, delta.offset(b * rows), rows, l.seq, scale)?;
            for sub in 0..l.group {
                let ds_sub = d_scores.offset(sub * l.scores);
                self.gemm(dqb.offset(sub * l.hd), ds_sub, kb, l.scores_kv())?;
                self.gemm(dkb, ds_sub, qb.offset(sub * l.hd), l.scores_t_x(sub))?;
            }
        }
        Ok(())
    }

    /// The flash kernels' forward: fills `out` [n, heads·hd] and `lse` [batch, heads, seq]
    /// from bf16 `q`, `k`, `v`, with no scratch.
    pub fn flash_attention_forward(
        &self,
        (out, lse): (DevPtr, DevPtr),
        (q, k, v): (DevPtr, DevPtr, DevPtr),
        sh: AttnShape,
    ) -> R {
        let (forward, _) = flash_kernels(self.flash_loads, &[out, q, k, v], &sh)?;
        let scale = 1.0 / (sh.head_dim as f32).sqrt();
        self.launch_flash_forward(forward, (out, lse), (q, k, v), &sh, scale)
    }

    /// The flash kernels' backward: writes `dq`, `dk`, `dv` and `delta`; `dq_acc` holds
    /// [n, heads·hd] f32 of zeros on entry (the kernel adds each key block's share into it).
    pub fn flash_attention_backward(
        &self,
        (dq, dk, dv, delta): (DevPtr, DevPtr, DevPtr, DevPtr),
        d_out: DevPtr,
        (q, k, v, out, lse): (DevPtr, DevPtr, DevPtr, DevPtr, DevPtr),
        dq_acc: DevPtr,
        sh: AttnShape,
    ) -> R {
        let operands = [dq, dk, dv, d_out, q, k, v, out];
        let (_, backward) = flash_kernels(self.flash_loads, &operands, &sh)?;
        let scale = 1.0 / (sh.head_dim as f32).sqrt();
        self.launch_delta(delta, d_out, out, &sh)?;
        self.launch_flash_backward(
            backward,
            (dq_acc, dk, dv),
            (q, k, v, d_out, lse, delta),
            &sh,
            scale,
        )?;
        self.cast_to_act(dq, dq_acc, sh.batch * sh.seq * sh.heads * sh.head_dim)
    }
}

/// The flash kernels with `loads` for `sh`'s head dimension, once the operands are known to
/// suit them: bf16, and 16-byte aligned (the kernels copy rows in 16-byte pieces).
fn flash_kernels(
    loads: FlashLoads,
    operands: &[DevPtr],
    sh: &AttnShape,
) -> Result<(&'static str, &'static str), CudaError> {
    let unsupported =
        |what: String| Err(CudaError::Unsupported(format!("flash attention: {what}")));
    let found = (FLASH_KERNELS.iter()).find(|k| k.0 == sh.head_dim && k.1 == loads);
    let Some(&(_, _, forward, backward)) = found else {
        return unsupported(format!("no kernels for head dimension {}", sh.head_dim));
    };
    if let Some(p) = operands.iter().find(|p| p.dtype != DType::Bf16) {
        return unsupported(format!("operands are bf16, not {:?}", p.dtype));
    }
    if let Some(p) = operands.iter().find(|p| p.addr % 16 != 0) {
        return unsupported(format!("operand at {:#x} is not 16-byte aligned", p.addr));
    }
    Ok((forward, backward))
}
