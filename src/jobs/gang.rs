//! Which queued jobs run across workers, and where: a job needing more devices than any one
//! live worker has is reserved on the free devices of the workers that run ranks, whole
//! machines first. A job naming its `devices` takes consecutive ranks (a replica's adjacent
//! stages) on one machine and worker; one naming none is planned over the free devices and placed by
//! its traffic (`gang_plan`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::cluster::{GangError, reserve_across_workers, reserve_laid_out};
use super::gang_plan::{free_in_order, plan_over_cluster};
use super::planner::Planner;
use crate::plan::machines::Network;
use crate::plan::network::{Configured, NetworkFigures};
use crate::spec::JobSpec;
use crate::store::{ClusterDeviceRow, RankPlacement, Reservation, Store, StoreError};

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

/// How a worker plans the jobs it reserves that name no `devices`.
#[derive(Clone)]
pub struct GangPlanning {
    pub planner: Arc<dyn Planner>,
    /// The operator's network figures; those unset are the measured links', else assumed.
    pub network: Configured,
    pub host_memory_bytes: u64,
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
/// (with `planning`); one whose plan then fits one worker is left to the one-worker claim
/// (its `devices_needed` lowered to the plan's). Two workers racing for one job: one reserves
/// it, the other moves on.
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
    let mut network = None;
    for (job, needed) in store.queued_jobs_over(largest as i64).await? {
        let reserved = match (planning, unnamed(store, &job).await?) {
            (Some(planning), Some(row)) => {
                if network.is_none() {
                    network = Some(planning.figures(store).await?);
                }
                let figures = network.clone().unwrap_or_default();
                let Some(plan) = plan_over_cluster(
                    store,
                    planning.planner.clone(),
                    &figures,
                    planning.host_memory_bytes,
                    &row,
                    &devices,
                )
                .await
                else {
                    continue;
                };
                if plan.one_worker() {
                    let used = plan.ranks.len() as i64;
                    store.set_plan(&job, &plan.plan_row(), used).await?;
                    tracing::info!(%job, devices = used, "fits one worker now: left to its claim");
                    continue;
                }
                let reserved =
                    reserve_laid_out(store, &job, &plan.ranks, &plan.layout, start_timeout).await;
                if reserved.is_ok() {
                    let said = plan.describe();
                    tracing::info!(%job, "{said}");
                    let used = plan.ranks.len() as i64;
                    store.set_plan(&job, &plan.plan_row(), used).await?;
                    let data = serde_json::json!({ "message": said }).to_string();
                    store.append_event(&job, "info", &data).await?;
                }
                reserved
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

/// The queued job when its body names no `devices` (it is planned over the cluster).
async fn unnamed(store: &dyn Store, job: &str) -> Result<Option<crate::store::JobRow>, StoreError> {
    let Some(row) = store.get_job_any(job).await? else {
        return Ok(None);
    };
    let spec: Option<JobSpec> = serde_json::from_str(&row.spec).ok();
    Ok(spec.filter(|s| s.devices.is_none()).map(|_| row))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(worker: &str, id: &str, job: Option<&str>) -> ClusterDeviceRow {
        ClusterDeviceRow {
            worker_id: worker.into(),
            host: "h".into(),
            device_id: id.into(),
            kind: "cpu".into(),
            memory_bytes: 1 << 26,
            job_id: job.map(Into::into),
            attempt: None,
            rank: None,
        }
    }

    fn names(ranks: &[RankPlacement]) -> Vec<String> {
        ranks
            .iter()
            .map(|r| format!("{}/{}", r.worker_id, r.device_id))
            .collect()
    }

    #[test]
    fn whole_workers_first_so_adjacent_ranks_share_one() {
        let cluster = [
            device("a", "cpu:0", Some("other")),
            device("a", "cpu:1", None),
            device("b", "cpu:0", None),
            device("b", "cpu:1", None),
            device("c", "cpu:0", None),
            device("c", "cpu:1", None),
        ];
        let ranks = place(&cluster, 5).unwrap();
        assert_eq!(
            names(&ranks),
            ["b/cpu:0", "b/cpu:1", "c/cpu:0", "c/cpu:1", "a/cpu:1"]
        );
        assert!(place(&cluster, 6).is_none(), "one device is held");
        assert_eq!(largest_worker(&cluster), 2);
    }
}
