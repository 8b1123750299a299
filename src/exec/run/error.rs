//! Why a run could not start or go on, and whose fault that is.

use std::path::PathBuf;

use thiserror::Error;

use crate::data::DataError;
use crate::exec::backend::cuda::CudaError;
use crate::exec::checkpoint::CheckpointError;
use crate::exec::device::DeviceError;
use crate::exec::device_spec::DeviceSpecError;
use crate::exec::model::ModelError;
use crate::exec::pipeline::PipelineError;
use crate::plan::PlanError;
use crate::spec::SpecError;

#[derive(Debug, Error)]
pub enum RunError {
    #[error("invalid job spec: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Spec(Vec<SpecError>),
    #[error(transparent)]
    Devices(#[from] DeviceSpecError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error(
        "{what} need {need_bytes} bytes of host memory, more than the {have_bytes} the service \
         gives a job (`--host-memory`); change {param}"
    )]
    HostMemory {
        what: &'static str,
        param: &'static str,
        need_bytes: u64,
        have_bytes: u64,
    },
    /// The observer (a progress display, the job store) could not take a report.
    #[error("{0}")]
    Observer(String),
}

/// Whose fault an error is, a stable code and, where one field is at fault, its JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blame {
    pub user: bool,
    pub code: &'static str,
    pub param: Option<String>,
}

impl RunError {
    /// The storage's refusal, when a checkpoint could not be written for want of room.
    pub fn storage_full(&self) -> Option<std::io::ErrorKind> {
        match self {
            RunError::Checkpoint(CheckpointError::Write { source, .. })
                if crate::exec::checkpoint::is_storage_full(source) =>
            {
                Some(source.kind())
            }
            _ => None,
        }
    }

    pub fn blame(&self) -> Blame {
        let user = |code, param: Option<&str>| Blame {
            user: true,
            code,
            param: param.map(str::to_owned),
        };
        let ours = |code| Blame {
            user: false,
            code,
            param: None,
        };
        match self {
            RunError::Spec(errors) => {
                user("invalid_spec", errors.first().map(|e| e.param.as_str()))
            }
            RunError::Devices(_) | RunError::Cuda(CudaError::Unavailable { .. }) => {
                user("invalid_devices", Some("devices"))
            }
            RunError::Plan(PlanError::DoesNotFit { .. }) => user("does_not_fit", Some("devices")),
            RunError::HostMemory { param, .. } => user("does_not_fit", Some(param)),
            RunError::Plan(_) => user("invalid_plan", Some("parallelism")),
            RunError::Data(e) => user("invalid_data", Some(e.param())),
            RunError::Pipeline(PipelineError::Model(ModelError::NothingCounted { .. })) => {
                user("invalid_data", Some("data.train"))
            }
            RunError::Checkpoint(_) if self.storage_full().is_some() => ours("storage_full"),
            // Writing a checkpoint is the service's business whatever went wrong.
            RunError::Checkpoint(CheckpointError::Write { .. }) => ours("internal"),
            RunError::Checkpoint(_) => user("invalid_model", Some("model.init.from")),
            RunError::Model(_) => user("invalid_model", Some("model")),
            RunError::Pipeline(
                PipelineError::NonFiniteLoss { .. } | PipelineError::NonFiniteGradNorm { .. },
            ) => user("diverged", Some("training.optimizer.lr")),
            RunError::Device(DeviceError::OutOfMemory(_))
            | RunError::Pipeline(PipelineError::Device(DeviceError::OutOfMemory(_))) => {
                ours("out_of_memory")
            }
            RunError::Cuda(e) | RunError::Pipeline(PipelineError::Cuda(e))
                if e.is_out_of_memory() =>
            {
                ours("out_of_memory")
            }
            _ => ours("internal"),
        }
    }
}

#[cfg(test)]
mod tests {
    use cudarc::driver::{DriverError, sys::CUresult};

    use super::*;

    /// A GPU that runs out of memory outside the pools' count (the driver's allocator, or
    /// cuBLAS's) is out of memory, as a pool over budget is, not an internal error.
    #[test]
    fn running_out_of_gpu_memory_is_blamed_as_out_of_memory() {
        let driver_oom = || CudaError::Driver(DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        for e in [
            RunError::Cuda(driver_oom()),
            RunError::Pipeline(PipelineError::Cuda(driver_oom())),
        ] {
            assert_eq!(e.blame().code, "out_of_memory", "{e}");
            assert!(!e.blame().user);
        }
        let launch = CudaError::Driver(DriverError(CUresult::CUDA_ERROR_LAUNCH_FAILED));
        assert_eq!(RunError::Cuda(launch).blame().code, "internal");
    }

    /// Data the user gave is the user's fault, named by the field that holds it.
    #[test]
    fn data_errors_blame_the_field_at_fault() {
        let tokenizer = RunError::Data(DataError::TokenizerConfig {
            field: "chat_template".into(),
            reason: "does not compile".into(),
        });
        assert_eq!(tokenizer.blame().param.as_deref(), Some("data.tokenizer"));
        let masked =
            RunError::Pipeline(PipelineError::Model(ModelError::NothingCounted { step: 3 }));
        let blame = masked.blame();
        assert!(blame.user && blame.code == "invalid_data", "{masked}");
        assert_eq!(blame.param.as_deref(), Some("data.train"));
    }
}
