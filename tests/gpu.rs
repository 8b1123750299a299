//! The CUDA backend against the CPU backend, for machines with an NVIDIA GPU and a Rust
//! toolchain: `cargo test --release -- --ignored gpu_`. Without a toolchain there, the same
//! checks run from the binary (`scripts/gpu-check`).

use std::path::PathBuf;

#[path = "common/run_log.rs"]
mod run_log;

use chronospipe::exec::backend::cuda::Precision;
use chronospipe::exec::backend::cuda::selftest::{self, SelftestOptions};
use run_log::RunLog;

fn options() -> SelftestOptions {
    SelftestOptions {
        device: 0,
        fixture: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/testdata/hf-llama-tiny"
        )),
        micro_batch_size: 8,
        microbatches: 2,
        large_micro_batch: 32,
        timing_heads: selftest::llama_125m().dims.heads,
        steps: 5,
        skip_timing: true,
        skip_checks: false,
        precisions: Precision::EACH.to_vec(),
        profile: false,
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA 13 libraries on the loader path"]
fn gpu_kernels_and_a_training_step_match_the_cpu_backend() {
    assert!(
        selftest::run(&options()).unwrap(),
        "some GPU checks failed (FAIL lines above)"
    );
}

/// A whole run through `exec::run` on the GPU (`devices: "cuda"`, and two pipeline stages
/// sharing it: `cuda:0x2`), with f32 and with bf16 activations, against the same run on a CPU
/// device: losses step by step, and resuming from a checkpoint.
#[test]
#[ignore = "needs an NVIDIA GPU with CUDA 13 libraries on the loader path"]
fn gpu_run_matches_a_cpu_run_and_resumes() {
    use chronospipe::exec::run::{Run, drive};
    use chronospipe::spec::JobSpec;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("corpus.txt");
    std::fs::write(&data, "Device memory is a small fast cache. ".repeat(200)).unwrap();
    let spec = |devices: &str, precision: &str| {
        JobSpec::from_json(&format!(
            r#"{{"model": {{"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                         "intermediate_size": 96, "vocab_size": 256, "init": {{"seed": 3}}}},
                "data": {{"train": {data:?}}},
                "training": {{"seq_len": 32, "micro_batch_size": 2, "microbatches": 2, "steps": 4,
                             "checkpoint_every": 2, "precision": {precision:?}}},
                "devices": {devices:?}}}"#
        ))
        .unwrap()
    };
    let run_to = |devices: &str, precision: &str, out: &std::path::Path| {
        let mut run = Run::prepare(spec(devices, precision), "cpu:1x256MiB").unwrap();
        let mut log = RunLog::new(out);
        drive(&mut run, &mut log).unwrap();
        (run, log.losses)
    };
    let (_, cpu) = run_to("cpu:1x256MiB", "f32", &dir.path().join("cpu"));
    // The whole model on one GPU, then two pipeline stages sharing it; f32 activations (TF32
    // products) within 1e-3 of the CPU, bf16 (8 significant bits) within 2e-2.
    let cases = [
        ("cuda", 1, "f32", 1e-3),
        ("cuda:0x2", 2, "f32", 1e-3),
        ("cuda", 1, "bf16", 2e-2),
        ("cuda:0x2", 2, "bf16", 2e-2),
    ];
    for (devices, stages, precision, tol) in cases {
        let gpu_dir = dir.path().join(format!("{devices}-{precision}"));
        let (gpu_run, gpu) = run_to(devices, precision, &gpu_dir);
        assert_eq!(gpu.len(), cpu.len());
        for (c, g) in cpu.iter().zip(&gpu) {
            assert!(
                (c - g).abs() / c.abs() < tol,
                "{devices} {precision}: losses {cpu:?} vs {gpu:?}"
            );
        }
        assert_eq!(gpu_run.measured_peaks().len(), stages);
        assert_eq!(
            gpu_run.measured_peaks().len(),
            gpu_run.predicted_peaks().len()
        );

        // Resume on the GPU from step 2: the last two losses of the uninterrupted GPU run (to
        // rounding: some GPU sums use atomics, whose order varies, and bf16 rounding can
        // amplify that).
        let mut resumed = Run::prepare(spec(devices, precision), "cpu:1x256MiB").unwrap();
        resumed.resume_from(&gpu_dir.join("step-2")).unwrap();
        let mut log = RunLog::new(&gpu_dir.join("resumed"));
        drive(&mut resumed, &mut log).unwrap();
        assert_eq!(log.losses.len(), 2);
        let resume_tol = if precision == "bf16" { 1e-3 } else { 1e-5 };
        for (r, g) in log.losses.iter().zip(&gpu[2..]) {
            assert!(
                (r - g).abs() / g.abs() < resume_tol,
                "{devices} {precision}: resumed {:?} vs {gpu:?}",
                log.losses
            );
        }
    }
}

/// Every weight of a checkpoint's `model.safetensors`, tensors in name order, as f64.
fn weights(dir: &std::path::Path) -> Vec<(String, Vec<f64>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all: Vec<(String, Vec<f64>)> = (st.tensors().into_iter())
        .map(|(name, view)| {
            let values = (view.data().chunks_exact(4))
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect();
            (name, values)
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// Data parallelism through `exec::run` on GPUs: 2 replicas of one stage sharing GPU 0
/// (`cuda:0x2`, gradients summed by the device add kernel) and, where the machine has two
/// GPUs, one replica on each (`cuda:0,1`, NCCL all-reduce), against one replica on GPU 0
/// (`cuda:0x1`) with the same global batch: final weights within 1e-5 relative (f32
/// activations; only the gradients' summation order differs), every device's peak measured.
#[test]
#[ignore = "needs an NVIDIA GPU with CUDA 13 libraries on the loader path"]
fn gpu_data_parallel_replicas_train_like_one_replica() {
    use chronospipe::exec::run::{Run, drive};
    use chronospipe::spec::JobSpec;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("corpus.txt");
    std::fs::write(&data, "Replicas sum what they learned. ".repeat(200)).unwrap();
    let spec = |devices: &str, replicas: usize| {
        JobSpec::from_json(&format!(
            r#"{{"model": {{"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                         "intermediate_size": 96, "vocab_size": 256, "init": {{"seed": 3}}}},
                "data": {{"train": {data:?}}},
                "training": {{"seq_len": 32, "micro_batch_size": 2, "microbatches": 4, "steps": 3,
                             "precision": "f32"}},
                "parallelism": {{"stages": 1, "data_parallel": {replicas}, "schedule": "1f1b",
                                "recompute": "none", "offload": "none"}},
                "devices": {devices:?}}}"#
        ))
        .unwrap()
    };
    let run_to = |devices: &str, replicas: usize| {
        let out = dir.path().join(devices.replace([':', ','], "-"));
        let mut run = Run::prepare(spec(devices, replicas), "cpu:1x256MiB").unwrap();
        let mut log = RunLog::new(&out);
        drive(&mut run, &mut log).unwrap();
        assert_eq!(run.answer.plan.replicas as usize, replicas, "{devices}");
        assert_eq!(run.measured_peaks().len(), replicas, "{devices}");
        weights(&out.join("final"))
    };
    let one = run_to("cuda:0x1", 1);
    let gpu_count = cudarc::driver::CudaContext::device_count().unwrap_or(0);
    let mut cases = vec!["cuda:0x2"];
    if gpu_count >= 2 {
        cases.push("cuda:0,1");
    }
    for devices in cases {
        let two = run_to(devices, 2);
        assert_eq!(two.len(), one.len());
        let (mut diff, mut norm) = (0.0, 0.0);
        for ((name, a), (other, b)) in two.iter().zip(&one) {
            assert_eq!(name, other);
            diff += a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
            norm += b.iter().map(|y| y * y).sum::<f64>();
        }
        let relative = (diff / norm).sqrt();
        // Without the reduction replica 0 would step on its own half of the batch: far off.
        assert!(relative < 1e-5, "{devices}: {relative:e} from one replica");
    }
}
