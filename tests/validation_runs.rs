//! Validation loss, early stopping, epochs and checkpoint retention through `exec::run` and
//! `chronospipe train`: the evaluated loss equals the single-device reference's forward over
//! the same windows with the same weights (and transformers' loss with that checkpoint, where
//! Python has torch and transformers); an evaluation stays within the plan's predicted
//! peak; early stopping and retention keep what they say on disk and in `summary.json`.

#[path = "common/reference.rs"]
mod reference;

use std::path::{Path, PathBuf};

use chronospipe::exec::backend::CpuBackend;
use chronospipe::exec::checkpoint::model_files::load_hf_parts;
use chronospipe::exec::checkpoint::trainer_state::TrainerState;
use chronospipe::exec::device::Pool;
use chronospipe::exec::model::chunk::forward_chunk;
use chronospipe::exec::model::part::{MicroTokens, PartOutput};
use chronospipe::exec::model::{PartCtx, PartId};
use chronospipe::exec::run::Run;
use chronospipe::plan::inventory::MicroShape;
use chronospipe::spec::JobSpec;
use reference::{python_last_line, transformers_available};

const SEQ: usize = 16;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn job(dir: &Path, parallelism: &str, training: &str) -> JobSpec {
    let train = write(
        dir,
        "train.txt",
        &"Keep what is used soon near; move the rest away. ".repeat(30),
    );
    // 7 whole windows of 16 tokens and a partial one that is dropped.
    let validation = write(
        dir,
        "valid.txt",
        &"Memory is a cache: near, fast and small. ".repeat(3)[..7 * SEQ + 9],
    );
    let text = format!(
        r#"{{"model": {{"hidden_size": 32, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                     "intermediate_size": 48, "vocab_size": 256, "init": {{"seed": 3}}}},
            "data": {{"train": {train:?}, "validation": {validation:?}}},
            "training": {{"seq_len": {SEQ}, "micro_batch_size": 2, "microbatches": 2,
                         "optimizer": {{"kind": "adamw", "lr": 0.01}}, {training}}},
            "parallelism": {parallelism},
            "devices": "cpu:2x64MiB"}}"#
    );
    JobSpec::from_json(&text).unwrap()
}

/// The mean loss over every whole window of the validation file, one window at a time, with
/// the weights of the checkpoint in `dir`, through the single-device forward.
fn reference_val_loss(spec: &JobSpec, dir: &Path) -> f64 {
    let tokens: Vec<i32> = std::fs::read(spec.data.validation.as_ref().unwrap())
        .unwrap()
        .into_iter()
        .map(i32::from)
        .collect();
    let windows = (tokens.len() - 1) / SEQ;
    assert_eq!(windows, 7);
    let config = chronospipe::exec::checkpoint::model_files::read_hf_config(dir).unwrap();
    let pool = Pool::new("reference", 1 << 30);
    let parts = load_hf_parts(dir, &config, &PartId::all(config.dims.layers), &pool).unwrap();
    let backend = CpuBackend::default();
    let ctx = PartCtx {
        backend: &backend,
        pool: &pool,
        config: &config,
        micro: MicroShape { batch: 1, seq: SEQ },
    };
    let mut sum = 0.0;
    for w in 0..windows {
        let t = MicroTokens {
            input_ids: &tokens[w * SEQ..w * SEQ + SEQ],
            targets: &tokens[w * SEQ + 1..w * SEQ + SEQ + 1],
        };
        let (_, out) = forward_chunk(&ctx, &parts, None, t).unwrap();
        let PartOutput::LossSum(l) = out else {
            panic!("no loss")
        };
        sum += l;
    }
    sum / (windows * SEQ) as f64
}

/// The checkpoint in `dir` loaded by transformers, its mean loss over every whole window of
/// the validation file (bytes are the token ids), each window its own sequence.
const TRANSFORMERS_VAL_LOSS: &str = r#"
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
tokens = list(open(sys.argv[2], "rb").read())
seq = int(sys.argv[3])
windows = (len(tokens) - 1) // seq
total = 0.0
with torch.no_grad():
    for w in range(windows):
        ids = torch.tensor([tokens[w * seq:w * seq + seq + 1]])
        logits = model(input_ids=ids[:, :-1]).logits[0]
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
print(repr(total / (windows * seq)))
"#;

/// `TRANSFORMERS_VAL_LOSS` for the checkpoint in `dir`; `None` (saying so) where Python lacks
/// torch or transformers.
fn transformers_val_loss(dir: &Path, validation: &str) -> Option<f64> {
    if !transformers_available() {
        return None;
    }
    let seq = SEQ.to_string();
    let args: [&std::ffi::OsStr; 3] = [dir.as_ref(), validation.as_ref(), seq.as_ref()];
    let line = python_last_line(TRANSFORMERS_VAL_LOSS, &args);
    Some(line.parse().unwrap())
}

/// On a V-shaped pipeline with recompute and offload, after two steps: the evaluated loss is
/// the reference's with the checkpointed weights, and the trainer state carries it.
#[test]
fn val_loss_is_the_reference_forward_over_the_windows() {
    let dir = tempfile::tempdir().unwrap();
    let spec = job(
        dir.path(),
        r#"{"stages": 2, "schedule": "chronos", "recompute": "chronos", "offload": "chronos"}"#,
        r#""steps": 4"#,
    );
    let mut run = Run::prepare(spec.clone(), "cpu:1x64MiB").unwrap();
    for _ in 0..2 {
        run.train_step().unwrap();
    }
    let evaluation = run.evaluate().unwrap().expect("validation data is given");
    assert_eq!((evaluation.step, evaluation.val_windows), (2, 7));
    assert_eq!(evaluation.val_targets, (7 * SEQ) as u64);
    let ckpt = dir.path().join("step-2");
    run.save_checkpoint(&ckpt, None).unwrap();
    let reference = reference_val_loss(&spec, &ckpt);
    assert!(
        (evaluation.val_loss - reference).abs() <= 1e-6,
        "pipeline {} vs reference {reference}",
        evaluation.val_loss
    );
    if let Some(loss) = transformers_val_loss(&ckpt, spec.data.validation.as_ref().unwrap()) {
        println!(
            "val_loss: pipeline {} transformers {loss}",
            evaluation.val_loss
        );
        assert!(
            (evaluation.val_loss - loss).abs() <= 1e-4,
            "pipeline {} vs transformers {loss}",
            evaluation.val_loss
        );
    }
    let state = TrainerState::load(&ckpt).unwrap();
    assert_eq!(state.val_loss, Some(evaluation.val_loss));
    assert_eq!(state.validation.best_step, Some(2));
    // A resume carries the validation record on (early stopping's patience with it).
    let mut resumed = Run::prepare(spec, "").unwrap();
    resumed.resume_from(&ckpt).unwrap();
    assert_eq!(resumed.validation_progress(), run.validation_progress());
    // Evaluating changes no weight: the same loss again, and one evaluation without
    // improvement.
    let again = run.evaluate().unwrap().unwrap();
    assert_eq!(again.val_loss, evaluation.val_loss);
    assert_eq!(run.validation_progress().evaluations_without_improvement, 1);
}

/// An evaluation on a fresh run (nothing trained yet, so every byte measured is the
/// evaluation's or what rests on the devices) peaks on every device at the planner's
/// predicted evaluation peak, to the byte, for plans that keep everything and plans that
/// offload; and that peak is within the step's.
#[test]
fn evaluation_peaks_at_the_predicted_evaluation_peak() {
    for parallelism in [
        r#"{"stages": 2, "schedule": "1f1b", "recompute": "none", "offload": "none"}"#,
        r#"{"stages": 2, "schedule": "chronos", "recompute": "chronos", "offload": "chronos"}"#,
        r#"{"stages": 2, "schedule": "interleaved", "recompute": "full", "offload": "none"}"#,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut run = Run::prepare(job(dir.path(), parallelism, r#""steps": 1"#), "").unwrap();
        run.evaluate().unwrap().unwrap();
        let (measured, predicted) = (run.measured_peaks(), run.predicted_eval_peaks());
        assert_eq!(measured, predicted, "{parallelism}: evaluation peaks");
        for (e, p) in predicted.iter().zip(run.predicted_peaks()) {
            assert!(
                *e <= p,
                "{parallelism}: evaluation {predicted:?} over the step's"
            );
        }
    }
}

/// Devices too small for the plan that keeps everything: the planner recomputes and moves
/// state to the host, and the evaluation (which brings weights resting on the host in for
/// their chunk) still peaks at the predicted evaluation peak, within the budget.
#[test]
fn evaluation_peak_is_predicted_when_state_rests_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let roomy = r#"{"stages": 2, "schedule": "1f1b", "recompute": "none", "offload": "none"}"#;
    let run = Run::prepare(job(dir.path(), roomy, r#""steps": 1"#), "").unwrap();
    let need = *run.predicted_peaks().iter().max().unwrap();
    let spec = job(
        dir.path(),
        r#"{"stages": 2, "schedule": "1f1b", "recompute": "chronos", "offload": "chronos"}"#,
        r#""steps": 1"#,
    );
    // The first of these budgets whose plan rests weights, gradients or optimizer state on
    // the host.
    let (budget, mut run) = [3, 2, 1]
        .into_iter()
        .find_map(|quarters| {
            let budget = need * quarters / 4;
            let mut spec = spec.clone();
            spec.devices = Some(format!("cpu:2x{budget}"));
            let run = Run::prepare(spec, "").ok()?;
            let text = run.plan().to_string();
            let state_moves = ["OFF:W", "OFF:G", "OFF:O"].iter().any(|m| text.contains(m));
            state_moves.then_some((budget, run))
        })
        .expect("a budget whose plan offloads");
    run.evaluate().unwrap().unwrap();
    let (measured, predicted) = (run.measured_peaks(), run.predicted_eval_peaks());
    assert_eq!(measured, predicted);
    assert!(
        predicted.iter().all(|&p| p <= budget),
        "{predicted:?} in {budget}"
    );
}

fn cli(job_path: &Path, out: &Path) -> chronospipe::cli::train::Summary {
    use chronospipe::cli::train::{TrainArgs, run};
    run(&TrainArgs {
        job: job_path.to_owned(),
        out: out.to_owned(),
        devices: None,
        steps: None,
        ranks: Default::default(),
    })
    .unwrap()
}

fn steps_on_disk(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-") || n == "final")
        .collect();
    names.sort();
    names
}

/// A `min_delta` no evaluation can beat: the first evaluation improves, two more do not, so
/// the run stops at step 3 of 8. Retention keeps the latest (the final one) and the lowest
/// validation loss's; summary.json says so.
#[test]
fn early_stopping_and_retention_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let spec = job(
        dir.path(),
        r#"{"stages": 2}"#,
        r#""steps": 8, "checkpoint_every": 1, "keep_checkpoints": 1,
           "early_stopping": {"patience": 2, "min_delta": 100.0}"#,
    );
    let job_path = write(
        dir.path(),
        "job.json",
        &serde_json::to_string(&spec).unwrap(),
    );
    let out = dir.path().join("out");
    let summary = cli(&job_path, &out);
    assert!(summary.stopped_early);
    assert_eq!(summary.steps, 3);
    let last = TrainerState::load(&out.join("final")).unwrap();
    assert_eq!(last.step, 3);
    assert_eq!(summary.val_loss, last.val_loss);
    let v = last.validation;
    assert_eq!(v.evaluations_without_improvement, 2);
    assert_eq!(summary.best_val_step, v.best_step);
    let best = v.best_step.unwrap();
    let expected: Vec<String> = match best {
        3 => vec!["final".into()],
        b => vec!["final".into(), format!("step-{b}")],
    };
    assert_eq!(steps_on_disk(&out), expected);
    if best != 3 {
        let kept = TrainerState::load(&out.join(format!("step-{best}"))).unwrap();
        assert_eq!(kept.val_loss, v.best_val_loss);
    }
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(written["stopped_early"], true);
    assert_eq!(written["val_loss"].as_f64(), summary.val_loss);

    // Epochs instead of steps: 2 passes over the training data's windows.
    let mut epochs = spec.clone();
    (epochs.training.steps, epochs.training.epochs) = (None, Some(2));
    (
        epochs.training.early_stopping,
        epochs.training.checkpoint_every,
    ) = (None, None);
    let run = Run::prepare(epochs, "").unwrap();
    let windows = (49 * 30 - 1) / SEQ; // "Keep what ... away. " is 49 bytes
    assert_eq!(run.total_steps(), (2 * windows as u64).div_ceil(4));
}

/// Validation data too short for one window is the user's to fix, named `data.validation`.
#[test]
fn validation_data_without_a_window_is_refused_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = job(dir.path(), r#"{"stages": 1}"#, r#""steps": 1"#);
    let short = write(dir.path(), "short.txt", "too short");
    spec.data.validation = Some(short.to_string_lossy().into_owned());
    let err = Run::prepare(spec, "").err().expect("refused");
    let blame = err.blame();
    assert!(blame.user, "{err}");
    assert_eq!(blame.param.as_deref(), Some("data.validation"), "{err}");
    assert!(err.to_string().contains("17"), "says what it needs: {err}");
}
