//! The LM head fused with cross-entropy: logits exist only for `block` tokens at a time, in a
//! caller-provided buffer of `block x vocab` floats.

use multiversion::multiversion;
use rayon::prelude::*;

use crate::data::IGNORE_TARGET;
use crate::exec::backend::cpu::kernels::matmul::{MatRef, Threads, matmul};
use crate::exec::backend::cpu::kernels::{fast_exp, reduce};

/// Shapes of one head call: `tokens` rows of `hidden` features, `vocab` classes.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    pub tokens: usize,
    pub hidden: usize,
    pub vocab: usize,
    /// Tokens whose logits are materialised together.
    pub block: usize,
}

#[multiversion(targets = "simd")]
fn row_lse(row: &[f32]) -> f32 {
    let m = reduce::max(row);
    m + fast_exp::sum_exp_shifted(row, m).ln()
}

/// Turns one row of logits into its loss gradient: `softmax · scale`, less `scale` at the target;
/// zero for a target that does not count ([`IGNORE_TARGET`]).
#[multiversion(targets = "simd")]
fn row_grad(row: &mut [f32], target: i32, scale: f32) {
    if target == IGNORE_TARGET {
        row.fill(0.0);
        return;
    }
    let target = target as usize;
    let lse = row_lse(row);
    for l in row.iter_mut() {
        *l = fast_exp::exp(*l - lse) * scale;
    }
    row[target] -= scale;
}

/// Returns the sum over counted tokens of `-log softmax(x W^T)[target]` (an [`IGNORE_TARGET`]
/// adds nothing), accumulated in f64 in token order (so it does not depend on threads).
pub fn head_ce_forward(
    logits_block: &mut [f32],
    x: &[f32],
    w: &[f32],
    targets: &[i32],
    sh: HeadShape,
    threads: Threads,
) -> f64 {
    let (h, v) = (sh.hidden, sh.vocab);
    let mut loss = 0.0f64;
    for t0 in (0..sh.tokens).step_by(sh.block) {
        let bt = sh.block.min(sh.tokens - t0);
        let logits = &mut logits_block[..bt * v];
        matmul(
            logits,
            MatRef::rows(&x[t0 * h..(t0 + bt) * h], bt, h),
            MatRef::rows(w, v, h).t(),
            false,
            threads,
        );
        let per_row: Vec<f32> = logits
            .par_chunks(v)
            .zip(&targets[t0..t0 + bt])
            .map(|(row, &t)| {
                if t == IGNORE_TARGET {
                    0.0
                } else {
                    row_lse(row) - row[t as usize]
                }
            })
            .collect();
        loss += per_row.iter().map(|&l| l as f64).sum::<f64>();
    }
    loss
}

/// Backward with the loss scaled by `scale` (1 / counted tokens of the whole step): writes `dx`
/// and adds to `dw`; an [`IGNORE_TARGET`] token gets no gradient.
#[allow(clippy::too_many_arguments)]
pub fn head_ce_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    logits_block: &mut [f32],
    x: &[f32],
    w: &[f32],
    targets: &[i32],
    scale: f32,
    sh: HeadShape,
    threads: Threads,
) {
    let (h, v) = (sh.hidden, sh.vocab);
    for t0 in (0..sh.tokens).step_by(sh.block) {
        let bt = sh.block.min(sh.tokens - t0);
        let xb = MatRef::rows(&x[t0 * h..(t0 + bt) * h], bt, h);
        let logits = &mut logits_block[..bt * v];
        matmul(logits, xb, MatRef::rows(w, v, h).t(), false, threads);
        logits
            .par_chunks_mut(v)
            .zip(&targets[t0..t0 + bt])
            .for_each(|(row, &t)| row_grad(row, t, scale));
        let dl = MatRef::rows(logits, bt, v);
        matmul(
            &mut dx[t0 * h..(t0 + bt) * h],
            dl,
            MatRef::rows(w, v, h),
            false,
            threads,
        );
        matmul(dw, dl.t(), xb, true, threads);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SH: HeadShape = HeadShape {
        tokens: 7,
        hidden: 5,
        vocab: 11,
        block: 3,
    };

    fn inputs() -> (Vec<f32>, Vec<f32>) {
        let x: Vec<f32> = (0..35).map(|i| (i as f32 * 0.41).sin()).collect();
        let w: Vec<f32> = (0..55).map(|i| (i as f32 * 0.23).cos()).collect();
        (x, w)
    }

    /// Checks `head_ce_backward`'s `dx` and `dw` against central differences of the forward.
    fn check_finite_differences(x: &[f32], w: &[f32], t: &[i32], scale: f32) {
        let sh = SH;
        let mut buf = vec![0.0; 11 * 7];
        let (mut dx, mut dw) = (vec![0.0; 35], vec![0.0; 55]);
        head_ce_backward(&mut dx, &mut dw, &mut buf, x, w, t, scale, sh, Threads(2));
        let e = 1e-2;
        let mut loss = |x: &[f32], w: &[f32]| head_ce_forward(&mut buf, x, w, t, sh, Threads(1));
        for i in 0..35 {
            let (mut xp, mut xm) = (x.to_vec(), x.to_vec());
            xp[i] += e;
            xm[i] -= e;
            let fd = scale as f64 * (loss(&xp, w) - loss(&xm, w)) / (2.0 * e as f64);
            assert!(
                (fd - dx[i] as f64).abs() < 1e-3,
                "dx[{i}] {fd} vs {}",
                dx[i]
            );
        }
        for i in 0..55 {
            let (mut wp, mut wm) = (w.to_vec(), w.to_vec());
            wp[i] += e;
            wm[i] -= e;
            let fd = scale as f64 * (loss(x, &wp) - loss(x, &wm)) / (2.0 * e as f64);
            assert!(
                (fd - dw[i] as f64).abs() < 1e-3,
                "dw[{i}] {fd} vs {}",
                dw[i]
            );
        }
    }

    #[test]
    fn blocked_matches_one_block_and_finite_differences() {
        let sh = SH;
        let (x, w) = inputs();
        let t: Vec<i32> = (0..7i32).map(|i| i * 5 % 11).collect();
        let mut buf = vec![0.0; 11 * 7];
        let blocked = head_ce_forward(&mut buf, &x, &w, &t, sh, Threads(1));
        let whole = head_ce_forward(
            &mut buf,
            &x,
            &w,
            &t,
            HeadShape { block: 7, ..sh },
            Threads(1),
        );
        assert!((blocked - whole).abs() < 1e-5);
        check_finite_differences(&x, &w, &t, 0.5);
    }

    #[test]
    fn ignored_targets_carry_no_loss_and_no_gradient() {
        let (x, w) = inputs();
        let mut t: Vec<i32> = (0..7i32).map(|i| i * 5 % 11).collect();
        let counted = t.clone();
        for i in [1, 4, 5] {
            t[i] = IGNORE_TARGET;
        }
        check_finite_differences(&x, &w, &t, 0.5);
        let mut buf = vec![0.0; 11 * 7];
        let per_token: Vec<f64> = (0..7)
            .map(|i| {
                let one = HeadShape {
                    tokens: 1,
                    block: 1,
                    ..SH
                };
                let xi = &x[i * 5..i * 5 + 5];
                head_ce_forward(&mut buf, xi, &w, &counted[i..=i], one, Threads(1))
            })
            .collect();
        let want: f64 = [0, 2, 3, 6].iter().map(|&i| per_token[i]).sum();
        let got = head_ce_forward(&mut buf, &x, &w, &t, SH, Threads(1));
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        let (mut dx, mut dw) = (vec![1.0; 35], vec![0.0; 55]);
        head_ce_backward(&mut dx, &mut dw, &mut buf, &x, &w, &t, 0.5, SH, Threads(2));
        for i in [1, 4, 5] {
            assert!(dx[i * 5..i * 5 + 5].iter().all(|&g| g == 0.0), "token {i}");
        }
    }
}
