//! The vocabulary of tensor inventories: element types, named tensors, the model's and a
//! micro-batch's shapes, the parts a chunk is made of and what each part holds. A leaf:
//! `inventory` (the CPU and CUDA profiles) and `megatron` (the paper-scale one) both build on it.

use serde::{Deserialize, Serialize};

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    Bf16,
    /// Token ids and targets.
    I32,
    /// The CUDA backend's gradient-norm accumulator (never in an inventory).
    F64,
}

impl DType {
    pub fn bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::Bf16 => 2,
            DType::F64 => 8,
        }
    }
}

/// One tensor: a name unique within its part, a shape, an element type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl TensorSpec {
    pub fn new(name: &'static str, shape: &[usize], dtype: DType) -> Self {
        TensorSpec {
            name,
            shape: shape.to_vec(),
            dtype,
        }
    }

    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> usize {
        self.elements() * self.dtype.bytes()
    }
}

/// Sum of the bytes of a list of tensors.
pub fn total_bytes(tensors: &[TensorSpec]) -> usize {
    tensors.iter().map(TensorSpec::bytes).sum()
}

/// The shape of a Llama-style decoder, as the planner and executor need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDims {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    /// Biases on the query, key and value projections (Qwen2).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub qkv_bias: bool,
    /// The LM head reads the embedding's table (`tie_word_embeddings`): one weight, two uses.
    /// The head holds a copy of it, kept equal to the embedding's by the plan's `TIE`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tied_embeddings: bool,
}

impl ModelDims {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim()
    }
}

/// One micro-batch: `batch` sequences of `seq` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MicroShape {
    pub batch: usize,
    pub seq: usize,
}

impl MicroShape {
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }
}

/// A unit of the model that a pipeline chunk is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// Token embedding; first part of the first chunk.
    Embedding,
    /// One decoder layer.
    Layer,
    /// Final RMSNorm, LM head and cross-entropy; last part of the last chunk.
    Head,
}

/// What one part holds for one micro-batch. Serialize only: tensor names are `&'static str`,
/// which serde cannot deserialize into a struct that is generic over the input's lifetime.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartInventory {
    pub params: Vec<TensorSpec>,
    pub stash: Vec<TensorSpec>,
    pub forward_scratch: Vec<TensorSpec>,
    pub backward_scratch: Vec<TensorSpec>,
    /// The activation this part hands to the next part (none for the head).
    pub output: Option<TensorSpec>,
}

/// The per-parameter state kept on a device, in bytes per parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateBytes {
    pub weight: usize,
    pub grad: usize,
    pub optimizer: usize,
}
