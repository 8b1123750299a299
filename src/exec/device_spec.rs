//! The one syntax that names devices, shared by `chronospipe train --devices`, a job's
//! `devices` field and `chronospipe serve --devices`:
//!
//! - `cpu:NxSIZE`: N CPU devices with SIZE bytes of "HBM" each (SIZE: bytes with an optional
//!   `KiB`, `MiB`, `GiB`, `KB`, `MB` or `GB`);
//! - `cuda` (GPU 0) or `cuda:N`: one GPU;
//! - `cuda:I,J,...`: one stage on each of several GPUs;
//! - `cuda:NxK`: K stages sharing GPU N;
//! - any of the GPU forms followed by `@SIZE` (`cuda:1@40GiB`): the most memory each stage
//!   may use (otherwise: the GPU's free memory less a reserve).
//!
//! Parsing says only what was asked for; `DeviceSpec::placement` says what this build runs
//! on it.

use std::fmt;

use crate::exec::device::{DeviceError, DeviceSet, parse_size};

/// Parsed `devices` text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu {
        count: usize,
        budget_bytes: usize,
    },
    Cuda {
        gpus: Vec<usize>,
        stages_per_gpu: usize,
        /// The most bytes each stage may use; `None`: what the GPU has free, less a reserve.
        cap_bytes: Option<usize>,
    },
}

/// Where this build runs a job on the devices named.
#[derive(Debug)]
pub enum Target {
    /// The pipeline runtime on CPU device pools.
    CpuPipeline(DeviceSet),
    /// The whole model on GPU `ordinal` (`cuda`, `cuda:N`), within `cap_bytes` if given.
    WholeModelGpu {
        ordinal: usize,
        cap_bytes: Option<usize>,
    },
    /// The pipeline runtime with one stage per entry of `stage_gpus` (a GPU ordinal, repeated
    /// for stages that share it), each within `cap_bytes` if given.
    GpuPipeline {
        stage_gpus: Vec<usize>,
        cap_bytes: Option<usize>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "device spec {spec:?}: {reason}; expected `cpu:NxSIZE` (e.g. `cpu:4x256MiB`), `cuda`, \
     `cuda:N`, `cuda:0,1` or `cuda:0x4`, GPUs with an optional `@SIZE` cap"
)]
pub struct DeviceSpecError {
    pub spec: String,
    pub reason: String,
}

impl DeviceSpec {
    pub fn parse(text: &str) -> Result<DeviceSpec, DeviceSpecError> {
        let bad = |reason: &str| DeviceSpecError {
            spec: text.to_owned(),
            reason: reason.to_owned(),
        };
        let count = |t: &str, what: &str| -> Result<usize, DeviceSpecError> {
            t.trim()
                .parse()
                .map_err(|_| bad(&format!("the {what} is not a whole number")))
        };
        let (trimmed, cap) = match text.trim().split_once('@') {
            Some((devices, cap)) => (devices.trim(), Some(cap.trim())),
            None => (text.trim(), None),
        };
        let cap_bytes = match cap {
            Some(_) if trimmed.starts_with("cpu") => {
                return Err(bad(
                    "a cap (`@SIZE`) is for GPUs; CPU devices give their size",
                ));
            }
            Some(c) => match parse_size(c) {
                Some(0) => return Err(bad("the cap must be more than 0 bytes")),
                Some(bytes) => Some(bytes),
                None => return Err(bad("the cap is not like `40GiB`")),
            },
            None => None,
        };
        let (kind, rest) = match trimmed.split_once(':') {
            Some((kind, rest)) => (kind.trim(), Some(rest.trim())),
            None => (trimmed, None),
        };
        match (kind, rest) {
            ("cpu", Some(rest)) => {
                let (n, size) = rest
                    .split_once(['x', 'X'])
                    .ok_or_else(|| bad("missing `x` between the device count and the size"))?;
                let n = count(n, "device count")?;
                if n == 0 {
                    return Err(bad("the device count must be at least 1"));
                }
                let budget_bytes =
                    parse_size(size.trim()).ok_or_else(|| bad("the size is not like `256MiB`"))?;
                Ok(DeviceSpec::Cpu {
                    count: n,
                    budget_bytes,
                })
            }
            ("cpu", None) => Err(bad("CPU devices need a count and a size")),
            ("cuda", None) => Ok(DeviceSpec::Cuda {
                gpus: vec![0],
                stages_per_gpu: 1,
                cap_bytes,
            }),
            ("cuda", Some(rest)) => {
                if let Some((gpu, stages)) = rest.split_once(['x', 'X']) {
                    let stages_per_gpu = count(stages, "stage count")?;
                    if stages_per_gpu == 0 {
                        return Err(bad("the stage count must be at least 1"));
                    }
                    return Ok(DeviceSpec::Cuda {
                        gpus: vec![count(gpu, "GPU index")?],
                        stages_per_gpu,
                        cap_bytes,
                    });
                }
                // A GPU named again holds another stage (in one process, as `cuda:0x2` does;
                // over ranks, each entry is a GPU of its own rank's machine).
                let gpus = rest
                    .split(',')
                    .map(|g| count(g, "GPU index"))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(DeviceSpec::Cuda {
                    gpus,
                    stages_per_gpu: 1,
                    cap_bytes,
                })
            }
            _ => Err(bad("unknown device kind (`cpu` or `cuda`)")),
        }
    }

    /// What runs on these devices: the pipeline on CPU pools, the whole model on one GPU
    /// (`cuda`, `cuda:N`), or the pipeline on GPU stages (`cuda:0,1`, `cuda:0x4`).
    pub fn target(&self) -> Target {
        match self {
            DeviceSpec::Cpu {
                count,
                budget_bytes,
            } => Target::CpuPipeline(DeviceSet::cpu(*count, *budget_bytes)),
            DeviceSpec::Cuda {
                gpus,
                stages_per_gpu: 1,
                cap_bytes,
            } if gpus.len() == 1 => Target::WholeModelGpu {
                ordinal: gpus[0],
                cap_bytes: *cap_bytes,
            },
            DeviceSpec::Cuda {
                gpus,
                stages_per_gpu,
                cap_bytes,
            } => Target::GpuPipeline {
                stage_gpus: gpus
                    .iter()
                    .flat_map(|&g| std::iter::repeat_n(g, *stages_per_gpu))
                    .collect(),
                cap_bytes: *cap_bytes,
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu {
                count,
                budget_bytes,
            } => write!(f, "cpu:{count}x{budget_bytes}"),
            DeviceSpec::Cuda {
                gpus,
                stages_per_gpu,
                cap_bytes,
            } => {
                if *stages_per_gpu > 1 {
                    write!(f, "cuda:{}x{stages_per_gpu}", gpus[0])?;
                } else {
                    let list: Vec<String> = gpus.iter().map(ToString::to_string).collect();
                    write!(f, "cuda:{}", list.join(","))?;
                }
                match cap_bytes {
                    Some(cap) => write!(f, "@{cap}"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl DeviceSet {
    /// Parses `cpu:NxSIZE` (the syntax of `device_spec`; GPUs are refused here: a run opens
    /// a GPU itself).
    pub fn parse(spec: &str) -> Result<DeviceSet, DeviceError> {
        let bad = |reason: String| DeviceError::BadDeviceSpec {
            spec: spec.to_string(),
            reason,
        };
        match DeviceSpec::parse(spec).map_err(|e| bad(e.reason))? {
            DeviceSpec::Cpu {
                count,
                budget_bytes,
            } => Ok(DeviceSet::cpu(count, budget_bytes)),
            DeviceSpec::Cuda { .. } => Err(bad(
                "CPU device sets only: a run opens a GPU itself (`cuda` or `cuda:N`)".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_sets() {
        let set = DeviceSet::parse("cpu:4x256MiB").unwrap();
        assert_eq!(set.devices.len(), 4);
        assert_eq!(set.devices[3].budget(), 256 << 20);
        assert_eq!(set.devices[3].name(), "cpu:3");
        assert_eq!(parse_size("1GB"), Some(1_000_000_000));
        for bad in [
            "gpu:1x1GiB",
            "cpu:0x1MiB",
            "cpu:4",
            "cpu:ax1MiB",
            "cpu:2x12PiB",
        ] {
            let err = DeviceSet::parse(bad).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    fn cuda(gpus: &[usize], stages_per_gpu: usize) -> DeviceSpec {
        DeviceSpec::Cuda {
            gpus: gpus.to_vec(),
            stages_per_gpu,
            cap_bytes: None,
        }
    }

    fn capped(gpus: &[usize], stages_per_gpu: usize, cap: usize) -> DeviceSpec {
        DeviceSpec::Cuda {
            gpus: gpus.to_vec(),
            stages_per_gpu,
            cap_bytes: Some(cap),
        }
    }

    #[test]
    fn every_form_parses_and_prints_back() {
        let cases = [
            (
                "cpu:4x256MiB",
                DeviceSpec::Cpu {
                    count: 4,
                    budget_bytes: 256 << 20,
                },
            ),
            (
                " cpu:2X1MB ",
                DeviceSpec::Cpu {
                    count: 2,
                    budget_bytes: 1_000_000,
                },
            ),
            ("cuda", cuda(&[0], 1)),
            ("cuda:3", cuda(&[3], 1)),
            ("cuda:0, 1", cuda(&[0, 1], 1)),
            ("cuda:0x4", cuda(&[0], 4)),
            ("cuda@1GiB", capped(&[0], 1, 1 << 30)),
            ("cuda:1 @ 40GB", capped(&[1], 1, 40_000_000_000)),
            ("cuda:0,1@2MiB", capped(&[0, 1], 1, 2 << 20)),
            ("cuda:0x4@20GiB", capped(&[0], 4, 20 << 30)),
        ];
        for (text, want) in cases {
            let got = DeviceSpec::parse(text).unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(DeviceSpec::parse(&got.to_string()).unwrap(), want);
        }
    }

    #[test]
    fn bad_specs_name_the_text_and_the_reason() {
        for (text, reason) in [
            ("cpu", "need a count and a size"),
            ("cpu:4", "missing `x`"),
            ("cpu:0x1MiB", "at least 1"),
            ("cpu:ax1MiB", "device count"),
            ("cpu:2x12PiB", "256MiB"),
            ("cuda:a", "GPU index"),
            ("cuda:0x0", "at least 1"),
            ("tpu:1", "unknown device kind"),
            ("cuda@lots", "the cap is not like"),
            ("cuda:1@0MiB", "more than 0 bytes"),
            ("cpu:2x1MiB@1GiB", "a cap (`@SIZE`) is for GPUs"),
        ] {
            let err = DeviceSpec::parse(text).unwrap_err().to_string();
            assert!(err.contains(text) && err.contains(reason), "{text}: {err}");
        }
    }

    #[test]
    fn cpu_pools_one_gpu_or_gpu_stages() {
        let target = |t: &str| DeviceSpec::parse(t).unwrap().target();
        let gpu = |ordinal, cap_bytes| Target::WholeModelGpu { ordinal, cap_bytes };
        let stages = |stage_gpus: &[usize], cap_bytes| Target::GpuPipeline {
            stage_gpus: stage_gpus.to_vec(),
            cap_bytes,
        };
        for (text, want) in [
            ("cuda", gpu(0, None)),
            ("cuda:2", gpu(2, None)),
            ("cuda:2@1MiB", gpu(2, Some(1 << 20))),
            ("cuda:0,1", stages(&[0, 1], None)),
            ("cuda:1x3@2GiB", stages(&[1, 1, 1], Some(2 << 30))),
            // A GPU named again holds another stage: over ranks, a GPU of another machine.
            ("cuda:0,1,0,1@1GiB", stages(&[0, 1, 0, 1], Some(1 << 30))),
        ] {
            let got = target(text);
            assert_eq!(format!("{got:?}"), format!("{want:?}"), "{text}");
        }
        let Target::CpuPipeline(set) = target("cpu:2x1MiB") else {
            panic!("CPU devices are the pipeline's");
        };
        assert_eq!(set.devices.len(), 2);
        assert_eq!(set.devices[1].name(), "cpu:1");
        assert_eq!(set.devices[1].budget(), 1 << 20);
    }
}
