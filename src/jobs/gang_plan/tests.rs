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
    assert_eq!(cluster_for_new_jobs(&two).as_deref(), Some("cpu:3x100"));
    assert_eq!(
        cluster_for_new_jobs(&two[..2]).as_deref(),
        Some("cpu:2x32MiB")
    );
    let gpu = [
        device("a", "cpu:0", "cpu", 64 << 20, None),
        device("b", "cuda:0", "cuda", 1 << 30, None),
    ];
    assert_eq!(cluster_for_new_jobs(&gpu), None, "GPUs do not span workers");
    assert!(parse_devices("cpu:3x100").is_ok());
}

#[test]
fn a_layout_pins_the_ranks_devices_and_degrees() {
    let mut spec: JobSpec = serde_json::from_value(serde_json::json!({
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "vocab_size": 256},
        "data": {"train": "file_x"},
        "training": {"seq_len": 16, "micro_batch_size": 1, "microbatches": 4, "steps": 1},
        "parallelism": {"stages": "auto", "data_parallel": "auto"}
    }))
    .unwrap();
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
