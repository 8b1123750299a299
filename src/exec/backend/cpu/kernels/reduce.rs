//! Sums written so they vectorise: eight interleaved partial sums in a fixed order (a plain
//! `iter().sum()` of floats is one serial chain of adds, since float addition is not
//! associative). The order depends only on the length, never on the CPU or thread count.

/// Σ xs.
#[inline(always)]
pub fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// The largest of `xs` (−∞ for none), in eight lanes. `f32::max` ignores NaN operands, so a
/// NaN appears only when every element is NaN.
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] = acc[l].max(c[l]);
        }
    }
    acc.iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

/// Σ a·b.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// Σ a·b·c.
#[inline(always)]
pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc, cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let (ar, br, cr) = (ac.remainder(), bc.remainder(), cc.remainder());
    for ((x, y), z) in ac.zip(bc).zip(cc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l] * z[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for ((x, y), z) in ar.iter().zip(br).zip(cr) {
        s += x * y * z;
    }
    s
}

/// Σ x² in f64 (for gradient norms, which add millions of terms).
#[inline(always)]
pub fn sum_squares_f64(xs: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            let x = c[l] as f64;
            acc[l] += x * x;
        }
    }
    acc.iter().sum::<f64>() + tail.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_plain_sums_on_every_tail_length() {
        for len in [0, 1, 7, 8, 9, 31, 64, 100] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain_sum: f64 = a.iter().map(|&x| x as f64).sum();
            let plain_dot: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let c: Vec<f32> = (0..len).map(|i| 1.0 + i as f32 * 0.01).collect();
            let plain_dot3: f64 = (0..len)
                .map(|i| a[i] as f64 * b[i] as f64 * c[i] as f64)
                .sum();
            assert!(
                (dot3(&a, &b, &c) as f64 - plain_dot3).abs() < 1e-5,
                "dot3, len {len}"
            );
            let plain_sq: f64 = a.iter().map(|&x| x as f64 * x as f64).sum();
            assert!((sum(&a) as f64 - plain_sum).abs() < 1e-5, "sum, len {len}");
            let plain_max = a.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&a), plain_max, "max, len {len}");
            assert!(
                (dot(&a, &b) as f64 - plain_dot).abs() < 1e-5,
                "dot, len {len}"
            );
            assert!(
                (sum_squares_f64(&a) - plain_sq).abs() < 1e-12,
                "squares, len {len}"
            );
        }
    }
}
