//! A job that names no `devices`, planned over the cluster when it is reserved across workers:
//! over every free CPU device of the live workers (whole machines first), the planner picks the
//! degrees (within what the job's `parallelism` allows), then the plan's devices go on the
//! machines (workers' hosts: devices on one machine talk for free) so that the pairs that talk
//! most (pipeline neighbours, or a stage's replicas) share a machine (`plan::machines`, each
//! pair of machines costed by its link: `plan::network`). The attempt keeps the layout its
//! ranks plan on (`GangLayout`), so every rank runs the same plan. A requeued job is planned
//! again on what is free then: a checkpoint is plan-independent, so it resumes on more or
//! fewer devices than before.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::devices::{DeviceInfo, parse_devices};
use super::planner::{PlanOutcome, Planner};
use super::resolve::resolve_files;
use crate::exec::run::{as_ranks_run, resolve_arch};
use crate::plan::Plan;
use crate::plan::inventory::Profile;
use crate::plan::machines::{place, traffic};
use crate::plan::network::NetworkFigures;
use crate::plan::tensors::MicroShape;
use crate::spec::{DataParallel, JobSpec, Stages};
use crate::store::{ClusterDeviceRow, JobRow, PlanRow, RankPlacement, Store};

/// Bytes of one tensor element on the CPU devices jobs spanning workers run on (f32).
const CPU_ELEMENT_BYTES: u64 = 4;

/// What every rank of one attempt plans on: the devices (as `chronospipe train` would name
/// them) and the degrees the reserving worker's plan chose. Kept on the attempt's reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GangLayout {
    pub devices: String,
    pub stages: u32,
    pub data_parallel: u32,
}

impl GangLayout {
    /// The job body the ranks run: `spec` on these devices with these degrees.
    pub fn apply(&self, spec: &mut JobSpec) {
        spec.devices = Some(self.devices.clone());
        spec.parallelism.stages = Stages::Count(self.stages as usize);
        spec.parallelism.data_parallel = DataParallel::Count(self.data_parallel as usize);
    }
}

/// A job planned over the cluster's free devices.
pub struct ClusterPlan {
    /// Rank `r` (run-wide device `r`) on `ranks[r]`.
    pub ranks: Vec<RankPlacement>,
    pub layout: GangLayout,
    pub outcome: PlanOutcome,
    /// What a step is predicted to spend on links between machines.
    pub network_s: f64,
    /// The links between the plan's machines and where their figures came from.
    pub links: String,
    /// Which devices were kept side by side (`replicas` or `stages`).
    pub order: &'static str,
}

impl ClusterPlan {
    /// Whether every rank is on one worker (the one-worker claim runs it).
    pub fn one_worker(&self) -> bool {
        (self.ranks.iter()).all(|r| Some(&r.worker_id) == self.ranks.first().map(|f| &f.worker_id))
    }

    /// The plan as the job shows it.
    pub fn plan_row(&self) -> PlanRow {
        PlanRow {
            plan: Some(self.outcome.plan.to_string()),
            plan_svg: Some(self.outcome.svg.clone()),
            plan_summary: serde_json::to_string(&self.outcome.summary).ok(),
        }
    }

    /// Said when it is reserved.
    pub fn describe(&self) -> String {
        let s = &self.outcome.summary;
        format!(
            "planned over the cluster on {}: {} stages x {} replicas, {} kept on one machine, \
             {:.3} s a step on the network ({})",
            self.layout.devices, s.stages, s.replicas, self.order, self.network_s, self.links
        )
    }
}

/// The free devices in placement order, one machine's consecutive: the machines (hosts) with
/// the most free devices first (ties by name), on each the workers with the most free devices
/// first (ties by id), each worker's devices in its own order.
pub fn free_in_order(devices: &[ClusterDeviceRow]) -> Vec<&ClusterDeviceRow> {
    let mut free: Vec<&ClusterDeviceRow> = devices.iter().filter(|d| d.job_id.is_none()).collect();
    let count = |worker: &str| free_count(devices, worker);
    let on_host = |host: &str| {
        (devices.iter())
            .filter(|d| d.host == host && d.job_id.is_none())
            .count()
    };
    // Stable: each worker's devices keep the store's order.
    free.sort_by(|a, b| {
        (on_host(&b.host).cmp(&on_host(&a.host)))
            .then(a.host.cmp(&b.host))
            .then(count(&b.worker_id).cmp(&count(&a.worker_id)))
            .then(a.worker_id.cmp(&b.worker_id))
    });
    free
}

fn free_count(devices: &[ClusterDeviceRow], worker: &str) -> usize {
    (devices.iter())
        .filter(|d| d.worker_id == worker && d.job_id.is_none())
        .count()
}

/// `cpu:NxSIZE` for `count` CPU devices of `bytes` each.
pub fn cpu_devices(count: usize, bytes: i64) -> String {
    let bytes = bytes.max(0);
    match bytes % (1 << 20) {
        0 => format!("cpu:{count}x{}MiB", bytes >> 20),
        _ => format!("cpu:{count}x{bytes}"),
    }
}

/// The devices a job naming none is planned on when it is created: every live worker's CPU
/// devices (each taken at the least memory among them), when there are several workers and
/// they all have CPU devices only; a job that asks for sharded optimizer state (which needs
/// its replicas in one process) gets the largest worker's alone. `None`: plan on the
/// service's own devices.
pub fn cluster_for_new_jobs(devices: &[ClusterDeviceRow], spec: &JobSpec) -> Option<String> {
    let first = devices.first()?;
    let several = devices.iter().any(|d| d.worker_id != first.worker_id);
    if !several || devices.iter().any(|d| d.kind != "cpu") {
        return None;
    }
    let mut devices: Vec<&ClusterDeviceRow> = devices.iter().collect();
    if one_process(spec) {
        let count = |w: &str| devices.iter().filter(|d| d.worker_id == w).count();
        let largest = (devices.iter())
            .max_by(|a, b| {
                count(&a.worker_id)
                    .cmp(&count(&b.worker_id))
                    .then(b.worker_id.cmp(&a.worker_id))
            })?
            .worker_id
            .clone();
        devices.retain(|d| d.worker_id == largest);
    }
    let least = devices.iter().map(|d| d.memory_bytes).min()?;
    Some(cpu_devices(devices.len(), least))
}

/// Whether `spec` must run in one process: it asks for sharded optimizer state, which ranks
/// in several processes do not implement (they reduce whole gradients over TCP).
fn one_process(spec: &JobSpec) -> bool {
    spec.parallelism.shard_optimizer == Some(true)
}

/// Plans `job` (which names no `devices`) over the free CPU devices among `devices` (every
/// live worker's), costing the links between machines by `network`: `None` when it does not
/// fit them now (it waits) or its files no longer resolve (the claim that runs it reports
/// that).
pub async fn plan_over_cluster(
    store: &dyn Store,
    planner: Arc<dyn Planner>,
    network: &NetworkFigures,
    host_memory_bytes: u64,
    job: &JobRow,
    devices: &[ClusterDeviceRow],
) -> Option<ClusterPlan> {
    let spec: JobSpec = serde_json::from_str(&job.spec).ok()?;
    let resolved = match resolve_files(store, &job.tenant_id, &spec).await {
        Ok(resolved) => resolved.spec,
        Err(e) => {
            tracing::debug!(job = %job.id, error = %e, "not planned over the cluster");
            return None;
        }
    };
    let mut slots: Vec<&ClusterDeviceRow> = (free_in_order(devices).into_iter())
        .filter(|d| d.kind == "cpu")
        .collect();
    if one_process(&resolved) {
        // The worker with the most free devices (ties by id).
        let count = |d: &&ClusterDeviceRow| free_count(devices, &d.worker_id);
        let largest = (slots.iter())
            .max_by(|a, b| count(a).cmp(&count(b)).then(b.worker_id.cmp(&a.worker_id)))?
            .worker_id
            .clone();
        slots.retain(|d| d.worker_id == largest);
    }
    let least = slots.iter().map(|d| d.memory_bytes).min()?;
    let mut on_cluster = as_ranks_run(&resolved);
    on_cluster.devices = Some(cpu_devices(slots.len(), least));
    let infos: Vec<DeviceInfo> = parse_devices(on_cluster.devices.as_deref()?).ok()?;
    let planning = on_cluster.clone();
    let outcome =
        tokio::task::spawn_blocking(move || planner.plan(&planning, &infos, host_memory_bytes))
            .await
            .ok()?;
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => {
            tracing::debug!(job = %job.id, error = %e, "does not fit the cluster's free devices");
            return None;
        }
    };
    place_plan(&on_cluster, outcome, &slots, least, network)
}

/// Puts a plan made over `slots` on them: its devices on the first slots, ordered so the
/// pairs that talk most share a machine (a host: one machine's slots are consecutive).
fn place_plan(
    spec: &JobSpec,
    outcome: PlanOutcome,
    slots: &[&ClusterDeviceRow],
    least: i64,
    network: &NetworkFigures,
) -> Option<ClusterPlan> {
    let summary = &outcome.summary;
    let used = (summary.devices as usize).min(slots.len());
    let slots = &slots[..used];
    let plan: Plan = serde_json::from_value(outcome.plan.get("plan")?.clone()).ok()?;
    let dims = resolve_arch(spec).ok()?.dims();
    let micro = MicroShape {
        batch: spec.training.micro_batch_size,
        seq: spec.training.seq_len,
    };
    let moved = traffic(&plan, Profile::CpuF32, &dims, micro, CPU_ELEMENT_BYTES);
    let mut machines: Vec<String> = Vec::new();
    let slot_machine: Vec<usize> = (slots.iter())
        .map(|d| match machines.iter().position(|m| *m == d.host) {
            Some(i) => i,
            None => {
                machines.push(d.host.clone());
                machines.len() - 1
            }
        })
        .collect();
    let links = network.for_machines(&machines);
    let placed = place(
        summary.stages,
        summary.replicas,
        &moved,
        &slot_machine,
        &links,
    );
    let ranks = (placed.slot.iter())
        .map(|s| RankPlacement {
            worker_id: slots[*s].worker_id.clone(),
            device_id: slots[*s].device_id.clone(),
        })
        .collect();
    Some(ClusterPlan {
        ranks,
        layout: GangLayout {
            devices: cpu_devices(used, least),
            stages: summary.stages,
            data_parallel: summary.replicas,
        },
        network_s: placed.network_s,
        links: links.describe(),
        order: placed.order,
        outcome,
    })
}

#[cfg(test)]
mod tests;
