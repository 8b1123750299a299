//! The Llama model as transformers' `LlamaForCausalLM` computes it, split into parts
//! (embedding, decoder layers, head) with explicit forward/backward pairs, so a pipeline chunk
//! is any contiguous run of parts. Written once over [`Backend`]: the same functions run on
//! the CPU and on a GPU. Each part's kept activations are a named stash struct whose tensors
//! are allocated from the backend's activation inventory; parameters are taken by name
//! ([`named`]).

pub mod chunk;
pub mod config;
pub mod embedding;
pub mod head;
pub mod hf_config;
pub mod layer;
pub mod named;
pub mod params;
pub mod part;
pub mod tied;

use thiserror::Error;

use crate::data::{IGNORE_TARGET, Microbatch};
use crate::exec::backend::Backend;
use crate::exec::device::{DeviceError, MemGroup, PoolRef};
use crate::plan::inventory::{MicroShape, Part, PartInventory, TensorSpec};

pub use config::LlamaConfig;
pub use params::{PartId, PartParams};

#[derive(Debug, Error)]
pub enum ModelError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("model config field {field}: {reason}")]
    BadConfig { field: String, reason: String },
    #[error("{part:?} part: tensor {name} is not in the backend's inventory")]
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

/// What a model function on backend `B` returns.
pub type ModelResult<B, T> = Result<T, <B as Backend>::Error>;

/// A backend the model runs on: its errors carry the model's own.
pub trait ModelBackend: Backend<Error: From<ModelError>> {}
impl<B: Backend<Error: From<ModelError>>> ModelBackend for B {}

/// What every part's forward and backward needs besides its parameters.
pub struct PartCtx<'a, B> {
    pub backend: &'a B,
    /// The device pool activations and scratch are counted in.
    pub pool: &'a PoolRef,
    pub config: &'a LlamaConfig,
    pub micro: MicroShape,
}

impl<B> Clone for PartCtx<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for PartCtx<'_, B> {}

impl<B: Backend> PartCtx<'_, B> {
    /// The part's tensors as this backend allocates them.
    pub fn inventory(&self, part: Part) -> PartInventory {
        self.backend
            .profile()
            .part(&self.config.dims, self.micro, part)
    }
}

/// Allocates a part's tensors by their inventory names, so shapes come from one place.
pub(crate) struct InventoryAlloc<'a, B> {
    backend: &'a B,
    pool: &'a PoolRef,
    part: Part,
    inv: PartInventory,
}

impl<'a, B: ModelBackend> InventoryAlloc<'a, B> {
    pub(crate) fn new(ctx: &PartCtx<'a, B>, part: Part) -> Self {
        InventoryAlloc {
            backend: ctx.backend,
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

    fn alloc(&self, spec: &TensorSpec) -> Result<B::Tensor, B::Error> {
        self.backend.alloc(self.pool, spec, MemGroup::Activations)
    }

    pub(crate) fn stash(&self, name: &'static str) -> Result<B::Tensor, B::Error> {
        self.alloc(self.find(&self.inv.stash, name)?)
    }

    pub(crate) fn stash_ids(&self, name: &'static str) -> Result<B::Ids, B::Error> {
        let spec = self.find(&self.inv.stash, name)?;
        self.backend
            .alloc_ids(self.pool, spec, MemGroup::Activations)
    }

    /// A stash tensor the backend's profile may list (none where it does not).
    pub(crate) fn stash_if_listed(
        &self,
        name: &'static str,
    ) -> Result<Option<B::Tensor>, B::Error> {
        (self.inv.stash.iter().find(|s| s.name == name))
            .map(|spec| self.alloc(spec))
            .transpose()
    }

    pub(crate) fn forward_scratch(&self, name: &'static str) -> Result<B::Tensor, B::Error> {
        self.alloc(self.find(&self.inv.forward_scratch, name)?)
    }

    pub(crate) fn backward_scratch(&self, name: &'static str) -> Result<B::Tensor, B::Error> {
        self.alloc(self.find(&self.inv.backward_scratch, name)?)
    }

    /// Scratch the backend's profile may list for this phase (none where it does not).
    pub(crate) fn scratch_if_listed(
        &self,
        backward: bool,
        name: &'static str,
    ) -> Result<Option<B::Tensor>, B::Error> {
        let list = match backward {
            false => &self.inv.forward_scratch,
            true => &self.inv.backward_scratch,
        };
        (list.iter().find(|s| s.name == name))
            .map(|spec| self.alloc(spec))
            .transpose()
    }

    pub(crate) fn output(&self) -> Result<B::Tensor, B::Error> {
        let spec = self.inv.output.as_ref().ok_or(ModelError::NotInInventory {
            part: self.part,
            name: "output",
        })?;
        self.alloc(spec)
    }

    /// Checks that a tensor handed in (an input or a gradient) has the inventory's shape.
    pub(crate) fn check(
        &self,
        t: &B::Tensor,
        list: &[TensorSpec],
        name: &'static str,
    ) -> Result<(), ModelError> {
        let spec = self.find(list, name)?;
        let got = B::shape(t);
        if got != spec.shape.as_slice() {
            return Err(ModelError::ShapeMismatch {
                what: format!("{:?} {name}", self.part),
                got: got.to_vec(),
                want: spec.shape.clone(),
            });
        }
        Ok(())
    }

    /// Checks the length of token ids or targets handed in against the inventory's entry.
    pub(crate) fn check_len(&self, ids: &[i32], name: &'static str) -> Result<(), ModelError> {
        let spec = self.find(&self.inv.stash, name)?;
        if ids.len() != spec.elements() {
            return Err(ModelError::ShapeMismatch {
                what: name.into(),
                got: vec![ids.len()],
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
