//! Causal grouped-query attention computed flash-style: keys are visited in blocks with an
//! online softmax, so only the output and each row's log-sum-exp are kept, never the
//! `seq x seq` probabilities. The backward recomputes the probabilities from the log-sum-exp.
//!
//! Layout: `q`, `out` are [tokens, heads*head_dim]; `k`, `v` are [tokens, kv_heads*head_dim];
//! tokens are `batch` sequences of `seq`; `lse` and `delta` are [batch, heads, seq]. Query head
//! `h` reads key/value head `h / (heads / kv_heads)`, as transformers' `repeat_kv` does.

use rayon::prelude::*;

/// Keys scored together before the running maximum is updated.
const KEY_BLOCK: usize = 64;

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

/// A raw pointer handed to parallel tasks that write disjoint elements of one buffer.
#[derive(Clone, Copy)]
struct Disjoint(*mut f32);
// SAFETY: every task writes only the (token, head) slices it owns; see each use.
unsafe impl Send for Disjoint {}
unsafe impl Sync for Disjoint {}

impl Disjoint {
    /// SAFETY: the caller guarantees no other task touches `[offset, offset+len)` meanwhile
    /// and that the range lies inside the buffer.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, offset: usize, len: usize) -> &mut [f32] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(offset), len) }
    }
}

/// Dot product with eight partial sums, so the compiler can vectorise it.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

#[inline]
fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
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
    let out_ptr = Disjoint(out.as_mut_ptr());
    // Each task is one (sequence, query head): it owns that head's columns of `out` and one
    // contiguous row of `lse`.
    lse.par_chunks_mut(s).enumerate().for_each_init(
        || (vec![0.0f32; KEY_BLOCK], vec![0.0f32; d]),
        |(scores, acc), (task, lse_row)| {
            let (b, h) = (task / sh.heads, task % sh.heads);
            let g = h / sh.group();
            for i in 0..s {
                let qi = &q[(b * s + i) * qw + h * d..][..d];
                let (mut m, mut l) = (f32::NEG_INFINITY, 0.0f32);
                acc.fill(0.0);
                for j0 in (0..=i).step_by(KEY_BLOCK) {
                    let j1 = (j0 + KEY_BLOCK).min(i + 1);
                    let mut bm = f32::NEG_INFINITY;
                    for j in j0..j1 {
                        let kj = &k[(b * s + j) * kw + g * d..][..d];
                        let sc = dot(qi, kj) * scale;
                        scores[j - j0] = sc;
                        bm = bm.max(sc);
                    }
                    if bm > m {
                        let c = (m - bm).exp();
                        l *= c;
                        acc.iter_mut().for_each(|a| *a *= c);
                        m = bm;
                    }
                    for j in j0..j1 {
                        let p = (scores[j - j0] - m).exp();
                        l += p;
                        axpy(acc, p, &v[(b * s + j) * kw + g * d..][..d]);
                    }
                }
                // SAFETY: row (b, i), head h belongs to this task alone.
                let o = unsafe { out_ptr.slice((b * s + i) * qw + h * d, d) };
                let inv = 1.0 / l;
                for (o, a) in o.iter_mut().zip(acc.iter()) {
                    *o = a * inv;
                }
                lse_row[i] = m + l.ln();
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
    let scale = sh.scale();
    delta.par_chunks_mut(s).enumerate().for_each(|(task, row)| {
        let (b, h) = (task / sh.heads, task % sh.heads);
        for (i, r) in row.iter_mut().enumerate() {
            let off = (b * s + i) * qw + h * d;
            *r = dot(&d_out[off..off + d], &out[off..off + d]);
        }
    });
    dq.fill(0.0);
    dk.fill(0.0);
    dv.fill(0.0);
    let (dq_ptr, dk_ptr, dv_ptr) = (
        Disjoint(dq.as_mut_ptr()),
        Disjoint(dk.as_mut_ptr()),
        Disjoint(dv.as_mut_ptr()),
    );
    let delta = &*delta;
    // Each task is one (sequence, key/value head) and the query heads that share it, so the
    // sums into dk and dv run in a fixed order inside one task.
    (0..sh.batch * sh.kv_heads)
        .into_par_iter()
        .for_each(|task| {
            let (b, g) = (task / sh.kv_heads, task % sh.kv_heads);
            for h in g * sh.group()..(g + 1) * sh.group() {
                let row_stats = (b * sh.heads + h) * s;
                for i in 0..s {
                    let qoff = (b * s + i) * qw + h * d;
                    let (qi, doi) = (&q[qoff..qoff + d], &d_out[qoff..qoff + d]);
                    let (lse_i, delta_i) = (lse[row_stats + i], delta[row_stats + i]);
                    // SAFETY: query row (b, i), head h is written by this task only.
                    let dqi = unsafe { dq_ptr.slice(qoff, d) };
                    for j in 0..=i {
                        let koff = (b * s + j) * kw + g * d;
                        let (kj, vj) = (&k[koff..koff + d], &v[koff..koff + d]);
                        let p = (dot(qi, kj) * scale - lse_i).exp();
                        let ds = p * (dot(doi, vj) - delta_i) * scale;
                        axpy(dqi, ds, kj);
                        // SAFETY: key row (b, j), kv head g is written by this task only.
                        let (dkj, dvj) = unsafe { (dk_ptr.slice(koff, d), dv_ptr.slice(koff, d)) };
                        axpy(dkj, ds, qi);
                        axpy(dvj, p, doi);
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Materialises the whole score matrix: the plain definition to hold the kernel against.
    fn naive_forward(q: &[f32], k: &[f32], v: &[f32], sh: AttnShape) -> Vec<f32> {
        let (s, d, qw, kw) = (sh.seq, sh.head_dim, sh.q_width(), sh.kv_width());
        let mut out = vec![0.0; q.len()];
        for b in 0..sh.batch {
            for h in 0..sh.heads {
                let g = h / sh.group();
                for i in 0..s {
                    let qi = &q[(b * s + i) * qw + h * d..][..d];
                    let sc: Vec<f64> = (0..=i)
                        .map(|j| {
                            let kj = &k[(b * s + j) * kw + g * d..][..d];
                            qi.iter().zip(kj).map(|(a, b)| (a * b) as f64).sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                    for (j, x) in sc.iter().enumerate() {
                        let p = (x - mx).exp() / z;
                        for e in 0..d {
                            out[(b * s + i) * qw + h * d + e] +=
                                (p * v[(b * s + j) * kw + g * d + e] as f64) as f32;
                        }
                    }
                }
            }
        }
        out
    }

    fn inputs(sh: AttnShape, salt: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let n = sh.batch * sh.seq;
        let make = |len: usize, f: f32| -> Vec<f32> {
            (0..len).map(|i| ((i as f32 + salt) * f).sin()).collect()
        };
        (
            make(n * sh.q_width(), 0.37),
            make(n * sh.kv_width(), 0.53),
            make(n * sh.kv_width(), 0.71),
        )
    }

    const SHAPE: AttnShape = AttnShape {
        batch: 2,
        seq: 70, // more than one key block
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
    };

    #[test]
    fn flash_forward_matches_naive() {
        let sh = SHAPE;
        let (q, k, v) = inputs(sh, 0.0);
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![0.0; sh.batch * sh.heads * sh.seq];
        attention_forward(&mut out, &mut lse, &q, &k, &v, sh);
        let want = naive_forward(&q, &k, &v, sh);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let sh = AttnShape { seq: 9, ..SHAPE };
        let (q, k, v) = inputs(sh, 1.0);
        let (w, _, _) = inputs(sh, 5.0); // loss = Σ w · out
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            naive_forward(q, k, v, sh)
                .iter()
                .zip(&w)
                .map(|(a, b)| (a * b) as f64)
                .sum()
        };
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![0.0; sh.batch * sh.heads * sh.seq];
        attention_forward(&mut out, &mut lse, &q, &k, &v, sh);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let mut delta = vec![0.0; lse.len()];
        attention_backward(
            &mut dq, &mut dk, &mut dv, &mut delta, &w, &q, &k, &v, &out, &lse, sh,
        );
        let e = 1e-2f32;
        let check = |name: &str, grad: &[f32], which: usize| {
            for idx in (0..grad.len()).step_by(7) {
                let mut bufs = [q.clone(), k.clone(), v.clone()];
                bufs[which][idx] += e;
                let up = loss(&bufs[0], &bufs[1], &bufs[2]);
                bufs[which][idx] -= 2.0 * e;
                let down = loss(&bufs[0], &bufs[1], &bufs[2]);
                let fd = (up - down) / (2.0 * e as f64);
                assert!(
                    (fd - grad[idx] as f64).abs() < 2e-3,
                    "{name}[{idx}]: {fd} vs {}",
                    grad[idx]
                );
            }
        };
        check("dq", &dq, 0);
        check("dk", &dk, 1);
        check("dv", &dv, 2);
    }
}
