//! The planner: pure functions from a model and a set of devices to a pipeline plan that fits
//! their memory. No I/O, no async.
//!
//! Entry points:
//! - `search::search(&Request, &Cluster) -> Answer`: the fastest plan that fits (its `plan`,
//!   simulation, and the runners-up), or `PlanError::DoesNotFit` with what would fit.
//! - `search::evaluate(model, cluster, seq, Config)`: one fixed configuration (pipeline degree,
//!   replicas, micro-batch shape, schedule, recompute and offload options, sharded optimizer
//!   state), built, reduced across its replicas, fitted and simulated.
//! - `schedule::build(kind, devices, microbatches, layers) -> Plan`, then optionally
//!   `policy::apply` to add recompute/offload, for callers that choose the schedule themselves.
//! - `ir::Plan` and `ir::Action`: what the executor runs (text form in `ir`'s doc);
//!   `validate::validate` checks a plan before it runs.
//! - `reduction::with_gradient_reduction(plan, replicas)`: the plan run by that many
//!   data-parallel replicas, each chunk's gradients reduced across them;
//!   `reduction::with_sharded_optimizer` then shards each chunk's optimizer state over them
//!   (ZeRO-1), `reduction::shard` deciding which elements each replica owns.
//! - `tying::with_tied_embeddings(plan)`: for a model with tied embeddings, `TIE` (the sum of
//!   the table's two gradients) on the devices of the first and last chunks, before the
//!   reduction pass.
//! - `memory::chunk_memory`: per chunk and action kind, the bytes the executor must measure.
//! - `capacity::capacity`: the `plan capacity` table; `render` turns answers into text and SVG.
//!
//! One concept per module: `tensors` (the inventories' vocabulary), `cost` (parameters, FLOPs,
//! shape checks), `inventory` and `megatron` (tensors per part and profile), `memory`, `ir`,
//! `residence` (where groups start a step), `hardware` (devices, links, transfer times),
//! `machines` (a plan's traffic between devices, placed on several machines), `network`
//! (each pair of machines' link: configured, measured or assumed),
//! `schedule`, `reduction`, `tying`, `validate`, `simulate`, `policy`, `search`, `capacity`, `presets`,
//! `render`, `error`.

pub mod capacity;
pub mod cost;
pub mod error;
pub mod hardware;
pub mod inventory;
pub mod ir;
pub mod machines;
pub mod megatron;
pub mod memory;
pub mod network;
pub mod policy;
pub mod presets;
pub mod reduction;
pub mod render;
pub mod residence;
pub mod schedule;
pub mod search;
pub mod simulate;
pub mod tensors;
pub mod tying;
pub mod validate;

pub use error::PlanError;
pub use ir::{Action, ChunkSpec, Group, Plan};
