//! Tied embeddings (`hf-tied-tiny`: `tie_word_embeddings: true`, no `lm_head.weight`) through
//! the pipeline runtime, against what PyTorch computed: the loss, the gradient norm and one
//! SGD and one AdamW step, on one stage and on two whose embedding and head sit on different
//! devices (their copies of the table summed by `TIE`); and whole jobs: the table written
//! once, memory as predicted, exact resume, and a checkpoint transformers loads.

use std::path::{Path, PathBuf};

#[path = "common/reference.rs"]
mod reference;
#[path = "common/run_log.rs"]
mod run_log;

use chronospipe::data::Microbatch;
use chronospipe::exec::backend::CpuBackend;
use chronospipe::exec::checkpoint::model_files::{load_hf_parts, read_hf_config};
use chronospipe::exec::checkpoint::safetensors_io::TensorFile;
use chronospipe::exec::device::DeviceSet;
use chronospipe::exec::model::PartId;
use chronospipe::exec::optim::OptimizerConfig;
use chronospipe::exec::optim::schedule::LrSchedule;
use chronospipe::exec::pipeline::{CpuEngine, Pipeline};
use chronospipe::exec::run::{Outcome, Run, drive};
use chronospipe::plan::inventory::MicroShape;
use chronospipe::plan::schedule::{ScheduleKind, build};
use chronospipe::plan::tying::with_tied_embeddings;
use chronospipe::spec::JobSpec;
use reference::{compare, python_last_line, testdata, transformers_available};
use run_log::RunLog;

/// One step of the reference batch (one micro-batch) through a tied 1F1B plan on `stages`
/// devices; compares the loss, the gradient norm and every weight after the step.
fn step_on_pipeline(
    stages: u32,
    prefix: &str,
    optimizer: OptimizerConfig,
    lr: f32,
    clip: Option<f32>,
) {
    let dir = testdata("hf-tied-tiny");
    let reference = TensorFile::open(&dir.join("reference.safetensors")).unwrap();
    let config = read_hf_config(&dir).unwrap();
    assert!(config.dims.tied_embeddings);
    let plan = build(ScheduleKind::OneFOneB, stages, 1, config.dims.layers as u32).unwrap();
    let plan = with_tied_embeddings(plan).unwrap();
    assert_ne!(
        (stages > 1).then(|| plan.chunks[0].device),
        Some(plan.chunks.last().unwrap().device),
        "the embedding and the head sit on different devices"
    );
    let devices = DeviceSet::parse(&format!("cpu:{stages}x64MiB")).unwrap();
    let parts = load_hf_parts(
        &dir,
        &config,
        &PartId::all(config.dims.layers),
        &devices.host,
    )
    .unwrap();
    let engine = CpuEngine {
        backend: CpuBackend::default(),
    };
    let schedule = LrSchedule::constant(lr);
    let mut p = Pipeline::new(
        config, plan, devices, engine, parts, optimizer, schedule, clip,
    )
    .unwrap();
    let (shape, input_ids) = reference.i32("input_ids").unwrap();
    let (_, targets) = reference.i32("targets").unwrap();
    let batch = Microbatch {
        step: 0,
        index: 0,
        shape: MicroShape {
            batch: shape[0],
            seq: shape[1],
        },
        windows: (0..shape[0]).collect(),
        input_ids,
        targets,
    };
    let (report, _) = p.train_step(&[batch]).unwrap();
    let value = |name: &str| reference.f32(name).unwrap().1;
    let mut ok = compare("loss", &[report.loss as f32], &value("loss"));
    ok &= compare("grad_norm", &[report.grad_norm as f32], &value("grad_norm"));
    let mut copies = 0;
    for part in p.parts() {
        for (name, w) in part.names.iter().zip(&part.weights) {
            copies += usize::from(name == "model.embed_tokens.weight");
            ok &= compare(
                &format!("{prefix}.{name}"),
                w.data(),
                &value(&format!("{prefix}.{name}")),
            );
        }
    }
    assert_eq!(copies, 2, "the embedding's table and the head's copy");
    assert!(
        ok,
        "{stages} stage(s), {prefix}: some values differ from PyTorch (NOT OK lines)"
    );
}

#[test]
fn tied_steps_through_the_runtime_match_pytorch() {
    let adamw = OptimizerConfig::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    for stages in [1, 2] {
        println!("{stages} stage(s):");
        step_on_pipeline(stages, "sgd", OptimizerConfig::Sgd, 0.5, None);
        step_on_pipeline(stages, "adamw", adamw, 1e-3, Some(1.0));
    }
}

fn corpus(dir: &Path) -> PathBuf {
    let path = dir.join("corpus.txt");
    let text = "A pipeline keeps every device busy; memory is a small fast cache. ".repeat(60);
    std::fs::write(&path, text).unwrap();
    path
}

fn train(spec: JobSpec, out: &Path) -> (Run, RunLog) {
    let mut run = Run::prepare(spec, "cpu:1x64MiB").unwrap();
    let mut log = RunLog::new(out);
    let outcome = drive(&mut run, &mut log).unwrap();
    let final_dir = out.join("final");
    assert_eq!(outcome, Outcome::Completed { final_dir });
    (run, log)
}

/// A job from `hf-tied-tiny` (or a random tied init) on `stages` devices.
fn job(model: &str, data: &Path, stages: usize, steps: u64) -> JobSpec {
    let text = format!(
        r#"{{"model": {model},
            "data": {{"train": {data:?}}},
            "training": {{"seq_len": 32, "micro_batch_size": 1, "microbatches": 2,
                         "steps": {steps}, "checkpoint_every": 1,
                         "optimizer": {{"kind": "adamw", "lr": 0.01}}}},
            "parallelism": {{"stages": {stages}, "schedule": "1f1b"}},
            "devices": "cpu:{stages}x64MiB"}}"#
    );
    JobSpec::from_json(&text).unwrap()
}

fn pretrained() -> String {
    format!(r#"{{"init": {{"from": {:?}}}}}"#, testdata("hf-tied-tiny"))
}

#[test]
fn a_tied_job_stores_the_table_once_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let whole = dir.path().join("whole");
    let (run, log) = train(job(&pretrained(), &data, 2, 2), &whole);
    assert!(run.config().dims.tied_embeddings);
    // The head's copy is in the planner's inventory, and TIE's transfer: peaks to the byte.
    assert_eq!(run.predicted_peaks(), run.measured_peaks());
    let model = TensorFile::open(&whole.join("final/model.safetensors")).unwrap();
    let names = model.names();
    assert!(!names.iter().any(|n| n.starts_with("lm_head")), "{names:?}");
    assert_eq!(
        names
            .iter()
            .filter(|n| *n == "model.embed_tokens.weight")
            .count(),
        1
    );
    let moments = TensorFile::open(&whole.join("final/optimizer.safetensors")).unwrap();
    assert!(!moments.names().iter().any(|n| n.contains("lm_head")));
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(whole.join("final/config.json")).unwrap()).unwrap();
    assert_eq!(written["tie_word_embeddings"], true);
    // The same job on one device writes the same bytes (the copies sum in the same order).
    let one = dir.path().join("one");
    let (_, one_log) = train(job(&pretrained(), &data, 1, 2), &one);
    assert_eq!(one_log.losses, log.losses);
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let read = |d: &Path| std::fs::read(d.join("final").join(file)).unwrap();
        assert!(read(&whole) == read(&one), "{file}: one device vs two");
    }
    // Resumed from step 1, the run ends where the uninterrupted one did.
    let resumed = dir.path().join("resumed");
    let mut run = Run::prepare(job(&pretrained(), &data, 2, 2), "cpu:1x64MiB").unwrap();
    assert_eq!(run.resume_from(&whole.join("step-1")).unwrap().step, 1);
    let mut quiet = RunLog::new(&resumed);
    drive(&mut run, &mut quiet).unwrap();
    assert_eq!(quiet.losses, log.losses[1..]);
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let read = |d: &Path| std::fs::read(d.join("final").join(file)).unwrap();
        assert!(
            read(&whole) == read(&resumed),
            "{file} differs after resume"
        );
    }
    transformers_loads_tied(&whole.join("final"));
}

/// A random init asks for tied embeddings with `model.tie_embeddings`; with `init.from` a
/// value given must agree with the checkpoint's `config.json`.
#[test]
fn a_random_init_ties_by_field_and_a_checkpoint_decides() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let model = r#"{"hidden_size": 32, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                    "intermediate_size": 48, "vocab_size": 256, "tie_embeddings": true,
                    "init": {"seed": 3}}"#;
    let out = dir.path().join("random");
    let (run, _) = train(job(model, &data, 2, 1), &out);
    assert!(run.config().dims.tied_embeddings);
    assert_eq!(run.predicted_peaks(), run.measured_peaks());
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("final/config.json")).unwrap()).unwrap();
    assert_eq!(written["tie_word_embeddings"], true);
    let untied = format!(
        r#"{{"tie_embeddings": false, "init": {{"from": {:?}}}}}"#,
        testdata("hf-tied-tiny")
    );
    let err = Run::prepare(job(&untied, &data, 2, 1), "cpu:1x64MiB")
        .err()
        .expect("a disagreeing tie_embeddings is refused");
    assert!(err.to_string().contains("model.tie_embeddings"), "{err}");
}

/// Loads `dir` with transformers (where Python has it): a tied `LlamaForCausalLM`, no key
/// missing or unexpected, the head reading the embedding's tensor.
fn transformers_loads_tied(dir: &Path) {
    const SCRIPT: &str = r#"
import sys, torch
from transformers import AutoModelForCausalLM
model, info = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], dtype=torch.float32, output_loading_info=True)
same = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
missing = info["missing_keys"] or ["-"]
unexpected = info["unexpected_keys"] or ["-"]
print(type(model).__name__, ",".join(sorted(missing)), ",".join(sorted(unexpected)), same)
"#;
    if !transformers_available() {
        return;
    }
    let line = python_last_line(SCRIPT, &[dir]);
    println!("transformers: {line}");
    assert_eq!(line, "LlamaForCausalLM - - True");
}
