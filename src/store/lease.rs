//! A claim's lease: which worker holds a job and the token minted for that one claim.

use super::new_id;

/// One claim of a job. Every write its run makes (heartbeat, step, checkpoint, event, end)
/// carries the token, so once the job is claimed again (by any worker, the same worker id
/// included) the earlier run is refused (`StoreError::LeaseLost`) and writes nothing more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: String,
    pub worker_id: String,
    pub token: String,
}

impl Lease {
    /// A fresh token for a new claim of `job_id` by `worker_id`.
    pub fn mint(job_id: &str, worker_id: &str) -> Lease {
        Lease {
            job_id: job_id.to_owned(),
            worker_id: worker_id.to_owned(),
            token: new_id("lease"),
        }
    }

    /// The key of this run's `n`th record: retried writes of it are written once.
    pub fn record_key(&self, n: u64) -> String {
        format!("{}/{n}", self.token)
    }
}
