//! Deterministic batching. Sequence i is tokens `[i*S, i*S+S)` with targets shifted by one
//! token. Step k takes sequences `k*B .. k*B+B-1` (B = micro_batch_size x microbatches), and
//! microbatch j of the step takes `k*B + j*micro_batch_size ..`. Sequence numbers past the end
//! wrap into the next epoch. With `shuffle`, each epoch visits the windows in a permutation
//! drawn from the seed and the epoch number, so any step's batch is a pure function of
//! (data, layout, step): resuming needs only the step. A target that does not count in the
//! loss (a prompt, a user turn) is [`IGNORE_TARGET`].

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::data::{Corpus, DataError, IGNORE_TARGET};
use crate::plan::inventory::MicroShape;

/// How a step is cut into micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLayout {
    pub seq_len: usize,
    pub micro_batch_size: usize,
    pub microbatches: usize,
    pub shuffle: bool,
    pub seed: u64,
}

impl BatchLayout {
    pub fn sequences_per_step(&self) -> usize {
        self.micro_batch_size * self.microbatches
    }
    pub fn micro_shape(&self) -> MicroShape {
        MicroShape {
            batch: self.micro_batch_size,
            seq: self.seq_len,
        }
    }
}

/// One micro-batch: `input_ids` and `targets` are [micro_batch_size * seq_len], row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Microbatch {
    pub step: u64,
    pub index: usize,
    pub shape: MicroShape,
    /// Which windows of the data, in order.
    pub windows: Vec<usize>,
    pub input_ids: Vec<i32>,
    pub targets: Vec<i32>,
}

#[derive(Debug)]
pub struct Batcher {
    /// The targets as read: the token, or [`IGNORE_TARGET`] where it does not count.
    targets: Vec<i32>,
    tokens: Vec<i32>,
    windows: usize,
    layout: BatchLayout,
    /// The permutation of the epoch last asked for (shuffle only).
    cached: Option<(u64, Vec<usize>)>,
}

impl Batcher {
    /// Every token counts: see [`Batcher::of_corpus`].
    pub fn new(tokens: &[u32], vocab: usize, layout: BatchLayout) -> Result<Batcher, DataError> {
        let counted = vec![true; tokens.len()];
        Batcher::with_mask(tokens, &counted, vocab, layout)
    }

    pub fn of_corpus(
        corpus: &Corpus,
        vocab: usize,
        layout: BatchLayout,
    ) -> Result<Batcher, DataError> {
        Batcher::with_mask(&corpus.tokens, &corpus.counted, vocab, layout)
    }

    /// Checks the tokens against the vocabulary and the layout against the data; a token
    /// whose `counted` is false is no target.
    fn with_mask(
        tokens: &[u32],
        counted: &[bool],
        vocab: usize,
        layout: BatchLayout,
    ) -> Result<Batcher, DataError> {
        for (field, v) in [
            ("seq_len", layout.seq_len),
            ("micro_batch_size", layout.micro_batch_size),
            ("microbatches", layout.microbatches),
        ] {
            if v == 0 {
                return Err(DataError::EmptyLayout { field });
            }
        }
        let needed = layout.seq_len + 1;
        if tokens.len() < needed {
            return Err(DataError::TooShort {
                tokens: tokens.len(),
                needed,
                seq_len: layout.seq_len,
            });
        }
        if let Some(position) = tokens.iter().position(|&t| t as usize >= vocab) {
            return Err(DataError::TokenOutOfRange {
                id: tokens[position],
                position,
                vocab,
            });
        }
        // The first token is never a target.
        if !counted.iter().skip(1).any(|&c| c) {
            return Err(DataError::NothingCounted);
        }
        let targets = tokens
            .iter()
            .zip(counted)
            .map(|(&t, &c)| if c { t as i32 } else { IGNORE_TARGET })
            .collect();
        Ok(Batcher {
            targets,
            tokens: tokens.iter().map(|&t| t as i32).collect(),
            windows: (tokens.len() - 1) / layout.seq_len,
            layout,
            cached: None,
        })
    }

    /// Number of whole sequences (with their targets) in the data: one epoch.
    pub fn windows(&self) -> usize {
        self.windows
    }

    pub fn layout(&self) -> BatchLayout {
        self.layout
    }

    /// Sequences consumed before step `step`: the data position a checkpoint records.
    pub fn position_before(&self, step: u64) -> u64 {
        step * self.layout.sequences_per_step() as u64
    }

    fn window_of(&mut self, sequence: u64) -> usize {
        let w = self.windows as u64;
        let (epoch, within) = (sequence / w, (sequence % w) as usize);
        if !self.layout.shuffle {
            return within;
        }
        if self.cached.as_ref().map(|c| c.0) != Some(epoch) {
            let mut perm: Vec<usize> = (0..self.windows).collect();
            let mut rng = ChaCha8Rng::seed_from_u64(self.layout.seed);
            rng.set_stream(epoch);
            perm.shuffle(&mut rng);
            self.cached = Some((epoch, perm));
        }
        self.cached.as_ref().map_or(within, |c| c.1[within])
    }

    /// Micro-batch `index` of step `step`.
    pub fn microbatch(&mut self, step: u64, index: usize) -> Microbatch {
        let l = self.layout;
        let first = step * l.sequences_per_step() as u64 + (index * l.micro_batch_size) as u64;
        let mut mb = Microbatch {
            step,
            index,
            shape: l.micro_shape(),
            windows: Vec::with_capacity(l.micro_batch_size),
            input_ids: Vec::with_capacity(l.micro_batch_size * l.seq_len),
            targets: Vec::with_capacity(l.micro_batch_size * l.seq_len),
        };
        for r in 0..l.micro_batch_size as u64 {
            let window = self.window_of(first + r);
            let start = window * l.seq_len;
            mb.windows.push(window);
            mb.input_ids
                .extend_from_slice(&self.tokens[start..start + l.seq_len]);
            mb.targets
                .extend_from_slice(&self.targets[start + 1..start + 1 + l.seq_len]);
        }
        mb
    }

    /// Windows `windows` (in order, no wrapping, no shuffle) as micro-batch `index` of one
    /// pass: how validation data is read.
    pub fn window_batch(&self, index: usize, windows: std::ops::Range<usize>) -> Microbatch {
        let s = self.layout.seq_len;
        let windows: Vec<usize> = windows.filter(|&w| w < self.windows).collect();
        let mut mb = Microbatch {
            step: 0,
            index,
            shape: MicroShape {
                batch: windows.len(),
                seq: s,
            },
            windows: windows.clone(),
            input_ids: Vec::with_capacity(windows.len() * s),
            targets: Vec::with_capacity(windows.len() * s),
        };
        for w in windows {
            let start = w * s;
            mb.input_ids
                .extend_from_slice(&self.tokens[start..start + s]);
            mb.targets
                .extend_from_slice(&self.targets[start + 1..start + 1 + s]);
        }
        mb
    }

    /// The first of steps `0..steps` none of whose sequences holds a target that counts in the
    /// loss (prompts longer than a window, say), found before training rather than at that
    /// step. One pass over the windows, and over the steps' windows only when one is masked
    /// whole.
    pub fn first_step_without_targets(&mut self, steps: u64) -> Option<u64> {
        let s = self.layout.seq_len;
        let counts: Vec<bool> = (0..self.windows)
            .map(|w| {
                let targets = &self.targets[w * s + 1..w * s + 1 + s];
                targets.iter().any(|&t| t != IGNORE_TARGET)
            })
            .collect();
        if counts.iter().all(|&c| c) {
            return None;
        }
        let per_step = self.layout.sequences_per_step() as u64;
        (0..steps).find(|&step| {
            let first = step * per_step;
            (first..first + per_step).all(|sequence| !counts[self.window_of(sequence)])
        })
    }

    /// All micro-batches of a step, in order.
    pub fn step(&mut self, step: u64) -> Vec<Microbatch> {
        (0..self.layout.microbatches)
            .map(|j| self.microbatch(step, j))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(seq_len: usize, mbs: usize, mbc: usize, shuffle: bool) -> BatchLayout {
        BatchLayout {
            seq_len,
            micro_batch_size: mbs,
            microbatches: mbc,
            shuffle,
            seed: 7,
        }
    }

    #[test]
    fn sequences_and_targets_follow_the_contract() {
        let tokens: Vec<u32> = (0..23).collect(); // 5 windows of 4 (+1 target), 2 tokens spare
        let mut b = Batcher::new(&tokens, 256, layout(4, 2, 2, false)).unwrap();
        assert_eq!(b.windows(), 5);
        let mb = b.microbatch(0, 1);
        assert_eq!(mb.windows, vec![2, 3]);
        assert_eq!(mb.input_ids, vec![8, 9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(mb.targets, vec![9, 10, 11, 12, 13, 14, 15, 16]);
        // Step 1 takes sequences 4..8: windows 4, then 0, 1, 2 of the next epoch.
        let s1: Vec<usize> = b.step(1).iter().flat_map(|m| m.windows.clone()).collect();
        assert_eq!(s1, vec![4, 0, 1, 2]);
        assert_eq!(b.position_before(3), 12);
    }

    #[test]
    fn exact_fit_and_single_window() {
        let tokens: Vec<u32> = (0..5).collect();
        let mut b = Batcher::new(&tokens, 256, layout(4, 3, 1, false)).unwrap();
        assert_eq!(b.windows(), 1);
        let mb = b.microbatch(2, 0);
        assert_eq!(mb.windows, vec![0, 0, 0]);
        assert_eq!(&mb.targets[..4], &[1, 2, 3, 4]);
    }

    #[test]
    fn shuffle_is_a_deterministic_permutation_per_epoch() {
        let tokens: Vec<u32> = (0..101).map(|i| i % 256).collect();
        let l = layout(10, 5, 2, true); // 10 windows, one epoch per step
        let epoch = |step| {
            let mut b = Batcher::new(&tokens, 256, l).unwrap();
            let mut w: Vec<usize> = b
                .step(step)
                .iter()
                .flat_map(|m| m.windows.clone())
                .collect();
            let order = w.clone();
            w.sort();
            assert_eq!(w, (0..10).collect::<Vec<_>>());
            order
        };
        assert_eq!(epoch(0), epoch(0));
        assert_ne!(epoch(0), epoch(1));
        assert_ne!(epoch(0), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn targets_that_do_not_count_are_the_ignore_id() {
        let corpus = Corpus {
            tokens: (0..9).collect(),
            counted: (0..9).map(|i| i % 3 != 0).collect(),
        };
        let mut b = Batcher::of_corpus(&corpus, 256, layout(4, 1, 2, false)).unwrap();
        let step = b.step(0);
        assert_eq!(step[0].input_ids, vec![0, 1, 2, 3]);
        assert_eq!(step[0].targets, vec![1, 2, IGNORE_TARGET, 4]);
        assert_eq!(step[1].targets, vec![5, IGNORE_TARGET, 7, 8]);
        let none = Corpus {
            tokens: (0..9).collect(),
            counted: (0..9).map(|i| i == 0).collect(),
        };
        let err = Batcher::of_corpus(&none, 256, layout(4, 1, 2, false)).unwrap_err();
        assert!(matches!(err, DataError::NothingCounted), "{err}");
    }

    /// Window 1 of five holds only masked targets: with two sequences a step every step also
    /// holds a counted window, but one sequence a step leaves step 1 (window 1) with none.
    #[test]
    fn a_step_of_masked_windows_is_found_before_training() {
        let corpus = Corpus {
            tokens: (0..21).collect(),
            counted: (0..21).map(|i| !(5..=8).contains(&i)).collect(),
        };
        let mut two = Batcher::of_corpus(&corpus, 256, layout(4, 2, 1, false)).unwrap();
        assert_eq!(two.first_step_without_targets(10), None);
        let mut one = Batcher::of_corpus(&corpus, 256, layout(4, 1, 1, false)).unwrap();
        assert_eq!(one.first_step_without_targets(1), None);
        assert_eq!(one.first_step_without_targets(10), Some(1));
        assert!(one.step(1)[0].targets.iter().all(|&t| t == IGNORE_TARGET));
        assert!(two.step(1)[0].targets.iter().any(|&t| t != IGNORE_TARGET));
        // With shuffling, the step that meets a masked window alone is the one found.
        let mut shuffled = Batcher::of_corpus(&corpus, 256, layout(4, 1, 1, true)).unwrap();
        let found = shuffled.first_step_without_targets(10).unwrap();
        let targets = |b: &mut Batcher, k| b.step(k)[0].targets.clone();
        assert!(
            targets(&mut shuffled, found)
                .iter()
                .all(|&t| t == IGNORE_TARGET)
        );
        for k in 0..found {
            assert!(
                targets(&mut shuffled, k)
                    .iter()
                    .any(|&t| t != IGNORE_TARGET)
            );
        }
    }

    #[test]
    fn bad_data_is_an_error() {
        let err = Batcher::new(&[1, 2, 3, 4], 256, layout(4, 1, 1, false)).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TooShort {
                    tokens: 4,
                    needed: 5,
                    ..
                }
            ),
            "{err}"
        );
        let err = Batcher::new(&[1, 2, 300, 4, 5], 256, layout(4, 1, 1, false)).unwrap_err();
        assert!(err.to_string().contains("300") && err.to_string().contains("position 2"));
        let err = Batcher::new(&[1; 9], 256, layout(4, 0, 1, false)).unwrap_err();
        assert!(matches!(
            err,
            DataError::EmptyLayout {
                field: "micro_batch_size"
            }
        ));
    }
}
