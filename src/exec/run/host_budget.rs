//! The host pool as a budget. A run's parts start in the host pool (f32, from their seed or a
//! checkpoint) before they move to their devices, and what a plan offloads lives there between
//! uses. With a bounded pool (`--host-memory`), each of the run's devices plans its offloads
//! within an equal share of it, and a job that cannot fit is refused by the field to change.

use super::RunError;
use crate::plan::PlanError;
use crate::plan::inventory::{MicroShape, ModelDims, Part, Profile, total_bytes};
use crate::plan::presets::Cluster;
use crate::plan::search::{Answer, Request, search};

/// The model's parameters in f32: what the host pool holds when a run starts.
pub fn starting_weight_bytes(dims: &ModelDims) -> u64 {
    let micro = MicroShape { batch: 1, seq: 1 };
    let params = |part| total_bytes(&Profile::CpuF32.part(dims, micro, part).params) as u64;
    params(Part::Embedding) + dims.layers as u64 * params(Part::Layer) + params(Part::Head)
}

/// Searches `request` on `cluster` with each device's offloads within its share of a host
/// pool of `host_bytes` (`usize::MAX`: unbounded, the cluster's own figure stands).
pub(super) fn search_within_host(
    request: &Request,
    cluster: &mut Cluster,
    host_bytes: usize,
) -> Result<Answer, RunError> {
    if host_bytes == usize::MAX {
        return Ok(search(request, cluster)?);
    }
    let have_bytes = host_bytes as u64;
    let weights = starting_weight_bytes(&request.model);
    if weights > have_bytes {
        return Err(RunError::HostMemory {
            what: "the model's starting weights",
            param: "model",
            need_bytes: weights,
            have_bytes,
        });
    }
    cluster.host_memory_bytes = have_bytes / u64::from(cluster.devices.max(1));
    match search(request, cluster) {
        Err(PlanError::DoesNotFit { .. }) if offloads_would_fit(request, cluster).is_some() => {
            Err(RunError::HostMemory {
                what: "the plan's offloaded tensors",
                param: "parallelism.offload",
                need_bytes: offloads_would_fit(request, cluster).unwrap_or(0),
                have_bytes,
            })
        }
        other => Ok(other?),
    }
}

/// The host bytes the plan would offload in all if the host pool were unbounded, when with
/// it some plan fits the devices (so the host is what was short).
fn offloads_would_fit(request: &Request, cluster: &Cluster) -> Option<u64> {
    let unbounded = Cluster {
        host_memory_bytes: u64::MAX,
        ..cluster.clone()
    };
    let answer = search(request, &unbounded).ok()?;
    let per_replica: u64 = answer.sim.devices.iter().map(|d| d.host_peak_bytes).sum();
    let replicas = cluster.devices as usize / answer.sim.devices.len().max(1);
    Some(per_replica * replicas as u64)
}
