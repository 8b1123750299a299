//! The executor: tensors in counted device pools, a backend trait over each device's storage
//! (`backend`: the CPU's host memory, a GPU's), the Llama model written once over it as
//! explicit per-part forward/backward (`model`), the pipeline runtime that runs a plan's
//! programs on an engine per kind of device (`pipeline`), optimizers and checkpoints.
//!
//! What a pipeline runtime uses, per device thread:
//! - `device::{DeviceSet, Pool, PoolRef, MemGroup}`: `DeviceSet::parse("cpu:4x256MiB")` gives
//!   one counted pool per device plus the host pool; `Pool::peak_bytes` is the measured peak.
//! - `model::PartParams::allocate(pool, config, PartId)` (+ `init_from_seed` or
//!   `checkpoint::model_files::load_weights`) for the parts the device holds.
//! - `model::chunk::{forward_chunk, backward_chunk}` (or `model::part::{forward_part,
//!   backward_part}`) with a `model::PartCtx` naming the backend and the device's pool. A
//!   stash moves to the host and back with `relocate`. Recompute is `forward_chunk` again
//!   from the kept chunk input.
//! - At the step's end: `optim::clip::part_squares` per part, combine every device's
//!   `PartSquares` with `optim::clip::global_norm` (order-independent by construction),
//!   `optim::clip::clip_factor`, then `optim::update_parts` on the device's own parts.
//! - The loss scale for every micro-batch's head backward is `1 / tokens of the whole step`.

pub mod backend;
pub mod checkpoint;
pub mod compare;
pub mod device;
pub mod device_spec;
pub mod model;
pub mod optim;
pub mod pipeline;
pub mod run;
pub mod tensor;
pub mod train;
pub mod transport;
