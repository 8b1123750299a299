//! A projection's bias (Qwen2's query, key and value): added to each output row, its gradient
//! the column sums of the output's gradient, summed in row order so the result does not
//! depend on thread count.

/// `y[r, :] += b` for every row of `y` (rows of `b.len()`).
pub fn bias_add(y: &mut [f32], b: &[f32]) {
    assert!(!b.is_empty() && y.len().is_multiple_of(b.len()));
    for row in y.chunks_exact_mut(b.len()) {
        for (v, bias) in row.iter_mut().zip(b) {
            *v += bias;
        }
    }
}

/// `db += Σ_r dy[r, :]` (rows of `db.len()`).
pub fn bias_backward(db: &mut [f32], dy: &[f32]) {
    assert!(!db.is_empty() && dy.len().is_multiple_of(db.len()));
    let mut sums = vec![0.0f32; db.len()];
    for row in dy.chunks_exact(db.len()) {
        for (s, d) in sums.iter_mut().zip(row) {
            *s += d;
        }
    }
    for (g, s) in db.iter_mut().zip(sums) {
        *g += s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_is_added_to_every_row_and_its_gradient_sums_the_rows() {
        let mut y = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        bias_add(&mut y, &[0.5, -1.0, 2.0]);
        assert_eq!(y, [1.5, 1.0, 5.0, 4.5, 4.0, 8.0]);
        let mut db = vec![1.0, 0.0, -1.0];
        bias_backward(&mut db, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(db, [6.0, 7.0, 8.0]);
    }
}
