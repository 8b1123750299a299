//! The contract with the planner: from a job body and the devices, a plan (JSON and SVG
//! renderings and a summary) or a typed reason it cannot be made.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::devices::DeviceInfo;
use crate::spec::{InvalidSpec, JobSpec};

/// Computes plans. Pure and quick (called inside request handlers on a blocking thread).
pub trait Planner: Send + Sync + 'static {
    /// `spec` has its file ids resolved to local paths (see `RunRequest::spec`); the plan must
    /// fit `devices` and keep what it offloads within `host_memory_bytes` in all.
    fn plan(
        &self,
        spec: &JobSpec,
        devices: &[DeviceInfo],
        host_memory_bytes: u64,
    ) -> Result<PlanOutcome, PlanFailure>;
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlanOutcome {
    /// The whole plan (per-device programs) as the planner renders it to JSON.
    pub plan: serde_json::Value,
    /// The schedule drawn as SVG text.
    pub svg: String,
    pub summary: PlanSummary,
}

/// What a plan predicts, shown on the job and returned by `POST /v1/plans`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlanSummary {
    /// Schedule name, e.g. `chronos`, `1f1b`.
    pub schedule: String,
    /// Devices of each replica's pipeline.
    pub stages: u32,
    /// Copies of the pipeline (data parallelism), each on its own `stages` devices: run-wide
    /// device `d` is stage `d % stages` of replica `d / stages`.
    #[serde(default = "one_replica")]
    pub replicas: u32,
    /// How many of the devices the plan uses, stages x replicas (a worker claims the job when
    /// it has this many free).
    pub devices: u32,
    /// Programs: actions per device, in device order.
    pub actions_per_device: Vec<u64>,
    /// Predicted peak bytes of each device, in device order.
    pub peak_bytes: Vec<u64>,
    /// Predicted peak bytes of each device during an evaluation of `data.validation` between
    /// steps (forward only), in device order; the plan fits both.
    #[serde(default)]
    pub eval_peak_bytes: Vec<u64>,
    pub step_time_s: f64,
    /// Fraction of device time idle in the pipeline.
    pub bubble_ratio: f64,
    /// Next-best plans considered.
    pub runners_up: Vec<PlanCandidate>,
}

impl PlanSummary {
    /// The plan's replicas x stages on `devices` (those a worker gave the job, in order):
    /// device `d` is stage `d % stages` of replica `d / stages`.
    pub fn placement(&self, devices: &[String]) -> Vec<PlacementEntry> {
        let stages = self.stages.max(1) as usize;
        (devices.iter().enumerate())
            .map(|(d, device)| PlacementEntry {
                replica: (d / stages) as u32,
                stage: (d % stages) as u32,
                device: device.clone(),
            })
            .collect()
    }
}

/// One device of a job: stage `stage` of replica `replica`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlacementEntry {
    pub replica: u32,
    pub stage: u32,
    pub device: String,
}

/// Summaries stored before replicas were shown ran one.
fn one_replica() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlanCandidate {
    /// e.g. `1f1b, 4 stages, recompute all`.
    pub label: String,
    pub max_peak_bytes: u64,
    pub step_time_s: f64,
    pub bubble_ratio: f64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanFailure {
    /// No configuration fits the devices' memory.
    #[error("{message}")]
    DoesNotFit {
        message: String,
        /// The least memory per device with which some configuration would fit.
        smallest_memory_bytes: u64,
        /// That configuration (planner JSON).
        closest: serde_json::Value,
    },
    #[error(transparent)]
    Invalid(#[from] InvalidSpec),
    /// No planner is plugged into this build of the service.
    #[error("{0}")]
    Unavailable(String),
    #[error("planner failed: {0}")]
    Internal(String),
}
