use super::*;
use crate::jobs::devices::parse_devices;
use crate::plan::machines::Network;
use crate::plan::network::Configured;

fn device(worker: &str, id: &str, kind: &str, memory: i64, job: Option<&str>) -> ClusterDeviceRow {
    ClusterDeviceRow {
        worker_id: worker.into(),
        host: "h".into(),
        host_memory_bytes: None,
        device_id: id.into(),
        kind: kind.into(),
        memory_bytes: memory,
        job_id: job.map(Into::into),
        attempt: None,
        rank: None,
    }
}

#[test]
fn free_devices_come_whole_workers_first() {
    let cluster = [
        device("a", "cpu:0", "cpu", 64 << 20, Some("other")),
        device("a", "cpu:1", "cpu", 64 << 20, None),
        device("b", "cpu:0", "cpu", 64 << 20, None),
        device("b", "cpu:1", "cpu", 64 << 20, None),
    ];
    let order: Vec<String> = (free_in_order(&cluster).iter())
        .map(|d| format!("{}/{}", d.worker_id, d.device_id))
        .collect();
    assert_eq!(order, ["b/cpu:0", "b/cpu:1", "a/cpu:1"]);
}

/// Two workers on one host are one machine: its slots come together, the fuller machine first,
/// even when a worker of another machine has more free devices than either of them.
#[test]
fn one_machines_free_devices_are_consecutive() {
    let on = |host: &str, worker: &str, id: &str| ClusterDeviceRow {
        host: host.into(),
        ..device(worker, id, "cpu", 64 << 20, None)
    };
    let cluster = [
        on("m1", "a", "cpu:0"),
        on("m2", "b", "cpu:0"),
        on("m2", "b", "cpu:1"),
        on("m2", "b", "cpu:2"),
        on("m1", "c", "cpu:0"),
        on("m1", "c", "cpu:1"),
        on("m1", "d", "cpu:0"),
        on("m1", "d", "cpu:1"),
    ];
    let order: Vec<String> = (free_in_order(&cluster).iter())
        .map(|d| format!("{}/{}/{}", d.host, d.worker_id, d.device_id))
        .collect();
    assert_eq!(
        order,
        [
            "m1/c/cpu:0",
            "m1/c/cpu:1",
            "m1/d/cpu:0",
            "m1/d/cpu:1",
            "m1/a/cpu:0",
            "m2/b/cpu:0",
            "m2/b/cpu:1",
            "m2/b/cpu:2",
        ]
    );
}

fn spec(parallelism: serde_json::Value) -> JobSpec {
    serde_json::from_value(serde_json::json!({
        "model": {"hidden_size": 32, "num_layers": 4, "num_heads": 4, "intermediate_size": 48, "vocab_size": 256},
        "data": {"train": "file_x"},
        "training": {"seq_len": 16, "micro_batch_size": 1, "microbatches": 4, "steps": 1},
        "parallelism": parallelism
    }))
    .unwrap()
}

#[test]
fn new_jobs_are_planned_over_several_cpu_workers_at_the_least_memory() {
    let one = [
        device("a", "cpu:0", "cpu", 64 << 20, None),
        device("a", "cpu:1", "cpu", 64 << 20, None),
    ];
    assert_eq!(
        cluster_for_new_jobs(&one),
        None,
        "one worker: its own devices"
    );
    let two = [
        device("a", "cpu:0", "cpu", 64 << 20, None),
        device("b", "cpu:0", "cpu", 32 << 20, Some("held")),
        device("b", "cpu:1", "cpu", 100, None),
    ];
    let text = |devices: &[ClusterDeviceRow]| cluster_for_new_jobs(devices).map(|c| c.text);
    assert_eq!(text(&two).as_deref(), Some("cpu:3x100"));
    assert_eq!(text(&two[..2]).as_deref(), Some("cpu:2x32MiB"));
    let named = cluster_for_new_jobs(&two).unwrap();
    assert_eq!(named.devices, parse_devices("cpu:3x100").unwrap());
    let mixed = [
        device("a", "cpu:0", "cpu", 64 << 20, None),
        device("b", "cuda:0", "cuda", 1 << 30, None),
    ];
    assert_eq!(
        cluster_for_new_jobs(&mixed),
        None,
        "CPU devices and GPUs: the service's own"
    );
}

/// On GPU workers only, a new job is planned over every GPU by its ordinal on its worker, all
/// at the least memory registered.
#[test]
fn new_jobs_are_planned_over_several_gpu_workers_by_ordinal() {
    let gpus = [
        device("a", "cuda:0", "cuda", 40 << 30, None),
        device("a", "cuda:1", "cuda", 40 << 30, Some("held")),
        device("b", "cuda:0", "cuda", 30 << 30, None),
        device("b", "cuda:1", "cuda", 40 << 30, None),
    ];
    let named = cluster_for_new_jobs(&gpus).unwrap();
    assert_eq!(named.text, "cuda:0,1,0,1@30GiB");
    let ids: Vec<&str> = named.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]);
    assert!(
        (named.devices.iter()).all(|d| d.kind == "cuda" && d.memory_bytes == 30 << 30),
        "{:?}",
        named.devices
    );
    assert_eq!(
        cluster_for_new_jobs(&gpus[..2]),
        None,
        "one worker: its own devices"
    );
}

fn refs(slots: &[ClusterDeviceRow]) -> Vec<&ClusterDeviceRow> {
    slots.iter().collect()
}

/// Each worker's host memory is shared among its slots; the plan gets the least share per
/// slot, never more than the least worker's whole.
#[test]
fn the_host_budget_is_the_least_workers_share() {
    let with = |worker: &str, id: &str, host: Option<i64>| ClusterDeviceRow {
        host_memory_bytes: host,
        ..device(worker, id, "cpu", 64 << 20, None)
    };
    let unbounded = [with("a", "cpu:0", None), with("b", "cpu:0", None)];
    assert_eq!(host_budget(&refs(&unbounded)), None);
    // a: 8 GiB over 2 slots, b: 6 GiB over 1, c unbounded: 4 GiB a slot, 4 slots, but at most
    // the 6 GiB a rank on b may hold.
    let mixed = [
        with("a", "cpu:0", Some(8 << 30)),
        with("a", "cpu:1", Some(8 << 30)),
        with("b", "cpu:0", Some(6 << 30)),
        with("c", "cpu:0", None),
    ];
    assert_eq!(host_budget(&refs(&mixed)), Some(6 << 30));
    // Without b: 4 GiB a slot over 3 slots, within a's 8 GiB.
    let without_b = [mixed[0].clone(), mixed[1].clone(), mixed[3].clone()];
    assert_eq!(host_budget(&refs(&without_b)), Some(8 << 30));
    let roomy = [
        with("a", "cpu:0", Some(40 << 30)),
        with("b", "cpu:0", Some(40 << 30)),
    ];
    assert_eq!(host_budget(&refs(&roomy)), Some(40 << 30));
    let tight = [
        with("a", "cpu:0", Some(2 << 30)),
        with("a", "cpu:1", Some(2 << 30)),
        with("b", "cpu:0", Some(40 << 30)),
    ];
    assert_eq!(
        host_budget(&refs(&tight)),
        Some(2 << 30),
        "1 GiB a slot, 3 slots, at most a's 2"
    );
}

#[test]
fn a_layout_pins_the_ranks_devices_and_degrees() {
    let mut spec = spec(serde_json::json!({"stages": "auto", "data_parallel": "auto"}));
    let layout = GangLayout {
        devices: "cpu:4x64MiB".into(),
        stages: 2,
        data_parallel: 2,
        host_memory_bytes: Some(3 << 30),
    };
    layout.apply(&mut spec);
    assert_eq!(spec.devices.as_deref(), Some("cpu:4x64MiB"));
    assert_eq!(spec.parallelism.stages, Stages::Count(2));
    assert_eq!(spec.parallelism.data_parallel, DataParallel::Count(2));
    let text = serde_json::to_string(&layout).unwrap();
    assert_eq!(serde_json::from_str::<GangLayout>(&text).unwrap(), layout);
}

/// Two workers of two CPU devices each, all free, each on a machine of its own.
fn two_workers() -> Vec<ClusterDeviceRow> {
    ["a", "b"]
        .into_iter()
        .flat_map(|w| {
            (0..2).map(move |i| ClusterDeviceRow {
                host: format!("machine-{w}"),
                ..device(w, &format!("cpu:{i}"), "cpu", 64 << 20, None)
            })
        })
        .collect()
}

/// Every link of the cluster at `network`, as the operator would configure it.
fn everywhere(network: Network) -> NetworkFigures {
    NetworkFigures::configured(Configured {
        bytes_per_s: Some(network.bytes_per_s),
        latency_s: Some(network.latency_s),
    })
}

fn auto_degrees() -> JobSpec {
    spec(serde_json::json!({"stages": "auto", "data_parallel": "auto"}))
}

async fn over_two_workers(network: NetworkFigures) -> ClusterPlan {
    let planner: Arc<dyn Planner> = Arc::new(crate::jobs::ExecPlanner);
    plan_resolved(planner, &network, &auto_degrees(), &two_workers())
        .await
        .expect("a plan fits four devices of 64 MiB")
}

/// Links between workers that cost nothing: the choice is the simulation's alone.
fn free_links() -> NetworkFigures {
    everywhere(Network {
        bytes_per_s: f64::INFINITY,
        latency_s: 0.0,
    })
}

/// Links so slow that a step sending anything between workers takes seconds.
fn slow_links() -> NetworkFigures {
    everywhere(Network {
        bytes_per_s: 1e3,
        latency_s: 1.0,
    })
}

fn degrees(plan: &ClusterPlan) -> (u32, u32, usize) {
    (
        plan.layout.stages,
        plan.layout.data_parallel,
        plan.ranks.len(),
    )
}

/// With links that cost nothing the pick is the planner's own over every free device: the
/// fastest in simulation.
#[tokio::test]
async fn free_links_take_the_planners_own_pick() {
    let blind = over_two_workers(free_links()).await;
    let mut on_four = auto_degrees();
    on_four.devices = Some("cpu:4x64MiB".into());
    let infos = parse_devices("cpu:4x64MiB").unwrap();
    let own = crate::jobs::ExecPlanner
        .plan(&on_four, &infos, u64::MAX)
        .unwrap();
    assert_eq!(
        (blind.layout.stages, blind.layout.data_parallel),
        (own.summary.stages, own.summary.replicas),
        "{}",
        blind.describe()
    );
    assert_eq!(blind.outcome.summary.step_time_s, own.summary.step_time_s);
    assert_eq!(blind.network_s, 0.0);
    assert!(blind.compared.pairs >= 3, "{}", blind.describe());
}

/// The fastest plan in simulation spans both workers; over slow links a plan on one worker
/// wins, and the description says what lost and why.
#[tokio::test]
async fn slow_links_keep_the_job_on_one_worker() {
    let blind = over_two_workers(free_links()).await;
    assert_eq!(blind.ranks.len(), 4, "{}", blind.describe());
    assert!(!blind.one_worker());
    let slow = over_two_workers(slow_links()).await;
    assert!(slow.one_worker(), "{}", slow.describe());
    assert_eq!(slow.ranks.len(), 2, "{}", slow.describe());
    assert_eq!(slow.network_s, 0.0);
    assert!(
        slow.outcome.summary.step_time_s > blind.outcome.summary.step_time_s,
        "it lost in simulation and won on the network: {}",
        slow.describe()
    );
    // The network-blind pick, placed on the slow links, is what it beat.
    let said = slow.describe();
    let beaten = &blind.layout.said();
    assert!(said.contains(beaten), "{said} does not name {beaten}");
    // The other plan on one worker is next; the fastest in simulation is said apart.
    let next = slow.compared.next.as_ref().unwrap();
    assert_eq!(next.network_s, 0.0, "{said}");
    let fastest = slow.compared.fastest_simulated.as_ref().unwrap();
    assert_eq!(fastest.layout, blind.layout, "{said}");
    assert!(fastest.network_s >= 1.0, "{said}");
}

/// Links of 100 GB/s and 1 us: this small model's traffic costs little beside its step, so the
/// pick is the one blind to the network, now with its network time said. (On the default
/// 10 Gb/s and 50 us its gradient ring would cost more than a replica saves.)
#[tokio::test]
async fn fast_links_keep_the_fastest_pick() {
    let blind = over_two_workers(free_links()).await;
    let fast = everywhere(Network {
        bytes_per_s: 100e9,
        latency_s: 1e-6,
    });
    let planned = over_two_workers(fast).await;
    assert_eq!(degrees(&planned), degrees(&blind), "{}", planned.describe());
    assert!(planned.network_s > 0.0, "{}", planned.describe());
    assert!(
        planned.network_s < 0.2 * planned.outcome.summary.step_time_s,
        "{}",
        planned.describe()
    );
    assert!(planned.describe().starts_with(&format!(
        "planned over the cluster on cpu:4x64MiB: {} stages x {} replicas",
        blind.layout.stages, blind.layout.data_parallel
    )));
}

/// Given counts stay as given: two stages and "auto" replicas compare one and two replicas.
#[tokio::test]
async fn given_stages_stay_fixed() {
    let planner: Arc<dyn Planner> = Arc::new(crate::jobs::ExecPlanner);
    let two_stages = spec(serde_json::json!({"stages": 2, "data_parallel": "auto"}));
    let plan = plan_resolved(planner.clone(), &slow_links(), &two_stages, &two_workers())
        .await
        .unwrap();
    assert_eq!(degrees(&plan), (2, 1, 2), "{}", plan.describe());
    assert_eq!(plan.compared.pairs, 2, "{}", plan.describe());
    let four = spec(serde_json::json!({"stages": 4}));
    let plan = plan_resolved(planner.clone(), &slow_links(), &four, &two_workers())
        .await
        .unwrap();
    assert_eq!(
        degrees(&plan),
        (4, 1, 4),
        "the only pair: {}",
        plan.describe()
    );
    assert!(plan.network_s >= 1.0);
    let five = spec(serde_json::json!({"stages": 5}));
    let refused = plan_resolved(planner, &slow_links(), &five, &two_workers()).await;
    assert!(
        matches!(&refused, Err(NotPlanned::DoesNotFit(why)) if why.contains("4 free CPU devices")),
        "{:?}",
        refused.err()
    );
}

/// A GPU worker on its own machine: `gpus` GPUs (`cuda:0`, `cuda:1`, ...) of `memory` each.
fn gpu_worker(worker: &str, gpus: usize, memory: i64) -> Vec<ClusterDeviceRow> {
    (0..gpus)
        .map(|i| ClusterDeviceRow {
            host: format!("machine-{worker}"),
            ..device(worker, &format!("cuda:{i}"), "cuda", memory, None)
        })
        .collect()
}

/// The GPU ordinals a plan's ranks hold, each on its own worker, and their workers.
fn rank_gpus(plan: &ClusterPlan) -> (Vec<usize>, Vec<&str>) {
    let ordinals = (plan.ranks.iter())
        .map(|r| r.device_id.strip_prefix("cuda:").unwrap().parse().unwrap())
        .collect();
    let workers = plan.ranks.iter().map(|r| r.worker_id.as_str()).collect();
    (ordinals, workers)
}

/// Two GPU workers of two GPUs, links that cost nothing: the pick is the planner's own over
/// the four GPUs at the least memory, and the layout names each rank's GPU by its ordinal on
/// its worker, with that memory as the cap.
#[tokio::test]
async fn gpu_workers_are_planned_like_cpu_workers() {
    let planner: Arc<dyn Planner> = Arc::new(crate::jobs::ExecPlanner);
    let cluster = [gpu_worker("a", 2, 40 << 30), gpu_worker("b", 2, 30 << 30)].concat();
    let blind = plan_resolved(planner, &free_links(), &auto_degrees(), &cluster)
        .await
        .expect("a plan fits four GPUs");
    let said = blind.describe();
    let (ordinals, workers) = rank_gpus(&blind);
    assert_eq!(
        blind.layout.devices,
        cuda_devices(&ordinals, 30 << 30),
        "{said}"
    );
    let on_four = GangKind::Cuda.infos(&cluster.iter().collect::<Vec<_>>(), 30 << 30);
    let mut pinned = auto_degrees();
    pinned.devices = Some(cuda_devices(&[0, 1, 0, 1], 30 << 30));
    let own = (crate::jobs::ExecPlanner.plan(&pinned, &on_four, u64::MAX)).unwrap();
    assert_eq!(
        (blind.layout.stages, blind.layout.data_parallel),
        (own.summary.stages, own.summary.replicas),
        "{said}"
    );
    assert_eq!(blind.outcome.summary.step_time_s, own.summary.step_time_s);
    assert_eq!(blind.ranks.len(), 4, "{said}");
    assert!(workers.contains(&"a") && workers.contains(&"b"), "{said}");
    assert!(
        said.starts_with("planned over the cluster on cuda:"),
        "{said}"
    );
    assert!(said.contains("@30GiB"), "{said}");
}

/// Three GPU workers on three machines, four stages: the two fuller workers' GPUs, the cap the
/// least among those placed (not the smaller GPU left out), a replica's stages kept on each
/// machine in turn.
#[tokio::test]
async fn four_stages_take_the_fuller_gpu_workers() {
    let planner: Arc<dyn Planner> = Arc::new(crate::jobs::ExecPlanner);
    let mut a = gpu_worker("a", 2, 40 << 30);
    a[1].memory_bytes = 38 << 30;
    let cluster = [
        a,
        gpu_worker("b", 2, 40 << 30),
        gpu_worker("c", 1, 24 << 30),
    ]
    .concat();
    let four = spec(serde_json::json!({"stages": 4}));
    let plan = plan_resolved(planner, &slow_links(), &four, &cluster)
        .await
        .unwrap();
    let said = plan.describe();
    assert_eq!(degrees(&plan), (4, 1, 4), "{said}");
    let (ordinals, workers) = rank_gpus(&plan);
    assert_eq!(workers, ["a", "a", "b", "b"], "{said}");
    assert_eq!(ordinals, [0, 1, 0, 1], "{said}");
    assert_eq!(plan.layout.devices, "cuda:0,1,0,1@38GiB", "{said}");
    assert!(plan.network_s >= 1.0, "one link crossed: {said}");
}

/// Over slow links a small job stays on one GPU worker: the one-worker claim runs it.
#[tokio::test]
async fn a_job_fitting_one_gpu_worker_is_left_to_its_claim() {
    let planner: Arc<dyn Planner> = Arc::new(crate::jobs::ExecPlanner);
    let cluster = [gpu_worker("a", 2, 40 << 30), gpu_worker("b", 2, 40 << 30)].concat();
    let plan = plan_resolved(planner, &slow_links(), &auto_degrees(), &cluster)
        .await
        .unwrap();
    let said = plan.describe();
    assert!(plan.one_worker(), "{said}");
    assert_eq!(plan.network_s, 0.0, "{said}");
    let (ordinals, _) = rank_gpus(&plan);
    assert_eq!(
        plan.layout.devices,
        cuda_devices(&ordinals, 40 << 30),
        "{said}"
    );
}

/// bf16 plans with the CUDA backend's bf16 layout, and its activations cross the network at
/// half the bytes of f32's (gradients stay f32); CPU devices do not run it.
#[tokio::test]
async fn bf16_on_gpus_sends_half_the_activations() {
    let planner: Arc<dyn Planner> = Arc::new(crate::jobs::ExecPlanner);
    let cluster = [gpu_worker("a", 2, 40 << 30), gpu_worker("b", 2, 40 << 30)].concat();
    let f32_spec = spec(serde_json::json!({"stages": 4}));
    let mut bf16_spec = f32_spec.clone();
    bf16_spec.training.precision = crate::spec::PrecisionSpec::Bf16;
    let links = everywhere(Network {
        bytes_per_s: 1e3,
        latency_s: 0.0,
    });
    let f32_plan = plan_resolved(planner.clone(), &links, &f32_spec, &cluster)
        .await
        .unwrap();
    let bf16_plan = plan_resolved(planner.clone(), &links, &bf16_spec, &cluster)
        .await
        .unwrap();
    assert_eq!(degrees(&f32_plan), degrees(&bf16_plan));
    assert_eq!(f32_plan.ranks, bf16_plan.ranks);
    let (f32_s, bf16_s) = (f32_plan.network_s, bf16_plan.network_s);
    // The activations halve; a tied table's gradient (f32 in both) does not.
    assert!(bf16_s < f32_s && bf16_s >= f32_s / 2.0, "{f32_s} {bf16_s}");
    let refused = plan_resolved(planner, &links, &bf16_spec, &two_workers()).await;
    assert!(
        matches!(&refused, Err(NotPlanned::DoesNotFit(why)) if why.contains("bf16")),
        "{:?}",
        refused.err()
    );
}

/// CPU devices and GPUs in one cluster: jobs span workers over the CPU devices alone.
#[tokio::test]
async fn a_mixed_cluster_spans_its_cpu_devices_only() {
    let planner: Arc<dyn Planner> = Arc::new(crate::jobs::ExecPlanner);
    let cluster = [two_workers(), gpu_worker("g", 4, 40 << 30)].concat();
    let four = spec(serde_json::json!({"stages": 4}));
    let plan = plan_resolved(planner.clone(), &slow_links(), &four, &cluster)
        .await
        .unwrap();
    let said = plan.describe();
    assert_eq!(plan.layout.devices, "cpu:4x64MiB", "{said}");
    assert!(
        plan.ranks.iter().all(|r| r.device_id.starts_with("cpu:")),
        "{said}"
    );
    let five = spec(serde_json::json!({"stages": 5}));
    let refused = plan_resolved(planner, &slow_links(), &five, &cluster).await;
    assert!(
        matches!(&refused, Err(NotPlanned::DoesNotFit(why)) if why.contains("4 free CPU devices")),
        "{:?}",
        refused.err()
    );
}
