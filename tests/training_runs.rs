//! Whole runs through `exec::run`, as `chronospipe train` and the service's workers make them:
//! bit-identical checkpoints whatever the plan, exact resume, predicted = measured memory, and
//! bad input that stops with a clear error.

use std::path::{Path, PathBuf};

#[path = "common/reference.rs"]
mod reference;
#[path = "common/run_log.rs"]
mod run_log;

use chronospipe::exec::run::{Outcome, Run, drive};
use chronospipe::spec::JobSpec;
use reference::testdata;
use run_log::RunLog;

fn corpus(dir: &Path) -> PathBuf {
    let path = dir.join("corpus.txt");
    let text = "A pipeline keeps every device busy; memory is a small fast cache. ".repeat(60);
    std::fs::write(&path, text).unwrap();
    path
}

fn job(corpus: &Path, stages: usize, schedule: &str, recompute: &str, offload: &str) -> JobSpec {
    let text = format!(
        r#"{{"model": {{"hidden_size": 32, "num_layers": 8, "num_heads": 4, "num_kv_heads": 2,
                     "intermediate_size": 48, "vocab_size": 256, "init": {{"seed": 11}}}},
            "data": {{"train": {corpus:?}}},
            "training": {{"seq_len": 16, "micro_batch_size": 2, "microbatches": 4, "steps": 3,
                         "optimizer": {{"kind": "adamw", "lr": 0.01}}, "shuffle": true, "seed": 5}},
            "parallelism": {{"stages": {stages}, "schedule": "{schedule}",
                            "recompute": "{recompute}", "offload": "{offload}"}},
            "devices": "cpu:{stages}x64MiB"}}"#
    );
    JobSpec::from_json(&text).unwrap()
}

fn train(spec: JobSpec, out: &Path) -> (Run, RunLog) {
    let mut run = Run::prepare(spec, "cpu:1x64MiB").unwrap();
    let mut quiet = RunLog::new(out);
    let outcome = drive(&mut run, &mut quiet).unwrap();
    assert_eq!(
        outcome,
        Outcome::Completed {
            final_dir: out.join("final")
        }
    );
    (run, quiet)
}

#[test]
fn checkpoints_are_byte_identical_whatever_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let reference_dir = dir.path().join("one");
    train(job(&data, 1, "1f1b", "none", "none"), &reference_dir);
    let reference = std::fs::read(reference_dir.join("final/model.safetensors")).unwrap();
    let mut runs = 0;
    for stages in [2, 4] {
        for schedule in ["gpipe", "1f1b", "interleaved", "chronos"] {
            for (recompute, offload) in [("none", "none"), ("full", "chronos")] {
                let out = dir.path().join(format!("{stages}-{schedule}-{recompute}"));
                let (run, _) = train(job(&data, stages, schedule, recompute, offload), &out);
                let bytes = std::fs::read(out.join("final/model.safetensors")).unwrap();
                assert!(
                    bytes == reference,
                    "{stages} stages, {schedule}, recompute {recompute}, offload {offload}: \
                     model.safetensors differs from one device ({})",
                    run.answer.best.choices
                );
                runs += 1;
            }
        }
    }
    assert_eq!(runs, 16);
}

#[test]
fn predicted_peak_equals_measured_peak_on_every_device() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    for (schedule, recompute, offload) in [
        ("1f1b", "none", "none"),
        ("chronos", "full", "none"),
        ("chronos", "chronos", "chronos"),
        ("interleaved", "none", "chronos"),
    ] {
        let (run, _) = train(job(&data, 4, schedule, recompute, offload), dir.path());
        assert_eq!(
            run.predicted_peaks(),
            run.measured_peaks(),
            "{schedule} recompute {recompute} offload {offload}"
        );
    }
}

#[test]
fn resuming_from_a_checkpoint_equals_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let mut spec = job(&data, 2, "chronos", "chronos", "chronos");
    spec.training.steps = Some(4);
    spec.training.checkpoint_every = Some(2);
    let whole = dir.path().join("whole");
    let (_, uninterrupted) = train(spec.clone(), &whole);
    assert!(whole.join("step-2/trainer_state.json").exists());

    let resumed = dir.path().join("resumed");
    let mut run = Run::prepare(spec, "cpu:1x64MiB").unwrap();
    let state = run.resume_from(&whole.join("step-2")).unwrap();
    assert_eq!(state.step, 2);
    let mut quiet = RunLog::new(&resumed);
    drive(&mut run, &mut quiet).unwrap();
    assert_eq!(quiet.losses, uninterrupted.losses[2..]);
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            std::fs::read(whole.join("final").join(file)).unwrap()
                == std::fs::read(resumed.join("final").join(file)).unwrap(),
            "{file} differs after resume"
        );
    }
}

#[test]
fn a_run_starts_from_hugging_face_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let tiny = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/testdata/hf-llama-tiny"
    );
    let text = format!(
        r#"{{"model": {{"init": {{"from": {tiny:?}}}}},
            "data": {{"train": {data:?}}},
            "training": {{"seq_len": 32, "micro_batch_size": 1, "microbatches": 2, "steps": 2}},
            "parallelism": {{"stages": 2, "schedule": "1f1b"}},
            "devices": "cpu:2x64MiB"}}"#
    );
    let (run, quiet) = train(JobSpec::from_json(&text).unwrap(), dir.path());
    assert_eq!(run.config().dims.hidden, 64);
    // A trained byte-level model starts near ln(256) = 5.5 on text it has not seen.
    assert!(
        quiet.losses[0] > 1.0 && quiet.losses[0] < 8.0,
        "{:?}",
        quiet.losses
    );

    let wrong = text.replace(r#""init""#, r#""hidden_size": 128, "init""#);
    let err = Run::prepare(JobSpec::from_json(&wrong).unwrap(), "cpu:1x64MiB")
        .err()
        .expect("a disagreeing architecture is refused");
    assert!(err.to_string().contains("model.hidden_size"), "{err}");
}

fn pretrained_job(from: &Path, data: &Path) -> JobSpec {
    let text = format!(
        r#"{{"model": {{"init": {{"from": {from:?}}}}},
            "data": {{"train": {data:?}}},
            "training": {{"seq_len": 32, "micro_batch_size": 1, "microbatches": 2, "steps": 1}},
            "parallelism": {{"stages": 2, "schedule": "1f1b"}},
            "devices": "cpu:2x64MiB"}}"#
    );
    JobSpec::from_json(&text).unwrap()
}

/// A Llama 3.1-style checkpoint trains on a pipeline and is written back with its rotary
/// scaling, and a Mistral one as a Mistral, both readable as what they were.
#[test]
fn checkpoints_keep_their_architecture_and_rotary_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let out = dir.path().join("llama3");
    let (run, _) = train(pretrained_job(&testdata("hf-llama3-tiny"), &data), &out);
    assert!(run.config().rope.scaling.is_some());
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("final/config.json")).unwrap()).unwrap();
    assert_eq!(written["rope_scaling"]["rope_type"], "llama3");
    assert_eq!(written["rope_scaling"]["factor"], 8.0);
    assert_eq!(written["rope_theta"], 500000.0);

    // The same weights under Mistral's name (sliding window off) train the same numbers.
    let mistral = dir.path().join("mistral-in");
    std::fs::create_dir(&mistral).unwrap();
    std::fs::copy(
        testdata("hf-llama-tiny").join("model.safetensors"),
        mistral.join("model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(testdata("hf-llama-tiny").join("config.json")).unwrap(),
    )
    .unwrap();
    config["model_type"] = "mistral".into();
    config["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    config["sliding_window"] = serde_json::Value::Null;
    std::fs::write(mistral.join("config.json"), config.to_string()).unwrap();
    let (_, as_mistral) = train(pretrained_job(&mistral, &data), &dir.path().join("m"));
    let (_, as_llama) = train(
        pretrained_job(&testdata("hf-llama-tiny"), &data),
        &dir.path().join("l"),
    );
    assert_eq!(as_mistral.losses, as_llama.losses);
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("m/final/config.json")).unwrap())
            .unwrap();
    assert_eq!(written["architectures"][0], "MistralForCausalLM");
}

/// A Qwen2 checkpoint trains on a pipeline, its memory as the planner predicted, and is
/// written back as a Qwen2 with its q/k/v biases, trained (they have gradients) and under
/// transformers' names.
#[test]
fn qwen2_checkpoints_keep_their_biases() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let out = dir.path().join("qwen2");
    let (run, quiet) = train(pretrained_job(&testdata("hf-qwen2-tiny"), &data), &out);
    assert!(run.config().dims.qkv_bias);
    // The biases are in the planner's inventory: its peaks are the run's, to the byte.
    assert_eq!(run.predicted_peaks(), run.measured_peaks());
    assert!(
        quiet.losses[0] > 1.0 && quiet.losses[0] < 8.0,
        "{:?}",
        quiet.losses
    );
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("final/config.json")).unwrap()).unwrap();
    assert_eq!(written["architectures"][0], "Qwen2ForCausalLM");
    assert_eq!(written["model_type"], "qwen2");
    let before = chronospipe::exec::checkpoint::safetensors_io::TensorFile::open(
        &testdata("hf-qwen2-tiny").join("model.safetensors"),
    )
    .unwrap();
    let after = chronospipe::exec::checkpoint::safetensors_io::TensorFile::open(
        &out.join("final/model.safetensors"),
    )
    .unwrap();
    for layer in 0..2 {
        for proj in ["q", "k", "v"] {
            let name = format!("model.layers.{layer}.self_attn.{proj}_proj.bias");
            let (shape, trained) = after.f32(&name).unwrap();
            let (_, initial) = before.f32(&name).unwrap();
            assert_eq!(shape.len(), 1, "{name}");
            assert_ne!(trained, initial, "{name} was not trained");
        }
    }
}

/// Checkpoints whose config sets what the model does not compute are refused before
/// anything runs, naming the field, as the user's input.
#[test]
fn checkpoints_with_settings_not_implemented_are_refused_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    // A Qwen2 with its sliding window on.
    let windowed = dir.path().join("qwen2-windowed");
    std::fs::create_dir(&windowed).unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(testdata("hf-qwen2-tiny").join("config.json")).unwrap(),
    )
    .unwrap();
    config["use_sliding_window"] = true.into();
    std::fs::write(windowed.join("config.json"), config.to_string()).unwrap();
    // A Llama with biases on its MLP.
    let mlp_bias = dir.path().join("llama-mlp-bias");
    std::fs::create_dir(&mlp_bias).unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(testdata("hf-llama-tiny").join("config.json")).unwrap(),
    )
    .unwrap();
    config["mlp_bias"] = true.into();
    std::fs::write(mlp_bias.join("config.json"), config.to_string()).unwrap();
    for (fixture, field) in [(windowed, "use_sliding_window"), (mlp_bias, "mlp_bias")] {
        let err = Run::prepare(pretrained_job(&fixture, &data), "")
            .err()
            .expect("refused");
        let blame = err.blame();
        assert_eq!(blame.param.as_deref(), Some("model.init.from"), "{err}");
        assert_eq!(blame.code, "invalid_spec", "{err}");
        assert!(
            err.to_string()
                .contains(&format!("config.json field {field}")),
            "{}: {err}",
            fixture.display()
        );
    }
}

#[test]
fn bad_input_stops_with_an_error_that_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());

    let short = dir.path().join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    let err = Run::prepare(job(&short, 1, "1f1b", "none", "none"), "")
        .err()
        .unwrap();
    assert_eq!(err.blame().code, "invalid_data", "{err}");
    assert!(err.to_string().contains("fewer than one sequence"), "{err}");

    let mut tight = job(&data, 2, "1f1b", "none", "none");
    tight.devices = Some("cpu:2x64KiB".into());
    let err = Run::prepare(tight, "").err().unwrap();
    assert_eq!(err.blame().code, "does_not_fit", "{err}");
    assert!(err.to_string().contains("bytes per device"), "{err}");

    let mut too_many = job(&data, 4, "1f1b", "none", "none");
    too_many.devices = Some("cpu:2x64MiB".into());
    let err = Run::prepare(too_many, "").err().unwrap();
    assert_eq!(
        err.blame().param.as_deref(),
        Some("parallelism.stages"),
        "{err}"
    );

    // A learning rate this large overflows within a few steps: the run stops naming the step
    // and the checkpoint before it stays.
    let mut wild = job(&data, 2, "1f1b", "none", "none");
    wild.training.optimizer = chronospipe::spec::OptimizerSpec::Sgd { lr: 1e30 };
    wild.training.grad_clip = None;
    wild.training.steps = Some(6);
    wild.training.checkpoint_every = Some(1);
    let out = dir.path().join("wild");
    let mut run = Run::prepare(wild, "").unwrap();
    let err = drive(&mut run, &mut RunLog::new(&out)).unwrap_err();
    assert_eq!(err.blame().code, "diverged", "{err}");
    let failed_step = run.step();
    assert!(
        err.to_string().contains(&format!("step {failed_step}")),
        "{err}"
    );
    assert!(failed_step >= 1, "the first step has finite weights");
    assert!(
        out.join(format!("step-{failed_step}/model.safetensors"))
            .exists()
    );
}

/// `devices: "cuda"` puts the whole model on one GPU; what that cannot do is refused by field
/// before any GPU is touched, and a machine without CUDA says which library it lacks (for
/// pipeline stages on GPUs too).
#[test]
fn cuda_runs_refuse_what_one_gpu_cannot_do_and_say_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let on = |devices: &str, stages: usize, recompute: &str| {
        let mut spec = job(&data, stages, "1f1b", recompute, "none");
        spec.devices = Some(devices.to_owned());
        Run::prepare(spec, "cpu:1x64MiB").err()
    };
    for (devices, want) in [
        ("cuda:one", "not a whole number"),
        ("cudax", "unknown device kind"),
        // (A GPU named twice is two devices on it: see `device_spec`'s tests.)
        ("cuda:1@lots", "the cap is not like"),
    ] {
        let err = on(devices, 1, "none").expect("refused");
        let msg = err.to_string();
        assert!(msg.contains(devices) && msg.contains(want), "{msg}");
        assert_eq!(err.blame().code, "invalid_devices");
    }
    let err = on("cuda", 2, "full").expect("refused").to_string();
    assert!(
        err.contains("parallelism.stages") && err.contains("parallelism.recompute"),
        "{err}"
    );
    let mut gpipe = job(&data, 1, "gpipe", "none", "none");
    gpipe.devices = Some("cuda".into());
    let err = Run::prepare(gpipe, "cpu:1x64MiB").err().expect("refused");
    assert!(err.to_string().contains("parallelism.schedule"), "{err}");

    // bf16 activations are a CUDA backend's: refused on CPU devices, by field.
    let mut bf16 = job(&data, 1, "1f1b", "none", "none");
    bf16.training.precision = chronospipe::spec::PrecisionSpec::Bf16;
    let err = Run::prepare(bf16, "cpu:1x64MiB").err().expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("training.precision") && msg.contains("CUDA devices only"),
        "{msg}"
    );

    let libs = chronospipe::exec::backend::cuda::libs::Libraries::probe();
    if !libs.driver {
        // One GPU holding the whole model, and pipeline stages on GPUs, alike.
        for devices in ["cuda", "cuda:0,1", "cuda:0x4@1GiB"] {
            let err = on(devices, 1, "auto").expect("no driver here");
            assert!(
                err.to_string().contains("CUDA unavailable: libcuda.so"),
                "{devices}: {err}"
            );
            assert_eq!(err.blame().code, "invalid_devices");
        }
    }
}
