//! Data parallelism through `exec::run`, as `chronospipe train` and the service's workers run
//! it: replicas x stages on CPU devices train the same global batch to the same weights as
//! one pipeline (to rounding), repeat bit for bit, measure the predicted peak on every
//! device, resume exactly across degrees, and refuse what does not fit by field.

use std::path::{Path, PathBuf};

#[path = "common/run_log.rs"]
mod run_log;

use chronospipe::exec::device::DeviceSet;
use chronospipe::exec::run::{DeviceKind, Outcome, Run, RunError, drive, plan_job, resolve_arch};
use chronospipe::spec::{JobSpec, OffloadChoice, RecomputeChoice};
use run_log::RunLog;

fn corpus(dir: &Path) -> PathBuf {
    let path = dir.join("corpus.txt");
    let text = "Replicas share a step's micro-batches and sum their gradients. ".repeat(60);
    std::fs::write(&path, text).unwrap();
    path
}

fn job(corpus: &Path, stages: usize, replicas: usize, schedule: &str) -> JobSpec {
    let text = format!(
        r#"{{"model": {{"hidden_size": 32, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                     "intermediate_size": 48, "vocab_size": 256, "init": {{"seed": 11}}}},
            "data": {{"train": {corpus:?}}},
            "training": {{"seq_len": 16, "micro_batch_size": 2, "microbatches": 4, "steps": 4,
                         "checkpoint_every": 2, "grad_clip": 1.0,
                         "optimizer": {{"kind": "adamw", "lr": 0.01}}, "shuffle": true, "seed": 5}},
            "parallelism": {{"stages": {stages}, "schedule": "{schedule}",
                            "data_parallel": {replicas}}},
            "devices": "cpu:{}x64MiB"}}"#,
        stages * replicas
    );
    JobSpec::from_json(&text).unwrap()
}

fn train(spec: JobSpec, out: &Path) -> (Run, RunLog) {
    let mut run = Run::prepare(spec, "cpu:1x64MiB").unwrap();
    let mut log = RunLog::new(out);
    let outcome = drive(&mut run, &mut log).unwrap();
    assert_eq!(
        outcome,
        Outcome::Completed {
            final_dir: out.join("final")
        }
    );
    (run, log)
}

/// Every tensor of a safetensors file, by name, as f64.
fn tensors(file: &Path) -> Vec<(String, Vec<f64>)> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all: Vec<(String, Vec<f64>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect();
            (name, values)
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// The whole model's relative distance: |a - b| / |b| over every weight.
fn relative(a: &Path, b: &Path) -> f64 {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(a.len(), b.len());
    let (mut diff, mut norm) = (0.0, 0.0);
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        diff += va.iter().zip(vb).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
        norm += vb.iter().map(|y| y * y).sum::<f64>();
    }
    (diff / norm).sqrt()
}

#[test]
fn replicas_train_the_global_batch_like_one_pipeline_and_repeat_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let model = |out: &Path| out.join("final/model.safetensors");
    let one = dir.path().join("pp2-dp1");
    let (_, reference_log) = train(job(&data, 2, 1, "1f1b"), &one);
    for (stages, replicas, schedule) in [
        (2, 2, "1f1b"),
        (2, 2, "gpipe"),
        (2, 2, "chronos"),
        (1, 2, "1f1b"),
        (1, 4, "1f1b"),
    ] {
        let label = format!("pp{stages} dp{replicas} {schedule}");
        let out = dir.path().join(&label);
        let (run, log) = train(job(&data, stages, replicas, schedule), &out);
        assert_eq!(run.answer.plan.replicas as usize, replicas, "{label}");
        let off = relative(&model(&out), &model(&one));
        assert!(off <= 1e-6, "{label}: {off:e} from one pipeline");
        assert!(off > 0.0, "{label}: no reduction order changed a bit?");
        for (got, want) in log.losses.iter().zip(&reference_log.losses) {
            assert!(
                (got - want).abs() <= 1e-6 * want.abs(),
                "{label}: loss {got} vs {want}"
            );
        }
        assert_eq!(run.predicted_peaks(), run.measured_peaks(), "{label}");
        assert_eq!(run.measured_peaks().len(), stages * replicas, "{label}");
    }
    let again = dir.path().join("again");
    train(job(&data, 2, 2, "1f1b"), &again);
    let first = dir.path().join("pp2 dp2 1f1b");
    same_final_files(&first, &again, "two runs of the same dp plan differ");
}

#[test]
fn a_data_parallel_checkpoint_resumes_exactly_on_any_degree() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let whole = dir.path().join("whole");
    let (_, uninterrupted) = train(job(&data, 2, 2, "chronos"), &whole);

    // The same degree: the rest of the run is the uninterrupted run's, bit for bit.
    let run = Run::prepare(job(&data, 2, 2, "chronos"), "").unwrap();
    resumes_bit_for_bit(run, &whole, &uninterrupted, &dir.path().join("resumed"));

    // Another degree loads the same state exactly and finishes within rounding.
    for (stages, replicas) in [(2, 1), (1, 4)] {
        let run = Run::prepare(job(&data, stages, replicas, "1f1b"), "").unwrap();
        resumes_within_rounding(run, &whole, dir.path(), &format!("{stages}x{replicas}"));
    }
}

const RUN_FILES: [&str; 2] = ["model.safetensors", "optimizer.safetensors"];

/// Resumes `run` (the uninterrupted run's degree) from `whole`'s step-2 checkpoint into
/// `out`: the rest of its losses are the uninterrupted run's and its final files the same
/// bytes.
fn resumes_bit_for_bit(mut run: Run, whole: &Path, uninterrupted: &RunLog, out: &Path) {
    assert_eq!(run.resume_from(&whole.join("step-2")).unwrap().step, 2);
    let mut log = RunLog::new(out);
    drive(&mut run, &mut log).unwrap();
    assert_eq!(log.losses, uninterrupted.losses[2..]);
    same_final_files(whole, out, "differs after resume");
}

/// `a`'s and `b`'s final model and optimizer files are the same bytes.
fn same_final_files(a: &Path, b: &Path, otherwise: &str) {
    for file in RUN_FILES {
        assert!(
            std::fs::read(a.join("final").join(file)).unwrap()
                == std::fs::read(b.join("final").join(file)).unwrap(),
            "{file}: {otherwise}"
        );
    }
}

/// Resumes `run` (another degree, `label`) from `whole`'s step-2 checkpoint under `dir`: the
/// state loads exactly (written back, the same bytes) and the run finishes within 1e-6 of
/// the uninterrupted run's weights.
fn resumes_within_rounding(mut run: Run, whole: &Path, dir: &Path, label: &str) {
    let checkpoint = whole.join("step-2");
    run.resume_from(&checkpoint).unwrap();
    let copy = dir.join(format!("copy-{label}"));
    run.save_checkpoint(&copy, None).unwrap();
    for file in RUN_FILES {
        assert!(
            std::fs::read(checkpoint.join(file)).unwrap()
                == std::fs::read(copy.join(file)).unwrap(),
            "{label}: {file} did not load exactly"
        );
    }
    let out = dir.join(format!("resumed-{label}"));
    drive(&mut run, &mut RunLog::new(&out)).unwrap();
    let off = relative(
        &out.join("final/model.safetensors"),
        &whole.join("final/model.safetensors"),
    );
    assert!(off <= 1e-6, "{label}: {off:e} after resume");
}

fn spec_error(result: Result<impl Sized, RunError>) -> (String, String) {
    match result.map(|_| ()).unwrap_err() {
        RunError::Spec(errors) => (errors[0].param.clone(), errors[0].message.clone()),
        other => panic!("not a spec error: {other}"),
    }
}

#[test]
fn degrees_that_do_not_fit_are_refused_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    // 3 replicas share neither 4 micro-batches nor the devices.
    let mut spec = job(&data, 1, 3, "1f1b");
    let (field, message) = spec_error(Run::prepare(spec.clone(), ""));
    assert_eq!(field, "parallelism.data_parallel");
    assert!(
        message.contains("training.microbatches = 4") && message.contains("1, 2, 4"),
        "{message}"
    );
    spec.training.microbatches = 6;
    spec.devices = Some("cpu:4x64MiB".into());
    // One stage a replica: 3 of the 4 devices do.
    let run = Run::prepare(spec.clone(), "").unwrap();
    assert_eq!(run.measured_peaks().len(), 3);
    // Stages "auto" share every device out: 3 replicas cannot split 4.
    spec.parallelism.stages = chronospipe::spec::Stages::default();
    let (field, message) = spec_error(Run::prepare(spec, ""));
    assert_eq!(field, "parallelism.data_parallel");
    assert!(
        message.contains("do not divide the 4 devices") && message.contains("6 devices"),
        "{message}"
    );
    // 2 stages x 2 replicas need 4 devices.
    let mut spec = job(&data, 2, 2, "1f1b");
    spec.devices = Some("cpu:2x64MiB".into());
    let (field, message) = spec_error(Run::prepare(spec, ""));
    assert_eq!(field, "parallelism.stages");
    assert!(
        message.contains("2 stages x 2 replicas need 4 devices"),
        "{message}"
    );
    // Nothing to shard over with one replica: said so by field.
    let spec = patched(&job(&data, 1, 1, "1f1b"), r#""shard_optimizer": true"#);
    let (got, message) = spec_error(Run::prepare(spec, ""));
    assert_eq!(got, "parallelism.shard_optimizer", "{message}");
    assert!(message.contains("data_parallel is 1"), "{message}");
    // GPUs run replicas too: planned with the CUDA layout, before any GPU is opened.
    let spec = job(&data, 1, 2, "1f1b");
    let arch = resolve_arch(&spec).unwrap();
    let gpus = DeviceSet::parse("cpu:2x1GiB").unwrap();
    let answer = plan_job(&spec, &arch, &gpus, DeviceKind::Cuda).unwrap();
    assert_eq!((answer.best.pipeline, answer.plan.replicas), (1, 2));
    // And the planner searches replicas for them.
    let spec = patched(&job(&data, 1, 1, "1f1b"), r#""data_parallel": "auto""#);
    let answer = plan_job(&spec, &arch, &gpus, DeviceKind::Cuda).unwrap();
    assert_eq!(answer.plan.total_devices(), 2);
    // GPU replicas shard the optimizer state as CPU ones do: by default, asked, or not.
    let answer = plan_job(&job(&data, 1, 2, "1f1b"), &arch, &gpus, DeviceKind::Cuda).unwrap();
    assert!(answer.plan.sharded(0) && answer.best.shard_optimizer);
    let spec = patched(&job(&data, 1, 2, "1f1b"), r#""shard_optimizer": true"#);
    let answer = plan_job(&spec, &arch, &gpus, DeviceKind::Cuda).unwrap();
    assert!(answer.plan.sharded(0));
    let spec = patched(&job(&data, 1, 2, "1f1b"), r#""shard_optimizer": false"#);
    let answer = plan_job(&spec, &arch, &gpus, DeviceKind::Cuda).unwrap();
    assert!(!answer.plan.sharded(0) && answer.plan.to_string().contains("AR0"));
}

/// `spec` with `patch` (a JSON member) first in its `parallelism`.
fn patched(spec: &JobSpec, patch: &str) -> JobSpec {
    let text = serde_json::to_string(spec).unwrap();
    let text = text.replace(
        r#""parallelism":{"#,
        &format!(r#""parallelism":{{{patch},"#),
    );
    JobSpec::from_json(&text).unwrap()
}

#[test]
fn auto_replicas_let_the_planner_pick_stages_x_replicas_and_train_like_one_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let model = |out: &Path| out.join("final/model.safetensors");
    let one = dir.path().join("pp2-dp1");
    train(job(&data, 2, 1, "1f1b"), &one);
    // Four devices, stages and replicas left to the planner: on CPU devices (instant
    // hand-overs and reductions) replicas beat stages' bubbles, as far as the 4 micro-batches
    // of the step split.
    let mut spec = patched(&job(&data, 2, 1, "1f1b"), r#""data_parallel": "auto""#);
    spec.parallelism.stages = chronospipe::spec::Stages::default();
    spec.devices = Some("cpu:4x64MiB".into());
    let auto = dir.path().join("auto");
    let (run, log) = train(spec.clone(), &auto);
    let plan = &run.answer.plan;
    assert_eq!(
        (plan.devices(), plan.replicas),
        (1, 4),
        "{}",
        crate_describe(&run)
    );
    assert_eq!(run.answer.best.data_parallel, 4);
    // More than one replica: the optimizer state is sharded by default.
    assert!(
        plan.to_string().contains("RS0") && plan.to_string().contains("AG0"),
        "{plan}"
    );
    let off = relative(&model(&auto), &model(&one));
    assert!(off <= 1e-6, "{off:e} from one pipeline");
    assert_eq!(run.predicted_peaks(), run.measured_peaks());
    assert_eq!(log.losses.len(), 4);
    // Stages fixed at 2: the planner fills the devices with replicas of them.
    spec.parallelism.stages = chronospipe::spec::Stages::Count(2);
    let run = Run::prepare(spec.clone(), "").unwrap();
    assert_eq!(
        (run.answer.plan.devices(), run.answer.plan.replicas),
        (2, 2)
    );
    // Six micro-batches on four devices of one stage: 3 replicas share them, one device idles.
    spec.parallelism.stages = chronospipe::spec::Stages::Count(1);
    spec.training.microbatches = 6;
    let run = Run::prepare(spec, "").unwrap();
    assert_eq!(run.answer.plan.replicas, 3);
    assert_eq!(run.measured_peaks().len(), 3);
}

fn crate_describe(run: &Run) -> String {
    chronospipe::plan::search::describe(&run.answer.best)
}

#[test]
fn the_cli_trains_stages_x_replicas_and_says_so_in_its_summary() {
    use chronospipe::cli::train::{TrainArgs, run};
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let file = dir.path().join("job.json");
    let mut spec = job(&data, 2, 2, "chronos");
    spec.devices = None;
    std::fs::write(&file, serde_json::to_string(&spec).unwrap()).unwrap();
    let out = dir.path().join("out");
    run(&TrainArgs {
        job: file,
        out: out.clone(),
        devices: Some("cpu:4x64MiB".into()),
        steps: Some(2),
        ranks: Default::default(),
    })
    .unwrap();
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["replicas"], 2, "{summary}");
    let devices = summary["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 4, "{summary}");
    for (i, d) in devices.iter().enumerate() {
        assert_eq!(d["replica"], i / 2, "{summary}");
        assert_eq!(d["stage"], i % 2, "{summary}");
        assert_eq!(
            d["measured_peak_bytes"], d["predicted_peak_bytes"],
            "{summary}"
        );
        assert!(d["reduction_s"].as_f64().unwrap() > 0.0, "{summary}");
    }
}

/// Parameters of each chunk of `run`'s plan, counted from a model file's tensors.
fn chunk_params(run: &Run, model: &Path) -> Vec<u64> {
    let all = tensors(model);
    let count = |prefix: &str| -> u64 {
        (all.iter())
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(_, v)| v.len() as u64)
            .sum()
    };
    (run.answer.plan.chunks.iter())
        .map(|c| {
            let layers: u64 = (c.first_layer..c.end_layer)
                .map(|l| count(&format!("model.layers.{l}.")))
                .sum();
            let embedding = if c.embedding {
                count("model.embed_tokens.")
            } else {
                0
            };
            let head = if c.head {
                count("model.norm.") + count("lm_head.")
            } else {
                0
            };
            embedding + layers + head
        })
        .collect()
}

#[test]
fn sharded_optimizer_state_trains_like_whole_state_and_keeps_only_its_shard() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let model = |out: &Path| out.join("final/model.safetensors");
    let one = dir.path().join("pp2-dp1");
    train(job(&data, 2, 1, "1f1b"), &one);
    for (stages, replicas, schedule) in [
        (1, 2, "1f1b"),
        (1, 4, "1f1b"),
        (2, 2, "1f1b"),
        (2, 2, "gpipe"),
        (2, 2, "chronos"),
    ] {
        let label = format!("pp{stages} dp{replicas} {schedule}");
        let mut spec = job(&data, stages, replicas, schedule);
        spec.parallelism.offload = OffloadChoice::None;
        let whole_spec = patched(&spec, r#""shard_optimizer": false"#);
        let (sharded, _) = train(spec, &dir.path().join(&label));
        let whole_out = dir.path().join(format!("{label} whole"));
        let (whole, _) = train(whole_spec, &whole_out);
        let text = sharded.answer.plan.to_string();
        assert!(
            text.contains("RS0") && text.contains("AG0") && !text.contains("AR"),
            "{label}: {text}"
        );
        assert!(whole.answer.plan.to_string().contains("AR0"), "{label}");
        for out in [dir.path().join(&label), whole_out] {
            let off = relative(&model(&out), &model(&one));
            assert!(off <= 1e-6, "{label}: {off:e} from one pipeline");
        }
        assert_eq!(
            sharded.predicted_peaks(),
            sharded.measured_peaks(),
            "{label}"
        );
        assert_eq!(whole.predicted_peaks(), whole.measured_peaks(), "{label}");
        // AdamW's two f32 moments: each replica keeps ceil(n / replicas) of a chunk's n.
        let params = chunk_params(&sharded, &model(&one));
        let plan = &sharded.answer.plan;
        let r = replicas as u64;
        for (device, (s, w)) in sharded
            .measured_peaks()
            .iter()
            .zip(whole.measured_peaks())
            .enumerate()
        {
            let stage = (device % stages) as u32;
            let saved: u64 = (plan.chunks.iter().zip(&params))
                .filter(|(c, _)| c.device == stage)
                .map(|(_, &n)| (n - n.div_ceil(r)) * 8)
                .sum();
            assert!(saved > 0, "{label}");
            assert_eq!(w - s, saved, "{label}: device {device}");
        }
    }
    // Two runs of one sharded plan: the same bits.
    let again = dir.path().join("again");
    train(job(&data, 2, 2, "1f1b"), &again);
    let first = dir.path().join("pp2 dp2 1f1b");
    same_final_files(&first, &again, "two runs of the same sharded plan differ");
}

#[test]
fn the_planner_finds_a_replicated_plan_that_fits_only_with_sharded_state() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let mut base = job(&data, 1, 2, "1f1b");
    base.parallelism.recompute = RecomputeChoice::None;
    base.parallelism.offload = OffloadChoice::None;
    let whole_spec = patched(&base, r#""shard_optimizer": false"#);
    let peak = |run: &Run| *run.predicted_peaks().iter().max().unwrap();
    let whole = peak(&Run::prepare(whole_spec.clone(), "").unwrap());
    let sharded = peak(&Run::prepare(base.clone(), "").unwrap());
    assert!(sharded < whole, "sharded {sharded} vs whole {whole}");
    // Between the two peaks: whole state fits no plan, the sharded plan is found.
    let devices = format!("cpu:2x{}", (whole + sharded) / 2);
    let mut tight = whole_spec;
    tight.devices = Some(devices.clone());
    let err = Run::prepare(tight, "").map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("no plan fits"), "{err}");
    let mut spec = base;
    spec.devices = Some(devices);
    let out = dir.path().join("sharded");
    let (run, _) = train(spec, &out);
    assert!(run.answer.best.shard_optimizer && run.answer.plan.sharded(0));
    assert_eq!(peak(&run), sharded);
    assert_eq!(run.predicted_peaks(), run.measured_peaks());
}

#[test]
fn a_replica_offloads_its_own_shard_of_the_optimizer_state() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let model = |out: &Path| out.join("final/model.safetensors");
    let one = dir.path().join("pp2-dp1");
    train(job(&data, 2, 1, "1f1b"), &one);
    let mut base = job(&data, 2, 2, "1f1b");
    base.parallelism.recompute = RecomputeChoice::None;
    // A budget that even a replica's shard of the optimizer state does not fit without
    // offloading half of it.
    base.parallelism.offload = OffloadChoice::None;
    let roomy = Run::prepare(base.clone(), "").unwrap();
    assert!(roomy.answer.plan.sharded(0));
    let params = chunk_params(&roomy, &model(&one));
    let peak = *roomy.predicted_peaks().iter().max().unwrap();
    let largest = (roomy.answer.plan.chunks.iter().zip(&params))
        .map(|(c, &n)| (c.device, n.div_ceil(2) * 8))
        .fold([0u64; 2], |mut per, (d, bytes)| {
            per[d as usize] += bytes;
            per
        });
    let budget = peak - largest.iter().min().unwrap() / 2;
    let mut spec = base;
    spec.parallelism.offload = OffloadChoice::Chronos;
    spec.devices = Some(format!("cpu:4x{budget}"));
    let out = dir.path().join("offloaded");
    let (run, _) = train(spec, &out);
    let text = run.answer.plan.to_string();
    assert!(text.contains("OFF:O") && text.contains("RS0"), "{text}");
    assert_eq!(run.predicted_peaks(), run.measured_peaks());
    let off = relative(&model(&out), &model(&one));
    assert!(off <= 1e-6, "{off:e} from one pipeline");
}

#[test]
fn a_sharded_dp4_checkpoint_resumes_exactly_on_dp4_dp2_and_dp1() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let whole = dir.path().join("whole");
    let (run, uninterrupted) = train(job(&data, 1, 4, "1f1b"), &whole);
    assert!(run.answer.plan.sharded(0));

    let run = Run::prepare(job(&data, 1, 4, "1f1b"), "").unwrap();
    resumes_bit_for_bit(run, &whole, &uninterrupted, &dir.path().join("resumed"));
    for replicas in [2, 1] {
        let run = Run::prepare(job(&data, 1, replicas, "1f1b"), "").unwrap();
        assert_eq!(run.answer.plan.sharded(0), replicas > 1);
        resumes_within_rounding(run, &whole, dir.path(), &format!("dp{replicas}"));
    }
}
