//! Jobs off the HTTP path: the contracts with the planner (`Planner`) and the executor
//! (`JobRunner`), resolving file ids, and the worker that claims queued jobs and runs them.

pub mod cluster;
pub mod devices;
mod executor;
pub mod gang;
pub mod gang_plan;
pub mod host_memory;
mod init_checkpoint;
mod planner;
mod redact;
pub mod rendezvous;
mod resolve;
mod resume;
mod runner;
mod sink;
mod worker;

pub use cluster::{GangError, Membership, reserve_across_workers, reserve_laid_out};
pub use devices::{DeviceInfo, default_devices, gpu_ordinal, parse_devices, with_gpu_memory};
pub use executor::{ExecPlanner, ExecRunner};
pub use planner::{PlacementEntry, PlanCandidate, PlanFailure, PlanOutcome, PlanSummary, Planner};
pub use rendezvous::{Rendezvous, RendezvousError};
pub use resolve::{ResolveError, ResolvedSpec, resolve_files};
pub use runner::{
    Evaluation, EventLevel, Fault, JobRunner, ResumePoint, RunControl, RunEnd, RunFailure,
    RunRequest, RunSink, SinkError, StepMetrics, StopRequest,
};
pub use worker::{Worker, WorkerConfig, WorkerError};

use std::sync::Arc;

/// The planner and trainer this build runs with. The service checks for `None` and refuses
/// the work with a clear error rather than pretend.
#[derive(Clone, Default)]
pub struct Capabilities {
    pub planner: Option<Arc<dyn Planner>>,
    pub runner: Option<Arc<dyn JobRunner>>,
}

impl Capabilities {
    /// The capabilities `serve` and `worker` use: the planner (`crate::plan`) and the executor
    /// (`crate::exec`).
    pub fn production() -> Capabilities {
        Capabilities {
            planner: Some(Arc::new(executor::ExecPlanner)),
            runner: Some(Arc::new(executor::ExecRunner)),
        }
    }
}
