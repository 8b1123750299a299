//! The Llama model as transformers' `LlamaForCausalLM` computes it, split into parts
//! (embedding, decoder layers, head) with explicit forward/backward pairs, so a pipeline chunk
//! is any contiguous run of parts. Each part's kept activations are a named stash struct whose
//! tensors are allocated from the `cpu-f32` activation inventory.

pub mod chunk;
pub mod config;
pub mod embedding;
pub mod head;
pub mod hf_config;
pub mod layer;
pub mod params;
pub mod part;

use thiserror::Error;

use crate::data::{IGNORE_TARGET, Microbatch};
use crate::exec::backend::Backend;
use crate::exec::device::{DeviceError, MemGroup, PoolRef};
use crate::exec::tensor::{Element, Tensor};
use crate::plan::inventory::{MicroShape, Part, PartInventory, Profile, TensorSpec};

pub use config::LlamaConfig;
pub use params::{PartId, PartParams};

#[derive(Debug, Error)]
pub enum ModelError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("model config field {field}: {reason}")]
    BadConfig { field: String, reason: String },
    #[error("{part:?} part: tensor {name} is not in the cpu-f32 inventory")]
    NotInInventory { part: Part, name: &'static str },
    #[error("{what} has shape {got:?}, expected {want:?}")]
    ShapeMismatch {
        what: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("{what}: token id {id} at position {position} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        what: &'static str,
        id: i64,
        position: usize,
        vocab: usize,
    },
    #[error("{part:?}: {reason}")]
    WrongInput { part: PartId, reason: String },
    #[error(
        "step {step}: no target of its micro-batches counts in the loss (all are masked); \
         the data needs counted tokens (completions, assistant turns) in every step"
    )]
    NothingCounted { step: u64 },
}

/// What every part's forward and backward needs besides its parameters.
#[derive(Clone, Copy)]
pub struct PartCtx<'a> {
    pub backend: &'a dyn Backend,
    /// The device pool activations and scratch are counted in.
    pub pool: &'a PoolRef,
    pub config: &'a LlamaConfig,
    pub micro: MicroShape,
}

impl PartCtx<'_> {
    pub fn inventory(&self, part: Part) -> PartInventory {
        Profile::CpuF32.part(&self.config.dims, self.micro, part)
    }
}

/// Allocates a part's tensors by their inventory names, so shapes come from one place.
pub(crate) struct InventoryAlloc<'a> {
    pool: &'a PoolRef,
    part: Part,
    inv: PartInventory,
}

impl<'a> InventoryAlloc<'a> {
    pub(crate) fn new(ctx: &PartCtx<'a>, part: Part) -> Self {
        InventoryAlloc {
            pool: ctx.pool,
            part,
            inv: ctx.inventory(part),
        }
    }

    fn find<'s>(
        &self,
        list: &'s [TensorSpec],
        name: &'static str,
    ) -> Result<&'s TensorSpec, ModelError> {
        list.iter()
            .find(|s| s.name == name)
            .ok_or(ModelError::NotInInventory {
                part: self.part,
                name,
            })
    }

    pub(crate) fn stash<T: Element>(&self, name: &'static str) -> Result<Tensor<T>, ModelError> {
        let spec = self.find(&self.inv.stash, name)?;
        Ok(Tensor::from_spec(self.pool, spec, MemGroup::Activations)?)
    }

    pub(crate) fn forward_scratch(&self, name: &'static str) -> Result<Tensor, ModelError> {
        let spec = self.find(&self.inv.forward_scratch, name)?;
        Ok(Tensor::from_spec(self.pool, spec, MemGroup::Activations)?)
    }

    pub(crate) fn backward_scratch(&self, name: &'static str) -> Result<Tensor, ModelError> {
        let spec = self.find(&self.inv.backward_scratch, name)?;
        Ok(Tensor::from_spec(self.pool, spec, MemGroup::Activations)?)
    }

    pub(crate) fn output(&self) -> Result<Tensor, ModelError> {
        let spec = self.inv.output.as_ref().ok_or(ModelError::NotInInventory {
            part: self.part,
            name: "output",
        })?;
        Ok(Tensor::from_spec(self.pool, spec, MemGroup::Activations)?)
    }

    /// Checks that a tensor handed in (an input or a gradient) has the inventory's shape.
    pub(crate) fn check(
        &self,
        t: &Tensor,
        list: &[TensorSpec],
        name: &'static str,
    ) -> Result<(), ModelError> {
        let spec = self.find(list, name)?;
        if t.shape() != spec.shape.as_slice() {
            return Err(ModelError::ShapeMismatch {
                what: format!("{:?} {name}", self.part),
                got: t.shape().to_vec(),
                want: spec.shape.clone(),
            });
        }
        Ok(())
    }

    pub(crate) fn inventory(&self) -> &PartInventory {
        &self.inv
    }
}

/// Checks input token ids against the vocabulary.
pub(crate) fn check_tokens(
    what: &'static str,
    ids: &[i32],
    vocab: usize,
) -> Result<(), ModelError> {
    first_outside(what, ids, vocab, |_| false)
}

/// Checks targets: ids of the vocabulary, or [`IGNORE_TARGET`] for a token that does not count.
pub(crate) fn check_targets(targets: &[i32], vocab: usize) -> Result<(), ModelError> {
    first_outside("targets", targets, vocab, |t| t == IGNORE_TARGET)
}

/// The targets of a step that count in the loss: the loss is their mean and each one's
/// gradient is scaled by 1 / this number.
pub fn counted_tokens(microbatches: &[Microbatch]) -> Result<usize, ModelError> {
    let counted = microbatches
        .iter()
        .flat_map(|m| &m.targets)
        .filter(|&&t| t != IGNORE_TARGET)
        .count();
    match counted {
        0 => Err(ModelError::NothingCounted {
            step: microbatches.first().map_or(0, |m| m.step),
        }),
        n => Ok(n),
    }
}

fn first_outside(
    what: &'static str,
    ids: &[i32],
    vocab: usize,
    allowed: impl Fn(i32) -> bool,
) -> Result<(), ModelError> {
    match ids
        .iter()
        .position(|&t| !allowed(t) && (t < 0 || t as usize >= vocab))
    {
        Some(position) => Err(ModelError::TokenOutOfRange {
            what,
            id: ids[position] as i64,
            position,
            vocab,
        }),
        None => Ok(()),
    }
}
