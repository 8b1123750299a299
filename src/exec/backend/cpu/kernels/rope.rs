//! Rotary position embedding in transformers' rotate-half convention: within each head the
//! first half of the dimensions pairs with the second half, `x' = x·cos + rotate_half(x)·sin`.

use std::sync::{Arc, Mutex};

use multiversion::multiversion;
use rayon::prelude::*;

use crate::spec::RopeScaling;

/// A model's rotary settings: the base `theta` and an optional scaling of its frequencies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub theta: f32,
    pub scaling: Option<RopeScaling>,
}

impl Rope {
    /// Unscaled rotary embedding with base `theta`.
    pub fn plain(theta: f32) -> Rope {
        Rope {
            theta,
            scaling: None,
        }
    }

    /// The rotation's frequency for each dimension pair `i < head_dim / 2`, in f32 as
    /// transformers computes it: position `pos` turns pair `i` by the angle
    /// `pos as f32 * inv_freq[i]`. The CUDA backend's rope kernel takes the same values, so
    /// both backends turn by the same angles.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base =
            (0..head_dim / 2).map(|i| 1.0 / self.theta.powf((2 * i) as f32 / head_dim as f32));
        match self.scaling {
            None => base.collect(),
            Some(RopeScaling::Linear { factor }) => base.map(|f| f / factor as f32).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let (factor, low, high) = (factor as f32, low_freq_factor, high_freq_factor);
                let context = original_max_position_embeddings as f64;
                // Wavelengths above `context / low` are slowed by `factor`, those below
                // `context / high` kept, the ones between blended; in f32 as transformers does.
                let (low_wavelen, high_wavelen) = ((context / low) as f32, (context / high) as f32);
                base.map(|f| {
                    let wavelen = (1.0 / f) * std::f32::consts::TAU;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth =
                            ((1.0 / wavelen) * context as f32 - low as f32) / (high - low) as f32;
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
            }
        }
    }
}

/// Rotates each head of `x` (rows of `width = heads * head_dim`, rows grouped in sequences of
/// `seq` tokens) by the row's position in its sequence. `inverse` applies the transposed
/// rotation, which is the backward of the forward rotation.
pub fn rope_apply(
    x: &mut [f32],
    width: usize,
    seq: usize,
    head_dim: usize,
    rope: &Rope,
    inverse: bool,
) {
    let table = RopeTable::cached(seq, head_dim, rope);
    let sign = if inverse { -1.0 } else { 1.0 };
    const ROWS_PER_TASK: usize = 16;
    x.par_chunks_mut(width * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, rows)| {
            let first = task * ROWS_PER_TASK;
            rotate_rows(rows, first, width, &table, sign)
        });
}

/// cos and sin of every (position, frequency) angle of one sequence, `seq x head_dim/2` each:
/// kernel scratch shared by every sequence, head and call with the same shape.
struct RopeTable {
    seq: usize,
    head_dim: usize,
    rope: Rope,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    fn new(seq: usize, head_dim: usize, rope: &Rope) -> Self {
        let inv_freq = rope.inv_freq(head_dim);
        let angles = || (0..seq).flat_map(|pos| inv_freq.iter().map(move |f| pos as f32 * f));
        RopeTable {
            seq,
            head_dim,
            rope: *rope,
            cos: angles().map(f32::cos).collect(),
            sin: angles().map(f32::sin).collect(),
        }
    }

    /// The table for this shape, computed on first use (a layer calls rope four times a
    /// micro-batch, and the sines and cosines cost more than the rotation).
    fn cached(seq: usize, head_dim: usize, rope: &Rope) -> Arc<RopeTable> {
        static TABLES: Mutex<Vec<Arc<RopeTable>>> = Mutex::new(Vec::new());
        let mut tables = TABLES.lock().unwrap_or_else(|e| e.into_inner());
        let same = |t: &&Arc<RopeTable>| t.seq == seq && t.head_dim == head_dim && t.rope == *rope;
        if let Some(t) = tables.iter().find(same) {
            return Arc::clone(t);
        }
        let table = Arc::new(RopeTable::new(seq, head_dim, rope));
        // A handful of shapes per process; the bound only guards against unbounded growth.
        if tables.len() >= 16 {
            tables.remove(0);
        }
        tables.push(Arc::clone(&table));
        table
    }
}

/// Rotates rows `first..` of `x` (the rows held in `rows`) by their positions; `sign` -1 turns
/// the rotation into its inverse.
#[multiversion(targets = "simd")]
fn rotate_rows(rows: &mut [f32], first: usize, width: usize, table: &RopeTable, sign: f32) {
    let (seq, head_dim) = (table.seq, table.head_dim);
    let half = head_dim / 2;
    for (i, xr) in rows.chunks_mut(width).enumerate() {
        let pos = (first + i) % seq;
        let cos = &table.cos[pos * half..][..half];
        let sin = &table.sin[pos * half..][..half];
        for head in xr.chunks_mut(head_dim) {
            let (lo, hi) = head.split_at_mut(half);
            for ((a, b), (&cos, &sin)) in lo.iter_mut().zip(hi.iter_mut()).zip(cos.iter().zip(sin))
            {
                let (x0, x1, sin) = (*a, *b, sign * sin);
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
        rope_apply(&mut y, width, seq, hd, &Rope::plain(10000.0), false);
        assert_eq!(&y[..width], &x[..width]);
        assert_ne!(&y[width..2 * width], &x[width..2 * width]);
        rope_apply(&mut y, width, seq, hd, &Rope::plain(10000.0), true);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn scaling_slows_the_frequencies_it_names() {
        let plain = Rope::plain(500000.0).inv_freq(16);
        let linear = Rope {
            scaling: Some(RopeScaling::Linear { factor: 4.0 }),
            ..Rope::plain(500000.0)
        };
        for (s, p) in linear.inv_freq(16).iter().zip(&plain) {
            assert_eq!(*s, p / 4.0);
        }
        let llama3 = Rope {
            scaling: Some(RopeScaling::LLAMA_3_1),
            ..Rope::plain(500000.0)
        };
        let scaled = llama3.inv_freq(16);
        let wavelen = |f: f32| std::f32::consts::TAU / f;
        // Short wavelengths are kept, long ones slowed by the whole factor, those between
        // slowed by less; each case occurs for this head size.
        let (mut kept, mut slowed, mut blended) = (0, 0, 0);
        for (s, p) in scaled.iter().zip(&plain) {
            if wavelen(*p) < 2048.0 {
                assert_eq!(s, p);
                kept += 1;
            } else if wavelen(*p) > 8192.0 {
                assert_eq!(*s, p / 8.0);
                slowed += 1;
            } else {
                assert!(*s < *p && *s > p / 8.0, "{s} between {p} and {}", p / 8.0);
                blended += 1;
            }
        }
        assert!(
            kept > 0 && slowed > 0 && blended > 0,
            "{kept} {slowed} {blended}"
        );
    }
}
