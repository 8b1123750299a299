//! `training.keep_checkpoints`: which of a job's checkpoints go. The latest `keep` stay, and
//! the best by validation loss (the lowest; the earliest of equals) when any has one; so do
//! the ones something else still needs (a resume's, another job's `model.init.from`).

/// A checkpoint as retention sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kept {
    pub step: u64,
    /// The validation loss evaluated at its step, when one was.
    pub val_loss: Option<f64>,
}

/// The step of the checkpoint with the lowest validation loss, if any has one.
pub fn best(checkpoints: &[Kept]) -> Option<u64> {
    checkpoints
        .iter()
        .filter_map(|c| c.val_loss.map(|l| (l, c.step)))
        .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
        .map(|(_, step)| step)
}

/// The steps of the checkpoints to delete, in order, keeping the latest `keep` (at least
/// one), the best and every step in `needed`.
pub fn to_delete(checkpoints: &[Kept], keep: usize, needed: &[u64]) -> Vec<u64> {
    let mut steps: Vec<u64> = checkpoints.iter().map(|c| c.step).collect();
    steps.sort_unstable();
    steps.dedup();
    let latest = steps.len().saturating_sub(keep.max(1));
    let best = best(checkpoints);
    steps[..latest]
        .iter()
        .copied()
        .filter(|s| Some(*s) != best && !needed.contains(s))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(step: u64, val_loss: Option<f64>) -> Kept {
        Kept { step, val_loss }
    }

    #[test]
    fn keeps_the_latest_the_best_and_the_needed() {
        let all = [
            at(2, Some(3.0)),
            at(4, Some(2.5)),
            at(6, Some(2.7)),
            at(8, Some(2.6)),
            at(10, Some(2.9)),
        ];
        assert_eq!(best(&all), Some(4));
        assert_eq!(to_delete(&all, 2, &[]), [2, 6]);
        assert_eq!(to_delete(&all, 2, &[6]), [2]);
        assert_eq!(to_delete(&all, 5, &[]), Vec::<u64>::new());
        // Never every checkpoint: the latest stays even with keep 0.
        assert_eq!(to_delete(&all, 0, &[]), [2, 6, 8]);
        let plain = [at(1, None), at(2, None), at(3, None)];
        assert_eq!(best(&plain), None);
        assert_eq!(to_delete(&plain, 1, &[]), [1, 2]);
        // The earliest of equal losses is the best.
        let tied = [at(1, Some(1.0)), at(2, Some(1.0)), at(3, None)];
        assert_eq!(to_delete(&tied, 1, &[]), [2]);
    }
}
