//! What a worker remembers of the queued jobs that did not fit the cluster's free devices, so
//! an idle worker polling an unchanged cluster does not resolve files and plan them again on
//! every poll. The answer is kept with what it depends on (`Asked`: the job's body, the kind
//! of devices the cluster plans on, the free devices with their workers, hosts and memory, the
//! host memory and the network's figures); any change in those plans the job again. Only the
//! last answer per job is kept, only for jobs still queued, and at most `MOST_REMEMBERED` of
//! them.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::jobs::gang_plan::GangKind;
use crate::plan::network::NetworkFigures;
use crate::store::ClusterDeviceRow;

/// Jobs remembered at most (a longer queue plans the rest on every poll, as before).
const MOST_REMEMBERED: usize = 1024;

/// One free device as planning saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FreeDevice {
    worker_id: String,
    host: String,
    device_id: String,
    kind: String,
    memory_bytes: i64,
    host_memory_bytes: Option<i64>,
}

/// What a job was planned with over the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Asked {
    spec: String,
    /// The kind of devices the cluster plans on (a worker leaving may change it while the
    /// free devices stay).
    kind: GangKind,
    free: Vec<FreeDevice>,
    network: NetworkFigures,
}

impl Asked {
    /// The job's body `spec` over the free devices among `devices`, in the store's order.
    pub fn new(spec: &str, devices: &[ClusterDeviceRow], network: NetworkFigures) -> Asked {
        let free = (devices.iter())
            .filter(|d| d.job_id.is_none())
            .map(|d| FreeDevice {
                worker_id: d.worker_id.clone(),
                host: d.host.clone(),
                device_id: d.device_id.clone(),
                kind: d.kind.clone(),
                memory_bytes: d.memory_bytes,
                host_memory_bytes: d.host_memory_bytes,
            })
            .collect();
        Asked {
            spec: spec.to_owned(),
            kind: GangKind::of_cluster(devices),
            free,
            network,
        }
    }
}

/// The last "does not fit" answer per queued job.
#[derive(Debug, Default)]
pub struct UnfitMemo {
    jobs: Mutex<HashMap<String, Asked>>,
}

impl UnfitMemo {
    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Asked>> {
        // A map of plain values is whole even if a holder panicked.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `job` was found not to fit when asked exactly `asked`.
    pub fn knows_unfit(&self, job: &str, asked: &Asked) -> bool {
        self.jobs().get(job) == Some(asked)
    }

    /// `job` does not fit when asked `asked`.
    pub fn remember(&self, job: &str, asked: Asked) {
        let mut jobs = self.jobs();
        if jobs.len() < MOST_REMEMBERED || jobs.contains_key(job) {
            jobs.insert(job.to_owned(), asked);
        }
    }

    /// Forgets every job but `queued` (those that left the queue are not asked again).
    pub fn keep_only(&self, queued: &[&str]) {
        self.jobs().retain(|job, _| queued.contains(&job.as_str()));
    }

    /// Jobs remembered now.
    pub fn len(&self) -> usize {
        self.jobs().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::network::Configured;

    fn device(worker: &str, id: &str, memory: i64, job: Option<&str>) -> ClusterDeviceRow {
        ClusterDeviceRow {
            worker_id: worker.into(),
            host: format!("host-{worker}"),
            host_memory_bytes: None,
            device_id: id.into(),
            kind: "cpu".into(),
            memory_bytes: memory,
            job_id: job.map(Into::into),
            attempt: None,
            rank: None,
        }
    }

    #[test]
    fn an_answer_holds_only_for_what_it_was_asked_with() {
        let memo = UnfitMemo::default();
        let cluster = [
            device("a", "cpu:0", 64, Some("other")),
            device("a", "cpu:1", 64, None),
        ];
        let asked =
            |cluster: &[ClusterDeviceRow]| Asked::new("{}", cluster, NetworkFigures::default());
        memo.remember("job", asked(&cluster));
        assert!(memo.knows_unfit("job", &asked(&cluster)));
        assert!(!memo.knows_unfit("another", &asked(&cluster)));
        // A held device's holder does not matter, only what is free.
        let held_by_third = [
            device("a", "cpu:0", 64, Some("third")),
            device("a", "cpu:1", 64, None),
        ];
        assert!(memo.knows_unfit("job", &asked(&held_by_third)));
        let freed = [
            device("a", "cpu:0", 64, None),
            device("a", "cpu:1", 64, None),
        ];
        assert!(!memo.knows_unfit("job", &asked(&freed)));
        let more_memory = [
            device("a", "cpu:0", 64, Some("other")),
            device("a", "cpu:1", 128, None),
        ];
        assert!(!memo.knows_unfit("job", &asked(&more_memory)));
        let other_body = Asked::new("{\"x\":1}", &cluster, NetworkFigures::default());
        assert!(!memo.knows_unfit("job", &other_body));
        let bounded: Vec<ClusterDeviceRow> = (cluster.iter())
            .map(|d| ClusterDeviceRow {
                host_memory_bytes: Some(1 << 31),
                ..d.clone()
            })
            .collect();
        let other_host = Asked::new("{}", &bounded, NetworkFigures::default());
        assert!(!memo.knows_unfit("job", &other_host));
        let slow = NetworkFigures::configured(Configured {
            bytes_per_s: Some(1.0),
            latency_s: Some(1.0),
        });
        assert!(!memo.knows_unfit("job", &Asked::new("{}", &cluster, slow)));
    }

    /// A CPU worker whose devices are all held leaves: the free devices are the same GPUs,
    /// but the cluster now plans over them.
    #[test]
    fn the_clusters_kind_is_part_of_the_question() {
        let gpu = ClusterDeviceRow {
            kind: "cuda".into(),
            ..device("g", "cuda:0", 1 << 30, None)
        };
        let with_cpu = [device("c", "cpu:0", 64, Some("other")), gpu.clone()];
        let memo = UnfitMemo::default();
        memo.remember(
            "job",
            Asked::new("{}", &with_cpu, NetworkFigures::default()),
        );
        assert!(memo.knows_unfit(
            "job",
            &Asked::new("{}", &with_cpu, NetworkFigures::default())
        ));
        let gpus_only = Asked::new("{}", &[gpu], NetworkFigures::default());
        assert!(!memo.knows_unfit("job", &gpus_only));
    }

    #[test]
    fn only_queued_jobs_are_kept_and_at_most_so_many() {
        let memo = UnfitMemo::default();
        let asked = Asked::new("{}", &[], NetworkFigures::default());
        for i in 0..MOST_REMEMBERED + 5 {
            memo.remember(&format!("job-{i}"), asked.clone());
        }
        assert_eq!(memo.len(), MOST_REMEMBERED);
        memo.keep_only(&["job-1", "job-2", "job-gone"]);
        assert_eq!(memo.len(), 2);
        assert!(memo.knows_unfit("job-1", &asked));
        assert!(!memo.knows_unfit("job-3", &asked));
    }
}
