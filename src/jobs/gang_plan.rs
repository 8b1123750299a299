//! A job that names no `devices`, planned over the cluster when it is reserved across workers:
//! over the free devices of one kind (`kind`: GPUs when every live worker's devices are GPUs,
//! else the CPU devices) of the live workers (whole machines first, on each whole workers
//! first), every degree pair (stages x replicas) the job's `parallelism` allows over the first
//! one, two, ... workers is planned (`degrees`; the planner picks schedule, micro-batches,
//! recompute, offload and sharding within each), each plan's devices go on the machines
//! (workers' hosts: devices on one machine talk for free) so that the pairs that talk most
//! (pipeline neighbours, or a stage's replicas) share a machine (`plan::machines`, each pair of
//! machines costed by its link: `plan::network`), and the plan with the least simulated step time plus network time per step runs
//! (`choice`): a plan a little faster in simulation that sends much over a slow network loses
//! to one kept on one machine. The attempt keeps the layout its ranks plan on (`GangLayout`),
//! so every rank runs the same plan. A requeued job is planned again on what is free then: a
//! checkpoint is plan-independent, so it resumes on more or fewer devices than before.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::devices::DeviceInfo;
use super::planner::{PlanOutcome, Planner};
use super::resolve::resolve_files;
use crate::exec::run::resolve_arch;
use crate::plan::Plan;
use crate::plan::machines::{place, traffic};
use crate::plan::network::NetworkFigures;
use crate::plan::tensors::MicroShape;
use crate::spec::{DataParallel, JobSpec, Stages};
use crate::store::{ClusterDeviceRow, JobRow, PlanRow, RankPlacement, Store};
pub use choice::{Compared, Rival};
use choice::{choose, milliseconds};
use degrees::degree_pairs;
pub use kind::{GangKind, cpu_devices, cuda_devices};

/// What every rank of one attempt plans on: the devices (as `chronospipe train` would name
/// them), the degrees the reserving worker's plan chose and the host memory it was planned
/// within. Kept on the attempt's reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GangLayout {
    pub devices: String,
    pub stages: u32,
    pub data_parallel: u32,
    /// The host memory the plan offloads into, in all (`host_budget`); `None`: unbounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_memory_bytes: Option<u64>,
}

impl GangLayout {
    /// The job body the ranks run: `spec` on these devices with these degrees.
    pub fn apply(&self, spec: &mut JobSpec) {
        spec.devices = Some(self.devices.clone());
        spec.parallelism.stages = Stages::Count(self.stages as usize);
        spec.parallelism.data_parallel = DataParallel::Count(self.data_parallel as usize);
    }

    /// `2 stages x 3 replicas on cpu:6x64MiB`.
    pub fn said(&self) -> String {
        format!(
            "{} stages x {} replicas on {}",
            self.stages, self.data_parallel, self.devices
        )
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
    /// What it was chosen over.
    pub compared: Compared,
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

    /// Said when it is reserved: the plan, its step and network times, and what it beat.
    pub fn describe(&self) -> String {
        let s = &self.outcome.summary;
        format!(
            "planned over the cluster on {}: {} stages x {} replicas, {} kept on one machine, \
             {} a step simulated + {} on the network ({}); {}",
            self.layout.devices,
            s.stages,
            s.replicas,
            self.order,
            milliseconds(s.step_time_s),
            milliseconds(self.network_s),
            self.links,
            self.compared.describe()
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

/// The devices a job is planned on: as `chronospipe train` would name them, and as the
/// planner takes them.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedDevices {
    pub text: String,
    pub devices: Vec<DeviceInfo>,
}

/// The devices a job naming none is planned on when it is created: every live worker's
/// devices (each taken at the least memory among them), when there are several workers and
/// their devices are all CPU devices (`cpu:NxSIZE`) or all GPUs (`cuda:I,J,...@CAP`, each
/// GPU's ordinal on its worker, in the store's order). `None`: plan on the service's own
/// devices (one worker, or CPU devices and GPUs mixed: see `kind`).
pub fn cluster_for_new_jobs(devices: &[ClusterDeviceRow]) -> Option<NamedDevices> {
    let first = devices.first()?;
    let several = devices.iter().any(|d| d.worker_id != first.worker_id);
    let kind = GangKind::of_cluster(devices);
    if !several || !devices.iter().all(|d| kind.takes(d)) {
        return None;
    }
    let least = devices.iter().map(|d| d.memory_bytes).min()?;
    let all: Vec<&ClusterDeviceRow> = devices.iter().collect();
    Some(NamedDevices {
        text: kind.devices(&all, least),
        devices: kind.infos(&all, least),
    })
}

/// Why a job naming no `devices` is not planned over the cluster now.
#[derive(Debug, Clone, PartialEq)]
pub enum NotPlanned {
    /// No answer now: its body does not parse, its files do not resolve (the claim that runs
    /// it reports that) or the planning was interrupted.
    Unanswered(String),
    /// No degree pair's plan fits the free devices: the answer while they stay as they are.
    DoesNotFit(String),
}

/// Plans `job` (which names no `devices`) over the free devices of the cluster's kind among
/// `devices` (every live worker's): each degree pair its `parallelism` allows over the first
/// workers' free devices (`degrees`) is planned, placed, and the one with the least simulated
/// step time plus network time per step taken (`choice`).
pub async fn plan_over_cluster(
    store: &dyn Store,
    planner: Arc<dyn Planner>,
    network: &NetworkFigures,
    job: &JobRow,
    devices: &[ClusterDeviceRow],
) -> Result<ClusterPlan, NotPlanned> {
    let unanswered = |e: &dyn std::fmt::Display| NotPlanned::Unanswered(e.to_string());
    let spec: JobSpec = serde_json::from_str(&job.spec).map_err(|e| unanswered(&e))?;
    let resolved = (resolve_files(store, &job.tenant_id, &spec).await)
        .map_err(|e| unanswered(&e))?
        .spec;
    let planned = plan_resolved(planner, network, &resolved, devices).await;
    if let Err(NotPlanned::DoesNotFit(why)) = &planned {
        tracing::debug!(job = %job.id, %why, "does not fit the cluster's free devices");
    }
    planned
}

/// `plan_over_cluster` for a body whose files are resolved.
async fn plan_resolved(
    planner: Arc<dyn Planner>,
    network: &NetworkFigures,
    resolved: &JobSpec,
    devices: &[ClusterDeviceRow],
) -> Result<ClusterPlan, NotPlanned> {
    let kind = GangKind::of_cluster(devices);
    let slots: Vec<&ClusterDeviceRow> = (free_in_order(devices).into_iter())
        .filter(|d| kind.takes(d))
        .collect();
    let on_cluster = resolved.clone();
    let pairs = degree_pairs(
        &on_cluster.parallelism,
        on_cluster.training.microbatches,
        &whole_workers(&slots),
    );
    // Planned on the first slots; `place_plan` orders them (a GPU layout's ordinals with them).
    let layouts: Vec<(GangLayout, Vec<DeviceInfo>)> = (pairs.iter())
        .map(|d| {
            let first = &slots[..d.devices()];
            let least = least_memory(first);
            let layout = GangLayout {
                devices: kind.devices(first, least),
                stages: d.stages as u32,
                data_parallel: d.replicas as u32,
                host_memory_bytes: host_budget(first),
            };
            (layout, kind.infos(first, least))
        })
        .collect();
    let planned = plan_each(planner, &on_cluster, &layouts).await?;
    let mut placed = Vec::new();
    let mut refusals = Vec::new();
    for ((layout, _), outcome) in layouts.into_iter().zip(planned) {
        let mut spec = on_cluster.clone();
        layout.apply(&mut spec);
        let used = (layout.stages * layout.data_parallel) as usize;
        let least = least_memory(&slots[..used]);
        match outcome.map(|o| place_plan(&spec, o, kind, &slots, least, network)) {
            Ok(Some(plan)) => placed.push(plan),
            Ok(None) => refusals.push(format!("{}: its plan cannot be placed", layout.said())),
            Err(e) => refusals.push(format!("{}: {e}", layout.said())),
        }
    }
    choose(placed).ok_or_else(|| {
        NotPlanned::DoesNotFit(if refusals.is_empty() {
            format!(
                "no degree pair fits the {} free {}",
                slots.len(),
                kind.plural()
            )
        } else {
            refusals.join("; ")
        })
    })
}

/// The planner's answer for `spec` on each layout (with the devices it names), all on one
/// blocking thread.
async fn plan_each(
    planner: Arc<dyn Planner>,
    spec: &JobSpec,
    layouts: &[(GangLayout, Vec<DeviceInfo>)],
) -> Result<Vec<Result<PlanOutcome, String>>, NotPlanned> {
    let asked: Vec<(JobSpec, Vec<DeviceInfo>, u64)> = (layouts.iter())
        .map(|(layout, infos)| {
            let mut pinned = spec.clone();
            layout.apply(&mut pinned);
            let host = layout.host_memory_bytes.unwrap_or(u64::MAX);
            (pinned, infos.clone(), host)
        })
        .collect();
    let planning = move || {
        (asked.into_iter())
            .map(|(spec, infos, host)| {
                (planner.plan(&spec, &infos, host)).map_err(|e| e.to_string())
            })
            .collect()
    };
    (tokio::task::spawn_blocking(planning).await)
        .map_err(|e| NotPlanned::Unanswered(format!("planning stopped: {e}")))
}

/// The free devices of the first worker, the first two, ... of `slots` (in placement order).
fn whole_workers(slots: &[&ClusterDeviceRow]) -> Vec<usize> {
    let mut counts = Vec::new();
    for (i, slot) in slots.iter().enumerate() {
        let next = slots.get(i + 1);
        if next.is_none_or(|n| n.worker_id != slot.worker_id) {
            counts.push(i + 1);
        }
    }
    counts
}

/// The host memory a plan on `slots` may use, in all: each worker's `--host-memory` shared
/// equally among its slots, the least share times the slots (the planner gives each device
/// an equal share of the whole), and never more than the least worker's whole (every rank
/// loads the starting weights into its own host memory). `None` when every worker's is
/// unbounded.
fn host_budget(slots: &[&ClusterDeviceRow]) -> Option<u64> {
    let mut workers: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for slot in slots {
        if let Some(bytes) = slot.host_memory_bytes {
            let (_, count) = (workers.entry(&slot.worker_id)).or_insert((bytes.max(0) as u64, 0));
            *count += 1;
        }
    }
    let share = workers
        .values()
        .map(|&(bytes, count)| bytes / count)
        .min()?;
    let least = workers.values().map(|&(bytes, _)| bytes).min()?;
    Some((share * slots.len() as u64).min(least))
}

/// The least memory among `slots` (every device of a plan is taken at it).
fn least_memory(slots: &[&ClusterDeviceRow]) -> i64 {
    slots.iter().map(|d| d.memory_bytes).min().unwrap_or(0)
}

/// Puts a plan made over `slots` (of `kind`) on them: its devices on the first slots, ordered
/// so the pairs that talk most share a machine (a host: one machine's slots are consecutive).
/// Its traffic is counted at the sizes the devices' backend sends at the spec's precision.
fn place_plan(
    spec: &JobSpec,
    outcome: PlanOutcome,
    kind: GangKind,
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
    let profile = kind.profile(spec.training.precision)?;
    let moved = traffic(&plan, profile, &dims, micro, kind.collectives());
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
    // Rank `r` (run-wide device `r`) on `by_rank[r]`.
    let by_rank: Vec<&ClusterDeviceRow> = placed.slot.iter().map(|s| slots[*s]).collect();
    let ranks = (by_rank.iter())
        .map(|d| RankPlacement {
            worker_id: d.worker_id.clone(),
            device_id: d.device_id.clone(),
        })
        .collect();
    Some(ClusterPlan {
        ranks,
        layout: GangLayout {
            devices: kind.devices(&by_rank, least),
            stages: summary.stages,
            data_parallel: summary.replicas,
            host_memory_bytes: host_budget(slots),
        },
        network_s: placed.network_s,
        links: links.describe(),
        order: placed.order,
        outcome,
        compared: Compared::default(),
    })
}

mod choice;
mod degrees;
mod kind;
#[cfg(test)]
mod tests;
