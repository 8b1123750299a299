use super::*;

fn device(worker: &str, id: &str, kind: &str, memory: i64, job: Option<&str>) -> ClusterDeviceRow {
    ClusterDeviceRow {
        worker_id: worker.into(),
        host: "h".into(),
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
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "vocab_size": 256},
        "data": {"train": "file_x"},
        "training": {"seq_len": 16, "micro_batch_size": 1, "microbatches": 4, "steps": 1},
        "parallelism": parallelism
    }))
    .unwrap()
}

#[test]
fn new_jobs_are_planned_over_several_cpu_workers_at_the_least_memory() {
    let spec = spec(serde_json::json!({"stages": "auto", "data_parallel": "auto"}));
    let one = [
        device("a", "cpu:0", "cpu", 64 << 20, None),
        device("a", "cpu:1", "cpu", 64 << 20, None),
    ];
    assert_eq!(
        cluster_for_new_jobs(&one, &spec),
        None,
        "one worker: its own devices"
    );
    let two = [
        device("a", "cpu:0", "cpu", 64 << 20, None),
        device("b", "cpu:0", "cpu", 32 << 20, Some("held")),
        device("b", "cpu:1", "cpu", 100, None),
    ];
    assert_eq!(
        cluster_for_new_jobs(&two, &spec).as_deref(),
        Some("cpu:3x100")
    );
    assert_eq!(
        cluster_for_new_jobs(&two[..2], &spec).as_deref(),
        Some("cpu:2x32MiB")
    );
    let gpu = [
        device("a", "cpu:0", "cpu", 64 << 20, None),
        device("b", "cuda:0", "cuda", 1 << 30, None),
    ];
    assert_eq!(
        cluster_for_new_jobs(&gpu, &spec),
        None,
        "GPUs do not span workers"
    );
    assert!(parse_devices("cpu:3x100").is_ok());
}

/// Sharded optimizer state needs the replicas in one process: such a job is planned on the
/// largest worker alone, and a plan over several workers keeps the whole state its ranks run.
#[test]
fn sharded_jobs_stay_on_one_worker_and_ranks_keep_whole_state() {
    let three = [
        device("a", "cpu:0", "cpu", 64 << 20, None),
        device("b", "cpu:0", "cpu", 64 << 20, None),
        device("b", "cpu:1", "cpu", 64 << 20, None),
    ];
    let sharded = spec(serde_json::json!({"data_parallel": "auto", "shard_optimizer": true}));
    assert_eq!(
        cluster_for_new_jobs(&three, &sharded).as_deref(),
        Some("cpu:2x64MiB")
    );
    assert_eq!(
        as_ranks_run(&sharded).parallelism.shard_optimizer,
        Some(true)
    );
    let default = spec(serde_json::json!({"data_parallel": "auto"}));
    assert_eq!(
        cluster_for_new_jobs(&three, &default).as_deref(),
        Some("cpu:3x64MiB")
    );
    assert_eq!(
        as_ranks_run(&default).parallelism.shard_optimizer,
        Some(false)
    );
}

#[test]
fn a_layout_pins_the_ranks_devices_and_degrees() {
    let mut spec = spec(serde_json::json!({"stages": "auto", "data_parallel": "auto"}));
    let layout = GangLayout {
        devices: "cpu:4x64MiB".into(),
        stages: 2,
        data_parallel: 2,
    };
    layout.apply(&mut spec);
    assert_eq!(spec.devices.as_deref(), Some("cpu:4x64MiB"));
    assert_eq!(spec.parallelism.stages, Stages::Count(2));
    assert_eq!(spec.parallelism.data_parallel, DataParallel::Count(2));
    let text = serde_json::to_string(&layout).unwrap();
    assert_eq!(serde_json::from_str::<GangLayout>(&text).unwrap(), layout);
}
