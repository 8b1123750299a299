//! `chunk_memory`: the activation bytes of one pipeline chunk (an ordered list of parts) per
//! action, under the rules of `inventory`. This is the one place those rules become numbers;
//! the simulator uses them and the executor is tested to measure exactly them.
//!
//! The rules, per part in the chunk's order (forward) or reverse order (backward):
//! - **Forward** of a part allocates its stash, its forward scratch and its output. A layer's
//!   and the head's stash entry `input` is the previous part's output (or, for the chunk's
//!   first part, the received input, allocated before the forward starts), so it is not
//!   allocated again. The forward scratch is freed when the part's forward ends. The chunk's
//!   last output (not for the head) outlives the forward: it is sent, or handed to the next
//!   chunk on the same device as that chunk's input.
//! - **Backward** of a part allocates its backward scratch except `grad_output`. One of those
//!   scratch tensors, the size of the part's input, becomes the gradient of its input and
//!   outlives the backward (the previous part's `grad_output`; for the chunk's first part, the
//!   gradient the chunk sends; the embedding makes none). `grad_output`, the gradient of the
//!   part's output (same size as its output; the embedding does not list it), is already there:
//!   made by the next part's backward, or, for the chunk's last part, received or handed over
//!   before the backward starts. When the part's backward ends, its other backward scratch,
//!   that gradient and its stash are freed.
//! - **Forward dropping the stash** (for recompute) runs as a forward and, when it ends, frees
//!   the whole stash except what the recompute starts from: the chunk input (`input` of the
//!   first part), or the token ids when the chunk starts with the embedding.
//! - **Recompute** runs the forward again from that kept input, rebuilding the stash; it writes
//!   the last part's output too and frees it when it ends (nothing is sent).
//! - **Evaluation** (validation loss, forward only) drops each part's stash, its input with it,
//!   as soon as the part's forward ends: a part holds its input, its fresh stash, its scratch
//!   and its output at once, and the chunk ends holding its output alone.
//!
//! "Peak above start" is the highest level the action reaches above the device's level when
//! it starts; "net" is the change of level when it ends.

use serde::Serialize;

use super::inventory::{MicroShape, ModelDims, Part, PartInventory, Profile, total_bytes};

/// What one action does to a device's memory, relative to its level when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ActionMemory {
    pub peak_above_start: u64,
    pub net: i64,
}

/// Bytes of one chunk per micro-batch, and per action kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChunkMemory {
    /// The received input activation (0 when the chunk starts with the embedding); it is the
    /// first part's stash `input`, counted in `stash_bytes` too.
    pub input_bytes: u64,
    /// The activation the chunk hands on (0 when it ends with the head).
    pub output_bytes: u64,
    /// Everything the chunk stashes for backward, its input included.
    pub stash_bytes: u64,
    /// What a forward that drops its stash keeps for the recompute.
    pub kept_bytes: u64,
    /// The gradient the chunk receives before its backward (0 when it ends with the head).
    pub grad_in_bytes: u64,
    /// The gradient of the chunk's input that its backward hands on (0 with the embedding).
    pub grad_out_bytes: u64,
    pub forward: ActionMemory,
    pub forward_dropping: ActionMemory,
    pub recompute: ActionMemory,
    pub backward: ActionMemory,
    /// The evaluation's forward, its input already there.
    pub evaluate: ActionMemory,
}

fn named(inv: &PartInventory, list: Which, name: &str) -> u64 {
    let tensors = match list {
        Which::Stash => &inv.stash,
        Which::BackwardScratch => &inv.backward_scratch,
    };
    tensors
        .iter()
        .filter(|t| t.name == name)
        .map(|t| t.bytes() as u64)
        .sum()
}

#[derive(Clone, Copy)]
enum Which {
    Stash,
    BackwardScratch,
}

/// The three part inventories, built once: a chunk of 100 layers repeats one of them.
struct Parts {
    embedding: PartInventory,
    layer: PartInventory,
    head: PartInventory,
}

impl Parts {
    fn get(&self, part: Part) -> &PartInventory {
        match part {
            Part::Embedding => &self.embedding,
            Part::Layer => &self.layer,
            Part::Head => &self.head,
        }
    }
}

/// The memory of a chunk made of `parts` (in order) for one micro-batch of shape `micro`.
pub fn chunk_memory(
    profile: Profile,
    dims: &ModelDims,
    micro: MicroShape,
    parts: &[Part],
) -> ChunkMemory {
    let all = Parts {
        embedding: profile.part(dims, micro, Part::Embedding),
        layer: profile.part(dims, micro, Part::Layer),
        head: profile.part(dims, micro, Part::Head),
    };
    let output_of = |p: Part| all.get(p).output.as_ref().map_or(0, |t| t.bytes() as u64);
    // The `input` of a layer or the head is its predecessor's output, counted there.
    let fresh_stash = |p: Part| {
        let inv = all.get(p);
        total_bytes(&inv.stash) as u64 - named(inv, Which::Stash, "input")
    };
    let Some(&first) = parts.first() else {
        return ChunkMemory::empty();
    };
    let last = *parts.last().unwrap_or(&first);
    let input_bytes = named(all.get(first), Which::Stash, "input");

    // Forward: level relative to the start (the received input is already there).
    let (mut level, mut peak) = (0u64, 0u64);
    for &p in parts {
        let inv = all.get(p);
        let adds = fresh_stash(p) + output_of(p);
        peak = peak.max(level + adds + total_bytes(&inv.forward_scratch) as u64);
        level += adds;
    }
    let output_bytes = output_of(last);
    let stash_bytes = input_bytes + level - output_bytes;
    let forward = ActionMemory {
        peak_above_start: peak,
        net: level as i64,
    };
    let kept_bytes = if first == Part::Embedding {
        total_bytes(&all.embedding.stash) as u64
    } else {
        input_bytes
    };
    let forward_dropping = ActionMemory {
        peak_above_start: peak,
        net: (kept_bytes - input_bytes + output_bytes) as i64,
    };

    // Recompute: starts from the kept bytes; the output is written and discarded.
    let (mut level, mut rpeak) = (0u64, 0u64);
    for (i, &p) in parts.iter().enumerate() {
        let inv = all.get(p);
        let stash = if i == 0 && p == Part::Embedding {
            0
        } else {
            fresh_stash(p)
        };
        let adds = stash + output_of(p);
        rpeak = rpeak.max(level + adds + total_bytes(&inv.forward_scratch) as u64);
        level += adds;
    }
    let recompute = ActionMemory {
        peak_above_start: rpeak,
        net: (stash_bytes - kept_bytes) as i64,
    };

    // Evaluation: one part's input, fresh stash, scratch and output at a time. The first
    // part's input is the chunk's, already there when it starts.
    let epeak = parts
        .iter()
        .map(|&p| {
            let inv = all.get(p);
            named(inv, Which::Stash, "input")
                + fresh_stash(p)
                + output_of(p)
                + total_bytes(&inv.forward_scratch) as u64
        })
        .max()
        .unwrap_or(0);
    let evaluate = ActionMemory {
        peak_above_start: epeak.saturating_sub(input_bytes),
        net: output_bytes as i64 - input_bytes as i64,
    };

    // Backward, in reverse: starts with the whole stash and the arriving gradient.
    let grad_in_bytes = output_of(last);
    let (mut level, mut bpeak) = (0i64, 0i64);
    let mut grad_out_bytes = 0;
    for &p in parts.iter().rev() {
        let inv = all.get(p);
        // The gradient of the part's output; a layer lists it as `grad_output`.
        let arriving = output_of(p);
        let scratch = total_bytes(&inv.backward_scratch) as u64
            - named(inv, Which::BackwardScratch, "grad_output");
        grad_out_bytes = if p == Part::Embedding {
            0
        } else {
            named(inv, Which::Stash, "input")
        };
        // The input gradient is one of the scratch tensors (it outlives the backward).
        bpeak = bpeak.max(level + scratch as i64);
        level += grad_out_bytes as i64 - arriving as i64 - total_bytes(&inv.stash) as i64;
    }
    let backward = ActionMemory {
        peak_above_start: bpeak.max(0) as u64,
        net: level,
    };
    ChunkMemory {
        input_bytes,
        output_bytes,
        stash_bytes,
        kept_bytes,
        grad_in_bytes,
        grad_out_bytes,
        forward,
        forward_dropping,
        recompute,
        backward,
        evaluate,
    }
}

impl ChunkMemory {
    fn empty() -> Self {
        let zero = ActionMemory {
            peak_above_start: 0,
            net: 0,
        };
        ChunkMemory {
            input_bytes: 0,
            output_bytes: 0,
            stash_bytes: 0,
            kept_bytes: 0,
            grad_in_bytes: 0,
            grad_out_bytes: 0,
            forward: zero,
            forward_dropping: zero,
            recompute: zero,
            backward: zero,
            evaluate: zero,
        }
    }
}

/// The parts of a chunk: the embedding if it comes first, `layers` decoder layers, the head if
/// it comes last.
pub fn chunk_parts(embedding: bool, layers: usize, head: bool) -> Vec<Part> {
    let mut parts = Vec::with_capacity(layers + 2);
    if embedding {
        parts.push(Part::Embedding);
    }
    parts.extend(std::iter::repeat_n(Part::Layer, layers));
    if head {
        parts.push(Part::Head);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelDims {
        ModelDims {
            hidden: 16,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            ffn: 40,
            vocab: 50,
            qkv_bias: false,
            tied_embeddings: false,
        }
    }
    const M: MicroShape = MicroShape { batch: 2, seq: 8 };

    fn inv(p: Part) -> PartInventory {
        Profile::CpuF32.part(&tiny(), M, p)
    }
    fn bytes(v: &[crate::plan::inventory::TensorSpec]) -> u64 {
        total_bytes(v) as u64
    }

    #[test]
    fn one_layer_follows_the_rules_by_hand() {
        let l = inv(Part::Layer);
        let out = l.output.as_ref().unwrap().bytes() as u64;
        let input = (16 * 16 * 4) as u64; // tokens * hidden * f32
        let m = chunk_memory(Profile::CpuF32, &tiny(), M, &[Part::Layer]);
        assert_eq!(m.input_bytes, input);
        assert_eq!(m.stash_bytes, bytes(&l.stash));
        assert_eq!(
            m.forward.peak_above_start,
            bytes(&l.stash) - input + out + bytes(&l.forward_scratch)
        );
        assert_eq!(m.forward.net, (bytes(&l.stash) - input + out) as i64);
        assert_eq!(m.grad_in_bytes, input);
        assert_eq!(m.grad_out_bytes, input);
        // Backward adds its scratch less the arriving gradient; the gradient it sends is
        // one of those scratch tensors.
        assert_eq!(
            m.backward.peak_above_start,
            bytes(&l.backward_scratch) - input
        );
        assert_eq!(m.backward.net, -(bytes(&l.stash) as i64));
        // Dropping keeps the input only; the recompute rebuilds the rest.
        assert_eq!(m.forward_dropping.net, out as i64);
        assert_eq!(m.recompute.net, (bytes(&l.stash) - input) as i64);
        // Evaluation holds the input, the stash and scratch, and the output; then the output.
        assert_eq!(
            m.evaluate.peak_above_start,
            bytes(&l.stash) - input + out + bytes(&l.forward_scratch)
        );
        assert_eq!(m.evaluate.net, out as i64 - input as i64);
    }

    #[test]
    fn evaluation_holds_one_part_at_a_time() {
        let parts = chunk_parts(true, 3, true);
        let m = chunk_memory(Profile::CpuF32, &tiny(), M, &parts);
        let one = |p: Part| {
            let i = inv(p);
            bytes(&i.stash)
                + i.output.as_ref().map_or(0, |t| t.bytes() as u64)
                + bytes(&i.forward_scratch)
        };
        let widest = [Part::Embedding, Part::Layer, Part::Head].map(one);
        assert_eq!(m.evaluate.peak_above_start, *widest.iter().max().unwrap());
        assert!(m.evaluate.peak_above_start < m.forward.peak_above_start);
        assert_eq!(m.evaluate.net, 0);
    }

    #[test]
    fn whole_model_chunk_balances_to_zero() {
        let parts = chunk_parts(true, 3, true);
        let m = chunk_memory(Profile::CpuF32, &tiny(), M, &parts);
        assert_eq!(m.input_bytes, 0);
        assert_eq!(m.output_bytes, 0);
        assert_eq!(m.grad_in_bytes, 0);
        assert_eq!(m.grad_out_bytes, 0);
        let stash: u64 = parts.iter().map(|&p| bytes(&inv(p).stash)).sum();
        // Each layer's and the head's input is counted once, in its own stash.
        assert_eq!(m.stash_bytes, stash);
        assert_eq!(m.forward.net + m.backward.net, 0);
        assert_eq!(m.kept_bytes, bytes(&inv(Part::Embedding).stash));
        assert_eq!(m.forward_dropping.net + m.recompute.net + m.backward.net, 0);
    }

    #[test]
    fn peaks_grow_with_layers() {
        let a = chunk_memory(Profile::CpuF32, &tiny(), M, &chunk_parts(false, 2, false));
        let b = chunk_memory(Profile::CpuF32, &tiny(), M, &chunk_parts(false, 5, false));
        assert!(b.forward.peak_above_start > a.forward.peak_above_start);
        assert!(b.stash_bytes > a.stash_bytes);
        assert_eq!(a.backward.peak_above_start, b.backward.peak_above_start);
    }
}
