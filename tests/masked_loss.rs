//! Masked targets (prompts, user turns) against PyTorch's `ignore_index=-100`:
//! `tests/fixtures/masked_loss` (made by its `make_fixture.py` from `hf-llama-tiny`) holds the
//! loss, every gradient and one SGD step with some targets ignored. Ours, to the same bound as
//! `hf_reference` (relative error under 1e-4 per tensor): the loss and every gradient of one
//! forward/backward on one device, and the loss and every parameter after one SGD step on a
//! two-stage pipeline whose micro-batches are the fixture's two sequences.

#[path = "common/reference.rs"]
mod reference;

use std::path::{Path, PathBuf};

use chronospipe::data::{IGNORE_TARGET, Microbatch};
use chronospipe::exec::backend::CpuBackend;
use chronospipe::exec::checkpoint::model_files::{load_hf_parts, read_hf_config};
use chronospipe::exec::checkpoint::safetensors_io::TensorFile;
use chronospipe::exec::device::{DeviceSet, Pool};
use chronospipe::exec::model::part::{
    MicroTokens, PartOutput, PartStash, backward_part, forward_part,
};
use chronospipe::exec::model::{PartCtx, PartId};
use chronospipe::exec::optim::OptimizerConfig;
use chronospipe::exec::optim::schedule::LrSchedule;
use chronospipe::exec::pipeline::{CpuEngine, Pipeline};
use chronospipe::plan::inventory::MicroShape;
use chronospipe::plan::schedule::{ScheduleKind, build};
use reference::compare;

const LR: f32 = 0.5;

fn weights() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata/hf-llama-tiny")
}

fn reference() -> TensorFile {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/masked_loss/reference.safetensors");
    TensorFile::open(&path).unwrap()
}

/// The fixture's windows and targets, and how many targets count.
fn batch(reference: &TensorFile) -> (MicroShape, Vec<i32>, Vec<i32>, usize) {
    let (shape, input_ids) = reference.i32("input_ids").unwrap();
    let (_, targets) = reference.i32("targets").unwrap();
    let counted = targets.iter().filter(|&&t| t != IGNORE_TARGET).count();
    // Some targets of both sequences are masked, and some count.
    assert!(counted > 0 && counted < targets.len());
    let shape = MicroShape {
        batch: shape[0],
        seq: shape[1],
    };
    (shape, input_ids, targets, counted)
}

#[test]
fn masked_loss_and_gradients_match_pytorch_on_one_device() {
    let (dir, reference) = (weights(), reference());
    let (micro, input_ids, targets, counted) = batch(&reference);
    let config = read_hf_config(&dir).unwrap();
    let pool = Pool::new("cpu:0", 64 << 20);
    let mut parts = load_hf_parts(&dir, &config, &PartId::all(config.dims.layers), &pool).unwrap();
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
    let (mut stashes, mut carry, mut loss) = (Vec::<PartStash>::new(), None, f64::NAN);
    for p in &parts {
        let (stash, out) = forward_part(&ctx, p, carry.take(), tokens).unwrap();
        stashes.push(stash);
        match out {
            PartOutput::Hidden(t) => carry = Some(t),
            PartOutput::LossSum(sum) => loss = sum / counted as f64,
        }
    }
    let mut grad = None;
    for p in parts.iter_mut().rev() {
        let scale = 1.0 / counted as f32;
        grad = backward_part(&ctx, p, stashes.pop().unwrap(), grad.take(), scale).unwrap();
    }
    let mut ok = compare("loss", &[loss as f32], &reference.f32("loss").unwrap().1);
    for p in &parts {
        for (name, g) in p.names.iter().zip(&p.grads) {
            let want = reference.f32(&format!("grad.{name}")).unwrap().1;
            ok &= compare(&format!("grad.{name}"), g.data(), &want);
        }
    }
    assert!(
        ok,
        "masked loss or gradients differ from PyTorch's (see NOT OK lines)"
    );
}

#[test]
fn a_masked_sgd_step_on_a_pipeline_matches_pytorch() {
    let (dir, reference) = (weights(), reference());
    let (micro, input_ids, targets, _) = batch(&reference);
    let config = read_hf_config(&dir).unwrap();
    // One sequence a micro-batch, two stages.
    let plan = build(ScheduleKind::OneFOneB, 2, micro.batch as u32, 2).unwrap();
    let devices = DeviceSet::cpu(2, 64 << 20);
    let parts = load_hf_parts(
        &dir,
        &config,
        &PartId::all(config.dims.layers),
        &devices.host,
    )
    .unwrap();
    let mut pipeline = Pipeline::new(
        config,
        plan,
        devices,
        CpuEngine {
            backend: CpuBackend::default(),
        },
        parts,
        OptimizerConfig::Sgd,
        LrSchedule::constant(LR),
        None,
    )
    .unwrap();
    let seq = micro.seq;
    let microbatches: Vec<Microbatch> = (0..micro.batch)
        .map(|i| Microbatch {
            step: 0,
            index: i,
            shape: MicroShape { batch: 1, seq },
            windows: vec![i],
            input_ids: input_ids[i * seq..(i + 1) * seq].to_vec(),
            targets: targets[i * seq..(i + 1) * seq].to_vec(),
        })
        .collect();
    let (report, _) = pipeline.train_step(&microbatches).unwrap();
    let mut ok = compare(
        "loss",
        &[report.loss as f32],
        &reference.f32("loss").unwrap().1,
    );
    for p in pipeline.parts() {
        for (name, w) in p.names.iter().zip(&p.weights) {
            let want = reference.f32(&format!("sgd.{name}")).unwrap().1;
            ok &= compare(&format!("sgd.{name}"), w.data(), &want);
        }
    }
    assert!(
        ok,
        "the masked SGD step differs from PyTorch's (see NOT OK lines)"
    );
}
