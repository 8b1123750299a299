//! Splitting the model into chunks on separate device pools, with the activation and its
//! gradient moved between them as a pipeline would, gives bit-identical gradients and loss.

use chronospipe::exec::backend::CpuBackend;
use chronospipe::exec::backend::cpu::kernels::rope::Rope;
use chronospipe::exec::device::{MemGroup, Pool};
use chronospipe::exec::model::chunk::{backward_chunk, forward_chunk};
use chronospipe::exec::model::part::{MicroTokens, PartOutput};
use chronospipe::exec::model::{LlamaConfig, PartCtx, PartId, PartParams};
use chronospipe::exec::optim::clip::{global_norm, part_squares};
use chronospipe::exec::tensor::Tensor;
use chronospipe::plan::inventory::{MicroShape, ModelDims};
use chronospipe::spec::Architecture;

fn config() -> LlamaConfig {
    LlamaConfig {
        dims: ModelDims {
            hidden: 32,
            layers: 3,
            heads: 4,
            kv_heads: 1,
            ffn: 40,
            vocab: 256,
            qkv_bias: false,
            tied_embeddings: false,
        },
        rms_norm_eps: 1e-5,
        rope: Rope::plain(500000.0),
        architecture: Architecture::Llama,
        max_position_embeddings: 4096,
    }
}

fn parts_on(pool: &chronospipe::exec::device::PoolRef, ids: &[PartId]) -> Vec<PartParams> {
    ids.iter()
        .map(|&id| {
            let mut p = PartParams::allocate(pool, &config(), id).unwrap();
            p.init_from_seed(11);
            p
        })
        .collect()
}

fn tokens(mb: usize) -> (Vec<i32>, Vec<i32>) {
    let ids: Vec<i32> = (0..17 * 2)
        .map(|i| ((i * 7 + mb * 13) % 256) as i32)
        .collect();
    (ids[..16 * 2].to_vec(), ids[1..16 * 2 + 1].to_vec())
}

#[test]
fn two_chunks_on_two_pools_match_one_device_bit_for_bit() {
    let cfg = config();
    let micro = MicroShape { batch: 2, seq: 16 };
    let backend = CpuBackend::default();
    let all = PartId::all(3);
    let scale = 1.0 / (2 * micro.tokens()) as f32;

    // One device, two micro-batches.
    let single = Pool::new("cpu:0", 64 << 20);
    let mut whole = parts_on(&single, &all);
    let ctx = PartCtx {
        backend: &backend,
        pool: &single,
        config: &cfg,
        micro,
    };
    let mut loss_one = 0.0;
    for mb in 0..2 {
        let (ids, targets) = tokens(mb);
        let t = MicroTokens {
            input_ids: &ids,
            targets: &targets,
        };
        let (stash, out) = forward_chunk(&ctx, &whole, None, t).unwrap();
        let PartOutput::LossSum(l) = out else {
            panic!("no loss")
        };
        loss_one += l;
        backward_chunk(&ctx, &mut whole, stash, None, scale).unwrap();
    }

    // Two devices: embedding + layer 0 | layers 1, 2 + head.
    let (d0, d1) = (Pool::new("cpu:0", 64 << 20), Pool::new("cpu:1", 64 << 20));
    let mut first = parts_on(&d0, &all[..2]);
    let mut second = parts_on(&d1, &all[2..]);
    let (c0, c1) = (
        PartCtx {
            backend: &backend,
            pool: &d0,
            config: &cfg,
            micro,
        },
        PartCtx {
            backend: &backend,
            pool: &d1,
            config: &cfg,
            micro,
        },
    );
    let mut loss_two = 0.0;
    for mb in 0..2 {
        let (ids, targets) = tokens(mb);
        let t = MicroTokens {
            input_ids: &ids,
            targets: &targets,
        };
        let (s0, out0) = forward_chunk(&c0, &first, None, t).unwrap();
        let PartOutput::Hidden(h) = out0 else {
            panic!("chunk 0 has no hidden output")
        };
        let sent = h
            .regroup(MemGroup::Communication)
            .transfer(&d1, MemGroup::Activations)
            .unwrap();
        let (s1, out1) = forward_chunk(&c1, &second, Some(sent), t).unwrap();
        let PartOutput::LossSum(l) = out1 else {
            panic!("no loss")
        };
        loss_two += l;
        let g = backward_chunk(&c1, &mut second, s1, None, scale)
            .unwrap()
            .unwrap();
        let g = g.transfer(&d0, MemGroup::Activations).unwrap();
        assert!(
            backward_chunk(&c0, &mut first, s0, Some(g), scale)
                .unwrap()
                .is_none()
        );
    }
    assert_eq!(loss_one.to_bits(), loss_two.to_bits());
    for (a, b) in whole.iter().zip(first.iter().chain(&second)) {
        for (x, y) in a.grads.iter().zip(&b.grads) {
            assert_eq!(x.data(), y.data(), "{}", x.name());
        }
    }
    // The global norm combines per-part sums in part order whatever the split.
    let mut split: Vec<_> = second.iter().chain(&first).map(part_squares).collect();
    split.reverse();
    let one: Vec<_> = whole.iter().map(part_squares).collect();
    assert_eq!(global_norm(&one).to_bits(), global_norm(&split).to_bits());
    // Nothing but parameters and gradients is left on either device.
    assert_eq!(
        d0.live().get(MemGroup::Activations) + d1.live().get(MemGroup::Activations),
        0
    );
    assert_eq!(
        d0.live().get(MemGroup::Communication) + d1.live().get(MemGroup::Communication),
        0
    );
}

#[test]
fn recompute_from_the_kept_input_gives_identical_gradients() {
    let cfg = config();
    let micro = MicroShape { batch: 2, seq: 16 };
    let backend = CpuBackend::default();
    let ids = [PartId::Layer(0), PartId::Layer(1)];
    let (ids_in, targets) = tokens(0);
    let t = MicroTokens {
        input_ids: &ids_in,
        targets: &targets,
    };
    let run = |recompute: bool| {
        let pool = Pool::new("cpu:0", 64 << 20);
        let host = Pool::new("host", usize::MAX);
        let ctx = PartCtx {
            backend: &backend,
            pool: &pool,
            config: &cfg,
            micro,
        };
        let emb = parts_on(&pool, &[PartId::Embedding]);
        let mut layers = parts_on(&pool, &ids);
        let (_, x) = forward_chunk(&ctx, &emb, None, t).unwrap();
        let PartOutput::Hidden(x) = x else { panic!() };
        let mut kept = Tensor::zeros(&pool, "kept", x.shape(), MemGroup::Activations).unwrap();
        kept.data_mut().copy_from_slice(x.data());
        let (stash, out) = forward_chunk(&ctx, &layers, Some(x), t).unwrap();
        let stash = if recompute {
            // Drop the stash, keep only the chunk input, rebuild before backward.
            drop(stash);
            forward_chunk(&ctx, &layers, Some(kept), t).unwrap().0
        } else {
            // Offload the stash to the host and prefetch it back.
            drop(kept);
            let away = stash.relocate(&backend, &host, true).unwrap();
            assert!(host.live_bytes() > 0);
            away.relocate(&backend, &pool, false).unwrap()
        };
        let PartOutput::Hidden(y) = out else { panic!() };
        let mut g = Tensor::zeros(&pool, "grad_output", y.shape(), MemGroup::Activations).unwrap();
        g.data_mut()
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = (i as f32 * 0.01).sin());
        let back = backward_chunk(&ctx, &mut layers, stash, Some(g), 1.0).unwrap();
        (
            back.unwrap().data().to_vec(),
            layers[0].grads[1].data().to_vec(),
        )
    };
    assert_eq!(run(true), run(false));
}
