//! The heartbeat that holds a claimed job's lease (and rank 0's job lease).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::jobs::runner::StopRequest;
use crate::jobs::sink::JobLease;
use crate::store::StoreError;

/// Renews the job's lease every third of it. A lost lease abandons the job; a renewal the
/// database cannot take marks the worker as unable to hold leases, so it claims nothing new.
pub(super) async fn heartbeat(lease: JobLease, trouble: Arc<AtomicBool>) {
    let id = &lease.lease.job_id;
    loop {
        tokio::time::sleep(lease.duration / 3).await;
        let asked = Instant::now();
        let lease_ms = lease.duration.as_millis() as i64;
        match lease.store.heartbeat(&lease.lease, lease_ms).await {
            Ok(state) => {
                trouble.store(false, Ordering::SeqCst);
                lease.renewed_at(asked);
                lease.take_state(state);
            }
            Err(StoreError::LeaseLost { .. }) => {
                lease.control.request(StopRequest::Abandon);
                return;
            }
            Err(e) => {
                trouble.store(true, Ordering::SeqCst);
                tracing::warn!(job = %id, error = %e, "heartbeat failed");
            }
        }
    }
}
