use super::*;

fn device(worker: &str, id: &str, job: Option<&str>) -> ClusterDeviceRow {
    ClusterDeviceRow {
        worker_id: worker.into(),
        host: "h".into(),
        host_memory_bytes: None,
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

mod planning_once {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::jobs::gang_plan::GangLayout;
    use crate::jobs::{DeviceInfo, ExecPlanner, PlanFailure, PlanOutcome};
    use crate::store::{
        ClusterStore, FileRow, NewJob, PlanRow, Planned, SqliteStore, WorkerDevice,
        WorkerRegistration,
    };

    /// The service's planner for a model that needs four stages to fit: fewer are refused
    /// (and counted, as every call is).
    #[derive(Default)]
    struct CountingPlanner {
        calls: AtomicUsize,
    }

    impl Planner for CountingPlanner {
        fn plan(
            &self,
            spec: &JobSpec,
            devices: &[DeviceInfo],
            host_memory_bytes: u64,
        ) -> Result<PlanOutcome, PlanFailure> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match spec.parallelism.stages.count() {
                Some(stages) if stages >= 4 => ExecPlanner.plan(spec, devices, host_memory_bytes),
                _ => Err(PlanFailure::DoesNotFit {
                    message: "the model needs four stages".into(),
                    smallest_memory_bytes: u64::MAX,
                    closest: serde_json::json!({"stages": 4}),
                }),
            }
        }
    }

    fn registration(worker: &str) -> WorkerRegistration {
        registered(worker, "cpu", 64 << 20)
    }

    /// A worker of two devices of `kind` (`cpu:0`, `cpu:1` or `cuda:0`, `cuda:1`).
    fn registered(worker: &str, kind: &str, memory_bytes: i64) -> WorkerRegistration {
        WorkerRegistration {
            worker_id: worker.into(),
            host: format!("host-{worker}"),
            runs_ranks: true,
            host_memory_bytes: None,
            devices: (0..2)
                .map(|i| WorkerDevice {
                    device_id: format!("{kind}:{i}"),
                    kind: kind.into(),
                    memory_bytes,
                })
                .collect(),
        }
    }

    /// A store of one tenant with the training text uploaded as `file_train`.
    async fn store_with_text(dir: &std::path::Path) -> (SqliteStore, String) {
        let url = format!("sqlite://{}", dir.join("store.db").display());
        let store = SqliteStore::connect(&url).await.unwrap();
        let tenant = store.create_tenant("t").await.unwrap().id;
        let corpus = dir.join("corpus.txt");
        std::fs::write(&corpus, "a corpus").unwrap();
        let file = FileRow {
            id: "file_train".into(),
            tenant_id: tenant.clone(),
            purpose: "train".into(),
            filename: "corpus.txt".into(),
            bytes: 8,
            sha256: String::new(),
            path: corpus.display().to_string(),
            created_at: 0,
        };
        store.insert_file(&file).await.unwrap();
        (store, tenant)
    }

    /// Two GPU workers: a four-stage job naming no devices is reserved across both, each
    /// rank on a GPU of its worker (where that worker picks it up), and the layout kept with
    /// the reservation names each rank's GPU by its ordinal there.
    #[tokio::test]
    async fn gpu_workers_take_ranks_of_a_job_planned_over_them() {
        let dir = tempfile::tempdir().unwrap();
        let (store, tenant) = store_with_text(dir.path()).await;
        for worker in ["g1", "g2"] {
            let registration = registered(worker, "cuda", 40 << 30);
            store.register_worker(&registration, 60_000).await.unwrap();
        }
        let body = serde_json::json!({
            "model": {"hidden_size": 32, "num_layers": 4, "num_heads": 4, "intermediate_size": 48, "vocab_size": 256},
            "data": {"train": "file_train"},
            "training": {"seq_len": 16, "micro_batch_size": 1, "microbatches": 4, "steps": 1},
            "parallelism": {"stages": 4}
        });
        let job = queued(&tenant, &body.to_string(), 4);
        store.insert_job(&job).await.unwrap();
        let planning = GangPlanning::new(Arc::new(ExecPlanner), Configured::default());
        let reserved = reserve_next(&store, Some(&planning), Duration::from_secs(60))
            .await
            .unwrap()
            .expect("four GPUs hold four stages");
        assert_eq!(reserved.job_id, job.id);
        let layout: GangLayout = serde_json::from_str(reserved.layout.as_deref().unwrap()).unwrap();
        assert_eq!(layout.devices, "cuda:0,1,0,1@40GiB");
        assert_eq!((layout.stages, layout.data_parallel), (4, 1));
        for worker in ["g1", "g2"] {
            let ranks = store.worker_ranks(worker).await.unwrap();
            let held: Vec<(i64, &str, &str)> = (ranks.iter())
                .map(|r| (r.rank, r.device_id.as_str(), r.state.as_str()))
                .collect();
            let (first, second) = if worker == "g1" { (0, 1) } else { (2, 3) };
            assert_eq!(
                held,
                [
                    (first, "cuda:0", "reserved"),
                    (second, "cuda:1", "reserved")
                ],
                "{worker}"
            );
        }
    }

    fn queued(tenant: &str, spec: &str, devices_needed: i64) -> NewJob {
        NewJob {
            id: crate::store::new_id("job"),
            tenant_id: tenant.into(),
            spec: spec.into(),
            total_steps: 1,
            file_ids: vec![],
            checkpoint_uses: vec![],
            idempotency_key: None,
            request_hash: None,
            planned: Some(Planned::Queued {
                plan: PlanRow {
                    plan: Some("{}".into()),
                    plan_svg: None,
                    plan_summary: None,
                },
                devices_needed,
            }),
            max_restarts: None,
        }
    }

    /// A job naming no devices waits on three free devices of two workers: it is planned once
    /// however often the idle workers poll, and again (and reserved) once a fourth frees.
    #[tokio::test]
    async fn an_unchanged_cluster_is_not_planned_again() {
        let dir = tempfile::tempdir().unwrap();
        let (store, tenant) = store_with_text(dir.path()).await;
        for worker in ["w1", "w2"] {
            let registration = registration(worker);
            store.register_worker(&registration, 60_000).await.unwrap();
        }
        // Another job holds one device of w1.
        let holder = queued(&tenant, "{}", 1);
        store.insert_job(&holder).await.unwrap();
        let held = [RankPlacement {
            worker_id: "w1".into(),
            device_id: "cpu:0".into(),
        }];
        let held = store.reserve_gang(&holder.id, &held, 60_000).await.unwrap();
        let crate::store::GangOutcome::Reserved(held) = held else {
            panic!("not held: {held:?}");
        };
        let body = serde_json::json!({
            "model": {"hidden_size": 32, "num_layers": 4, "num_heads": 4, "intermediate_size": 48, "vocab_size": 256},
            "data": {"train": "file_train"},
            "training": {"seq_len": 16, "micro_batch_size": 1, "microbatches": 4, "steps": 1},
            "parallelism": {"stages": "auto", "data_parallel": "auto"}
        });
        let job = queued(&tenant, &body.to_string(), 3);
        store.insert_job(&job).await.unwrap();

        let counting = Arc::new(CountingPlanner::default());
        let planner: Arc<dyn Planner> = counting.clone();
        let planning = GangPlanning::new(planner, Configured::default());
        let calls = || counting.calls.load(Ordering::SeqCst);
        let timeout = Duration::from_secs(60);
        let poll = || reserve_next(&store, Some(&planning), timeout);
        assert!(poll().await.unwrap().is_none(), "three devices are too few");
        // Over all three free devices, then over w2's two: 1x2, 3x1, then 2x1.
        assert_eq!(calls(), 3);
        assert_eq!(planning.unfit.len(), 1);
        for _ in 0..5 {
            assert!(poll().await.unwrap().is_none());
        }
        assert_eq!(calls(), 3, "an unchanged cluster is not planned again");

        assert!(
            (store.release_reservation(&holder.id, held.attempt, "test"))
                .await
                .unwrap()
        );
        let reserved = poll()
            .await
            .unwrap()
            .expect("four devices hold four stages");
        assert!(calls() > 3, "a freed device plans again");
        assert_eq!(reserved.job_id, job.id);
        assert_eq!(reserved.ranks.len(), 4);
    }
}
