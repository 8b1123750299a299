use super::*;

const HOST: u64 = 4 << 30;

fn spec(parallelism: &str) -> JobSpec {
    JobSpec::from_json(&format!(
        r#"{{"model": {{"hidden_size": 64, "num_layers": 4, "num_heads": 4,
                      "intermediate_size": 176, "vocab_size": 256}},
            "data": {{"train": "f"}},
            "training": {{"seq_len": 32, "micro_batch_size": 1, "microbatches": 4,
                          "steps": 3}},
            "parallelism": {parallelism}}}"#
    ))
    .unwrap()
}

fn gpu(id: &str, memory_bytes: u64) -> DeviceInfo {
    DeviceInfo {
        id: id.into(),
        kind: "cuda".into(),
        memory_bytes,
    }
}

fn gpus(count: usize, memory_bytes: u64) -> Vec<DeviceInfo> {
    (0..count)
        .map(|g| gpu(&format!("cuda:{g}"), memory_bytes))
        .collect()
}

/// One GPU runs a one-stage pipeline, planned with the CUDA layout against its measured
/// memory; a job asking for more stages than the GPUs is refused by field.
#[test]
fn a_gpu_is_planned_as_one_stage_against_its_measured_memory() {
    let planner = ExecPlanner;
    let devices = [gpu("cuda:1", 8 << 30)];
    let out = planner.plan(&spec("{}"), &devices, HOST).unwrap();
    assert_eq!(
        (
            out.summary.stages,
            out.summary.replicas,
            out.summary.devices
        ),
        (1, 1, 1)
    );
    // The cuda-f32 layout is not the CPU's: the same job on a CPU device of the same size
    // is planned with its own (different) peak.
    let cpu = DeviceInfo {
        kind: "cpu".into(),
        ..gpu("cpu:0", 8 << 30)
    };
    let on_cpu = planner
        .plan(&spec(r#"{"stages": 1}"#), &[cpu], HOST)
        .unwrap();
    assert_ne!(out.summary.peak_bytes, on_cpu.summary.peak_bytes);

    match planner.plan(&spec(r#"{"stages": 2}"#), &devices, HOST) {
        Err(PlanFailure::Invalid(e)) => assert_eq!(e.first().param, "parallelism.stages"),
        other => panic!("stages 2 on a GPU: {other:?}"),
    }
    match planner.plan(&spec("{}"), &[gpu("cuda:0", 1 << 16)], HOST) {
        Err(PlanFailure::DoesNotFit {
            smallest_memory_bytes,
            ..
        }) => assert!(smallest_memory_bytes > 1 << 16),
        other => panic!("64 KiB GPU: {other:?}"),
    }
}

/// Whole GPUs (`serve --devices cuda:0,1,2,3`): a job takes as many as its stages x
/// replicas, replica by replica, each device on its own GPU; the rest stay free for
/// other jobs (the worker claims the first free ones: a 2 x 2 job given GPUs 2 to 5 runs
/// replica 0 on GPUs 2 and 3, replica 1 on 4 and 5).
#[test]
fn a_job_takes_stages_x_replicas_gpus() {
    let planner = ExecPlanner;
    let eight = gpus(8, 8 << 30);
    let two_by_two = spec(r#"{"stages": 2, "data_parallel": 2, "schedule": "1f1b"}"#);
    let out = planner.plan(&two_by_two, &eight, HOST).unwrap();
    let s = &out.summary;
    assert_eq!((s.stages, s.replicas, s.devices), (2, 2, 4));
    assert_eq!(s.peak_bytes.len(), 4);
    assert_eq!(out.plan["plan"]["replicas"], 2);
    let Ok(Placement::Gpu { set, ordinals }) = placement(&eight[2..6], HOST) else {
        panic!("four GPUs");
    };
    assert_eq!(ordinals, [2, 3, 4, 5]);
    assert_eq!(set.devices[1].name(), "cuda:3");
    let devices: Vec<String> = eight[2..6].iter().map(|d| d.id.clone()).collect();
    let placed = s.placement(&devices);
    let got: Vec<(u32, u32, &str)> = (placed.iter())
        .map(|p| (p.replica, p.stage, p.device.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (0, 0, "cuda:2"),
            (0, 1, "cuda:3"),
            (1, 0, "cuda:4"),
            (1, 1, "cuda:5")
        ]
    );
    // Two smaller jobs each take what they ask, so both fit the 8 side by side.
    let stages_only = planner
        .plan(&spec(r#"{"stages": 2}"#), &eight, HOST)
        .unwrap();
    let replicas_only = planner
        .plan(&spec(r#"{"stages": 1, "data_parallel": 4}"#), &eight, HOST)
        .unwrap();
    assert_eq!(
        (stages_only.summary.devices, replicas_only.summary.devices),
        (2, 4)
    );
    assert_eq!(replicas_only.summary.replicas, 4);
}

/// `"auto"` replicas on GPUs: the planner picks stages x replicas within the GPUs, no
/// slower than any layout it could have been given.
#[test]
fn auto_replicas_on_gpus_pick_the_fastest_layout() {
    let planner = ExecPlanner;
    let four = gpus(4, 8 << 30);
    let auto = planner
        .plan(
            &spec(r#"{"stages": "auto", "data_parallel": "auto", "schedule": "1f1b"}"#),
            &four,
            HOST,
        )
        .unwrap();
    let a = &auto.summary;
    assert_eq!(a.stages * a.replicas, a.devices);
    assert!(a.devices <= 4);
    assert_eq!(auto.plan["best"]["data_parallel"], a.replicas);
    for (stages, replicas) in [(1, 4), (2, 2), (4, 1)] {
        let fixed = planner
            .plan(
                &spec(&format!(
                    r#"{{"stages": {stages}, "data_parallel": {replicas}, "schedule": "1f1b"}}"#
                )),
                &four,
                HOST,
            )
            .unwrap();
        assert!(
            a.step_time_s <= fixed.summary.step_time_s * (1.0 + 1e-9),
            "auto {} x {}: {} s; {stages} x {replicas}: {} s",
            a.stages,
            a.replicas,
            a.step_time_s,
            fixed.summary.step_time_s
        );
    }
}

/// What the GPUs cannot hold, or the runtime cannot run on them, is refused by field.
#[test]
fn gpu_layouts_that_do_not_fit_are_refused_by_field() {
    let planner = ExecPlanner;
    let four = gpus(4, 8 << 30);
    let refused = |parallelism: &str, microbatches: usize| {
        let mut s = spec(parallelism);
        s.training.microbatches = microbatches;
        match planner.plan(&s, &four, HOST) {
            Err(PlanFailure::Invalid(e)) => (e.first().param.clone(), e.first().message.clone()),
            other => panic!("{parallelism}: {other:?}"),
        }
    };
    let (param, message) = refused(r#"{"stages": "auto", "data_parallel": 3}"#, 3);
    assert_eq!(param, "parallelism.data_parallel");
    assert!(message.contains("do not divide the 4 devices"), "{message}");
    let (param, message) = refused(r#"{"stages": 3, "data_parallel": 2}"#, 4);
    assert_eq!(param, "parallelism.stages");
    assert!(message.contains("need 6 devices but 4"), "{message}");
    let (param, message) = refused(r#"{"stages": 1, "data_parallel": 3}"#, 4);
    assert_eq!(param, "parallelism.data_parallel");
    assert!(message.contains("training.microbatches"), "{message}");
}

/// Stages sharing a GPU (`serve --devices cuda:0x4`) are a pipeline planned with the
/// CUDA layout, each stage within the memory the service gives it.
#[test]
fn stages_sharing_a_gpu_are_planned_as_a_pipeline() {
    let planner = ExecPlanner;
    let stages: Vec<DeviceInfo> = (0..4)
        .map(|s| gpu(&format!("cuda:0/stage{s}"), 2 << 30))
        .collect();
    let one_f_one_b = spec(r#"{"schedule": "1f1b"}"#);
    let out = planner.plan(&one_f_one_b, &stages, HOST).unwrap();
    assert_eq!((out.summary.stages, out.summary.devices), (4, 4));
    assert_eq!(out.summary.schedule, "1f1b");
    let Ok(Placement::Gpu { set, ordinals }) = placement(&stages, HOST) else {
        panic!("stages of one GPU");
    };
    assert_eq!(ordinals, [0, 0, 0, 0]);
    assert_eq!(set.devices[3].name(), "cuda:0/stage3");
    // The same pipeline on four CPU devices is planned with its own (different) peaks.
    let cpus: Vec<DeviceInfo> = (0..4)
        .map(|i| DeviceInfo {
            kind: "cpu".into(),
            ..gpu(&format!("cpu:{i}"), 2 << 30)
        })
        .collect();
    let on_cpu = planner.plan(&one_f_one_b, &cpus, HOST).unwrap();
    assert_ne!(out.summary.peak_bytes, on_cpu.summary.peak_bytes);
}

/// `training.precision: bf16` plans GPU stages with the `cuda-bf16` layout and is refused
/// on CPU devices, by field. The layout halves activations and adds a 2-byte copy of each
/// projection weight, so its peaks are smaller where a stage's f32 activations outweigh its
/// projection weights' f32 bytes (roughly): here 256-token sequences, 4 to a
/// micro-batch (the helper's 32-token, 1-sequence micro-batches hold less than the copies).
#[test]
fn bf16_jobs_plan_smaller_on_gpus_and_are_refused_on_cpus() {
    let planner = ExecPlanner;
    let bf16 = |s: JobSpec| {
        let mut s = s;
        s.training.precision = crate::spec::PrecisionSpec::Bf16;
        s
    };
    let mut one_f_one_b = spec(r#"{"schedule": "1f1b"}"#);
    (
        one_f_one_b.training.seq_len,
        one_f_one_b.training.micro_batch_size,
    ) = (256, 4);
    let stages: Vec<DeviceInfo> = (0..2)
        .map(|s| gpu(&format!("cuda:0/stage{s}"), 2 << 30))
        .collect();
    let f32_plan = planner.plan(&one_f_one_b, &stages, HOST).unwrap();
    let bf16_plan = planner
        .plan(&bf16(one_f_one_b.clone()), &stages, HOST)
        .unwrap();
    let (b, f) = (&bf16_plan.summary.peak_bytes, &f32_plan.summary.peak_bytes);
    assert_eq!(b.len(), f.len());
    assert!(
        b.iter().zip(f).all(|(b, f)| b < f),
        "bf16 {b:?} vs f32 {f:?}"
    );
    let whole = planner.plan(&bf16(spec("{}")), &[gpu("cuda:0", 8 << 30)], HOST);
    assert!(whole.is_ok(), "{whole:?}");

    let cpu = DeviceInfo {
        kind: "cpu".into(),
        ..gpu("cpu:0", 1 << 30)
    };
    match planner.plan(&bf16(one_f_one_b), &[cpu], HOST) {
        Err(PlanFailure::Invalid(e)) => {
            assert_eq!(e.first().param, "training.precision");
            assert!(e.first().message.contains("CUDA"), "{}", e.first().message);
        }
        other => panic!("bf16 on a CPU device: {other:?}"),
    }
}

#[test]
fn devices_of_two_kinds_are_refused() {
    let cpu = DeviceInfo {
        id: "cpu:0".into(),
        kind: "cpu".into(),
        memory_bytes: 1 << 30,
    };
    let err = placement(&[cpu, gpu("cuda:0", 1 << 30)], HOST)
        .err()
        .unwrap();
    assert!(err.contains("cuda:0"), "{err}");
}
