//! The `megatron-bf16` profile: what a Megatron-style GPU implementation keeps for a Llama
//! decoder, per tensor-parallel rank, for paper-scale planning.
//!
//! Conventions: `s` sequence, `b` micro-batch size, `h` hidden, `a` heads, `kv` key/value width
//! (`kv_heads * h / a`), `f` FFN width, `V` vocab, `t` tensor-parallel degree with sequence
//! parallelism (so every activation is split `t` ways: the token dimension outside the
//! tensor-parallel regions, the head/FFN dimension inside them).
//!
//! **State, bytes per parameter** (mixed precision with Adam): bf16 weight 2, fp32 gradient 4,
//! fp32 master weight 4, Adam m 4 and v 4: **18** in all. We count the master copy, m and v
//! as "optimizer state" (12), since only the optimizer step reads them.
//!
//! **Activations a layer stashes for backward**, bytes per micro-batch and rank:
//! ```text
//! flash attention:  s*b*(12h + 4kv + 6f)/t + 4*a*s*b/t (log-sum-exp, fp32) + 8*s*b/t (norm rstd)
//! without flash:    s*b*(12h + 4kv + 6f)/t + 2*a*s*s*b/t (softmax output) + 8*s*b/t
//! ```
//! The `12h` term is six bf16 tensors of width h: layer input, attention norm output, q,
//! attention output, residual after attention, MLP norm output; `4kv` is k and v; `6f` is the
//! SwiGLU gate, up and their product. This follows Korthikanti et al. (arXiv 2205.05198, §4.1),
//! whose GPT layer keeps `s*b*h*(34 + 5*a*s/h)`: a GPT layer has dropout masks and outputs
//! (`2sbh + 3as²b`) and a GeLU MLP (`16sbh` for GeLU input and output) where Llama has none and
//! a SwiGLU MLP (`6sbf`), and Korthikanti leaves out the fp32 norm statistics (`8sb`). The test
//! `korthikanti_accounting_matches` checks exactly that bookkeeping.

use super::tensors::{DType, MicroShape, ModelDims, Part, PartInventory, StateBytes, TensorSpec};

/// 18 bytes per parameter: see the module doc.
pub const STATE_BYTES: StateBytes = StateBytes {
    weight: 2,
    grad: 4,
    optimizer: 12,
};

/// A part's tensors on one tensor-parallel rank.
pub fn part(d: &ModelDims, m: MicroShape, part: Part, tp: usize, flash: bool) -> PartInventory {
    use DType::{Bf16, F32, I32};
    let t = tp.max(1);
    let n = m.tokens();
    // Sequence-parallel regions split tokens; tensor-parallel regions split heads and FFN.
    let nt = n.div_ceil(t);
    let (h, ht) = (d.hidden, d.hidden.div_ceil(t));
    let kvt = d.kv_width().div_ceil(t);
    let ft = d.ffn.div_ceil(t);
    let vt = d.vocab.div_ceil(t);
    let at = d.heads.div_ceil(t);
    let ts = |name, shape: &[usize], dtype| TensorSpec::new(name, shape, dtype);
    let sharded_out = Some(ts("output", &[nt, h], Bf16));
    match part {
        Part::Embedding => PartInventory {
            params: vec![ts("embed_tokens.weight", &[vt, h], Bf16)],
            stash: vec![ts("token_ids", &[n], I32)],
            // Each rank looks up its vocab slice for every token, then reduce-scatters.
            forward_scratch: vec![ts("embed_partial", &[n, h], Bf16)],
            backward_scratch: vec![ts("grad_output_gathered", &[n, h], Bf16)],
            output: sharded_out,
        },
        Part::Layer => {
            let mut stash = vec![
                ts("input", &[nt, h], Bf16),
                ts("attn_norm_rstd", &[nt], F32),
                ts("norm_out", &[nt, h], Bf16),
                ts("q", &[n, ht], Bf16),
                ts("k", &[n, kvt], Bf16),
                ts("v", &[n, kvt], Bf16),
                ts("attn_out", &[n, ht], Bf16),
            ];
            let mut backward_scratch = vec![
                ts("grad_output", &[nt, h], Bf16),
                ts("norm_gathered", &[n, h], Bf16),
                ts("d_gate", &[n, ft], Bf16),
                ts("d_up", &[n, ft], Bf16),
                ts("d_act", &[n, ft], Bf16),
                ts("d_q", &[n, ht], Bf16),
                ts("d_k", &[n, kvt], Bf16),
                ts("d_v", &[n, kvt], Bf16),
                ts("d_norm_partial", &[n, h], Bf16),
                ts("d_resid_mid", &[nt, h], Bf16),
            ];
            if flash {
                stash.push(ts("attn_lse", &[m.batch, at, m.seq], F32));
            } else {
                stash.push(ts("attn_probs", &[m.batch, at, m.seq, m.seq], Bf16));
                backward_scratch.push(ts("d_attn_probs", &[m.batch, at, m.seq, m.seq], Bf16));
            }
            stash.extend([
                ts("resid_mid", &[nt, h], Bf16),
                ts("mlp_norm_rstd", &[nt], F32),
                ts("mlp_norm_out", &[nt, h], Bf16),
                ts("gate", &[n, ft], Bf16),
                ts("up", &[n, ft], Bf16),
                ts("act", &[n, ft], Bf16),
            ]);
            PartInventory {
                params: vec![
                    ts("input_layernorm.weight", &[h], Bf16),
                    ts("self_attn.q_proj.weight", &[ht, h], Bf16),
                    ts("self_attn.k_proj.weight", &[kvt, h], Bf16),
                    ts("self_attn.v_proj.weight", &[kvt, h], Bf16),
                    ts("self_attn.o_proj.weight", &[h, ht], Bf16),
                    ts("post_attention_layernorm.weight", &[h], Bf16),
                    ts("mlp.gate_proj.weight", &[ft, h], Bf16),
                    ts("mlp.up_proj.weight", &[ft, h], Bf16),
                    ts("mlp.down_proj.weight", &[h, ft], Bf16),
                ],
                stash,
                // The all-gathered norm output feeds q/k/v (and later gate/up); the partial
                // sum of o_proj / down_proj is reduce-scattered into the residual.
                forward_scratch: vec![
                    ts("norm_gathered", &[n, h], Bf16),
                    ts("proj_partial", &[n, h], Bf16),
                ],
                backward_scratch,
                output: sharded_out,
            }
        }
        Part::Head => PartInventory {
            params: vec![
                ts("norm.weight", &[h], Bf16),
                ts("lm_head.weight", &[vt, h], Bf16),
            ],
            stash: vec![
                ts("input", &[nt, h], Bf16),
                ts("final_norm_rstd", &[nt], F32),
                ts("targets", &[n], I32),
                // Vocab-parallel cross-entropy keeps its fp32 softmax for the backward.
                ts("softmax", &[n, vt], F32),
            ],
            forward_scratch: vec![
                ts("norm_gathered", &[n, h], Bf16),
                ts("logits", &[n, vt], Bf16),
            ],
            backward_scratch: vec![
                ts("norm_gathered", &[n, h], Bf16),
                ts("d_logits", &[n, vt], Bf16),
                ts("d_norm_partial", &[n, h], Bf16),
            ],
            output: None,
        },
    }
}

/// Korthikanti et al.'s activation bytes for one GPT layer, no recomputation, t = 1.
pub fn korthikanti_layer_bytes(s: u64, b: u64, h: u64, a: u64) -> u64 {
    // s*b*h*(34 + 5*a*s/h), kept in integers.
    s * b * h * 34 + 5 * a * s * s * b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::inventory::{Profile, total_bytes};

    fn llama(hidden: usize, heads: usize, kv_heads: usize, ffn: usize) -> ModelDims {
        ModelDims {
            hidden,
            layers: 4,
            heads,
            kv_heads,
            ffn,
            vocab: 1000,
            qkv_bias: false,
            tied_embeddings: false,
        }
    }

    fn layer_stash(d: &ModelDims, m: MicroShape, t: usize, flash: bool) -> u64 {
        let p = Profile::MegatronBf16 {
            tensor_parallel: t,
            flash_attention: flash,
        };
        total_bytes(&p.part(d, m, Part::Layer).stash) as u64
    }

    #[test]
    fn korthikanti_accounting_matches() {
        for (h, a, f, s, b) in [(4096, 32, 11008, 2048, 1), (8192, 64, 28672, 4096, 2)] {
            let d = llama(h, a, a, f);
            let m = MicroShape { batch: b, seq: s };
            let (s, b, h, a, f) = (s as u64, b as u64, h as u64, a as u64, f as u64);
            let gpt = korthikanti_layer_bytes(s, b, h, a);
            // GPT-only terms out (dropout masks and outputs, GeLU input and output), Llama-only
            // terms in (SwiGLU gate/up/product, fp32 norm statistics).
            let dropout = 2 * s * b * h + 3 * a * s * s * b;
            let gelu = 16 * s * b * h;
            let swiglu = 6 * s * b * f;
            let norm_stats = 8 * s * b;
            assert_eq!(
                layer_stash(&d, m, 1, false),
                gpt - dropout - gelu + swiglu + norm_stats
            );
        }
    }

    #[test]
    fn closed_forms_hold_with_tensor_parallel_and_flash() {
        let d = llama(8192, 64, 8, 28672);
        let m = MicroShape {
            batch: 1,
            seq: 4096,
        };
        let (s, b, h, kv, f, a) = (4096u64, 1u64, 8192u64, 1024u64, 28672u64, 64u64);
        for t in [1u64, 2, 8] {
            let base = s * b * (12 * h + 4 * kv + 6 * f) / t + 8 * s * b / t;
            assert_eq!(
                layer_stash(&d, m, t as usize, true),
                base + 4 * a * s * b / t
            );
            assert_eq!(
                layer_stash(&d, m, t as usize, false),
                base + 2 * a * s * s * b / t
            );
        }
    }
}
