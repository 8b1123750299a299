//! How the job is split across devices. Every choice may be `"auto"`: the planner decides.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use super::schedule_choice::ScheduleChoice;
use super::validate::SpecError;

/// The one accepted string for "let the planner choose".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AutoKeyword {
    Auto,
}

/// Pipeline stages: a count, or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stages {
    Auto(AutoKeyword),
    Count(usize),
}

impl Default for Stages {
    fn default() -> Self {
        Stages::Auto(AutoKeyword::Auto)
    }
}

impl Stages {
    /// `None` when the planner chooses.
    pub fn count(self) -> Option<usize> {
        match self {
            Stages::Auto(_) => None,
            Stages::Count(n) => Some(n),
        }
    }
}

/// Data-parallel replicas: a count, or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum DataParallel {
    Auto(AutoKeyword),
    Count(usize),
}

impl Default for DataParallel {
    fn default() -> Self {
        DataParallel::Count(1)
    }
}

impl DataParallel {
    /// The replica count; `None` for `"auto"`.
    pub fn count(self) -> Option<usize> {
        match self {
            DataParallel::Auto(_) => None,
            DataParallel::Count(n) => Some(n),
        }
    }

    fn is_one(&self) -> bool {
        *self == DataParallel::Count(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RecomputeChoice {
    #[default]
    Auto,
    None,
    Full,
    Chronos,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OffloadChoice {
    #[default]
    Auto,
    None,
    Chronos,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ParallelismSpec {
    #[serde(default)]
    pub stages: Stages,
    #[serde(default)]
    pub schedule: ScheduleChoice,
    /// Model chunks per device (interleaved and chronos); omitted means the schedule's own.
    #[serde(default)]
    pub chunks_per_stage: Option<usize>,
    #[serde(default)]
    pub recompute: RecomputeChoice,
    #[serde(default)]
    pub offload: OffloadChoice,
    /// Copies of the pipeline, each on its own devices and its share of the step's
    /// micro-batches (`training.microbatches / data_parallel` each); 1 when left out;
    /// `"auto"`: the planner picks stages x replicas for the fastest plan.
    #[serde(default, skip_serializing_if = "DataParallel::is_one")]
    pub data_parallel: DataParallel,
    /// Each replica keeps and steps 1/data_parallel of every chunk's optimizer state
    /// (ZeRO-1: gradients reduce-scattered, weights gathered after the step); left out, it
    /// is on whenever there is more than one replica (CPU or GPU devices), and the planner
    /// searches the replicated plans that way. `false` keeps the whole state on every replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_optimizer: Option<bool>,
}

impl ParallelismSpec {
    /// Whether replicas, where there are more than one, shard the optimizer state.
    pub fn shards_optimizer(&self) -> bool {
        self.shard_optimizer != Some(false)
    }

    /// Each replica runs an equal share of the step's `microbatches`.
    pub(super) fn check_replica_share(&self, microbatches: usize, errors: &mut Vec<SpecError>) {
        let Some(dp) = self.data_parallel.count().filter(|&n| n > 1) else {
            return;
        };
        if !microbatches.is_multiple_of(dp) {
            let fits: Vec<String> = (1..=microbatches)
                .filter(|n| microbatches.is_multiple_of(*n))
                .map(|n| n.to_string())
                .collect();
            errors.push(SpecError::new(
                "parallelism.data_parallel",
                format!(
                    "{dp} replicas cannot share training.microbatches = {microbatches} equally; \
                     use a data_parallel that divides it ({}), or a multiple of {dp} \
                     micro-batches",
                    fits.join(", ")
                ),
            ));
        }
    }

    pub(super) fn check(&self, errors: &mut Vec<SpecError>) {
        if self.stages == Stages::Count(0) {
            errors.push(SpecError::new(
                "parallelism.stages",
                "must be at least 1, or \"auto\"",
            ));
        }
        if self.data_parallel == DataParallel::Count(0) {
            errors.push(SpecError::new(
                "parallelism.data_parallel",
                "must be at least 1 (1: one pipeline, no data parallelism)",
            ));
        }
        if self.shard_optimizer == Some(true) && self.data_parallel == DataParallel::Count(1) {
            errors.push(SpecError::new(
                "parallelism.shard_optimizer",
                "shards the optimizer state over data-parallel replicas, and \
                 parallelism.data_parallel is 1: set data_parallel to 2 or more (or \"auto\"), \
                 or leave shard_optimizer out",
            ));
        }
        if self.chunks_per_stage == Some(0) {
            errors.push(SpecError::new(
                "parallelism.chunks_per_stage",
                "must be at least 1, or left out",
            ));
        } else if let Err(e) = self.schedule.kind(self.chunks_per_stage) {
            errors.push(e);
        }
    }
}
