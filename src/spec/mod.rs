//! What users send: a job = model + data + training settings + parallelism + devices.
//! The same JSON body serves the CLI (`train JOB.json`, with paths) and the service
//! (`POST /v1/jobs`, with file ids in place of paths). Unknown fields are rejected so a
//! misspelt setting is never silently ignored; `validate` reports every problem with the
//! JSON path of the field at fault.

mod evaluation;
mod model;
mod parallelism;
mod rope;
mod schedule_choice;
mod training;
mod validate;

pub use model::{Architecture, JobCheckpointRef, ModelArch, ModelInit, ModelSpec};
pub use parallelism::{
    DataParallel, OffloadChoice, ParallelismSpec, RecomputeChoice, ScheduleChoice, Stages,
};
pub use rope::RopeScaling;
pub use training::StoragePolicy;
pub use training::{
    DataSpec, EarlyStoppingSpec, LrDecay, OptimizerSpec, PrecisionSpec, TrainingSpec,
};
pub use validate::{InvalidSpec, SpecError};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A training job as a user describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub model: ModelSpec,
    pub data: DataSpec,
    pub training: TrainingSpec,
    #[serde(default)]
    pub parallelism: ParallelismSpec,
    /// Device set: `cpu:NxSIZE` (e.g. `cpu:4x256MiB`), one of the service's GPUs (`cuda`,
    /// `cuda:N`), which holds the whole model, or pipeline stages on GPUs (`cuda:0x4`: four
    /// sharing GPU 0, which a service started with them has; `cuda:0,1` from `chronospipe
    /// train`); omitted means the service's devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<String>,
}

impl JobSpec {
    /// Parses a JSON body; serde's message carries the line, column and field.
    pub fn from_json(text: &str) -> Result<JobSpec, InvalidSpec> {
        serde_json::from_str(text).map_err(|e| {
            InvalidSpec(vec![SpecError::new(
                serde_path_hint(&e),
                format!("not a valid job spec: {e}"),
            )])
        })
    }

    /// Every problem found, each with the JSON path of its field.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        let mut errors = Vec::new();
        self.model.check(&mut errors);
        self.data.check(&mut errors);
        self.training.check(&mut errors);
        self.training.check_evaluation(&self.data, &mut errors);
        self.parallelism.check(&mut errors);
        (self.parallelism).check_replica_share(self.training.microbatches, &mut errors);
        if let Some(arch) = self.model.explicit_arch() {
            self.data.check_vocab(arch.vocab_size, &mut errors);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(InvalidSpec(errors))
        }
    }
}

/// serde_json does not expose the failing field's path; the top-level key in its message is
/// the best pointer we have.
fn serde_path_hint(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let field = msg
        .split('`')
        .nth(1)
        .filter(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    field.unwrap_or("").to_owned()
}

#[cfg(test)]
mod tests;
