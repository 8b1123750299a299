//! Holds the executor against what transformers + PyTorch computed for tiny Llamas
//! (`shared/testdata/hf-llama-tiny`, `hf-llama3-tiny` with Llama 3.1's rotary scaling,
//! `hf-tied-tiny` with tied embeddings) and a tiny Qwen2 (`hf-qwen2-tiny`, biased q/k/v
//! projections): logits, loss, every gradient, one SGD and one AdamW step, with the model on
//! one device and split into two pipeline stages (a tied table's two gradients summed into
//! both copies, as the runtime's `TIE` does; `tests/tied_embeddings.rs` runs that runtime).

#[path = "common/reference.rs"]
mod reference;

use std::path::Path;

use chronospipe::exec::backend::CpuBackend;
use chronospipe::exec::checkpoint::model_files::{load_hf_parts, read_hf_config, save_model};
use chronospipe::exec::checkpoint::safetensors_io::TensorFile;
use chronospipe::exec::device::{MemGroup, Pool};
use chronospipe::exec::model::chunk::{backward_chunk, forward_chunk};
use chronospipe::exec::model::head::head_logits;
use chronospipe::exec::model::part::{
    MicroTokens, PartOutput, PartStash, backward_part, forward_part,
};
use chronospipe::exec::model::tied::sum_tied_grads;
use chronospipe::exec::model::{PartCtx, PartId, PartParams};
use chronospipe::exec::optim::clip::{clip_factor, global_norm, part_squares};
use chronospipe::exec::optim::{OptimizerConfig, PartOptimState, step_part};
use chronospipe::plan::inventory::MicroShape;
use reference::{compare, python_last_line, testdata, transformers_available};

/// The fixtures this executor implements; each holds the same reference tensors.
const FIXTURES: [&str; 4] = [
    "hf-llama-tiny",
    "hf-llama3-tiny",
    "hf-tied-tiny",
    "hf-qwen2-tiny",
];

/// How the model is split: one device, or two pipeline stages (embedding and the first layer
/// | the other layers and the head) on two pools, the activation and its gradient moved
/// between them.
const STAGES: [usize; 2] = [1, 2];

struct Run {
    parts: Vec<PartParams>,
    logits: Vec<f32>,
    loss: f64,
}

/// Forward and backward of the whole reference batch as one micro-batch, on `stages` devices.
fn run_reference(dir: &Path, reference: &TensorFile, stages: usize) -> Run {
    let config = read_hf_config(dir).unwrap();
    let ids = PartId::all(config.dims.layers);
    let cut = if stages == 1 { ids.len() } else { 2 };
    let pools = [Pool::new("cpu:0", 64 << 20), Pool::new("cpu:1", 64 << 20)];
    let mut first = load_hf_parts(dir, &config, &ids[..cut], &pools[0]).unwrap();
    let mut second = load_hf_parts(dir, &config, &ids[cut..], &pools[1]).unwrap();
    let (shape, input_ids) = reference.i32("input_ids").unwrap();
    let (_, targets) = reference.i32("targets").unwrap();
    let micro = MicroShape {
        batch: shape[0],
        seq: shape[1],
    };
    let backend = CpuBackend::default();
    let ctx = |pool| PartCtx {
        backend: &backend,
        pool,
        config: &config,
        micro,
    };
    let (c0, c1) = (ctx(&pools[0]), ctx(&pools[1]));
    let tokens = MicroTokens {
        input_ids: &input_ids,
        targets: &targets,
    };
    let scale = 1.0 / micro.tokens() as f32;
    let (loss, logits);
    if second.is_empty() {
        let mut stashes: Vec<PartStash> = Vec::new();
        let mut carry = None;
        let mut head_logits_seen = Vec::new();
        let mut loss_sum = 0.0;
        for p in &first {
            if p.id == PartId::Head {
                head_logits_seen = head_logits(&c0, p, carry.as_ref().unwrap()).unwrap();
            }
            let (stash, out) = forward_part(&c0, p, carry.take(), tokens).unwrap();
            stashes.push(stash);
            match out {
                PartOutput::Hidden(t) => carry = Some(t),
                PartOutput::LossSum(l) => loss_sum = l,
            }
        }
        let mut grad = None;
        for p in first.iter_mut().rev() {
            grad = backward_part(&c0, p, stashes.pop().unwrap(), grad.take(), scale).unwrap();
        }
        (loss, logits) = (loss_sum, head_logits_seen);
    } else {
        let (s0, out0) = forward_chunk(&c0, &first, None, tokens).unwrap();
        let PartOutput::Hidden(h) = out0 else {
            panic!("the first stage hands on hidden states")
        };
        let sent = (h.regroup(MemGroup::Communication))
            .transfer(&pools[1], MemGroup::Activations)
            .unwrap();
        let (s1, out1) = forward_chunk(&c1, &second, Some(sent), tokens).unwrap();
        let PartOutput::LossSum(l) = out1 else {
            panic!("the last stage ends with the loss")
        };
        let g = backward_chunk(&c1, &mut second, s1, None, scale)
            .unwrap()
            .expect("the second stage's input gradient");
        let back = (g.regroup(MemGroup::Communication))
            .transfer(&pools[0], MemGroup::Activations)
            .unwrap();
        backward_chunk(&c0, &mut first, s0, Some(back), scale).unwrap();
        // Logits are a head-only check: the one-stage run makes it.
        (loss, logits) = (l, Vec::new());
    }
    first.append(&mut second);
    sum_tied_grads(&mut first).unwrap();
    Run {
        parts: first,
        logits,
        loss: loss / micro.tokens() as f64,
    }
}

#[test]
fn logits_loss_and_gradients_match_pytorch() {
    for name in FIXTURES {
        for stages in STAGES {
            println!("{name}, {stages} stage(s):");
            logits_loss_and_gradients_match(&testdata(name), stages);
        }
    }
}

fn logits_loss_and_gradients_match(dir: &Path, stages: usize) {
    let reference = TensorFile::open(&dir.join("reference.safetensors")).unwrap();
    let run = run_reference(dir, &reference, stages);
    let mut ok = true;
    if stages == 1 {
        ok &= compare("logits", &run.logits, &reference.f32("logits").unwrap().1);
    }
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
        for stages in STAGES {
            println!("{name}, {stages} stage(s):");
            step_and_compare_on(&testdata(name), stages, prefix, &config, lr, clip);
        }
    }
}

fn step_and_compare_on(
    dir: &Path,
    stages: usize,
    prefix: &str,
    config: &OptimizerConfig,
    lr: f32,
    clip: Option<f32>,
) {
    let reference = TensorFile::open(&dir.join("reference.safetensors")).unwrap();
    let mut run = run_reference(dir, &reference, stages);
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

/// Loads a model directory with transformers' `AutoModelForCausalLM.from_pretrained` and
/// prints its class, the keys it did not find or did not expect, and the mean cross-entropy
/// on the reference batch.
const TRANSFORMERS_LOSS: &str = r#"
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
model, info = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], dtype=torch.float32, output_loading_info=True)
ref = load_file(sys.argv[2])
with torch.no_grad():
    logits = model(input_ids=ref["input_ids"].long()).logits
loss = torch.nn.functional.cross_entropy(
    logits.reshape(-1, logits.shape[-1]), ref["targets"].long().reshape(-1))
missing = info["missing_keys"] or ["-"]
unexpected = info["unexpected_keys"] or ["-"]
print(type(model).__name__, ",".join(sorted(missing)), ",".join(sorted(unexpected)), repr(loss.item()))
"#;

/// A checkpoint this project writes (`save_model`) loads in transformers as the class it came
/// from, with every tensor it expects (Qwen2's q/k/v biases included) and none it does not,
/// and gives the reference loss. Skipped, saying why, where Python lacks torch or transformers.
#[test]
fn written_checkpoints_load_in_transformers_with_the_same_loss() {
    if !transformers_available() {
        return;
    }
    for (name, class) in [
        ("hf-llama3-tiny", "LlamaForCausalLM"),
        ("hf-tied-tiny", "LlamaForCausalLM"),
        ("hf-qwen2-tiny", "Qwen2ForCausalLM"),
    ] {
        let dir = testdata(name);
        let reference = TensorFile::open(&dir.join("reference.safetensors")).unwrap();
        let run = run_reference(&dir, &reference, 1);
        let out = tempfile::tempdir().unwrap();
        let config = read_hf_config(&dir).unwrap();
        save_model(out.path(), &config, &run.parts.iter().collect::<Vec<_>>()).unwrap();
        let reference_file = dir.join("reference.safetensors");
        let line = python_last_line(TRANSFORMERS_LOSS, &[out.path(), &reference_file]);
        let fields: Vec<&str> = line.split(' ').collect();
        println!("{name}: {line}");
        assert_eq!(fields.len(), 4, "{line}");
        assert_eq!(
            fields[..3],
            [class, "-", "-"],
            "{name}: class, missing, unexpected"
        );
        let loss: f64 = fields[3].parse().unwrap();
        assert!(
            (loss - run.loss).abs() < 1e-5 * run.loss.abs(),
            "{name}: transformers' loss {loss} vs ours {}",
            run.loss
        );
    }
}
