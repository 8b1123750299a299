//! The cost model of a Llama-style decoder: parameters and FLOPs per part, and the checks that
//! make a model shape usable. FLOPs are per device (one tensor-parallel rank).
//!
//! Forward FLOPs of one part for `n = b*s` tokens: `2*n*P` for its matrix parameters `P`, plus
//! for a layer's causal attention `2*b*s*s*h` (q·kᵀ and p·v are `2*b*s*s*h` each, halved because
//! the causal mask skips half the blocks). Backward is twice forward (input and weight
//! gradients); a recompute is one more forward.

use super::error::PlanError;
use super::inventory::{MicroShape, ModelDims, Part, Profile, TensorSpec};

/// Checks a model shape, a micro-batch shape and a profile; errors name the field.
pub fn validate(profile: Profile, dims: &ModelDims, micro: MicroShape) -> Result<(), PlanError> {
    use super::error::require_positive as pos;
    pos("model.hidden", dims.hidden as u64)?;
    pos("model.layers", dims.layers as u64)?;
    pos("model.heads", dims.heads as u64)?;
    pos("model.kv_heads", dims.kv_heads as u64)?;
    pos("model.ffn", dims.ffn as u64)?;
    pos("model.vocab", dims.vocab as u64)?;
    pos("micro_batch_size", micro.batch as u64)?;
    pos("seq_len", micro.seq as u64)?;
    // Bounds far above any real model keep byte counts inside 64 bits and plans in memory.
    for (field, value, most) in [
        ("model.hidden", dims.hidden, 1 << 20),
        ("model.layers", dims.layers, 100_000),
        ("model.heads", dims.heads, 1 << 16),
        ("model.ffn", dims.ffn, 1 << 22),
        ("model.vocab", dims.vocab, 1 << 24),
        ("micro_batch_size", micro.batch, 1 << 16),
        ("seq_len", micro.seq, 1 << 22),
    ] {
        if value > most {
            return Err(PlanError::invalid(
                field,
                format!("{value} is beyond what the planner handles (at most {most})"),
            ));
        }
    }
    if !dims.hidden.is_multiple_of(dims.heads) {
        return Err(PlanError::invalid(
            "model.heads",
            format!(
                "{} heads do not divide hidden size {}; try a divisor such as {}",
                dims.heads,
                dims.hidden,
                nearest_divisor(dims.hidden, dims.heads)
            ),
        ));
    }
    if !dims.heads.is_multiple_of(dims.kv_heads) {
        return Err(PlanError::invalid(
            "model.kv_heads",
            format!(
                "{} key/value heads do not divide {} heads; try {}",
                dims.kv_heads,
                dims.heads,
                nearest_divisor(dims.heads, dims.kv_heads)
            ),
        ));
    }
    let t = profile.tensor_parallel();
    pos("cluster.tensor_parallel", t as u64)?;
    if !dims.kv_heads.is_multiple_of(t) {
        return Err(PlanError::invalid(
            "cluster.tensor_parallel",
            format!(
                "tensor parallel degree {t} must divide model.kv_heads = {}",
                dims.kv_heads
            ),
        ));
    }
    Ok(())
}

/// The divisor of `n` closest to `want` (ties to the smaller).
fn nearest_divisor(n: usize, want: usize) -> usize {
    (1..=n)
        .filter(|d| n.is_multiple_of(*d))
        .min_by_key(|d| d.abs_diff(want))
        .unwrap_or(1)
}

fn elements(tensors: &[TensorSpec]) -> u64 {
    tensors.iter().map(|t| t.elements() as u64).sum()
}

/// Parameters one device holds for `part`.
pub fn part_params(profile: Profile, dims: &ModelDims, part: Part) -> u64 {
    let micro = MicroShape { batch: 1, seq: 1 };
    elements(&profile.part(dims, micro, part).params)
}

/// Parameters of the whole model (all ranks).
pub fn model_params(dims: &ModelDims) -> u64 {
    let p = |part| part_params(Profile::CpuF32, dims, part);
    p(Part::Embedding) + dims.layers as u64 * p(Part::Layer) + p(Part::Head)
}

/// Forward FLOPs of one part for one micro-batch, on one tensor-parallel rank.
pub fn part_forward_flops(
    profile: Profile,
    dims: &ModelDims,
    micro: MicroShape,
    part: Part,
) -> f64 {
    let n = micro.tokens() as f64;
    let t = profile.tensor_parallel() as f64;
    let (h, s, b) = (dims.hidden as f64, micro.seq as f64, micro.batch as f64);
    let whole = match part {
        // A table lookup: no multiply-adds worth counting.
        Part::Embedding => 0.0,
        Part::Layer => {
            // The projections' weights: every 2-D parameter (not the norms or biases).
            let micro_one = MicroShape { batch: 1, seq: 1 };
            let params = Profile::CpuF32.part(dims, micro_one, Part::Layer).params;
            let matrix = elements(&params) as f64
                - (params.iter().filter(|p| p.shape.len() == 1))
                    .map(|p| p.elements() as f64)
                    .sum::<f64>();
            2.0 * n * matrix + 2.0 * b * s * s * h
        }
        Part::Head => 2.0 * n * h * dims.vocab as f64,
    };
    whole / t
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn llama2_70b() -> ModelDims {
        ModelDims {
            hidden: 8192,
            layers: 80,
            heads: 64,
            kv_heads: 8,
            ffn: 28672,
            vocab: 32000,
            qkv_bias: false,
            tied_embeddings: false,
        }
    }

    #[test]
    fn llama2_70b_has_about_69b_parameters() {
        let p = model_params(&llama2_70b());
        assert!((68_900_000_000..69_100_000_000).contains(&p), "{p}");
    }

    #[test]
    fn tensor_parallel_splits_flops_and_params() {
        let d = llama2_70b();
        let m = MicroShape {
            batch: 1,
            seq: 4096,
        };
        let mg = Profile::MegatronBf16 {
            tensor_parallel: 8,
            flash_attention: true,
        };
        let one = part_forward_flops(Profile::CpuF32, &d, m, Part::Layer);
        let eight = part_forward_flops(mg, &d, m, Part::Layer);
        assert!((one / eight - 8.0).abs() < 1e-9);
        let p1 = part_params(Profile::CpuF32, &d, Part::Layer);
        let p8 = part_params(mg, &d, Part::Layer);
        // Norm weights are replicated, the rest split.
        assert_eq!(p8, (p1 - 2 * 8192) / 8 + 2 * 8192);
    }

    #[test]
    fn bad_shapes_are_typed_errors_with_field_paths() {
        let m = MicroShape { batch: 1, seq: 16 };
        let p = Profile::CpuF32;
        let mut d = llama2_70b();
        d.heads = 60;
        assert_eq!(validate(p, &d, m).unwrap_err().field(), Some("model.heads"));
        let mut d = llama2_70b();
        d.kv_heads = 3;
        assert_eq!(
            validate(p, &d, m).unwrap_err().field(),
            Some("model.kv_heads")
        );
        let mut d = llama2_70b();
        d.hidden = 0;
        assert_eq!(
            validate(p, &d, m).unwrap_err().field(),
            Some("model.hidden")
        );
        let mut d = llama2_70b();
        d.layers = 10_000_000;
        assert_eq!(
            validate(p, &d, m).unwrap_err().field(),
            Some("model.layers")
        );
        let bad_seq = MicroShape { batch: 1, seq: 0 };
        assert_eq!(
            validate(p, &llama2_70b(), bad_seq).unwrap_err().field(),
            Some("seq_len")
        );
        let tp3 = Profile::MegatronBf16 {
            tensor_parallel: 3,
            flash_attention: true,
        };
        assert_eq!(
            validate(tp3, &llama2_70b(), m).unwrap_err().field(),
            Some("cluster.tensor_parallel")
        );
    }
}
