//! Holding results against references (PyTorch's, or another backend's): the relative error
//! every parity check and reference test uses.

/// `|ours - reference| / |reference|` in the L2 norm; infinite for unequal lengths or NaNs.
pub fn rel_err(ours: &[f32], reference: &[f32]) -> f64 {
    if ours.len() != reference.len() {
        return f64::INFINITY;
    }
    let num: f64 = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|b| (*b as f64).powi(2)).sum();
    let err = (num / den.max(1e-30)).sqrt();
    if err.is_nan() { f64::INFINITY } else { err }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_is_infinite_for_mismatches_and_nans() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_err(&[1.1], &[1.0]) - 0.1).abs() < 1e-6);
        assert_eq!(rel_err(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(rel_err(&[f32::NAN], &[1.0]), f64::INFINITY);
    }
}
