//! The residual stream's copies and sums, split over the pool's threads (one thread alone
//! would leave the other idle for each of them: four passes over `[n, h]` a layer).

use multiversion::multiversion;
use rayon::prelude::*;

const CHUNK: usize = 16 * 1024;

/// `dst = src`.
pub fn copy(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// `dst += src`.
pub fn add(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| add_chunk(d, s));
}

#[multiversion(targets = "simd")]
fn add_chunk(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_and_add_cover_every_element() {
        // Longer than a few chunks and not a multiple of one.
        let n = 3 * CHUNK + 17;
        let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut dst = vec![-1.0; n];
        copy(&mut dst, &src);
        assert_eq!(dst, src);
        add(&mut dst, &src);
        assert!(dst.iter().enumerate().all(|(i, &x)| x == 2.0 * i as f32));
    }
}
