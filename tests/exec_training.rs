//! Single-device training: memory equals the inventory, loss falls, resume is bit-exact,
//! checkpoints round-trip, bad input is an error.

use std::path::PathBuf;

use chronospipe::data::{BatchLayout, Batcher, IGNORE_TARGET, Microbatch};
use chronospipe::exec::backend::CpuBackend;
use chronospipe::exec::backend::cpu::kernels::rope::Rope;
use chronospipe::exec::checkpoint::CheckpointError;
use chronospipe::exec::checkpoint::model_files::{load_hf_parts, read_hf_config};
use chronospipe::exec::checkpoint::trainer_state::TrainerState;
use chronospipe::exec::device::{MemGroup, Pool};
use chronospipe::exec::model::part::{MicroTokens, backward_part, forward_part};
use chronospipe::exec::model::{LlamaConfig, PartCtx, PartId, PartParams};
use chronospipe::exec::optim::OptimizerConfig;
use chronospipe::exec::optim::schedule::LrSchedule;
use chronospipe::exec::tensor::Tensor;
use chronospipe::exec::train::{SingleDevice, TrainError};
use chronospipe::plan::inventory::{MicroShape, ModelDims, Profile, total_bytes};
use chronospipe::spec::Architecture;

fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        dims: ModelDims {
            hidden: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ffn: 48,
            vocab: 256,
            qkv_bias: false,
            tied_embeddings: false,
        },
        rms_norm_eps: 1e-5,
        rope: Rope::plain(10000.0),
        architecture: Architecture::Llama,
        max_position_embeddings: 4096,
    }
}

fn trainer(seed: u64) -> SingleDevice {
    SingleDevice::from_seed(
        tiny_config(),
        Pool::new("cpu:0", 64 << 20),
        CpuBackend::default(),
        seed,
        OptimizerConfig::default(),
        LrSchedule::constant(3e-3),
        Some(1.0),
    )
    .unwrap()
}

fn corpus() -> Vec<u32> {
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(40);
    text.bytes().map(u32::from).collect()
}

fn batcher() -> Batcher {
    let layout = BatchLayout {
        seq_len: 16,
        micro_batch_size: 2,
        microbatches: 2,
        shuffle: true,
        seed: 3,
    };
    Batcher::new(&corpus(), 256, layout).unwrap()
}

#[test]
fn every_part_allocates_exactly_its_inventory() {
    let config = tiny_config();
    let micro = MicroShape { batch: 2, seq: 8 };
    let weights = Pool::new("weights", 64 << 20);
    let backend = CpuBackend::default();
    for id in [PartId::Embedding, PartId::Layer(0), PartId::Head] {
        let inv = Profile::CpuF32.part(&config.dims, micro, id.kind());
        let mut params = PartParams::allocate(&weights, &config, id).unwrap();
        params.init_from_seed(1);
        let param_bytes: usize = params.weights.iter().map(Tensor::bytes).sum();
        assert_eq!(param_bytes, total_bytes(&inv.params), "{id:?} params");

        let acts = Pool::new("acts", 64 << 20);
        let ctx = PartCtx {
            backend: &backend,
            pool: &acts,
            config: &config,
            micro,
        };
        let ids: Vec<i32> = (0..micro.tokens() as i32).collect();
        let tokens = MicroTokens {
            input_ids: &ids,
            targets: &ids,
        };
        let input = (id != PartId::Embedding).then(|| {
            Tensor::zeros(
                &acts,
                "input",
                &[micro.tokens(), config.dims.hidden],
                MemGroup::Activations,
            )
            .unwrap()
        });
        let (stash, out) = forward_part(&ctx, &params, input, tokens).unwrap();
        let out_bytes = inv.output.as_ref().map_or(0, |o| o.bytes());
        let stash_bytes = total_bytes(&inv.stash);
        assert_eq!(
            acts.peak_bytes(),
            stash_bytes + total_bytes(&inv.forward_scratch) + out_bytes,
            "{id:?} forward peak"
        );
        assert_eq!(
            acts.live_bytes(),
            stash_bytes + out_bytes,
            "{id:?} after forward"
        );
        drop(out);
        assert_eq!(acts.live_bytes(), stash_bytes);

        acts.reset_peak();
        let grad = (id != PartId::Head).then(|| {
            Tensor::zeros(
                &acts,
                "grad_output",
                &[micro.tokens(), config.dims.hidden],
                MemGroup::Activations,
            )
            .unwrap()
        });
        let back = backward_part(&ctx, &mut params, stash, grad, 0.1).unwrap();
        assert_eq!(
            acts.peak_bytes(),
            stash_bytes + total_bytes(&inv.backward_scratch),
            "{id:?} backward peak"
        );
        let back_bytes = back.as_ref().map_or(0, Tensor::bytes);
        assert_eq!(acts.live_bytes(), back_bytes, "{id:?} after backward");
    }
}

#[test]
fn loss_falls_and_runs_are_bit_identical() {
    let run = || {
        let (mut t, mut b) = (trainer(5), batcher());
        let losses: Vec<f64> = (0..8)
            .map(|k| t.train_step(&b.step(k)).unwrap().loss)
            .collect();
        (losses, t.parts[1].weights[1].data().to_vec())
    };
    let (losses, w) = run();
    assert!(losses[7] < losses[0] - 0.5, "loss did not fall: {losses:?}");
    let (losses2, w2) = run();
    assert_eq!(losses, losses2);
    assert_eq!(w, w2);
}

#[test]
fn resume_from_checkpoint_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let (mut straight, mut b) = (trainer(9), batcher());
    for k in 0..3 {
        straight.train_step(&b.step(k)).unwrap();
    }
    let mut first = trainer(9);
    for k in 0..2 {
        first.train_step(&b.step(k)).unwrap();
    }
    let state = TrainerState {
        step: 2,
        data_position: b.position_before(2),
        rng_seed: 3,
        last_loss: None,
        ..Default::default()
    };
    first.save_checkpoint(dir.path(), &state).unwrap();
    let mut resumed = trainer(1234); // different init: everything must come from the checkpoint
    let loaded = resumed.load_checkpoint(dir.path()).unwrap();
    assert_eq!(loaded, state);
    resumed.train_step(&b.step(loaded.step)).unwrap();
    let out = |t: &SingleDevice, name: &str| {
        let d = PathBuf::from(dir.path()).join(name);
        t.save_checkpoint(&d, &state).unwrap();
        std::fs::read(d.join("model.safetensors")).unwrap()
    };
    assert_eq!(out(&straight, "a"), out(&resumed, "b"));
}

#[test]
fn hf_checkpoint_round_trips_and_mismatches_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let t = trainer(2);
    let state = TrainerState {
        step: 0,
        data_position: 0,
        rng_seed: 0,
        last_loss: None,
        ..Default::default()
    };
    t.save_checkpoint(dir.path(), &state).unwrap();
    let config = read_hf_config(dir.path()).unwrap();
    assert_eq!(config, t.config);
    let pool = Pool::new("cpu:0", 64 << 20);
    let parts = load_hf_parts(dir.path(), &config, &PartId::all(2), &pool).unwrap();
    for (a, b) in parts.iter().zip(&t.parts) {
        for (x, y) in a.weights.iter().zip(&b.weights) {
            assert_eq!(x.data(), y.data(), "{}", x.name());
        }
    }
    let mut wider = config;
    wider.dims.ffn = 64;
    let err = load_hf_parts(dir.path(), &wider, &PartId::all(2), &pool).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, CheckpointError::ShapeMismatch { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("model.layers.0.mlp.gate_proj.weight")
            && msg.contains("[48, 32]")
            && msg.contains("[64, 32]"),
        "{msg}"
    );
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let mut t = trainer(4);
    let mut b = batcher();
    let mut mbs = b.step(0);
    mbs[1].targets[3] = 999;
    let err = t.train_step(&mbs).unwrap_err();
    assert!(err.to_string().contains("999"), "{err}");

    t.parts[0].weights[0].data_mut()[b'h' as usize * 32] = f32::NAN;
    let err = t.train_step(&b.step(0)).unwrap_err();
    assert!(
        matches!(err, TrainError::NonFiniteLoss { step: 0, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("step 0"));

    let small = SingleDevice::from_seed(
        tiny_config(),
        Pool::new("cpu:0", 100_000),
        CpuBackend::default(),
        1,
        OptimizerConfig::default(),
        LrSchedule::constant(1e-3),
        None,
    );
    let msg = small.err().unwrap().to_string();
    assert!(
        msg.contains("out of memory on cpu:0") && msg.contains("budget 100000"),
        "{msg}"
    );
}

fn sgd_trainer(seed: u64) -> SingleDevice {
    SingleDevice::from_seed(
        tiny_config(),
        Pool::new("cpu:0", 64 << 20),
        CpuBackend::default(),
        seed,
        OptimizerConfig::Sgd,
        LrSchedule::constant(1.0),
        None,
    )
    .unwrap()
}

/// |a - b| / |b| over whole vectors, in f64.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

/// One SGD step (lr 1, so each weight moves by its gradient): the loss, the gradient norm and
/// every parameter's change.
fn sgd_step(mb: Microbatch) -> (f64, f64, Vec<Vec<f32>>) {
    let mut t = sgd_trainer(6);
    let before: Vec<Vec<f32>> = t
        .parts
        .iter()
        .flat_map(|p| p.weights.iter().map(|w| w.data().to_vec()))
        .collect();
    let report = t.train_step(&[mb]).unwrap();
    let after = t.parts.iter().flat_map(|p| p.weights.iter());
    let moves = after
        .zip(&before)
        .map(|(w, b)| w.data().iter().zip(b).map(|(a, b)| a - b).collect())
        .collect();
    (report.loss, report.grad_norm, moves)
}

#[test]
fn a_fully_masked_sequence_changes_nothing() {
    let mut b = batcher();
    let mut pair = b.microbatch(0, 0); // two sequences of 16
    let seq = pair.shape.seq;
    let mut alone = pair.clone();
    alone.shape.batch = 1;
    alone.windows.truncate(1);
    alone.input_ids.truncate(seq);
    alone.targets.truncate(seq);
    pair.targets[seq..].fill(IGNORE_TARGET);
    let (loss_pair, norm_pair, moves_pair) = sgd_step(pair);
    let (loss_alone, norm_alone, moves_alone) = sgd_step(alone);
    assert!(
        ((loss_pair - loss_alone) / loss_alone).abs() < 1e-6,
        "{loss_pair} vs {loss_alone}"
    );
    assert!(
        ((norm_pair - norm_alone) / norm_alone).abs() < 1e-6,
        "{norm_pair} vs {norm_alone}"
    );
    for (i, (p, a)) in moves_pair.iter().zip(&moves_alone).enumerate() {
        let err = rel_err(p, a);
        assert!(err < 1e-5, "parameter {i}: gradients differ by {err:.2e}");
    }
}

#[test]
fn masked_targets_average_over_counted_tokens_and_none_counted_is_an_error() {
    let mut b = batcher();
    let full = b.microbatch(0, 0);
    let mut masked = full.clone();
    // Every other target masked: the loss is the mean over the other half.
    for t in masked.targets.iter_mut().step_by(2) {
        *t = IGNORE_TARGET;
    }
    let (loss_full, _, _) = sgd_step(full.clone());
    let (loss_masked, _, _) = sgd_step(masked.clone());
    assert!(loss_masked.is_finite() && (loss_masked - loss_full).abs() > 1e-6);
    let mut t = sgd_trainer(6);
    let mut none = full;
    none.targets.fill(IGNORE_TARGET);
    let err = t.train_step(&[none]).unwrap_err();
    assert!(err.to_string().contains("no target"), "{err}");
    masked.targets[1] = -1;
    let err = t.train_step(&[masked]).unwrap_err();
    assert!(err.to_string().contains("-1"), "{err}");
}
