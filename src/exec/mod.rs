//! The executor: tensors in counted device pools, kernels behind a backend trait, the Llama
//! model as explicit per-part forward/backward, optimizers, checkpoints, and a single-device
//! training step that the pipeline runtime drives part by part.
//!
//! What a pipeline runtime uses, per device thread:
//! - `device::{DeviceSet, Pool, PoolRef, MemGroup}`: `DeviceSet::parse("cpu:4x256MiB")` gives
//!   one counted pool per device plus the host pool; `Pool::peak_bytes` is the measured peak.
//! - `model::PartParams::allocate(pool, config, PartId)` (+ `init_from_seed` or
//!   `checkpoint::model_files::load_weights`) for the parts the device holds.
//! - `model::chunk::{forward_chunk, backward_chunk}` (or `model::part::{forward_part,
//!   backward_part}`) with a `model::PartCtx` naming the device's pool. A chunk's output
//!   `Tensor` is sent with `Tensor::regroup(MemGroup::Communication)` then
//!   `Tensor::transfer(receiver_pool, MemGroup::Activations)`; offload/prefetch of a stash is
//!   `ChunkStash`'s parts' `transfer(host)` and back. Recompute is `forward_chunk` again from
//!   the kept chunk input.
//! - At the step's end: `optim::clip::part_squares` per part, combine every device's
//!   `PartSquares` with `optim::clip::global_norm` (order-independent by construction),
//!   `optim::clip::clip_factor`, then `optim::update_parts` on the device's own parts.
//! - The loss scale for every micro-batch's head backward is `1 / tokens of the whole step`.

pub mod backend;
pub mod checkpoint;
pub mod compare;
pub mod device;
pub mod device_spec;
pub mod kernels;
pub mod model;
pub mod optim;
pub mod pipeline;
pub mod run;
pub mod tensor;
pub mod train;
pub mod transport;
