//! The devices a worker trains on, as the service shows them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::exec::device_spec::DeviceSpec;
pub use crate::exec::device_spec::DeviceSpecError;
use crate::exec::run::{RunError, gpu_budget};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeviceInfo {
    /// e.g. `cpu:0`, `cuda:1`.
    pub id: String,
    /// `cpu` or `cuda`.
    pub kind: String,
    pub memory_bytes: u64,
}

/// The service's devices from `devices` text (`exec::device_spec`'s syntax): `cpu:NxSIZE`,
/// or GPUs (`cuda`, `cuda:N`, `cuda:I,J,...`, optionally `@SIZE`), each running whole-model
/// jobs; a GPU's memory is its cap, else unknown here (0) until `with_gpu_memory` measures
/// it. `cuda:NxK` (several stages on one GPU) is refused: the service does not run pipeline
/// stages on GPUs yet (the CLI's `train` does).
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
            stages_per_gpu: 1,
            cap_bytes,
        } => Ok(gpus
            .iter()
            .map(|g| info(format!("cuda:{g}"), "cuda", cap_bytes.unwrap_or(0) as u64))
            .collect()),
        DeviceSpec::Cuda { .. } => Err(DeviceSpecError {
            spec: spec.to_owned(),
            reason: "the service runs one whole-model job on each GPU it names (`cuda:0,1`); \
                     pipeline stages on GPUs run from the command line for now (`chronospipe \
                     train --devices cuda:0x4`)"
                .into(),
        }),
    }
}

/// The GPU ordinal of a `cuda:N` device, `None` for other kinds.
pub fn gpu_ordinal(device: &DeviceInfo) -> Option<usize> {
    match DeviceSpec::parse(&device.id).ok()? {
        DeviceSpec::Cuda { gpus, .. } if device.kind == "cuda" => gpus.first().copied(),
        _ => None,
    }
}

/// Fills in each GPU's memory: what a job may use of it (free memory less a reserve), or its
/// cap, which must not be more. Opens every GPU, so a machine without a driver or without that
/// GPU says so here, at start.
pub fn with_gpu_memory(devices: Vec<DeviceInfo>) -> Result<Vec<DeviceInfo>, RunError> {
    devices
        .into_iter()
        .map(|mut d| {
            if let Some(ordinal) = gpu_ordinal(&d) {
                let cap = d.memory_bytes;
                d.memory_bytes = gpu_budget(ordinal, None)? as u64;
                if cap > d.memory_bytes {
                    return Err(RunError::Devices(DeviceSpecError {
                        spec: format!("{}@{cap}", d.id),
                        reason: format!(
                            "the cap is more than the {} bytes this GPU has free (less a \
                             reserve)",
                            d.memory_bytes
                        ),
                    }));
                }
                if cap > 0 {
                    d.memory_bytes = cap;
                }
            }
            Ok(d)
        })
        .collect()
}

/// Without `--devices`: one CPU device with half the available memory.
pub fn default_devices() -> Vec<DeviceInfo> {
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(1 << 30);
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
        let err = parse_devices("cuda:0x4").unwrap_err().to_string();
        assert!(err.contains("one whole-model job on each GPU"), "{err}");
    }
}
