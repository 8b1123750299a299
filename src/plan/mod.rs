//! The planner: pure functions from a model and a set of devices to a pipeline plan that fits
//! their memory. No I/O, no async.

pub mod inventory;
