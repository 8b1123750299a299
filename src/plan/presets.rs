//! Named models and clusters, and the cluster description the search plans for.
//!
//! Cluster assumptions, stated once: `a100-80g-pp8-tp8` is 8 nodes of 8 A100-SXM4-80GB; a
//! tensor-parallel group of 8 is one node (NVLink), the 8 pipeline stages talk over one
//! 200 Gb/s HDR InfiniBand rail per GPU (25 GB/s, 5 µs); host link PCIe 4.0 x16, 25 GB/s each
//! way; 1 TiB of host memory per node (128 GiB per GPU); bf16 dense peak 312 TFLOP/s at an
//! assumed 50% model-FLOPs efficiency with tensor-parallel communication folded in; HBM2e
//! 2.0 TB/s. `h100-80g-pp8-tp8` is the same shape with H100-SXM5-80GB: 989 TFLOP/s at an
//! assumed 45%, HBM3 3.35 TB/s, 400 Gb/s NDR (50 GB/s), host link still 25 GB/s, 2 TiB per
//! node. Both keep 5% of device memory in reserve (allocator fragmentation, CUDA context,
//! communication libraries' buffers).

use serde::{Deserialize, Serialize};

use super::error::{PlanError, require_positive};
use super::hardware::Hardware;
use super::inventory::{ModelDims, Profile};

const GIB: u64 = 1 << 30;

/// Which implementation profile a cluster runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProfileName {
    CpuF32,
    /// What the CUDA backend allocates (`exec::backend::cuda`), f32 storage.
    CudaF32,
    /// What the CUDA backend allocates with bf16 activations.
    CudaBf16,
    MegatronBf16,
}

fn default_reserve() -> f64 {
    0.05
}
fn default_true() -> bool {
    true
}

/// A set of devices to plan for. JSON files use these field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    /// All devices (pipeline x tensor parallel x data parallel).
    pub devices: u32,
    pub tensor_parallel: u32,
    pub memory_bytes: u64,
    /// Fraction of `memory_bytes` never planned for.
    #[serde(default = "default_reserve")]
    pub reserve_fraction: f64,
    /// Host memory available to each device for offloaded groups.
    pub host_memory_bytes: u64,
    pub profile: ProfileName,
    #[serde(default = "default_true")]
    pub flash_attention: bool,
    pub peak_flops: f64,
    pub efficiency: f64,
    pub hbm_bytes_per_s: f64,
    /// Between pipeline stages (and for the data-parallel gradient all-reduce), per device.
    pub p2p_bytes_per_s: f64,
    pub p2p_latency_s: f64,
    pub host_bytes_per_s: f64,
}

impl Cluster {
    pub fn validate(&self) -> Result<(), PlanError> {
        require_positive("cluster.devices", self.devices as u64)?;
        require_positive("cluster.tensor_parallel", self.tensor_parallel as u64)?;
        require_positive("cluster.memory_bytes", self.memory_bytes)?;
        if !self.devices.is_multiple_of(self.tensor_parallel) {
            return Err(PlanError::invalid(
                "cluster.tensor_parallel",
                format!(
                    "{} does not divide the {} devices",
                    self.tensor_parallel, self.devices
                ),
            ));
        }
        let single_rank = self.profile != ProfileName::MegatronBf16;
        if single_rank && self.tensor_parallel != 1 {
            return Err(PlanError::invalid(
                "cluster.tensor_parallel",
                "the cpu-f32, cuda-f32 and cuda-bf16 profiles have no tensor parallelism; use 1",
            ));
        }
        if !(0.0..1.0).contains(&self.reserve_fraction) {
            return Err(PlanError::invalid(
                "cluster.reserve_fraction",
                "must be in [0, 1)",
            ));
        }
        if !(self.efficiency > 0.0 && self.efficiency <= 1.0) {
            return Err(PlanError::invalid(
                "cluster.efficiency",
                "must be in (0, 1]",
            ));
        }
        for (field, v) in [
            ("cluster.peak_flops", self.peak_flops),
            ("cluster.hbm_bytes_per_s", self.hbm_bytes_per_s),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(PlanError::invalid(field, "must be a positive number"));
            }
        }
        // Infinite link speeds stand for in-process hand-overs (CPU devices).
        for (field, v) in [
            ("cluster.p2p_bytes_per_s", self.p2p_bytes_per_s),
            ("cluster.host_bytes_per_s", self.host_bytes_per_s),
        ] {
            if v.is_nan() || v <= 0.0 {
                return Err(PlanError::invalid(field, "must be a positive number"));
            }
        }
        if !(self.p2p_latency_s >= 0.0 && self.p2p_latency_s.is_finite()) {
            return Err(PlanError::invalid(
                "cluster.p2p_latency_s",
                "must be zero or positive",
            ));
        }
        Ok(())
    }

    /// `devices` CPU devices of `memory_bytes` each, as the embedded executor runs them: its
    /// pools count every byte, so nothing is reserved. Sends, offloads and prefetches between
    /// CPU devices and the host hand a buffer over without copying it, so they take no time
    /// and free the sender's bytes at once, as the executor counts them. The compute speed is
    /// rough (one core's share of a 2-core machine); only memory has to be exact.
    pub fn cpu(devices: u32, memory_bytes: u64) -> Cluster {
        Cluster {
            name: format!("cpu-{devices}x{memory_bytes}"),
            devices,
            tensor_parallel: 1,
            memory_bytes,
            reserve_fraction: 0.0,
            host_memory_bytes: 4 * GIB,
            profile: ProfileName::CpuF32,
            flash_attention: true,
            peak_flops: 50e9,
            efficiency: 0.5,
            hbm_bytes_per_s: 20e9,
            p2p_bytes_per_s: f64::INFINITY,
            p2p_latency_s: 0.0,
            host_bytes_per_s: f64::INFINITY,
        }
    }

    /// `stages` pipeline stages of `memory_bytes` each on Hopper-class GPUs, as the CUDA
    /// engine runs them with `profile`'s layout (`cuda-f32` or `cuda-bf16`): pools count every
    /// byte the backend allocates, so nothing is reserved here (the run leaves its own reserve
    /// out of the budget); products at ~20% of the dense TF32 or bf16 peak (measured for TF32
    /// with the 125M model). The engine's sends between stages on one
    /// GPU hand the buffer over, and its pools count an offload's bytes as given back (and a
    /// prefetch's as taken) at the action, so transfers here are instant and the predicted
    /// peaks are the pools' to the byte. (The copies run on a copy stream; an offloaded
    /// buffer's device memory is freed when its copy ends, which the GPU's reserve absorbs.)
    pub fn cuda(stages: u32, memory_bytes: u64, profile: ProfileName) -> Cluster {
        let bf16 = profile == ProfileName::CudaBf16;
        Cluster {
            name: format!("cuda-{stages}x{memory_bytes}"),
            profile,
            host_memory_bytes: 64 * GIB,
            peak_flops: if bf16 { 989.4e12 } else { 494.7e12 },
            efficiency: 0.2,
            hbm_bytes_per_s: 3.35e12,
            ..Cluster::cpu(stages, memory_bytes)
        }
    }

    /// Usable bytes per device.
    pub fn budget_bytes(&self) -> u64 {
        (self.memory_bytes as f64 * (1.0 - self.reserve_fraction)) as u64
    }

    pub fn profile(&self) -> Profile {
        match self.profile {
            ProfileName::CpuF32 => Profile::CpuF32,
            ProfileName::CudaF32 => Profile::CudaF32,
            ProfileName::CudaBf16 => Profile::CudaBf16,
            ProfileName::MegatronBf16 => Profile::MegatronBf16 {
                tensor_parallel: self.tensor_parallel as usize,
                flash_attention: self.flash_attention,
            },
        }
    }

    pub fn hardware(&self) -> Hardware {
        Hardware {
            peak_flops: self.peak_flops,
            efficiency: self.efficiency,
            hbm_bytes_per_s: self.hbm_bytes_per_s,
            p2p_bytes_per_s: self.p2p_bytes_per_s,
            p2p_latency_s: self.p2p_latency_s,
            host_bytes_per_s: self.host_bytes_per_s,
        }
    }
}

pub const MODEL_NAMES: &[&str] = &["llama2-70b", "llama2-7b", "tiny"];
pub const CLUSTER_NAMES: &[&str] = &[
    "a100-80g-pp8-tp8",
    "h100-80g-pp8-tp8",
    "h100-80g-x8",
    "cpu-4x1g",
];

/// A model preset by name.
pub fn model(name: &str) -> Option<ModelDims> {
    Some(match name {
        "llama2-70b" => ModelDims {
            hidden: 8192,
            layers: 80,
            heads: 64,
            kv_heads: 8,
            ffn: 28672,
            vocab: 32000,
            qkv_bias: false,
            tied_embeddings: false,
        },
        "llama2-7b" => ModelDims {
            hidden: 4096,
            layers: 32,
            heads: 32,
            kv_heads: 32,
            ffn: 11008,
            vocab: 32000,
            qkv_bias: false,
            tied_embeddings: false,
        },
        // The size the CPU executor trains in tests.
        "tiny" => ModelDims {
            hidden: 64,
            layers: 8,
            heads: 4,
            kv_heads: 2,
            ffn: 172,
            vocab: 256,
            qkv_bias: false,
            tied_embeddings: false,
        },
        _ => return None,
    })
}

/// A cluster preset by name.
pub fn cluster(name: &str) -> Option<Cluster> {
    let gpu = |name: &str, peak, eff, hbm, p2p, host_mem| Cluster {
        name: name.to_string(),
        devices: 64,
        tensor_parallel: 8,
        memory_bytes: 80 * GIB,
        reserve_fraction: 0.05,
        host_memory_bytes: host_mem,
        profile: ProfileName::MegatronBf16,
        flash_attention: true,
        peak_flops: peak,
        efficiency: eff,
        hbm_bytes_per_s: hbm,
        p2p_bytes_per_s: p2p,
        p2p_latency_s: 5e-6,
        host_bytes_per_s: 25e9,
    };
    Some(match name {
        "a100-80g-pp8-tp8" => gpu(name, 312e12, 0.5, 2.0e12, 25e9, 128 * GIB),
        "h100-80g-pp8-tp8" => gpu(name, 989e12, 0.45, 3.35e12, 50e9, 256 * GIB),
        // Eight H100-SXM5-80GB in one node, each a pipeline stage or a replica, with the
        // CUDA backend's bf16 layout: NVLink 4 taken at 300 GB/s of its 450 per direction,
        // 10 µs; PCIe 5.0 host link taken at 25 GB/s; 128 GiB of host memory per GPU; 5%
        // kept in reserve; products at the measured ~20% of the bf16 peak (`Cluster::cuda`).
        "h100-80g-x8" => Cluster {
            name: name.to_string(),
            reserve_fraction: 0.05,
            host_memory_bytes: 128 * GIB,
            p2p_bytes_per_s: 300e9,
            p2p_latency_s: 10e-6,
            host_bytes_per_s: 25e9,
            ..Cluster::cuda(8, 80 * GIB, ProfileName::CudaBf16)
        },
        // Four CPU devices of 1 GiB, as the embedded executor runs them.
        "cpu-4x1g" => Cluster {
            name: name.to_string(),
            ..Cluster::cpu(4, GIB)
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for n in CLUSTER_NAMES {
            cluster(n).unwrap().validate().unwrap();
        }
        for n in MODEL_NAMES {
            let m = model(n).unwrap();
            crate::plan::cost::validate(
                Profile::CpuF32,
                &m,
                crate::plan::inventory::MicroShape { batch: 1, seq: 8 },
            )
            .unwrap();
        }
    }

    #[test]
    fn bad_clusters_name_the_field() {
        let mut c = cluster("a100-80g-pp8-tp8").unwrap();
        c.tensor_parallel = 3;
        assert_eq!(
            c.validate().unwrap_err().field(),
            Some("cluster.tensor_parallel")
        );
        let mut c = cluster("a100-80g-pp8-tp8").unwrap();
        c.memory_bytes = 0;
        assert_eq!(
            c.validate().unwrap_err().field(),
            Some("cluster.memory_bytes")
        );
        let mut c = cluster("a100-80g-pp8-tp8").unwrap();
        c.host_bytes_per_s = f64::NAN;
        assert_eq!(
            c.validate().unwrap_err().field(),
            Some("cluster.host_bytes_per_s")
        );
    }

    #[test]
    fn cuda_clusters_plan_with_the_cuda_inventories_and_one_rank() {
        let json = r#"{"name": "h200-1", "devices": 1, "tensor_parallel": 1,
            "memory_bytes": 150000000000, "host_memory_bytes": 0, "profile": "cuda-f32",
            "peak_flops": 4.9e14, "efficiency": 0.3, "hbm_bytes_per_s": 4.8e12,
            "p2p_bytes_per_s": 1e11, "p2p_latency_s": 1e-5, "host_bytes_per_s": 2.5e10}"#;
        let mut c: Cluster = serde_json::from_str(json).unwrap();
        c.validate().unwrap();
        assert_eq!(c.profile(), Profile::CudaF32);
        let bf16: Cluster =
            serde_json::from_str(&json.replace("\"cuda-f32\"", "\"cuda-bf16\"")).unwrap();
        bf16.validate().unwrap();
        assert_eq!(bf16.profile(), Profile::CudaBf16);
        c.tensor_parallel = 2;
        c.devices = 2;
        assert_eq!(
            c.validate().unwrap_err().field(),
            Some("cluster.tensor_parallel")
        );
    }
}
