//! The devices a worker trains on, as the service shows them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeviceInfo {
    /// e.g. `cpu:0`, `cuda:1`.
    pub id: String,
    /// `cpu` or `cuda`.
    pub kind: String,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device spec {spec:?}: {reason}; expected e.g. cpu:4x256MiB or cuda:0,1")]
pub struct DeviceSpecError {
    pub spec: String,
    pub reason: String,
}

/// `cpu:NxSIZE` (SIZE in B, KiB, MiB, GiB, KB, MB or GB) or `cuda:I,J,...` (memory unknown here: 0).
pub fn parse_devices(spec: &str) -> Result<Vec<DeviceInfo>, DeviceSpecError> {
    let err = |reason: &str| DeviceSpecError {
        spec: spec.to_owned(),
        reason: reason.to_owned(),
    };
    let (kind, rest) = spec.split_once(':').ok_or_else(|| err("missing ':'"))?;
    match kind {
        "cpu" => {
            let (count, size) = rest.split_once('x').ok_or_else(|| err("missing 'x'"))?;
            let count: usize = count.parse().map_err(|_| err("bad device count"))?;
            let memory_bytes = parse_size(size).ok_or_else(|| err("bad memory size"))?;
            if count == 0 {
                return Err(err("needs at least one device"));
            }
            Ok((0..count)
                .map(|i| DeviceInfo {
                    id: format!("cpu:{i}"),
                    kind: "cpu".into(),
                    memory_bytes,
                })
                .collect())
        }
        "cuda" => rest
            .split(',')
            .map(|i| {
                let index: usize = i.trim().parse().map_err(|_| err("bad CUDA index"))?;
                Ok(DeviceInfo {
                    id: format!("cuda:{index}"),
                    kind: "cuda".into(),
                    memory_bytes: 0,
                })
            })
            .collect(),
        _ => Err(err("unknown device kind")),
    }
}

/// The executor's size syntax, so `--devices` and a job's `devices` accept the same units.
fn parse_size(text: &str) -> Option<u64> {
    crate::exec::device::parse_size(text).map(|b| b as u64)
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
        assert_eq!(parse_devices("cuda:0,1").unwrap()[1].id, "cuda:1");
        assert_eq!(
            parse_devices("cpu:1x1MB").unwrap()[0].memory_bytes,
            1_000_000
        );
        for bad in ["cpu", "cpu:0x1MiB", "cpu:2x1TB", "tpu:1", "cuda:a"] {
            assert!(parse_devices(bad).is_err(), "{bad}");
        }
    }
}
