//! The degree pairs (pipeline stages x data-parallel replicas) a job planned over the cluster
//! is compared at. Where the network is slow a plan on fewer workers may beat the one fastest
//! in simulation, so the pairs are those the planner itself would consider over the first `k`
//! workers' free devices (whole workers first, as they are placed), for every `k`: a given
//! count stays fixed, `"auto"` stages divide the devices (or are the devices per replica when
//! the replicas are given), `"auto"` replicas are the most that fit beside the stages and share
//! the step's micro-batches equally.

use crate::spec::ParallelismSpec;

/// At most this many pairs are planned for one job (each one planner call): the pairs over
/// every free device come first, then those over one worker, two, and so on.
pub const MOST_PAIRS: usize = 32;

/// One candidate: `stages` devices per replica, `replicas` copies of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Degrees {
    pub stages: usize,
    pub replicas: usize,
}

impl Degrees {
    /// The devices the pair runs on.
    pub fn devices(self) -> usize {
        self.stages * self.replicas
    }
}

/// The pairs `parallelism` allows over `whole_workers` (the free devices of the first worker,
/// the first two, ... in placement order: ascending counts) for a step of `microbatches`
/// micro-batches; no pair twice, at most `MOST_PAIRS`.
pub fn degree_pairs(
    parallelism: &ParallelismSpec,
    microbatches: usize,
    whole_workers: &[usize],
) -> Vec<Degrees> {
    let every = whole_workers.last().into_iter();
    let mut pairs: Vec<Degrees> = Vec::new();
    for &devices in every.chain(whole_workers) {
        for pair in pairs_within(parallelism, microbatches, devices) {
            if !pairs.contains(&pair) {
                pairs.push(pair);
            }
        }
    }
    pairs.truncate(MOST_PAIRS);
    pairs
}

/// The pairs the planner would consider over `devices` devices.
fn pairs_within(
    parallelism: &ParallelismSpec,
    microbatches: usize,
    devices: usize,
) -> Vec<Degrees> {
    // The most replicas beside `stages` whose share of the micro-batches is whole.
    let most_replicas = |stages: usize| {
        (1..=devices / stages.max(1))
            .rev()
            .find(|r| microbatches.is_multiple_of(*r))
    };
    let stages = parallelism.stages.count();
    let replicas = parallelism.data_parallel.count();
    let pairs: Vec<(usize, Option<usize>)> = match (stages, replicas) {
        (Some(stages), Some(replicas)) => vec![(stages, Some(replicas))],
        (Some(stages), None) => vec![(stages, most_replicas(stages))],
        // Given replicas, "auto" stages take every device of each replica's share.
        (None, Some(replicas)) if replicas > 0 && devices.is_multiple_of(replicas) => {
            vec![(devices / replicas, Some(replicas))]
        }
        (None, Some(_)) => Vec::new(),
        (None, None) => (1..=devices)
            .filter(|p| devices.is_multiple_of(*p))
            .map(|p| (p, most_replicas(p)))
            .collect(),
    };
    (pairs.into_iter())
        .filter_map(|(stages, replicas)| {
            Some(Degrees {
                stages,
                replicas: replicas?,
            })
        })
        .filter(|d| d.stages > 0 && d.replicas > 0 && d.devices() <= devices)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parallelism(json: serde_json::Value) -> ParallelismSpec {
        serde_json::from_value(json).unwrap()
    }

    fn pairs(json: serde_json::Value, microbatches: usize, whole: &[usize]) -> Vec<(usize, usize)> {
        (degree_pairs(&parallelism(json), microbatches, whole).into_iter())
            .map(|d| (d.stages, d.replicas))
            .collect()
    }

    #[test]
    fn given_stages_take_the_most_replicas_over_each_count_of_workers() {
        let auto_replicas = serde_json::json!({"stages": 2, "data_parallel": "auto"});
        // Three workers of two: every device first, then one worker, then two.
        assert_eq!(
            pairs(auto_replicas.clone(), 12, &[2, 4, 6]),
            [(2, 3), (2, 1), (2, 2)]
        );
        // 3 replicas cannot share 8 micro-batches: two do.
        assert_eq!(
            pairs(auto_replicas.clone(), 8, &[2, 4, 6]),
            [(2, 2), (2, 1)]
        );
        assert_eq!(
            pairs(auto_replicas, 12, &[1]),
            [],
            "two stages need two devices"
        );
    }

    #[test]
    fn auto_stages_divide_the_devices_and_given_counts_stay() {
        let auto = serde_json::json!({"stages": "auto", "data_parallel": "auto"});
        assert_eq!(
            pairs(auto, 4, &[2, 4]),
            [(1, 4), (2, 2), (4, 1), (1, 2), (2, 1)]
        );
        let given_replicas = serde_json::json!({"data_parallel": 2});
        assert_eq!(
            pairs(given_replicas.clone(), 4, &[2, 5, 6]),
            [(3, 2), (1, 2)]
        );
        let fixed = serde_json::json!({"stages": 2, "data_parallel": 2});
        assert_eq!(pairs(fixed.clone(), 4, &[2, 4]), [(2, 2)]);
        assert_eq!(pairs(fixed, 4, &[3]), [], "four devices are not free");
        // One pipeline: the default replicas.
        let stages_only = serde_json::json!({"stages": "auto"});
        assert_eq!(pairs(stages_only, 4, &[2, 3]), [(3, 1), (2, 1)]);
    }

    #[test]
    fn zero_counts_and_no_devices_give_no_pairs() {
        let zero = serde_json::json!({"stages": 0, "data_parallel": "auto"});
        assert_eq!(pairs(zero, 4, &[2]), []);
        let zero = serde_json::json!({"data_parallel": 0});
        assert_eq!(pairs(zero, 4, &[2]), []);
        assert_eq!(pairs(serde_json::json!({}), 4, &[]), []);
    }

    #[test]
    fn the_pairs_are_bounded() {
        let auto = serde_json::json!({"stages": "auto", "data_parallel": "auto"});
        let whole: Vec<usize> = (1..=16).map(|k| 8 * k).collect();
        let many = degree_pairs(&parallelism(auto), 128, &whole);
        assert_eq!(many.len(), MOST_PAIRS);
        assert!(many.iter().all(|d| d.devices() <= 128));
    }
}
