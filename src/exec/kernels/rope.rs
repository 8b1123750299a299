//! Rotary position embedding in transformers' rotate-half convention: within each head the
//! first half of the dimensions pairs with the second half, `x' = x·cos + rotate_half(x)·sin`.

use multiversion::multiversion;
use rayon::prelude::*;

/// Rotates each head of `x` (rows of `width = heads * head_dim`, rows grouped in sequences of
/// `seq` tokens) by the row's position in its sequence. `inverse` applies the transposed
/// rotation, which is the backward of the forward rotation.
pub fn rope_apply(
    x: &mut [f32],
    width: usize,
    seq: usize,
    head_dim: usize,
    theta: f32,
    inverse: bool,
) {
    let half = head_dim / 2;
    // inv_freq and angles in f32, as transformers computes them. The cos/sin table covers one
    // sequence (seq x head_dim/2 pairs): kernel scratch, shared by every sequence and head.
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let sign = if inverse { -1.0 } else { 1.0 };
    let angles = || (0..seq).flat_map(|pos| inv_freq.iter().map(move |f| pos as f32 * f));
    let cos: Vec<f32> = angles().map(f32::cos).collect();
    let sin: Vec<f32> = angles().map(|a| sign * a.sin()).collect();
    const ROWS_PER_TASK: usize = 16;
    x.par_chunks_mut(width * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, rows)| {
            let first = task * ROWS_PER_TASK;
            rotate_rows(rows, first, width, seq, head_dim, (&cos, &sin))
        });
}

/// Rotates rows `first..` of `x` (the rows held in `rows`) with the per-position cos/sin tables.
#[multiversion(targets = "simd")]
fn rotate_rows(
    rows: &mut [f32],
    first: usize,
    width: usize,
    seq: usize,
    head_dim: usize,
    (cos, sin): (&[f32], &[f32]),
) {
    let half = head_dim / 2;
    for (i, xr) in rows.chunks_mut(width).enumerate() {
        let pos = (first + i) % seq;
        let (cos, sin) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
        for head in xr.chunks_mut(head_dim) {
            let (lo, hi) = head.split_at_mut(half);
            for ((a, b), (&cos, &sin)) in lo.iter_mut().zip(hi.iter_mut()).zip(cos.iter().zip(sin))
            {
                let (x0, x1) = (*a, *b);
                *a = x0 * cos - x1 * sin;
                *b = x1 * cos + x0 * sin;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_undoes_forward_and_position_zero_is_identity() {
        let (width, seq, hd) = (8, 3, 4);
        let x: Vec<f32> = (0..2 * seq * width).map(|i| (i as f32).sin()).collect();
        let mut y = x.clone();
        rope_apply(&mut y, width, seq, hd, 10000.0, false);
        assert_eq!(&y[..width], &x[..width]);
        assert_ne!(&y[width..2 * width], &x[width..2 * width]);
        rope_apply(&mut y, width, seq, hd, 10000.0, true);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
