//! RMSNorm as transformers' `LlamaRMSNorm` computes it in f32: `w * x / sqrt(mean(x²) + eps)`.

use multiversion::multiversion;
use rayon::prelude::*;

use crate::exec::backend::cpu::kernels::reduce;

/// Rows handed to one parallel task.
const ROWS_PER_TASK: usize = 16;

/// `out = w * x * rstd` row by row; `rstd[r] = 1 / sqrt(mean(x[r]²) + eps)` is kept for backward.
pub fn rmsnorm_forward(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let h = w.len();
    out.par_chunks_mut(h * ROWS_PER_TASK)
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .zip(x.par_chunks(h * ROWS_PER_TASK))
        .for_each(|((o, r), x)| forward_rows(o, r, x, w, eps));
}

#[multiversion(targets = "simd")]
fn forward_rows(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let h = w.len();
    for ((o, r), xr) in out.chunks_mut(h).zip(rstd).zip(x.chunks(h)) {
        *r = 1.0 / (reduce::dot(xr, xr) / h as f32 + eps).sqrt();
        scale_row(o, xr, w, *r);
    }
}

/// `out = w * (x * rstd)`, element by element.
#[inline(always)]
fn scale_row(out: &mut [f32], x: &[f32], w: &[f32], rstd: f32) {
    for ((o, xv), wv) in out.iter_mut().zip(x).zip(w) {
        *o = wv * (xv * rstd);
    }
}

/// Recomputes the forward output from the kept `rstd` (no reduction needed).
pub fn rmsnorm_apply(out: &mut [f32], rstd: &[f32], x: &[f32], w: &[f32]) {
    let h = w.len();
    out.par_chunks_mut(h * ROWS_PER_TASK)
        .zip(rstd.par_chunks(ROWS_PER_TASK))
        .zip(x.par_chunks(h * ROWS_PER_TASK))
        .for_each(|((o, r), x)| apply_rows(o, r, x, w));
}

#[multiversion(targets = "simd")]
fn apply_rows(out: &mut [f32], rstd: &[f32], x: &[f32], w: &[f32]) {
    let h = w.len();
    for ((o, r), xr) in out.chunks_mut(h).zip(rstd).zip(x.chunks(h)) {
        scale_row(o, xr, w, *r);
    }
}

/// Backward of RMSNorm, in place: `dy` (gradient of the output) becomes the gradient of `x`,
/// and `dw += Σ_rows dy * x * rstd`. `dw` is accumulated row by row in order, so the result
/// does not depend on the thread count.
pub fn rmsnorm_backward(dy_to_dx: &mut [f32], dw: &mut [f32], x: &[f32], w: &[f32], rstd: &[f32]) {
    let h = w.len();
    accumulate_dw(dw, dy_to_dx, x, rstd);
    dy_to_dx
        .par_chunks_mut(h * ROWS_PER_TASK)
        .zip(x.par_chunks(h * ROWS_PER_TASK))
        .zip(rstd.par_chunks(ROWS_PER_TASK))
        .for_each(|((d, x), r)| backward_rows(d, x, w, r));
}

#[multiversion(targets = "simd")]
fn accumulate_dw(dw: &mut [f32], dy: &[f32], x: &[f32], rstd: &[f32]) {
    let h = dw.len();
    for ((dy, xr), r) in dy.chunks(h).zip(x.chunks(h)).zip(rstd) {
        for ((dwv, d), xv) in dw.iter_mut().zip(dy).zip(xr) {
            *dwv += d * xv * r;
        }
    }
}

#[multiversion(targets = "simd")]
fn backward_rows(dy_to_dx: &mut [f32], x: &[f32], w: &[f32], rstd: &[f32]) {
    let h = w.len();
    for ((d, xr), r) in dy_to_dx.chunks_mut(h).zip(x.chunks(h)).zip(rstd) {
        // dx = rstd * (w*dy) - x * rstd³ * mean(w*dy*x)
        let dot = reduce::dot3(d, w, xr);
        let c = dot * r * r * r / h as f32;
        for ((dv, wv), xv) in d.iter_mut().zip(w).zip(xr) {
            *dv = r * (*dv * wv) - c * xv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_matches_finite_differences() {
        let h = 6;
        let x: Vec<f32> = (0..12).map(|i| (i as f32 * 0.7).sin()).collect();
        let w: Vec<f32> = (0..h).map(|i| 1.0 + 0.1 * i as f32).collect();
        let g: Vec<f32> = (0..12).map(|i| (i as f32 * 0.3).cos()).collect();
        let loss = |x: &[f32], w: &[f32]| {
            let (mut o, mut r) = (vec![0.0; 12], vec![0.0; 2]);
            rmsnorm_forward(&mut o, &mut r, x, w, 1e-5);
            o.iter().zip(&g).map(|(a, b)| (a * b) as f64).sum::<f64>()
        };
        let (mut o, mut r) = (vec![0.0; 12], vec![0.0; 2]);
        rmsnorm_forward(&mut o, &mut r, &x, &w, 1e-5);
        let mut dx = g.clone();
        let mut dw = vec![0.0; h];
        rmsnorm_backward(&mut dx, &mut dw, &x, &w, &r);
        let eps = 1e-2;
        for i in 0..12 {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += eps;
            xm[i] -= eps;
            let fd = (loss(&xp, &w) - loss(&xm, &w)) / (2.0 * eps as f64);
            assert!(
                (fd - dx[i] as f64).abs() < 2e-3,
                "dx[{i}] {fd} vs {}",
                dx[i]
            );
        }
        for i in 0..h {
            let (mut wp, mut wm) = (w.clone(), w.clone());
            wp[i] += eps;
            wm[i] -= eps;
            let fd = (loss(&x, &wp) - loss(&x, &wm)) / (2.0 * eps as f64);
            assert!(
                (fd - dw[i] as f64).abs() < 2e-3,
                "dw[{i}] {fd} vs {}",
                dw[i]
            );
        }
    }
}
