//! What a worker is given: its identity, devices, storage, leases and patience, and where
//! other workers reach its ranks.

use std::path::PathBuf;
use std::time::Duration;

use crate::jobs::devices::DeviceInfo;
use crate::jobs::sink::RECORD_QUEUE;
use crate::plan::network::Configured;
use crate::store::new_id;

/// How long a job waits for an absent database before the worker gives it up (it goes back
/// to the queue, or its lease runs out, and it is resumed from its last recorded checkpoint).
const PATIENCE: Duration = Duration::from_secs(600);

/// How long a job reserved across workers waits for all its ranks to start.
const GANG_START: Duration = Duration::from_secs(30);

/// What a worker is given.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub worker_id: String,
    pub devices: Vec<DeviceInfo>,
    /// Checkpoints go under `DATA_DIR/jobs/JOB_ID/checkpoints` (shared storage when several
    /// machines work one queue).
    pub data_dir: PathBuf,
    /// A claim not renewed for this long is taken back.
    pub lease: Duration,
    /// How often an idle worker looks for work.
    pub poll: Duration,
    /// Records a running job may hold while the database is away before it waits.
    pub record_queue: usize,
    /// How long a job waits for an absent database before the worker gives it up.
    pub patience: Duration,
    /// The host pool each run's offloaded tensors live in (`--host-memory`).
    pub host_memory_bytes: u64,
    /// The host other workers reach this worker's ranks at (`--rank-address`); each rank
    /// listens on a port the OS chooses there and publishes `host:port` to the others.
    pub rank_address: String,
    /// How long the ranks of a job reserved across workers have to all start, and then to
    /// meet, before the reservation is released and the job queued again.
    pub gang_start: Duration,
    /// The machine this worker runs on (`--machine`, default the kernel's host name):
    /// workers naming one machine are planned as sharing it (their devices talk for free),
    /// and links between machines are measured and looked up by these names.
    pub machine: String,
    /// The operator's figures for the links between machines, for placing jobs planned over
    /// the cluster; unset figures are the measured links', else assumed.
    pub network: Configured,
}

impl WorkerConfig {
    pub fn new(data_dir: PathBuf, devices: Vec<DeviceInfo>) -> Self {
        WorkerConfig {
            worker_id: new_id("worker"),
            devices,
            data_dir,
            lease: Duration::from_secs(30),
            poll: Duration::from_millis(500),
            record_queue: RECORD_QUEUE,
            patience: PATIENCE,
            host_memory_bytes: u64::MAX,
            rank_address: crate::jobs::cluster::host_name(),
            gang_start: GANG_START,
            machine: crate::jobs::cluster::host_name(),
            network: Configured::default(),
        }
    }
}
