//! The planner: pure functions from a model and a set of devices to a pipeline plan that fits
//! their memory. No I/O, no async.

pub mod cost;
pub mod error;
pub mod inventory;
pub mod ir;
pub mod megatron;
pub mod memory;
pub mod policy;
pub mod presets;
pub mod render;
pub mod schedule;
pub mod search;
pub mod simulate;
pub mod validate;

pub use error::PlanError;
pub use ir::{Action, ChunkSpec, Group, Plan};
