//! Causal grouped-query attention computed flash-style: keys are visited in blocks with an
//! online softmax, so only the output and each row's log-sum-exp are kept, never the
//! `seq x seq` probabilities. The backward recomputes the probabilities from the log-sum-exp.
//!
//! Layout: `q`, `out` are [tokens, heads*head_dim]; `k`, `v` are [tokens, kv_heads*head_dim];
//! tokens are `batch` sequences of `seq`; `lse` and `delta` are [batch, heads, seq]. Query head
//! `h` reads key/value head `h / (heads / kv_heads)`, as transformers' `repeat_kv` does.

use multiversion::multiversion;
use rayon::prelude::*;

use crate::exec::backend::cpu::kernels::disjoint::Disjoint;
use crate::exec::backend::cpu::kernels::matmul::matmul_raw;
use crate::exec::backend::cpu::kernels::{fast_exp, reduce};

/// Queries handled together: blocks of the score matrix are products through gemm. Small
/// blocks waste less on the diagonal block's masked half, and the backward's two score blocks
/// (16 x 256 floats each) then fit in L1 together; measured on seq 256 / head_dim 64
/// (`kernel_bench attention`, Zen 4): 16 rows beat 32 by about 5% and 8 or 64 by 20%.
const BLOCK: usize = 16;
/// Keys scored together before the running maximum is updated. Wider than the query block
/// so each product is larger; causal trimming keeps each block's columns at the diagonal.
const KEY_BLOCK: usize = 256;

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// The forward's per-thread working set: one block of scores (`BLOCK x KEY_BLOCK` floats), the
/// block's running softmax state, and one sequence's key head transposed (`head_dim x seq`);
/// not counted in a device pool (kernel scratch, like a gemm's packing buffers).
struct ForwardScratch {
    scores: Vec<f32>,
    acc: Vec<f32>,
    row_max: Vec<f32>,
    row_sum: Vec<f32>,
    k_t: Vec<f32>,
}

impl ForwardScratch {
    fn new(head_dim: usize, seq: usize) -> Self {
        ForwardScratch {
            scores: vec![0.0; BLOCK * KEY_BLOCK],
            acc: vec![0.0; BLOCK * head_dim],
            row_max: vec![0.0; BLOCK],
            row_sum: vec![0.0; BLOCK],
            k_t: vec![0.0; head_dim * seq],
        }
    }
}

/// The backward's per-thread working set: probabilities and score gradients of one block pair,
/// and the key and value head transposed.
struct BackwardScratch {
    scores: Vec<f32>,
    d_scores: Vec<f32>,
    k_t: Vec<f32>,
    v_t: Vec<f32>,
}

impl BackwardScratch {
    fn new(head_dim: usize, seq: usize) -> Self {
        BackwardScratch {
            scores: vec![0.0; BLOCK * KEY_BLOCK],
            d_scores: vec![0.0; BLOCK * KEY_BLOCK],
            k_t: vec![0.0; head_dim * seq],
            v_t: vec![0.0; head_dim * seq],
        }
    }
}

/// Copies one head of one sequence, `seq` rows of `head_dim` starting at `src[base]` with rows
/// `row_stride` apart, into `dst` as `head_dim x seq` (row e holds feature e of every token).
/// Products `A · Kᵀ` with both operands token-major run at about 60% of gemm's speed on
/// these shapes (64 x 256 x 64: the packing reads rows 1 KiB apart); with K transposed first
/// they run at its full speed.
fn transpose_head(dst: &mut [f32], src: &[f32], base: usize, row_stride: usize, head_dim: usize) {
    // Sixteen tokens at a time: each destination row gets 64 contiguous bytes per pass while
    // the sixteen source rows stay in cache.
    const TOKENS: usize = 16;
    let seq = dst.len() / head_dim;
    for t0 in (0..seq).step_by(TOKENS) {
        let n = TOKENS.min(seq - t0);
        let first = base + t0 * row_stride;
        for e in 0..head_dim {
            for (i, d) in dst[e * seq + t0..][..n].iter_mut().enumerate() {
                *d = src[first + i * row_stride + e];
            }
        }
    }
}

/// One query row's step of the online softmax over a block of raw scores, of which the first
/// `valid` are causal (the rest become 0): scales them, raises the running maximum `m`, turns
/// the scores into `exp(score - m)`, and rescales the running sum `l` and the output
/// accumulator `acc` to the new maximum.
#[multiversion(targets = "simd")]
fn online_softmax_row(
    row: &mut [f32],
    valid: usize,
    scale: f32,
    m: &mut f32,
    l: &mut f32,
    acc: &mut [f32],
) {
    row[..valid].iter_mut().for_each(|x| *x *= scale);
    let m_new = m.max(reduce::max(&row[..valid]));
    let c = (*m - m_new).exp();
    for x in &mut row[..valid] {
        *x = fast_exp::exp(*x - m_new);
    }
    *l = *l * c + reduce::sum(&row[..valid]);
    row[valid..].fill(0.0);
    *m = m_new;
    if c != 1.0 {
        acc.iter_mut().for_each(|a| *a *= c);
    }
}

/// One query row of the backward: raw scores `p` become probabilities `exp(p·scale - lse)`
/// and `dp` (dO·Vᵀ) becomes the scores' gradient `p · (dp - delta) · scale`; entries past
/// `valid` (masked) become 0.
#[multiversion(targets = "simd")]
fn probs_and_score_grads_row(
    p: &mut [f32],
    dp: &mut [f32],
    valid: usize,
    scale: f32,
    lse: f32,
    delta: f32,
) {
    for (pv, dpv) in p[..valid].iter_mut().zip(dp[..valid].iter_mut()) {
        *pv = fast_exp::exp(*pv * scale - lse);
        *dpv = *pv * (*dpv - delta) * scale;
    }
    p[valid..].fill(0.0);
    dp[valid..].fill(0.0);
}

/// `dst[i] = a_i · b_i` for the `head_dim` features of token i of one head: rows `row_stride`
/// apart from `base` in both `a` and `b`.
#[multiversion(targets = "simd")]
fn row_dots(
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    base: usize,
    row_stride: usize,
    head_dim: usize,
) {
    for (i, r) in dst.iter_mut().enumerate() {
        let off = base + i * row_stride;
        *r = reduce::dot(&a[off..off + head_dim], &b[off..off + head_dim]);
    }
}

/// Zeroes `rows` rows of `width` floats, `row_stride` apart, from `at`.
///
/// # Safety
/// The addressed elements must be inside one allocation that no other thread touches meanwhile.
unsafe fn zero_head(at: *mut f32, row_stride: usize, width: usize, rows: usize) {
    for r in 0..rows {
        // SAFETY: forwarded from the caller's contract.
        unsafe { std::ptr::write_bytes(at.add(r * row_stride), 0, width) };
    }
}

/// Forward: fills `out` and `lse`.
pub fn attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sh: AttnShape,
) {
    let (s, d, qw, kw) = (sh.seq, sh.head_dim, sh.q_width(), sh.kv_width());
    let scale = sh.scale();
    assert!(out.len() == q.len() && q.len() == sh.batch * s * qw);
    assert!(k.len() == sh.batch * s * kw && v.len() == k.len());
    assert_eq!(lse.len(), sh.batch * sh.heads * s);
    let out_ptr = Disjoint(out.as_mut_ptr());
    // Each task is one (sequence, query head): it owns that head's columns of `out` and one
    // contiguous row of `lse`.
    lse.par_chunks_mut(s).enumerate().for_each_init(
        || ForwardScratch::new(d, s),
        |sc, (task, lse_row)| {
            let (b, h) = (task / sh.heads, task % sh.heads);
            let g = h / sh.group();
            let q_base = b * s * qw + h * d;
            let kv_base = b * s * kw + g * d;
            transpose_head(&mut sc.k_t, k, kv_base, kw, d);
            for q0 in (0..s).step_by(BLOCK) {
                let rows = BLOCK.min(s - q0);
                sc.row_max[..rows].fill(f32::NEG_INFINITY);
                sc.row_sum[..rows].fill(0.0);
                sc.acc[..rows * d].fill(0.0);
                // Causal: only key blocks that start at or before the block's last query.
                for k0 in (0..q0 + rows).step_by(KEY_BLOCK) {
                    let cols = KEY_BLOCK.min(q0 + rows - k0);
                    // SAFETY: q/kᵀ blocks lie inside their slices (asserted lengths); scores is
                    // this thread's own scratch.
                    unsafe {
                        matmul_raw(
                            rows,
                            cols,
                            d,
                            sc.scores.as_mut_ptr(),
                            KEY_BLOCK,
                            q.as_ptr().add(q_base + q0 * qw),
                            qw,
                            1,
                            sc.k_t.as_ptr().add(k0),
                            s,
                            1,
                            false,
                        );
                    }
                    for r in 0..rows {
                        let valid = cols.min(q0 + r + 1 - k0.min(q0 + r + 1));
                        let row = &mut sc.scores[r * KEY_BLOCK..r * KEY_BLOCK + cols];
                        let acc = &mut sc.acc[r * d..(r + 1) * d];
                        let (m, l) = (&mut sc.row_max[r], &mut sc.row_sum[r]);
                        online_softmax_row(row, valid, scale, m, l, acc);
                    }
                    // SAFETY: as above; acc is this thread's own buffer.
                    unsafe {
                        matmul_raw(
                            rows,
                            d,
                            cols,
                            sc.acc.as_mut_ptr(),
                            d,
                            sc.scores.as_ptr(),
                            KEY_BLOCK,
                            1,
                            v.as_ptr().add(kv_base + k0 * kw),
                            kw,
                            1,
                            true,
                        );
                    }
                }
                for r in 0..rows {
                    let inv = 1.0 / sc.row_sum[r];
                    // SAFETY: row (b, q0+r), head h belongs to this task alone.
                    let o = unsafe {
                        std::slice::from_raw_parts_mut(out_ptr.at(q_base + (q0 + r) * qw), d)
                    };
                    for (o, a) in o.iter_mut().zip(&sc.acc[r * d..(r + 1) * d]) {
                        *o = a * inv;
                    }
                    lse_row[q0 + r] = sc.row_max[r] + sc.row_sum[r].ln();
                }
            }
        },
    );
}

/// Backward: writes `delta` (rowsum of dO·O), `dq`, `dk`, `dv` (overwritten, not accumulated).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
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
    sh: AttnShape,
) {
    let (s, d, qw, kw) = (sh.seq, sh.head_dim, sh.q_width(), sh.kv_width());
    assert!(q.len() == sh.batch * s * qw && dq.len() == q.len() && d_out.len() == q.len());
    assert!(out.len() == q.len() && k.len() == sh.batch * s * kw);
    assert!(v.len() == k.len() && dk.len() == k.len() && dv.len() == k.len());
    assert!(lse.len() == sh.batch * sh.heads * s && delta.len() == lse.len());
    delta.par_chunks_mut(s).enumerate().for_each(|(task, row)| {
        let (b, h) = (task / sh.heads, task % sh.heads);
        row_dots(row, d_out, out, b * s * qw + h * d, qw, d);
    });
    let io = BackwardIo {
        q,
        k,
        d_out,
        lse,
        delta,
        dq: Disjoint(dq.as_mut_ptr()),
        dk: Disjoint(dk.as_mut_ptr()),
        dv: Disjoint(dv.as_mut_ptr()),
        sh,
    };
    // Each task is one (sequence, key/value head) and the query heads that share it, so the
    // sums into dk and dv run in a fixed order inside one task. A task zeroes the rows it sums
    // into itself: on its own thread, just before use.
    (0..sh.batch * sh.kv_heads).into_par_iter().for_each_init(
        || BackwardScratch::new(d, s),
        |sc, task| {
            let (b, g) = (task / sh.kv_heads, task % sh.kv_heads);
            let kv_base = b * s * kw + g * d;
            let heads = g * sh.group()..(g + 1) * sh.group();
            // SAFETY: these head columns of sequence b belong to this task alone.
            unsafe {
                zero_head(io.dk.at(kv_base), kw, d, s);
                zero_head(io.dv.at(kv_base), kw, d, s);
                for h in heads.clone() {
                    zero_head(io.dq.at(b * s * qw + h * d), qw, d, s);
                }
            }
            transpose_head(&mut sc.k_t, k, kv_base, kw, d);
            transpose_head(&mut sc.v_t, v, kv_base, kw, d);
            for h in heads {
                let q_base = b * s * qw + h * d;
                let stats = (b * sh.heads + h) * s;
                for q0 in (0..s).step_by(BLOCK) {
                    let rows = BLOCK.min(s - q0);
                    for k0 in (0..q0 + rows).step_by(KEY_BLOCK) {
                        let tile = Tile {
                            q_base,
                            kv_base,
                            stats,
                            q0,
                            rows,
                            k0,
                            cols: KEY_BLOCK.min(q0 + rows - k0),
                        };
                        // SAFETY: the tile's dq rows (head h) and dk/dv rows (kv head g) of
                        // sequence b belong to this task only.
                        unsafe { io.backward_tile(sc, tile) };
                    }
                }
            }
        },
    );
}

/// The backward's inputs and the gradients its tasks write, each task its own rows.
struct BackwardIo<'a> {
    q: &'a [f32],
    k: &'a [f32],
    d_out: &'a [f32],
    lse: &'a [f32],
    delta: &'a [f32],
    dq: Disjoint,
    dk: Disjoint,
    dv: Disjoint,
    sh: AttnShape,
}

/// One block of `rows` queries (from `q0`) against `cols` keys (from `k0`) of one query head
/// (`q_base`, statistics at `stats`) and its key/value head (`kv_base`).
#[derive(Clone, Copy)]
struct Tile {
    q_base: usize,
    kv_base: usize,
    stats: usize,
    q0: usize,
    rows: usize,
    k0: usize,
    cols: usize,
}

impl BackwardIo<'_> {
    /// Recomputes the tile's probabilities and adds its share to dV, dQ and dK.
    ///
    /// # Safety
    /// No other thread may touch the tile's rows of dq, dk and dv meanwhile.
    unsafe fn backward_tile(&self, sc: &mut BackwardScratch, t: Tile) {
        let (qw, kw, d, s) = (
            self.sh.q_width(),
            self.sh.kv_width(),
            self.sh.head_dim,
            self.sh.seq,
        );
        // dO and dQ share Q's layout.
        let q_rows = t.q_base + t.q0 * qw;
        let kv_rows = t.kv_base + t.k0 * kw;
        // SAFETY (all products below): blocks lie inside the asserted buffers; scores and
        // d_scores are this thread's own; the caller owns the gradient rows.
        unsafe {
            // S = Q_i · K_jᵀ and dP = dO_i · V_jᵀ, through the transposed heads.
            matmul_raw(
                t.rows,
                t.cols,
                d,
                sc.scores.as_mut_ptr(),
                KEY_BLOCK,
                self.q.as_ptr().add(q_rows),
                qw,
                1,
                sc.k_t.as_ptr().add(t.k0),
                s,
                1,
                false,
            );
            matmul_raw(
                t.rows,
                t.cols,
                d,
                sc.d_scores.as_mut_ptr(),
                KEY_BLOCK,
                self.d_out.as_ptr().add(q_rows),
                qw,
                1,
                sc.v_t.as_ptr().add(t.k0),
                s,
                1,
                false,
            );
        }
        let scale = self.sh.scale();
        for r in 0..t.rows {
            let i = t.q0 + r;
            let valid = t.cols.min(i + 1 - t.k0.min(i + 1));
            let (lse_i, delta_i) = (self.lse[t.stats + i], self.delta[t.stats + i]);
            let p = &mut sc.scores[r * KEY_BLOCK..r * KEY_BLOCK + t.cols];
            let dp = &mut sc.d_scores[r * KEY_BLOCK..r * KEY_BLOCK + t.cols];
            probs_and_score_grads_row(p, dp, valid, scale, lse_i, delta_i);
        }
        unsafe {
            // dV_j += Pᵀ · dO_i
            matmul_raw(
                t.cols,
                d,
                t.rows,
                self.dv.at(kv_rows),
                kw,
                sc.scores.as_ptr(),
                1,
                KEY_BLOCK,
                self.d_out.as_ptr().add(q_rows),
                qw,
                1,
                true,
            );
            // dQ_i += dS · K_j
            matmul_raw(
                t.rows,
                d,
                t.cols,
                self.dq.at(q_rows),
                qw,
                sc.d_scores.as_ptr(),
                KEY_BLOCK,
                1,
                self.k.as_ptr().add(kv_rows),
                kw,
                1,
                true,
            );
            // dK_j += dSᵀ · Q_i
            matmul_raw(
                t.cols,
                d,
                t.rows,
                self.dk.at(kv_rows),
                kw,
                sc.d_scores.as_ptr(),
                1,
                KEY_BLOCK,
                self.q.as_ptr().add(q_rows),
                qw,
                1,
                true,
            );
        }
    }
}

#[cfg(test)]
mod tests;
