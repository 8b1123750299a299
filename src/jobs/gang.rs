//! Which queued jobs run across workers, and where: a job needing more devices than any one
//! live worker has is reserved on the free devices of the workers that run ranks, whole
//! machines first. A job naming its `devices` takes consecutive ranks (a replica's adjacent
//! stages) on one machine and worker; one naming none is planned over the free devices and placed by
//! its traffic (`gang_plan`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::cluster::{GangError, reserve_across_workers, reserve_laid_out};
use super::gang_plan::{NotPlanned, free_in_order, plan_over_cluster};
use super::planner::Planner;
use crate::plan::machines::Network;
use crate::plan::network::{Configured, NetworkFigures};
use crate::spec::JobSpec;
use crate::store::{ClusterDeviceRow, JobRow, RankPlacement, Reservation, Store, StoreError};
use unfit::{Asked, UnfitMemo};

/// Places `needed` ranks on the free devices among `devices` (every live worker's, in the
/// store's order) in `free_in_order`'s order: whole machines first, on each whole workers
/// first. `None` when fewer are free.
pub fn place(devices: &[ClusterDeviceRow], needed: usize) -> Option<Vec<RankPlacement>> {
    let ranks: Vec<RankPlacement> = (free_in_order(devices).into_iter())
        .take(needed)
        .map(|d| RankPlacement {
            worker_id: d.worker_id.clone(),
            device_id: d.device_id.clone(),
        })
        .collect();
    (ranks.len() == needed).then_some(ranks)
}

/// The most devices one live worker has (held or not): jobs needing more run across workers.
pub fn largest_worker(devices: &[ClusterDeviceRow]) -> usize {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for d in devices {
        *counts.entry(d.worker_id.as_str()).or_default() += 1;
    }
    counts.into_values().max().unwrap_or(0)
}

/// How a worker plans the jobs it reserves that name no `devices`, and what it remembers of
/// those that did not fit (kept across polls: build it once per worker).
#[derive(Clone)]
pub struct GangPlanning {
    pub planner: Arc<dyn Planner>,
    /// The operator's network figures; those unset are the measured links', else assumed.
    pub network: Configured,
    pub unfit: Arc<UnfitMemo>,
}

impl GangPlanning {
    pub fn new(planner: Arc<dyn Planner>, network: Configured) -> Self {
        GangPlanning {
            planner,
            network,
            unfit: Arc::new(UnfitMemo::default()),
        }
    }
}

impl GangPlanning {
    /// The cluster's network: the configured figures over the links the store has measured.
    async fn figures(&self, store: &dyn Store) -> Result<NetworkFigures, StoreError> {
        let measured = (store.network_links().await?.into_iter()).map(|link| {
            let network = Network {
                bytes_per_s: link.bytes_per_s,
                latency_s: link.latency_s,
            };
            (link.machine_a, link.machine_b, network)
        });
        Ok(NetworkFigures::new(self.network, measured))
    }
}

/// Reserves the first queued job (in queue order) that needs more devices than any one worker
/// has and fits the cluster's free devices now; a job that does not fit waits while later
/// ones that fit go first. A job naming no `devices` is planned over the free devices first
/// (with `planning`, which remembers a job that did not fit until its body or the free
/// devices change); one whose plan then fits one worker is left to the one-worker claim (its
/// `devices_needed` lowered to the plan's). Two workers racing for one job: one reserves it,
/// the other moves on.
pub async fn reserve_next(
    store: &dyn Store,
    planning: Option<&GangPlanning>,
    start_timeout: Duration,
) -> Result<Option<Reservation>, StoreError> {
    let devices = store.cluster_devices().await?;
    let largest = largest_worker(&devices);
    if largest == 0 {
        return Ok(None);
    }
    let queued = store.queued_jobs_over(largest as i64).await?;
    if let Some(planning) = planning {
        let ids: Vec<&str> = queued.iter().map(|(job, _)| job.as_str()).collect();
        planning.unfit.keep_only(&ids);
    }
    // The network's figures, read once a poll when some job is planned.
    let mut figures: Option<NetworkFigures> = None;
    for (job, needed) in queued {
        let reserved = match (planning, unnamed(store, &job).await?) {
            (Some(planning), Some(row)) => {
                let figures = match &figures {
                    Some(figures) => figures,
                    None => figures.insert(planning.figures(store).await?),
                };
                let planned =
                    reserve_planned(store, planning, figures, &row, &devices, start_timeout);
                match planned.await? {
                    Some(reserved) => reserved,
                    None => continue,
                }
            }
            _ => {
                let Some(ranks) = place(&devices, needed.max(0) as usize) else {
                    continue;
                };
                reserve_across_workers(store, &job, &ranks, start_timeout).await
            }
        };
        match reserved {
            Ok(reservation) => return Ok(Some(reservation)),
            Err(GangError::Store(e)) if e.is_transient() => return Err(e),
            // Taken, cancelled or its devices held since the cluster was read: the next.
            Err(e) => tracing::debug!(%job, error = %e, "not reserved"),
        }
    }
    Ok(None)
}

/// Plans `job` (naming no `devices`) over the cluster and reserves it as planned; `None` when
/// it does not fit now (remembered, or found so) or fits one worker (left to its claim).
async fn reserve_planned(
    store: &dyn Store,
    planning: &GangPlanning,
    figures: &NetworkFigures,
    job: &JobRow,
    devices: &[ClusterDeviceRow],
    start_timeout: Duration,
) -> Result<Option<Result<Reservation, GangError>>, StoreError> {
    let asked = Asked::new(&job.spec, devices, figures.clone());
    if planning.unfit.knows_unfit(&job.id, &asked) {
        return Ok(None);
    }
    let planner = planning.planner.clone();
    let plan = match plan_over_cluster(store, planner, figures, job, devices).await {
        Ok(plan) => plan,
        Err(NotPlanned::DoesNotFit(_)) => {
            planning.unfit.remember(&job.id, asked);
            return Ok(None);
        }
        Err(NotPlanned::Unanswered(why)) => {
            tracing::debug!(job = %job.id, %why, "not planned over the cluster");
            return Ok(None);
        }
    };
    let used = plan.ranks.len() as i64;
    if plan.one_worker() {
        store.set_plan(&job.id, &plan.plan_row(), used).await?;
        tracing::info!(job = %job.id, devices = used, "fits one worker now: left to its claim");
        return Ok(None);
    }
    let reserved = reserve_laid_out(store, &job.id, &plan.ranks, &plan.layout, start_timeout).await;
    if reserved.is_ok() {
        let said = plan.describe();
        tracing::info!(job = %job.id, "{said}");
        store.set_plan(&job.id, &plan.plan_row(), used).await?;
        let data = serde_json::json!({ "message": said }).to_string();
        store.append_event(&job.id, "info", &data).await?;
    }
    Ok(Some(reserved))
}

/// The queued job when its body names no `devices` (it is planned over the cluster).
async fn unnamed(store: &dyn Store, job: &str) -> Result<Option<JobRow>, StoreError> {
    let Some(row) = store.get_job_any(job).await? else {
        return Ok(None);
    };
    let spec: Option<JobSpec> = serde_json::from_str(&row.spec).ok();
    Ok(spec.filter(|s| s.devices.is_none()).map(|_| row))
}

mod unfit;

#[cfg(test)]
mod tests;
