//! Which queued jobs run across workers, and where: a job needing more devices than any one
//! live worker has is reserved on the free devices of the workers that run ranks, whole
//! workers first, so consecutive ranks (the pipeline's adjacent stages, which talk most) share
//! a worker and its fast links.

use std::collections::BTreeMap;
use std::time::Duration;

use super::cluster::{GangError, reserve_across_workers};
use crate::store::{ClusterDeviceRow, RankPlacement, Reservation, Store, StoreError};

/// Places `needed` ranks on the free devices among `devices` (every live worker's, in the
/// store's order): the workers with the most free devices first (ties by id), each worker's
/// devices in its own order. `None` when fewer are free.
pub fn place(devices: &[ClusterDeviceRow], needed: usize) -> Option<Vec<RankPlacement>> {
    let mut free: BTreeMap<&str, Vec<&ClusterDeviceRow>> = BTreeMap::new();
    for d in devices.iter().filter(|d| d.job_id.is_none()) {
        free.entry(d.worker_id.as_str()).or_default().push(d);
    }
    let mut workers: Vec<(&str, Vec<&ClusterDeviceRow>)> = free.into_iter().collect();
    workers.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
    let ranks: Vec<RankPlacement> = workers
        .into_iter()
        .flat_map(|(_, devices)| devices)
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

/// Reserves the first queued job (in queue order) that needs more devices than any one worker
/// has and fits the cluster's free devices now; a job that does not fit waits while later
/// ones that fit go first. Two workers racing for one job: one reserves it, the other moves on.
pub async fn reserve_next(
    store: &dyn Store,
    start_timeout: Duration,
) -> Result<Option<Reservation>, StoreError> {
    let devices = store.cluster_devices().await?;
    let largest = largest_worker(&devices);
    if largest == 0 {
        return Ok(None);
    }
    for (job, needed) in store.queued_jobs_over(largest as i64).await? {
        let Some(ranks) = place(&devices, needed.max(0) as usize) else {
            continue;
        };
        match reserve_across_workers(store, &job, &ranks, start_timeout).await {
            Ok(reservation) => return Ok(Some(reservation)),
            Err(GangError::Store(e)) if e.is_transient() => return Err(e),
            // Taken, cancelled or its devices held since the cluster was read: the next.
            Err(e) => tracing::debug!(%job, error = %e, "not reserved"),
        }
    }
    Ok(None)
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
