//! The planner: pure functions from a model and a set of devices to a pipeline plan that fits
//! their memory. No I/O, no async.

pub mod cost;
pub mod error;
pub mod inventory;
pub mod megatron;
pub mod memory;

pub use error::PlanError;
