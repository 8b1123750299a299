//! The devices a worker trains on, as the service shows them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::exec::device_spec::DeviceSpec;
pub use crate::exec::device_spec::DeviceSpecError;
use crate::exec::run::{RunError, gpu_budget};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeviceInfo {
    /// e.g. `cpu:0`, `cuda:1`, or `cuda:0/stage2` (a pipeline stage sharing GPU 0).
    pub id: String,
    /// `cpu` or `cuda`.
    pub kind: String,
    pub memory_bytes: u64,
}

/// The service's devices from `devices` text (`exec::device_spec`'s syntax): `cpu:NxSIZE`,
/// whole GPUs (`cuda`, `cuda:N`, `cuda:I,J,...`), each a device of a job's pipeline, or
/// pipeline devices sharing one GPU (`cuda:NxK`: devices `cuda:N/stage0` to `cuda:N/stageK-1`), GPUs optionally
/// `@SIZE` (each stage's cap). A GPU's memory is its cap, else unknown here (0) until
/// `with_gpu_memory` measures it.
pub fn parse_devices(spec: &str) -> Result<Vec<DeviceInfo>, DeviceSpecError> {
    let info = |id: String, kind: &str, memory_bytes: u64| DeviceInfo {
        id,
        kind: kind.into(),
        memory_bytes,
    };
    match DeviceSpec::parse(spec)? {
        DeviceSpec::Cpu {
            count,
            budget_bytes,
        } => Ok((0..count)
            .map(|i| info(format!("cpu:{i}"), "cpu", budget_bytes as u64))
            .collect()),
        DeviceSpec::Cuda {
            gpus,
            stages_per_gpu,
            cap_bytes,
        } => {
            let memory = cap_bytes.unwrap_or(0) as u64;
            Ok(gpus
                .iter()
                .flat_map(|g| {
                    (0..stages_per_gpu).map(move |s| match stages_per_gpu {
                        1 => format!("cuda:{g}"),
                        _ => format!("cuda:{g}/stage{s}"),
                    })
                })
                .map(|id| info(id, "cuda", memory))
                .collect())
        }
    }
}

/// The GPU ordinal of a `cuda:N` device or a `cuda:N/stageS` stage, `None` for other kinds.
pub fn gpu_ordinal(device: &DeviceInfo) -> Option<usize> {
    if device.kind != "cuda" {
        return None;
    }
    let gpu = device.id.split('/').next()?;
    match DeviceSpec::parse(gpu).ok()? {
        DeviceSpec::Cuda { gpus, .. } => gpus.first().copied(),
        _ => None,
    }
}

/// Whether a device is one of several pipeline stages sharing a GPU (`cuda:N/stageS`).
pub fn is_gpu_stage(device: &DeviceInfo) -> bool {
    gpu_ordinal(device).is_some() && device.id.contains("/stage")
}

/// Fills in each GPU device's memory: what a job may use of it, its GPU's free memory less a
/// reserve shared equally by the stages on it, or its cap, which must fit in that. Opens every
/// GPU, so a machine without a driver or without that GPU says so here, at start.
pub fn with_gpu_memory(devices: Vec<DeviceInfo>) -> Result<Vec<DeviceInfo>, RunError> {
    let ordinals: Vec<Option<usize>> = devices.iter().map(gpu_ordinal).collect();
    let mut free = std::collections::BTreeMap::new();
    devices
        .into_iter()
        .zip(&ordinals)
        .map(|(mut d, ordinal)| {
            let Some(ordinal) = *ordinal else {
                return Ok(d);
            };
            let sharing = ordinals.iter().filter(|o| **o == Some(ordinal)).count() as u64;
            let gpu_free = match free.get(&ordinal) {
                Some(&f) => f,
                None => {
                    let f = gpu_budget(ordinal, None)? as u64;
                    free.insert(ordinal, f);
                    f
                }
            };
            let share = gpu_free / sharing;
            let cap = d.memory_bytes;
            if cap > share {
                return Err(RunError::Devices(DeviceSpecError {
                    spec: format!("{}@{cap}", d.id),
                    reason: format!(
                        "the cap is more than the {share} bytes this device gets of its GPU's \
                         free memory (less a reserve, shared by {sharing} stage(s))"
                    ),
                }));
            }
            d.memory_bytes = if cap > 0 { cap } else { share };
            Ok(d)
        })
        .collect()
}

/// The host memory the CPU devices' budgets take (a GPU's memory is its own).
pub fn cpu_device_bytes(devices: &[DeviceInfo]) -> u64 {
    (devices.iter())
        .filter(|d| d.kind == "cpu")
        .map(|d| d.memory_bytes)
        .sum()
}

/// Without `--devices`: one CPU device with half the available memory.
pub fn default_devices() -> Vec<DeviceInfo> {
    let available = super::host_memory::available_memory().unwrap_or(1 << 30);
    vec![DeviceInfo {
        id: "cpu:0".into(),
        kind: "cpu".into(),
        memory_bytes: available / 2,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_cuda_specs_parse() {
        let d = parse_devices("cpu:2x64MiB").unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[1].id, "cpu:1");
        assert_eq!(d[1].memory_bytes, 64 << 20);
        let gpus = parse_devices("cuda:0,1").unwrap();
        assert_eq!(gpus[1].id, "cuda:1");
        assert_eq!(gpu_ordinal(&gpus[1]), Some(1));
        assert_eq!(gpu_ordinal(&d[1]), None);
        assert_eq!(parse_devices("cuda").unwrap()[0].id, "cuda:0");
        let capped = parse_devices("cuda:0,1@2GiB").unwrap();
        assert!(capped.iter().all(|d| d.memory_bytes == 2 << 30));
        assert_eq!(
            parse_devices("cpu:1x1MB").unwrap()[0].memory_bytes,
            1_000_000
        );
        for bad in ["cpu", "cpu:0x1MiB", "cpu:2x1TB", "tpu:1", "cuda:a"] {
            assert!(parse_devices(bad).is_err(), "{bad}");
        }
        let stages = parse_devices("cuda:1x3@1GiB").unwrap();
        let ids: Vec<&str> = stages.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["cuda:1/stage0", "cuda:1/stage1", "cuda:1/stage2"]);
        assert!(stages.iter().all(|d| d.memory_bytes == 1 << 30));
        assert_eq!(gpu_ordinal(&stages[2]), Some(1));
        assert!(is_gpu_stage(&stages[2]) && !is_gpu_stage(&gpus[1]) && !is_gpu_stage(&d[0]));
    }

    #[test]
    fn only_cpu_devices_take_host_memory() {
        assert_eq!(
            cpu_device_bytes(&parse_devices("cpu:2x1GiB").unwrap()),
            2 << 30
        );
        assert_eq!(cpu_device_bytes(&parse_devices("cuda:0@40GiB").unwrap()), 0);
    }
}
