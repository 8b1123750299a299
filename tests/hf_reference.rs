//! Holds the executor against what transformers + PyTorch computed for tiny Llamas
//! (`shared/testdata/hf-llama-tiny`, and `hf-llama3-tiny` with Llama 3.1's rotary scaling):
//! logits, loss, every gradient, one SGD and one AdamW step.

use std::path::{Path, PathBuf};

use chronospipe::exec::backend::CpuBackend;
use chronospipe::exec::checkpoint::model_files::{load_hf_parts, read_hf_config};
use chronospipe::exec::checkpoint::safetensors_io::TensorFile;
use chronospipe::exec::compare::rel_err;
use chronospipe::exec::device::Pool;
use chronospipe::exec::model::head::head_logits;
use chronospipe::exec::model::part::{
    MicroTokens, PartOutput, PartStash, backward_part, forward_part,
};
use chronospipe::exec::model::{PartCtx, PartId, PartParams};
use chronospipe::exec::optim::clip::{clip_factor, global_norm, part_squares};
use chronospipe::exec::optim::{OptimizerConfig, PartOptimState, step_part};
use chronospipe::plan::inventory::MicroShape;

/// The fixtures this executor implements; each holds the same reference tensors.
const FIXTURES: [&str; 2] = ["hf-llama-tiny", "hf-llama3-tiny"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/testdata")
        .join(name)
}

/// Prints an OK / NOT OK line and returns whether it passed.
fn compare(name: &str, ours: &[f32], reference: &[f32]) -> bool {
    let err = rel_err(ours, reference);
    let ok = err < 1e-4;
    println!(
        "{} {name}: rel err {err:.2e}",
        if ok { "OK    " } else { "NOT OK" }
    );
    ok
}

struct Run {
    parts: Vec<PartParams>,
    logits: Vec<f32>,
    loss: f64,
}

/// Forward and backward of the whole reference batch as one micro-batch.
fn run_reference(dir: &Path, reference: &TensorFile) -> Run {
    let config = read_hf_config(dir).unwrap();
    let pool = Pool::new("cpu:0", 64 << 20);
    let ids = PartId::all(config.dims.layers);
    let mut parts = load_hf_parts(dir, &config, &ids, &pool).unwrap();
    let (shape, input_ids) = reference.i32("input_ids").unwrap();
    let (_, targets) = reference.i32("targets").unwrap();
    let micro = MicroShape {
        batch: shape[0],
        seq: shape[1],
    };
    let backend = CpuBackend::default();
    let ctx = PartCtx {
        backend: &backend,
        pool: &pool,
        config: &config,
        micro,
    };
    let tokens = MicroTokens {
        input_ids: &input_ids,
        targets: &targets,
    };
    let mut stashes: Vec<PartStash> = Vec::new();
    let mut carry = None;
    let mut logits = Vec::new();
    let mut loss = 0.0;
    for p in &parts {
        if p.id == PartId::Head {
            logits = head_logits(&ctx, p, carry.as_ref().unwrap()).unwrap();
        }
        let (stash, out) = forward_part(&ctx, p, carry.take(), tokens).unwrap();
        stashes.push(stash);
        match out {
            PartOutput::Hidden(t) => carry = Some(t),
            PartOutput::LossSum(l) => loss = l / micro.tokens() as f64,
        }
    }
    let scale = 1.0 / micro.tokens() as f32;
    let mut grad = None;
    for p in parts.iter_mut().rev() {
        grad = backward_part(&ctx, p, stashes.pop().unwrap(), grad.take(), scale).unwrap();
    }
    Run {
        parts,
        logits,
        loss,
    }
}

#[test]
fn logits_loss_and_gradients_match_pytorch() {
    for name in FIXTURES {
        println!("{name}:");
        logits_loss_and_gradients_match(&fixture(name));
    }
}

fn logits_loss_and_gradients_match(dir: &Path) {
    let reference = TensorFile::open(&dir.join("reference.safetensors")).unwrap();
    let run = run_reference(dir, &reference);
    let mut ok = compare("logits", &run.logits, &reference.f32("logits").unwrap().1);
    let ref_loss = reference.f32("loss").unwrap().1[0];
    ok &= compare("loss", &[run.loss as f32], &[ref_loss]);
    for p in &run.parts {
        for (name, g) in p.names.iter().zip(&p.grads) {
            ok &= compare(
                &format!("grad.{name}"),
                g.data(),
                &reference.f32(&format!("grad.{name}")).unwrap().1,
            );
        }
    }
    assert!(
        ok,
        "{}: some tensors differ from the PyTorch reference (see NOT OK lines)",
        dir.display()
    );
}

fn step_and_compare(prefix: &str, config: OptimizerConfig, lr: f32, clip: Option<f32>) {
    for name in FIXTURES {
        println!("{name}:");
        step_and_compare_on(&fixture(name), prefix, &config, lr, clip);
    }
}

fn step_and_compare_on(
    dir: &Path,
    prefix: &str,
    config: &OptimizerConfig,
    lr: f32,
    clip: Option<f32>,
) {
    let reference = TensorFile::open(&dir.join("reference.safetensors")).unwrap();
    let mut run = run_reference(dir, &reference);
    let pool = Pool::new("cpu:0", 64 << 20);
    let squares: Vec<_> = run.parts.iter().map(part_squares).collect();
    let norm = global_norm(&squares);
    let mut ok = compare(
        "grad_norm",
        &[norm as f32],
        &reference.f32("grad_norm").unwrap().1,
    );
    let factor = clip.map_or(1.0, |max_norm| clip_factor(norm, max_norm));
    for p in &mut run.parts {
        let mut state = PartOptimState::allocate(&pool, config, p).unwrap();
        step_part(config, 1, lr, factor, p, &mut state);
        for (name, w) in p.names.iter().zip(&p.weights) {
            let want = reference.f32(&format!("{prefix}.{name}")).unwrap().1;
            ok &= compare(&format!("{prefix}.{name}"), w.data(), &want);
        }
    }
    assert!(
        ok,
        "{}: some parameters differ after the {prefix} step (see NOT OK lines)",
        dir.display()
    );
}

#[test]
fn sgd_step_matches_pytorch() {
    step_and_compare("sgd", OptimizerConfig::Sgd, 0.5, None);
}

#[test]
fn adamw_step_with_clipping_matches_pytorch() {
    let adamw = OptimizerConfig::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    step_and_compare("adamw", adamw, 1e-3, Some(1.0));
}
