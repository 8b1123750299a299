//! The kind of devices a job planned over the cluster runs on, and how its layout names them.
//! A gang is CPU devices or GPUs, never both (every rank plans the same job on the same
//! devices): GPUs when every live worker's devices are GPUs, else the CPU devices alone (in a
//! cluster of both, the GPUs run the jobs that fit one worker). CPU devices are named by count
//! and size (`cpu:4x64MiB`); GPUs by each run-wide device's ordinal on its own worker and one
//! cap every rank plans with (`cuda:0,1,0,1@40GiB`: four devices, two on each of two workers).
//! The cap is the least memory among the placed GPUs as their workers registered it, which is
//! already what a run may take of each: its free memory less the reserve a run leaves
//! (`jobs::devices::with_gpu_memory`), or the operator's smaller cap.

use crate::exec::run::DeviceKind;
use crate::jobs::devices::{DeviceInfo, gpu_ordinal};
use crate::plan::inventory::Profile;
use crate::plan::machines::Collectives;
use crate::plan::presets::ProfileName;
use crate::spec::PrecisionSpec;
use crate::store::ClusterDeviceRow;

/// CPU devices or GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GangKind {
    Cpu,
    Cuda,
}

impl GangKind {
    /// The kind a job is planned on over `devices` (every live worker's): GPUs when every
    /// one is a GPU, else CPU devices.
    pub fn of_cluster(devices: &[ClusterDeviceRow]) -> GangKind {
        match !devices.is_empty() && devices.iter().all(|d| d.kind == "cuda") {
            true => GangKind::Cuda,
            false => GangKind::Cpu,
        }
    }

    /// Whether a gang of this kind may hold `device` (a GPU's id names its ordinal).
    pub fn takes(self, device: &ClusterDeviceRow) -> bool {
        match self {
            GangKind::Cpu => device.kind == "cpu",
            GangKind::Cuda => ordinal(device).is_some(),
        }
    }

    /// How the gang's replicas exchange their reductions and gatherings: CPU ranks over TCP,
    /// GPUs (each replica of a stage on its own GPU, as a gang's are unless a worker
    /// registered stages sharing one) through NCCL's ring.
    pub fn collectives(self) -> Collectives {
        match self {
            GangKind::Cpu => Collectives::AllToAll,
            GangKind::Cuda => Collectives::Ring,
        }
    }

    /// `CPU devices` or `GPUs`.
    pub fn plural(self) -> &'static str {
        match self {
            GangKind::Cpu => "CPU devices",
            GangKind::Cuda => "GPUs",
        }
    }

    /// The layout's devices for run-wide device `d` on `slots[d]`, each taken at `bytes`.
    pub fn devices(self, slots: &[&ClusterDeviceRow], bytes: i64) -> String {
        match self {
            GangKind::Cpu => cpu_devices(slots.len(), bytes),
            GangKind::Cuda => cuda_devices(&ordinals(slots), bytes),
        }
    }

    /// The devices `devices(slots, bytes)` names, as the planner takes them.
    pub fn infos(self, slots: &[&ClusterDeviceRow], bytes: i64) -> Vec<DeviceInfo> {
        let info = |id: String, kind: &str| DeviceInfo {
            id,
            kind: kind.into(),
            memory_bytes: bytes.max(0) as u64,
        };
        match self {
            GangKind::Cpu => (0..slots.len())
                .map(|i| info(format!("cpu:{i}"), "cpu"))
                .collect(),
            GangKind::Cuda => (ordinals(slots).into_iter())
                .map(|o| info(format!("cuda:{o}"), "cuda"))
                .collect(),
        }
    }

    /// The memory layout a plan on these devices is made with at `precision` (the one its
    /// backend allocates), which also says the bytes of what its ranks send each other.
    /// `None` where the devices do not run that precision (bf16 on CPU devices).
    pub fn profile(self, precision: PrecisionSpec) -> Option<Profile> {
        let kind = match self {
            GangKind::Cpu => DeviceKind::Cpu,
            GangKind::Cuda => DeviceKind::Cuda,
        };
        match kind.profile(precision).ok()? {
            ProfileName::CpuF32 => Some(Profile::CpuF32),
            ProfileName::CudaF32 => Some(Profile::CudaF32),
            ProfileName::CudaBf16 => Some(Profile::CudaBf16),
            ProfileName::MegatronBf16 => None,
        }
    }
}

/// The GPU ordinal a registered `cuda:N` (or `cuda:N/stageS`) device names on its worker.
fn ordinal(device: &ClusterDeviceRow) -> Option<usize> {
    gpu_ordinal(&DeviceInfo {
        id: device.device_id.clone(),
        kind: device.kind.clone(),
        memory_bytes: 0,
    })
}

fn ordinals(slots: &[&ClusterDeviceRow]) -> Vec<usize> {
    slots.iter().filter_map(|d| ordinal(d)).collect()
}

/// `cpu:NxSIZE` for `count` CPU devices of `bytes` each.
pub fn cpu_devices(count: usize, bytes: i64) -> String {
    let bytes = bytes.max(0);
    match bytes % (1 << 20) {
        0 => format!("cpu:{count}x{}MiB", bytes >> 20),
        _ => format!("cpu:{count}x{bytes}"),
    }
}

/// `cuda:I,J,...@CAP`: run-wide device `d` on GPU `ordinals[d]` of its own worker, every one
/// planned within `cap` bytes (in GiB or MiB where whole, else bytes: `parse_size`'s syntax).
pub fn cuda_devices(ordinals: &[usize], cap: i64) -> String {
    let list: Vec<String> = ordinals.iter().map(usize::to_string).collect();
    let cap = cap.max(0);
    let size = match (cap % (1 << 30), cap % (1 << 20)) {
        (0, _) if cap > 0 => format!("{}GiB", cap >> 30),
        (_, 0) if cap > 0 => format!("{}MiB", cap >> 20),
        _ => cap.to_string(),
    };
    format!("cuda:{}@{size}", list.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::device::parse_size;

    fn registered(worker: &str, id: &str, kind: &str) -> ClusterDeviceRow {
        ClusterDeviceRow {
            worker_id: worker.into(),
            host: worker.into(),
            host_memory_bytes: None,
            device_id: id.into(),
            kind: kind.into(),
            memory_bytes: 40 << 30,
            job_id: None,
            attempt: None,
            rank: None,
        }
    }

    #[test]
    fn cuda_devices_name_each_ordinal_and_one_cap() {
        assert_eq!(cuda_devices(&[0, 1, 0, 1], 40 << 30), "cuda:0,1,0,1@40GiB");
        assert_eq!(cuda_devices(&[3], 1536 << 20), "cuda:3@1536MiB");
        assert_eq!(cuda_devices(&[2, 0], 1000), "cuda:2,0@1000");
        assert_eq!(cuda_devices(&[0], 0), "cuda:0@0");
        for (cap, text) in [
            (40_i64 << 30, "40GiB"),
            (1536 << 20, "1536MiB"),
            (1000, "1000"),
        ] {
            assert_eq!(parse_size(text), Some(cap as usize), "{text}");
        }
        assert_eq!(cpu_devices(3, 64 << 20), "cpu:3x64MiB");
        assert_eq!(cpu_devices(3, 100), "cpu:3x100");
    }

    #[test]
    fn gpus_are_named_by_their_ordinal_on_their_own_worker() {
        let gpus = [
            registered("a", "cuda:3", "cuda"),
            registered("b", "cuda:0/stage1", "cuda"),
            registered("b", "cuda:1", "cuda"),
        ];
        let slots: Vec<&ClusterDeviceRow> = gpus.iter().collect();
        assert_eq!(GangKind::Cuda.devices(&slots, 40 << 30), "cuda:3,0,1@40GiB");
        let infos = GangKind::Cuda.infos(&slots, 40 << 30);
        let ids: Vec<&str> = infos.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["cuda:3", "cuda:0", "cuda:1"]);
        assert!(
            infos
                .iter()
                .all(|d| d.kind == "cuda" && d.memory_bytes == 40 << 30)
        );
        assert!(!GangKind::Cuda.takes(&registered("a", "cuda:x", "cuda")));
        assert!(!GangKind::Cuda.takes(&registered("a", "cpu:0", "cpu")));
        assert!(!GangKind::Cpu.takes(&gpus[0]));
    }

    #[test]
    fn cpu_infos_are_what_the_layout_parses_to() {
        let cpus = [
            registered("a", "cpu:0", "cpu"),
            registered("b", "cpu:0", "cpu"),
        ];
        let slots: Vec<&ClusterDeviceRow> = cpus.iter().collect();
        let text = GangKind::Cpu.devices(&slots, 64 << 20);
        assert_eq!(text, "cpu:2x64MiB");
        let parsed = crate::jobs::devices::parse_devices(&text).unwrap();
        assert_eq!(GangKind::Cpu.infos(&slots, 64 << 20), parsed);
    }

    #[test]
    fn a_cluster_is_gpus_only_when_every_device_is_one() {
        let gpu = registered("a", "cuda:0", "cuda");
        let cpu = registered("b", "cpu:0", "cpu");
        assert_eq!(
            GangKind::of_cluster(&[gpu.clone(), gpu.clone()]),
            GangKind::Cuda
        );
        assert_eq!(GangKind::of_cluster(&[gpu, cpu.clone()]), GangKind::Cpu);
        assert_eq!(GangKind::of_cluster(&[cpu]), GangKind::Cpu);
        assert_eq!(GangKind::of_cluster(&[]), GangKind::Cpu);
    }

    #[test]
    fn the_profile_follows_the_devices_and_the_precision() {
        let cuda = GangKind::Cuda;
        assert_eq!(cuda.profile(PrecisionSpec::F32), Some(Profile::CudaF32));
        assert_eq!(cuda.profile(PrecisionSpec::Bf16), Some(Profile::CudaBf16));
        assert_eq!(
            GangKind::Cpu.profile(PrecisionSpec::F32),
            Some(Profile::CpuF32)
        );
        assert_eq!(GangKind::Cpu.profile(PrecisionSpec::Bf16), None);
    }
}
