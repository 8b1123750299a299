//! The selftest's micro-batches of random tokens.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::Microbatch;
use crate::exec::model::LlamaConfig;
use crate::plan::inventory::MicroShape;

/// `count` micro-batches of random tokens, each micro-batch 0 of step 0.
pub fn random_batches(config: &LlamaConfig, micro: MicroShape, count: usize) -> Vec<Microbatch> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let vocab = config.dims.vocab as i32;
    (0..count)
        .map(|_| {
            let ids: Vec<i32> = (0..micro.tokens() + 1)
                .map(|_| rng.gen_range(0..vocab))
                .collect();
            Microbatch {
                step: 0,
                index: 0,
                shape: micro,
                windows: Vec::new(),
                input_ids: ids[..micro.tokens()].to_vec(),
                targets: ids[1..].to_vec(),
            }
        })
        .collect()
}
