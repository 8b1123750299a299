//! chronospipe: a training service that plans pipeline-parallel schedules fitting device memory
//! (after ChronosPipe, arXiv 2503.03182) and runs them on an embedded multi-device executor.
//!
//! The parts and how data flows between them are described in `docs/architecture.md`.

pub mod api;
pub mod cli;
pub mod config;
pub mod data;
pub mod exec;
pub mod jobs;
pub mod plan;
pub mod service;
pub mod spec;
pub mod store;
pub mod telemetry;
