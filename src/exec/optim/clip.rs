//! Global-norm gradient clipping across devices. Each part reports the sum of squares of its
//! gradients; the global norm adds the parts' sums in forward order of parts, whatever device
//! holds them, so the result is bit-identical for any number of pipeline stages.

use multiversion::multiversion;
use rayon::prelude::*;

use crate::exec::backend::cpu::kernels::reduce;
use crate::exec::model::{PartId, PartParams};

/// One part's contribution to the global norm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PartSquares {
    pub part: PartId,
    pub sum_of_squares: f64,
}

/// Sum of squared gradients of one part, tensor by tensor in a fixed order, in f64.
pub fn part_squares(part: &PartParams) -> PartSquares {
    let counted = part.counted().map(|(i, _)| &part.grads[i]);
    let sum_of_squares = counted.map(|g| tensor_squares(g.data())).sum();
    PartSquares {
        part: part.id,
        sum_of_squares,
    }
}

/// Sum of squares of one tensor's values in f64: fixed ranges summed on the pool's threads,
/// their sums added in order, so the same bits for any number of threads.
pub fn tensor_squares(xs: &[f32]) -> f64 {
    const CHUNK: usize = 1 << 16;
    let partials: Vec<f64> = xs.par_chunks(CHUNK).map(chunk_squares).collect();
    partials.iter().sum()
}

#[multiversion(targets = "simd")]
fn chunk_squares(xs: &[f32]) -> f64 {
    reduce::sum_squares_f64(xs)
}

/// The L2 norm over every gradient of the model from each part's contribution, combined in
/// the parts' forward order regardless of the order given. A part may come in several
/// shares (one per replica when the optimizer state is sharded): they are added smallest
/// first, so whichever replica posted first, the sum has the same bits.
pub fn global_norm(partials: &[PartSquares]) -> f64 {
    let mut sorted = partials.to_vec();
    sorted
        .sort_by(|a, b| (a.part.cmp(&b.part)).then(a.sum_of_squares.total_cmp(&b.sum_of_squares)));
    sorted.iter().map(|p| p.sum_of_squares).sum::<f64>().sqrt()
}

/// The factor `torch.nn.utils.clip_grad_norm_` multiplies gradients by: at most 1.
pub fn clip_factor(norm: f64, max_norm: f32) -> f32 {
    ((max_norm as f64) / (norm + 1e-6)).min(1.0) as f32
}
