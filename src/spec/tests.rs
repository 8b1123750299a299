use super::*;

/// The example body of issue 4, verbatim.
const EXAMPLE: &str = r#"{
  "model": {"architecture": "llama", "hidden_size": 256, "num_layers": 4, "num_heads": 4,
            "num_kv_heads": 4, "intermediate_size": 688, "vocab_size": 256,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "init": {"seed": 1234}},
  "data": {"train": "corpus.txt", "tokenizer": "bytes"},
  "training": {"seq_len": 256, "micro_batch_size": 2, "microbatches": 4, "steps": 100,
               "optimizer": {"kind": "adamw", "lr": 3e-4, "betas": [0.9, 0.95],
                             "eps": 1e-8, "weight_decay": 0.1},
               "grad_clip": 1.0, "warmup_steps": 0, "lr_decay": "constant",
               "seed": 1234, "shuffle": false, "checkpoint_every": 50},
  "parallelism": {"stages": 4, "schedule": "chronos", "chunks_per_stage": 2,
                  "recompute": "auto", "offload": "auto"},
  "devices": "cpu:4x256MiB"
}"#;

fn example() -> JobSpec {
    JobSpec::from_json(EXAMPLE).expect("example parses")
}

fn params_of(spec: &JobSpec) -> Vec<String> {
    spec.validate()
        .unwrap_err()
        .0
        .into_iter()
        .map(|e| e.param)
        .collect()
}

#[test]
fn issue_example_parses_and_validates() {
    let spec = example();
    spec.validate().unwrap();
    assert_eq!(spec.model.init, ModelInit::Seed { seed: 1234 });
    assert_eq!(spec.parallelism.stages, Stages::Count(4));
    assert_eq!(spec.parallelism.schedule, ScheduleChoice::Named("chronos"));
    assert_eq!(spec.training.sequences_per_step(), 8);
    let arch = spec.model.explicit_arch().unwrap();
    assert_eq!(arch.dims().head_dim(), 64);
}

#[test]
fn round_trips_through_json() {
    let spec = example();
    let again = JobSpec::from_json(&serde_json::to_string(&spec).unwrap()).unwrap();
    assert_eq!(spec, again);
}

#[test]
fn minimal_body_takes_defaults() {
    let spec = JobSpec::from_json(
        r#"{"model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4,
                      "intermediate_size": 176, "vocab_size": 256},
            "data": {"train": "f"},
            "training": {"seq_len": 32, "micro_batch_size": 1, "microbatches": 2, "steps": 3}}"#,
    )
    .unwrap();
    spec.validate().unwrap();
    let arch = spec.model.explicit_arch().unwrap();
    assert_eq!(arch.num_kv_heads, 4);
    assert_eq!(arch.rope_theta, 10000.0);
    assert_eq!(spec.data.tokenizer, "bytes");
    assert_eq!(spec.training.grad_clip, Some(1.0));
    assert_eq!(spec.parallelism.stages, Stages::default());
    assert_eq!(spec.parallelism.stages.count(), None);
    assert!(matches!(
        spec.training.optimizer,
        OptimizerSpec::Adamw { .. }
    ));
    assert_eq!(spec.training.precision, PrecisionSpec::F32);
}

#[test]
fn precision_is_f32_or_bf16() {
    let with = |p: &str| {
        EXAMPLE.replace(
            r#""checkpoint_every": 50"#,
            &format!(r#""checkpoint_every": 50, "precision": {p}"#),
        )
    };
    let spec = JobSpec::from_json(&with(r#""bf16""#)).unwrap();
    assert_eq!(spec.training.precision, PrecisionSpec::Bf16);
    let err = JobSpec::from_json(&with(r#""fp16""#))
        .unwrap_err()
        .to_string();
    assert!(err.contains("fp16") && err.contains("bf16"), "{err}");
}

#[test]
fn auto_and_null_values_parse() {
    let text = EXAMPLE
        .replace(r#""stages": 4"#, r#""stages": "auto""#)
        .replace(r#""grad_clip": 1.0"#, r#""grad_clip": null"#)
        .replace(
            r#""optimizer": {"kind": "adamw", "lr": 3e-4, "betas": [0.9, 0.95],
                             "eps": 1e-8, "weight_decay": 0.1}"#,
            r#""optimizer": {"kind": "sgd", "lr": 0.5}"#,
        );
    let spec = JobSpec::from_json(&text).unwrap();
    assert_eq!(spec.parallelism.stages.count(), None);
    assert_eq!(spec.training.grad_clip, None);
    assert_eq!(spec.training.optimizer, OptimizerSpec::Sgd { lr: 0.5 });
}

#[test]
fn unknown_fields_and_bad_enums_are_rejected() {
    let err = JobSpec::from_json(&EXAMPLE.replace("\"shuffle\"", "\"shufle\"")).unwrap_err();
    assert!(err.to_string().contains("shufle"), "{err}");
    let err = JobSpec::from_json(&EXAMPLE.replace("\"chronos\"", "\"zigzag\"")).unwrap_err();
    assert!(err.to_string().contains("zigzag"), "{err}");
    assert!(JobSpec::from_json(&EXAMPLE.replace(r#""stages": 4"#, r#""stages": "many""#)).is_err());
}

#[test]
fn shape_errors_name_the_field_and_what_would_fit() {
    let mut spec = example();
    spec.model.num_heads = Some(3);
    let err = spec.validate().unwrap_err();
    assert_eq!(err.first().param, "model.num_heads");
    assert!(err.first().message.contains("do not divide"), "{err}");
    assert!(
        err.first().message.contains('4'),
        "suggests a divisor: {err}"
    );

    let mut spec = example();
    spec.model.num_kv_heads = Some(3);
    assert_eq!(params_of(&spec), ["model.num_kv_heads"]);

    let mut spec = example();
    spec.model.vocab_size = Some(100);
    assert_eq!(params_of(&spec), ["model.vocab_size"]);
}

#[test]
fn zero_sizes_are_each_reported() {
    let mut spec = example();
    spec.model.hidden_size = Some(0);
    spec.training.seq_len = 0;
    spec.training.microbatches = 0;
    spec.parallelism.stages = Stages::Count(0);
    let params = params_of(&spec);
    for want in [
        "model.hidden_size",
        "training.seq_len",
        "training.microbatches",
        "parallelism.stages",
    ] {
        assert!(
            params.iter().any(|p| p == want),
            "{want} missing from {params:?}"
        );
    }
}

#[test]
fn optimizer_settings_are_checked() {
    let mut spec = example();
    spec.training.optimizer = OptimizerSpec::Adamw {
        lr: -1.0,
        betas: [0.9, 1.0],
        eps: 0.0,
        weight_decay: f64::NAN,
    };
    spec.training.grad_clip = Some(0.0);
    spec.training.warmup_steps = 1000;
    assert_eq!(
        params_of(&spec),
        [
            "training.optimizer.lr",
            "training.optimizer.betas[1]",
            "training.optimizer.eps",
            "training.optimizer.weight_decay",
            "training.grad_clip",
            "training.warmup_steps",
        ]
    );
}

#[test]
fn random_init_needs_the_architecture() {
    let mut spec = example();
    spec.model.intermediate_size = None;
    assert_eq!(params_of(&spec), ["model.intermediate_size"]);
}

#[test]
fn pretrained_init_may_omit_the_architecture_but_must_agree() {
    let spec = JobSpec::from_json(
        r#"{"model": {"init": {"from": "hf-llama-tiny"}, "hidden_size": 64},
            "data": {"train": "f"},
            "training": {"seq_len": 32, "micro_batch_size": 1, "microbatches": 2, "steps": 3}}"#,
    )
    .unwrap();
    spec.validate().unwrap();
    let pretrained = ModelArch {
        architecture: Architecture::Llama,
        hidden_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        intermediate_size: 176,
        vocab_size: 256,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: Some(64),
        tie_embeddings: false,
    };
    assert_eq!(
        spec.model.merge_pretrained(&pretrained).unwrap(),
        pretrained
    );
    let other = ModelArch {
        hidden_size: 128,
        ..pretrained
    };
    let errors = spec.model.merge_pretrained(&other).unwrap_err();
    assert_eq!(errors[0].param, "model.hidden_size");
    assert!(errors[0].message.contains("128"), "{}", errors[0]);
    // Tied embeddings are the checkpoint's to decide; a given value must agree.
    let tied = ModelArch {
        tie_embeddings: true,
        ..pretrained
    };
    let mut untied = spec.model.clone();
    untied.tie_embeddings = Some(false);
    let errors = untied.merge_pretrained(&tied).unwrap_err();
    assert_eq!(errors[0].param, "model.tie_embeddings");
    assert_eq!(spec.model.merge_pretrained(&tied).unwrap(), tied);
}

/// Validation data is evaluated; the settings that evaluate it need it, by name.
#[test]
fn validation_settings_need_validation_data() {
    let mut spec = example();
    spec.training.eval_every = Some(10);
    spec.training.early_stopping = Some(EarlyStoppingSpec {
        patience: 0,
        min_delta: -1.0,
    });
    spec.training.keep_checkpoints = Some(0);
    assert_eq!(
        params_of(&spec),
        [
            "training.eval_every",
            "training.early_stopping",
            "training.early_stopping.patience",
            "training.early_stopping.min_delta",
            "training.keep_checkpoints"
        ]
    );
    spec.data.validation = Some("valid.txt".into());
    spec.training.eval_every = Some(0);
    assert_eq!(params_of(&spec)[0], "training.eval_every");
    spec.training.eval_every = Some(10);
    spec.training.early_stopping = Some(EarlyStoppingSpec {
        patience: 2,
        min_delta: 0.01,
    });
    spec.training.keep_checkpoints = Some(2);
    spec.validate().unwrap();
    assert!(spec.training.evaluates_at(10, 100) && spec.training.evaluates_at(100, 100));
    assert!(!spec.training.evaluates_at(50 + 5, 100));
    spec.training.eval_every = None; // at every checkpoint (50) and the end
    assert!(spec.training.evaluates_at(50, 100) && !spec.training.evaluates_at(10, 100));
}

#[test]
fn rope_scaling_and_architecture_are_read_and_checked() {
    let spec = JobSpec::from_json(
        r#"{"model": {"architecture": "mistral", "hidden_size": 64, "num_layers": 2,
                      "num_heads": 4, "intermediate_size": 176, "vocab_size": 256,
                      "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192}},
            "data": {"train": "f"},
            "training": {"seq_len": 32, "micro_batch_size": 1, "microbatches": 2, "steps": 3}}"#,
    )
    .unwrap();
    assert_eq!(
        spec.model.explicit_arch().unwrap().architecture,
        Architecture::Mistral
    );
    assert_eq!(
        params_of(&spec),
        ["model.rope_scaling.high_freq_factor"],
        "a high band below the low one is refused"
    );
    let yarn = r#"{"model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4,
                   "intermediate_size": 176, "vocab_size": 256,
                   "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
                   "data": {"train": "f"},
                   "training": {"seq_len": 32, "micro_batch_size": 1, "microbatches": 2,
                                "steps": 3}}"#;
    let err = JobSpec::from_json(yarn).unwrap_err();
    assert!(err.to_string().contains("yarn"), "{err}");
}

#[test]
fn data_parallel_is_a_count_that_shares_the_micro_batches() {
    let mut spec = example();
    assert_eq!(spec.parallelism.data_parallel, DataParallel::Count(1));
    assert!(
        !serde_json::to_string(&spec)
            .unwrap()
            .contains("data_parallel")
    );
    spec.parallelism.data_parallel = DataParallel::Count(2);
    spec.validate().unwrap();
    for refused in [DataParallel::Count(0), DataParallel::Count(3)] {
        spec.parallelism.data_parallel = refused;
        assert_eq!(
            params_of(&spec),
            ["parallelism.data_parallel"],
            "{refused:?}"
        );
    }
    let auto = EXAMPLE.replace(
        r#""stages": 4,"#,
        r#""stages": 4, "data_parallel": "auto","#,
    );
    let auto = JobSpec::from_json(&auto).unwrap();
    assert_eq!(auto.parallelism.data_parallel.count(), None);
    // The planner searches the replicas (the run refuses it on CUDA devices).
    auto.validate().unwrap();
    let mut sharded = example();
    sharded.parallelism.shard_optimizer = Some(false);
    sharded.validate().unwrap();
    sharded.parallelism.shard_optimizer = Some(true);
    assert_eq!(params_of(&sharded), ["parallelism.shard_optimizer"]);
}

#[test]
fn init_names_a_seed_a_file_a_job_or_a_jobs_step() {
    let init = |json: &str| {
        let text = EXAMPLE.replace(r#"{"seed": 1234}"#, json);
        JobSpec::from_json(&text).map(|spec| spec.model.init)
    };
    let file = init(r#"{"from": "file_01"}"#).unwrap();
    assert_eq!(file.source_job(), None);
    assert_eq!(file.directory().unwrap(), Some("file_01"));
    let latest = init(r#"{"from": "job_01"}"#).unwrap();
    assert_eq!(latest.source_job(), Some(("job_01", None)));
    let step = init(r#"{"from": {"job": "job_01", "step": 120}}"#).unwrap();
    assert_eq!(step.source_job(), Some(("job_01", Some(120))));
    for job in [latest, step] {
        assert_eq!(job.directory().unwrap_err().param, "model.init.from");
    }
    // A step without its job, or a job's step in the wrong type, says which forms there are.
    for bad in [
        r#"{"from": {"step": 3}}"#,
        r#"{"from": {"job": "job_01", "step": "3"}}"#,
    ] {
        let e = init(bad).unwrap_err();
        assert!(
            e.first()
                .message
                .contains(r#"{"from": {"job": "job_…", "step": N}}"#),
            "{}",
            e.first().message
        );
    }
    let mut spec = example();
    spec.model.init = init(r#"{"from": {"job": "file_01", "step": 1}}"#).unwrap();
    assert_eq!(params_of(&spec), ["model.init.from.job"]);
}
