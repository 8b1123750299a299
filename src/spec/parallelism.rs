//! How the job is split across devices. Every choice may be `"auto"`: the planner decides.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleChoice {
    #[default]
    Auto,
    Gpipe,
    #[serde(rename = "1f1b")]
    OneFOneB,
    Interleaved,
    Chronos,
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
}

impl ParallelismSpec {
    pub(super) fn check(&self, errors: &mut Vec<SpecError>) {
        if self.stages == Stages::Count(0) {
            errors.push(SpecError::new(
                "parallelism.stages",
                "must be at least 1, or \"auto\"",
            ));
        }
        if self.chunks_per_stage == Some(0) {
            errors.push(SpecError::new(
                "parallelism.chunks_per_stage",
                "must be at least 1, or left out",
            ));
        }
    }
}
