//! Rows put straight into a store, what the store suites claim, hold and release: jobs planned
//! for some devices, and workers' registrations.
#![allow(dead_code)]

use chronospipe::store::{
    JobState, NewJob, PlanRow, Planned, Store, TransitionChange, WorkerDevice, WorkerRegistration,
    new_id,
};

fn plan() -> PlanRow {
    PlanRow {
        plan: Some("{}".into()),
        plan_svg: None,
        plan_summary: None,
    }
}

/// A job row of `tenant` planned for `devices_needed` devices, queued as it is inserted, that
/// may be requeued `max_restarts` times (the service's default when `None`).
pub fn planned_job(tenant: &str, devices_needed: i64, max_restarts: Option<i64>) -> NewJob {
    NewJob {
        id: new_id("job"),
        tenant_id: tenant.to_owned(),
        spec: "{}".into(),
        total_steps: 10,
        file_ids: vec![],
        checkpoint_uses: vec![],
        idempotency_key: None,
        request_hash: None,
        planned: Some(Planned::Queued {
            plan: plan(),
            devices_needed,
        }),
        max_restarts,
    }
}

/// A job inserted in `validating`, then planned for `devices_needed` devices and moved to
/// `queued`, each a write of its own.
pub async fn queued_job(store: &dyn Store, tenant: &str, devices_needed: i64) -> String {
    let job = NewJob {
        planned: None,
        ..planned_job(tenant, devices_needed, None)
    };
    let id = job.id.clone();
    store.insert_job(&job).await.unwrap();
    store.set_plan(&id, &plan(), devices_needed).await.unwrap();
    store
        .transition(&id, JobState::Queued, TransitionChange::default())
        .await
        .unwrap();
    id
}

/// A worker on `host` with `devices` CPU devices of 64 MiB.
pub fn registration(
    worker: &str,
    host: &str,
    devices: usize,
    runs_ranks: bool,
) -> WorkerRegistration {
    WorkerRegistration {
        worker_id: worker.to_owned(),
        host: host.to_owned(),
        runs_ranks,
        host_memory_bytes: None,
        devices: (0..devices)
            .map(|i| WorkerDevice {
                device_id: format!("cpu:{i}"),
                kind: "cpu".into(),
                memory_bytes: 64 << 20,
            })
            .collect(),
    }
}
