//! The activation inventory: for a part of the model (embedding, one decoder layer, the head)
//! and a micro-batch shape, the tensors that part holds, by group, under an implementation
//! profile. The executor allocates exactly these and the planner sums them, so the planner's
//! predicted peak for a CPU run equals the executor's measured peak (docs/architecture.md, "the executor").
//!
//! Memory rules shared by planner and executor (`chunk_memory` computes them):
//! - A part's `stash` is allocated during its forward and freed when its backward ends. A
//!   decoder layer and the head stash their own `input`; that buffer is written by the part
//!   before them (its output) and is counted once, in the consumer's stash.
//! - `forward_scratch` lives only while that part's forward runs; `backward_scratch` likewise.
//! - A chunk's output (the last part's output when it is not the head) is a communication
//!   buffer from the end of the chunk's forward until its send completes. The gradient
//!   travelling backward between parts is in `backward_scratch` (`grad_output`).

use serde::{Deserialize, Serialize};

pub use super::tensors::{
    DType, MicroShape, ModelDims, Part, PartInventory, StateBytes, TensorSpec, total_bytes,
};

/// An implementation profile: how a backend lays out a part's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// Exactly what the CPU executor allocates (f32 everywhere, flash-style attention).
    CpuF32,
    /// Exactly what the CUDA backend allocates: `cpu-f32`'s tensors, plus the attention
    /// scores of one sequence as scratch and the head's larger logits blocks.
    CudaF32,
    /// What the CUDA backend allocates with bf16 activations: `cuda-f32`'s tensors with
    /// activations in bf16 (per-row statistics, losses and token ids keep their types); with
    /// the flash kernels' head dimensions, an f32 dQ accumulator instead of the scores.
    /// Weights, gradients and optimizer state stay f32; projection weights keep a bf16 copy
    /// beside them for the products ([`act_copy_bytes`], counted with the weights).
    CudaBf16,
    /// Paper-scale planning: bf16 activations, tensor parallel degree `tensor_parallel` with
    /// sequence parallelism, mixed-precision state of 18 bytes per parameter. The tensors and
    /// their formulas are in `plan::megatron`; shapes are per device (one tensor-parallel rank).
    MegatronBf16 {
        tensor_parallel: usize,
        flash_attention: bool,
    },
}

impl Profile {
    pub fn state_bytes(self) -> StateBytes {
        match self {
            // f32 weight, f32 grad, AdamW m and v in f32.
            Profile::CpuF32 | Profile::CudaF32 | Profile::CudaBf16 => StateBytes {
                weight: 4,
                grad: 4,
                optimizer: 8,
            },
            Profile::MegatronBf16 { .. } => super::megatron::STATE_BYTES,
        }
    }

    /// The type of the activations (what pipeline neighbours send each other).
    pub fn activation_dtype(self) -> DType {
        match self {
            Profile::CpuF32 | Profile::CudaF32 => DType::F32,
            Profile::CudaBf16 | Profile::MegatronBf16 { .. } => DType::Bf16,
        }
    }

    /// Ranks one tensor-parallel group spans (1 for the CPU profile).
    pub fn tensor_parallel(self) -> usize {
        match self {
            Profile::CpuF32 | Profile::CudaF32 | Profile::CudaBf16 => 1,
            Profile::MegatronBf16 {
                tensor_parallel, ..
            } => tensor_parallel,
        }
    }

    pub fn part(self, dims: &ModelDims, micro: MicroShape, part: Part) -> PartInventory {
        match self {
            Profile::CpuF32 => cpu_f32(dims, micro, part),
            Profile::CudaF32 => cuda_f32(dims, micro, part),
            Profile::CudaBf16 => cuda_bf16(dims, micro, part),
            Profile::MegatronBf16 {
                tensor_parallel,
                flash_attention,
            } => super::megatron::part(dims, micro, part, tensor_parallel, flash_attention),
        }
    }
}

/// A part's parameters (f32, in the order the executors keep them).
fn params(d: &ModelDims, part: Part) -> Vec<TensorSpec> {
    let (h, kv, f, v) = (d.hidden, d.kv_width(), d.ffn, d.vocab);
    let t = |name, shape: &[usize]| TensorSpec::new(name, shape, DType::F32);
    match part {
        Part::Embedding => vec![t("embed_tokens.weight", &[v, h])],
        Part::Layer => {
            let mut list = vec![
                t("input_layernorm.weight", &[h]),
                t("self_attn.q_proj.weight", &[h, h]),
                t("self_attn.k_proj.weight", &[kv, h]),
                t("self_attn.v_proj.weight", &[kv, h]),
                t("self_attn.o_proj.weight", &[h, h]),
                t("post_attention_layernorm.weight", &[h]),
                t("mlp.gate_proj.weight", &[f, h]),
                t("mlp.up_proj.weight", &[f, h]),
                t("mlp.down_proj.weight", &[h, f]),
            ];
            if d.qkv_bias {
                list.extend([
                    t("self_attn.q_proj.bias", &[h]),
                    t("self_attn.k_proj.bias", &[kv]),
                    t("self_attn.v_proj.bias", &[kv]),
                ]);
            }
            list
        }
        Part::Head => vec![t("norm.weight", &[h]), t("lm_head.weight", &[v, h])],
    }
}

/// Whether the CUDA backend keeps a copy of a parameter of `part` of this shape in the
/// activations' type beside it, for the products to read: the projection weights (2-D) of a
/// layer and of the head, with bf16 activations. The copy lives while the weight is on its
/// device and is counted with it (`MemGroup::Weights`).
pub fn keeps_act_copy(profile: Profile, part: Part, shape: &[usize]) -> bool {
    profile == Profile::CudaBf16 && part != Part::Embedding && shape.len() == 2
}

/// The bytes of a part's copies of its weights (see [`keeps_act_copy`]).
pub fn act_copy_bytes(profile: Profile, dims: &ModelDims, part: Part) -> u64 {
    let copied = params(dims, part).into_iter();
    let copied = copied.filter(|p| keeps_act_copy(profile, part, &p.shape));
    copied
        .map(|p| (p.elements() * DType::Bf16.bytes()) as u64)
        .sum()
}

/// The CPU executor's tensors. Keep in step with `exec`: a test compares them.
fn cpu_f32(d: &ModelDims, m: MicroShape, part: Part) -> PartInventory {
    use DType::{F32, I32};
    let n = m.tokens();
    let (h, kv, f, v) = (d.hidden, d.kv_width(), d.ffn, d.vocab);
    let t = |name, shape: &[usize], dtype| TensorSpec::new(name, shape, dtype);
    let hidden_out = Some(t("output", &[n, h], F32));
    match part {
        Part::Embedding => PartInventory {
            params: params(d, part),
            stash: vec![t("token_ids", &[n], I32)],
            forward_scratch: vec![],
            // The first layer's input gradient, alive while the embedding adds it to its table.
            backward_scratch: vec![t("grad_output", &[n, h], F32)],
            output: hidden_out,
        },
        Part::Layer => PartInventory {
            params: params(d, part),
            stash: vec![
                t("input", &[n, h], F32),
                t("attn_norm_rstd", &[n], F32),
                t("q", &[n, h], F32),
                t("k", &[n, kv], F32),
                t("v", &[n, kv], F32),
                t("attn_out", &[n, h], F32),
                t("attn_lse", &[m.batch, d.heads, m.seq], F32),
                t("resid_mid", &[n, h], F32),
                t("mlp_norm_rstd", &[n], F32),
                t("gate", &[n, f], F32),
                t("up", &[n, f], F32),
            ],
            forward_scratch: vec![t("norm_out", &[n, h], F32), t("act", &[n, f], F32)],
            backward_scratch: vec![
                t("grad_output", &[n, h], F32),
                t("norm_out", &[n, h], F32),
                t("act", &[n, f], F32),
                t("d_gate", &[n, f], F32),
                t("d_up", &[n, f], F32),
                t("d_norm_out", &[n, h], F32),
                t("d_resid_mid", &[n, h], F32),
                t("d_attn_out", &[n, h], F32),
                t("d_q", &[n, h], F32),
                t("d_k", &[n, kv], F32),
                t("d_v", &[n, kv], F32),
                t("attn_delta", &[m.batch, d.heads, m.seq], F32),
            ],
            output: hidden_out,
        },
        Part::Head => PartInventory {
            params: params(d, part),
            stash: vec![
                t("input", &[n, h], F32),
                t("final_norm_rstd", &[n], F32),
                t("targets", &[n], I32),
            ],
            forward_scratch: vec![
                t("norm_out", &[n, h], F32),
                t("logits_block", &[logits_block_tokens(v).min(n), v], F32),
            ],
            backward_scratch: vec![
                t("norm_out", &[n, h], F32),
                t("logits_block", &[logits_block_tokens(v).min(n), v], F32),
                t("d_norm_out", &[n, h], F32),
            ],
            output: None,
        },
    }
}

/// The fused LM head + cross-entropy materialises logits for this many tokens at a time: as
/// many as fit in 2 MiB (small vocabularies get blocks large enough for efficient products),
/// and at least 64.
pub fn logits_block_tokens(vocab: usize) -> usize {
    const BLOCK_BYTES: usize = 2 << 20;
    (BLOCK_BYTES / (4 * vocab.max(1))).max(64)
}

/// The CUDA head's logits block: large enough to keep the tensor cores busy.
pub const CUDA_LOGITS_BLOCK_TOKENS: usize = 2048;

/// The CUDA backend's tensors (`exec::backend::cuda::model`): attention products run one
/// sequence at a time through cuBLAS with the scores of all heads as scratch; the head's
/// logits blocks are larger, and it stashes its per-token losses (4 bytes a token): a
/// one-stage run does the head's forward and backward in one pass
/// (`head_forward_backward`), which holds them with the backward's scratch, and the stash is
/// what makes that pass's bytes the inventory's.
fn cuda_f32(d: &ModelDims, m: MicroShape, part: Part) -> PartInventory {
    let mut inv = cpu_f32(d, m, part);
    let n = m.tokens();
    let scores = |name| TensorSpec::new(name, &[d.heads, m.seq, m.seq], DType::F32);
    match part {
        Part::Embedding => {}
        Part::Layer => {
            inv.forward_scratch.push(scores("attn_scores"));
            inv.backward_scratch.push(scores("attn_scores"));
            inv.backward_scratch.push(scores("attn_d_scores"));
        }
        Part::Head => {
            let block = TensorSpec::new(
                "logits_block",
                &[CUDA_LOGITS_BLOCK_TOKENS.min(n), d.vocab],
                DType::F32,
            );
            for list in [&mut inv.forward_scratch, &mut inv.backward_scratch] {
                for t in list.iter_mut().filter(|t| t.name == "logits_block") {
                    *t = block.clone();
                }
            }
            inv.stash
                .push(TensorSpec::new("token_loss", &[n], DType::F32));
        }
    }
    inv
}

/// Tensors that stay f32 when the CUDA backend stores activations in bf16: per-row
/// statistics and per-token losses (besides parameters).
const CUDA_BF16_KEEPS_F32: [&str; 6] = [
    "attn_norm_rstd",
    "mlp_norm_rstd",
    "final_norm_rstd",
    "attn_lse",
    "attn_delta",
    "token_loss",
];

/// Head dimensions the CUDA backend's flash-attention kernels are built for.
pub const CUDA_FLASH_HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// Whether the CUDA backend runs a layer's attention with its flash kernels (bf16 activations
/// and a head dimension they are built for): scores then never reach device memory.
pub fn cuda_flash_attention(profile: Profile, d: &ModelDims) -> bool {
    profile == Profile::CudaBf16 && CUDA_FLASH_HEAD_DIMS.contains(&d.head_dim())
}

/// The CUDA backend's tensors with bf16 activations: `cuda-f32` with every f32 activation in
/// bf16 except [`CUDA_BF16_KEEPS_F32`] (the weights' bf16 copies are not activations: see
/// [`act_copy_bytes`]). Where attention runs on the flash kernels ([`cuda_flash_attention`]),
/// a layer has no scores scratch; its backward adds dQ into `attn_dq_acc`, f32, before
/// rounding it.
fn cuda_bf16(d: &ModelDims, m: MicroShape, part: Part) -> PartInventory {
    let mut inv = cuda_bf16_storage(d, m, part);
    if part == Part::Layer && cuda_flash_attention(Profile::CudaBf16, d) {
        let scores = ["attn_scores", "attn_d_scores"];
        inv.forward_scratch.retain(|t| !scores.contains(&t.name));
        inv.backward_scratch.retain(|t| !scores.contains(&t.name));
        let dq = TensorSpec::new(
            "attn_dq_acc",
            &[m.tokens(), d.heads * d.head_dim()],
            DType::F32,
        );
        inv.backward_scratch.push(dq);
    }
    inv
}

/// `cuda-bf16` with attention through cuBLAS (scores as scratch).
fn cuda_bf16_storage(d: &ModelDims, m: MicroShape, part: Part) -> PartInventory {
    let mut inv = cuda_f32(d, m, part);
    let lists = [
        &mut inv.stash,
        &mut inv.forward_scratch,
        &mut inv.backward_scratch,
    ];
    for t in lists.into_iter().flatten().chain(inv.output.as_mut()) {
        if t.dtype == DType::F32 && !CUDA_BF16_KEEPS_F32.contains(&t.name) {
            t.dtype = DType::Bf16;
        }
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIMS: ModelDims = ModelDims {
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ffn: 176,
        vocab: 256,
        qkv_bias: false,
        tied_embeddings: false,
    };
    const MICRO: MicroShape = MicroShape { batch: 2, seq: 32 };

    fn lists(inv: &PartInventory) -> [&Vec<TensorSpec>; 3] {
        [&inv.stash, &inv.forward_scratch, &inv.backward_scratch]
    }

    /// `cuda-bf16` is `cuda-f32` tensor for tensor with activations in bf16 (statistics,
    /// losses and token ids keep their types), at a head dimension the flash kernels are not
    /// built for (24).
    #[test]
    fn cuda_bf16_is_cuda_f32_with_bf16_activations() {
        let dims = ModelDims { hidden: 96, ..DIMS };
        assert!(!cuda_flash_attention(Profile::CudaBf16, &dims));
        for part in [Part::Embedding, Part::Layer, Part::Head] {
            let f32_inv = Profile::CudaF32.part(&dims, MICRO, part);
            let bf16_inv = Profile::CudaBf16.part(&dims, MICRO, part);
            assert_eq!(bf16_inv.params, f32_inv.params, "{part:?}");
            for (f, b) in lists(&f32_inv).into_iter().zip(lists(&bf16_inv)) {
                assert_eq!(b.len(), f.len(), "{part:?}");
                for (ft, bt) in f.iter().zip(b) {
                    assert_eq!((ft.name, &ft.shape), (bt.name, &bt.shape));
                    let want = match ft.dtype {
                        DType::F32 if !CUDA_BF16_KEEPS_F32.contains(&ft.name) => DType::Bf16,
                        kept => kept,
                    };
                    assert_eq!(bt.dtype, want, "{part:?} {}", ft.name);
                }
            }
            let output = |inv: &PartInventory| inv.output.as_ref().map(|t| t.dtype);
            let want = output(&f32_inv).map(|_| DType::Bf16);
            assert_eq!(output(&bf16_inv), want, "{part:?}");
        }
        // A layer keeps a little over half the bytes: statistics stay f32.
        let stash = |p: Profile| total_bytes(&p.part(&dims, MICRO, Part::Layer).stash) as f64;
        let ratio = stash(Profile::CudaBf16) / stash(Profile::CudaF32);
        assert!((0.5..0.52).contains(&ratio), "{ratio}");
    }

    /// With bf16 activations, a layer's seven projections and the head's LM head keep 2-byte
    /// copies; norm weights, the embedding and every other profile keep none.
    #[test]
    fn bf16_copies_are_the_projection_weights_of_layers_and_the_head() {
        let (h, kv, f, v) = (DIMS.hidden, DIMS.kv_width(), DIMS.ffn, DIMS.vocab);
        let bytes = |profile, part| act_copy_bytes(profile, &DIMS, part);
        let layer = 2 * (2 * h * h + 2 * kv * h + 3 * f * h) as u64;
        assert_eq!(bytes(Profile::CudaBf16, Part::Layer), layer);
        assert_eq!(bytes(Profile::CudaBf16, Part::Head), 2 * (v * h) as u64);
        assert_eq!(bytes(Profile::CudaBf16, Part::Embedding), 0);
        for profile in [Profile::CpuF32, Profile::CudaF32] {
            for part in [Part::Embedding, Part::Layer, Part::Head] {
                assert_eq!(bytes(profile, part), 0, "{profile:?} {part:?}");
            }
        }
    }

    /// With a head dimension the flash kernels are built for, a bf16 layer trades the scores
    /// scratch (forward and backward) for an f32 dQ accumulator in its backward; nothing else
    /// changes, and only with bf16 activations.
    #[test]
    fn flash_attention_layers_hold_a_dq_accumulator_instead_of_scores() {
        assert_eq!(DIMS.head_dim(), 16);
        assert!(cuda_flash_attention(Profile::CudaBf16, &DIMS));
        assert!(!cuda_flash_attention(Profile::CudaF32, &DIMS));
        let flash = Profile::CudaBf16.part(&DIMS, MICRO, Part::Layer);
        let mut cublas = cuda_bf16_storage(&DIMS, MICRO, Part::Layer);
        let scores = |t: &TensorSpec| t.name == "attn_scores" || t.name == "attn_d_scores";
        assert_eq!(
            cublas.forward_scratch.iter().filter(|t| scores(t)).count(),
            1
        );
        assert_eq!(
            cublas.backward_scratch.iter().filter(|t| scores(t)).count(),
            2
        );
        cublas.forward_scratch.retain(|t| !scores(t));
        cublas.backward_scratch.retain(|t| !scores(t));
        assert_eq!(flash.stash, cublas.stash);
        assert_eq!(flash.forward_scratch, cublas.forward_scratch);
        let dq: Vec<&TensorSpec> = (flash.backward_scratch.iter())
            .filter(|t| !cublas.backward_scratch.contains(t))
            .collect();
        assert_eq!(dq.len(), 1);
        assert_eq!((dq[0].name, dq[0].dtype), ("attn_dq_acc", DType::F32));
        assert_eq!(dq[0].shape, [MICRO.tokens(), DIMS.hidden]);
        assert_eq!(
            flash.backward_scratch.len(),
            cublas.backward_scratch.len() + 1
        );
    }

    /// Llama-2-7B's 128-wide heads run on the flash kernels: at seq 4096 a bf16 layer's
    /// backward holds a 64 MiB dQ accumulator where attention through cuBLAS holds a GiB each
    /// of scores and their gradient.
    #[test]
    fn head_dimension_128_runs_on_the_flash_kernels() {
        let dims = crate::plan::presets::model("llama2-7b").unwrap();
        let micro = MicroShape {
            batch: 1,
            seq: 4096,
        };
        assert_eq!(dims.head_dim(), 128);
        assert!(cuda_flash_attention(Profile::CudaBf16, &dims));
        let flash = Profile::CudaBf16.part(&dims, micro, Part::Layer);
        let cublas = cuda_bf16_storage(&dims, micro, Part::Layer);
        let bytes = |list: &[TensorSpec], name: &str| {
            (list.iter())
                .find(|t| t.name == name)
                .map(TensorSpec::bytes)
        };
        assert_eq!(
            bytes(&flash.backward_scratch, "attn_dq_acc"),
            Some(64 << 20)
        );
        assert_eq!(bytes(&flash.backward_scratch, "attn_scores"), None);
        assert_eq!(bytes(&flash.forward_scratch, "attn_scores"), None);
        assert_eq!(
            bytes(&cublas.backward_scratch, "attn_scores"),
            Some(1 << 30)
        );
        assert_eq!(
            bytes(&cublas.backward_scratch, "attn_d_scores"),
            Some(1 << 30)
        );
    }
}
