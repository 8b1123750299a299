//! RMSNorm as transformers' `LlamaRMSNorm` computes it in f32: `w * x / sqrt(mean(x²) + eps)`.

use rayon::prelude::*;

/// `out = w * x * rstd` row by row; `rstd[r] = 1 / sqrt(mean(x[r]²) + eps)` is kept for backward.
pub fn rmsnorm_forward(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let h = w.len();
    out.par_chunks_mut(h)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(h))
        .for_each(|((o, r), xr)| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
            *r = 1.0 / (ms + eps).sqrt();
            for ((o, xv), wv) in o.iter_mut().zip(xr).zip(w) {
                *o = wv * (xv * *r);
            }
        });
}

/// Recomputes the forward output from the kept `rstd` (no reduction needed).
pub fn rmsnorm_apply(out: &mut [f32], rstd: &[f32], x: &[f32], w: &[f32]) {
    let h = w.len();
    out.par_chunks_mut(h)
        .zip(rstd.par_iter())
        .zip(x.par_chunks(h))
        .for_each(|((o, r), xr)| {
            for ((o, xv), wv) in o.iter_mut().zip(xr).zip(w) {
                *o = wv * (xv * *r);
            }
        });
}

/// Backward of RMSNorm, in place: `dy` (gradient of the output) becomes the gradient of `x`,
/// and `dw += Σ_rows dy * x * rstd`. `dw` is accumulated row by row in order, so the result
/// does not depend on the thread count.
pub fn rmsnorm_backward(dy_to_dx: &mut [f32], dw: &mut [f32], x: &[f32], w: &[f32], rstd: &[f32]) {
    let h = w.len();
    for ((dy, xr), r) in dy_to_dx.chunks(h).zip(x.chunks(h)).zip(rstd) {
        for ((dwv, d), xv) in dw.iter_mut().zip(dy).zip(xr) {
            *dwv += d * xv * r;
        }
    }
    dy_to_dx
        .par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .zip(rstd.par_iter())
        .for_each(|((d, xr), r)| {
            // dx = rstd * (w*dy) - x * rstd³ * mean(w*dy*x)
            let dot = d
                .iter()
                .zip(w)
                .zip(xr)
                .map(|((d, w), x)| d * w * x)
                .sum::<f32>();
            let c = dot * r * r * r / h as f32;
            for ((dv, wv), xv) in d.iter_mut().zip(w).zip(xr) {
                *dv = r * (*dv * wv) - c * xv;
            }
        });
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
