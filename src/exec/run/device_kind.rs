//! What a run's devices are, and the memory layout that makes for the planner.

use crate::plan::presets::ProfileName;
use crate::spec::{PrecisionSpec, SpecError};

use super::RunError;

/// What a run's devices are. With the spec's precision it decides the memory layout the
/// planner counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    /// The backend's memory layout for `precision` on these devices; bf16 on CPU devices is
    /// refused by field.
    pub fn profile(self, precision: PrecisionSpec) -> Result<ProfileName, RunError> {
        Ok(match (self, precision) {
            (DeviceKind::Cpu, PrecisionSpec::F32) => ProfileName::CpuF32,
            (DeviceKind::Cpu, PrecisionSpec::Bf16) => {
                return Err(RunError::Spec(vec![SpecError::new(
                    "training.precision",
                    "bf16 runs on CUDA devices only and these are CPU devices; use f32, or \
                     CUDA devices such as `cuda` or `cuda:0x4`",
                )]));
            }
            (DeviceKind::Cuda, PrecisionSpec::F32) => ProfileName::CudaF32,
            (DeviceKind::Cuda, PrecisionSpec::Bf16) => ProfileName::CudaBf16,
        })
    }
}
