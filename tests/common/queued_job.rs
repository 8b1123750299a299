//! A job row put straight into a store, planned for `devices_needed` devices and queued: what
//! the store suites claim, hold and release.

use chronospipe::store::{JobState, NewJob, PlanRow, Store, TransitionChange, new_id};

pub async fn queued_job(store: &dyn Store, tenant: &str, devices_needed: i64) -> String {
    let id = new_id("job");
    let job = NewJob {
        id: id.clone(),
        tenant_id: tenant.to_owned(),
        spec: "{}".into(),
        total_steps: 10,
        file_ids: vec![],
        checkpoint_uses: vec![],
        idempotency_key: None,
        request_hash: None,
        planned: None,
        max_restarts: None,
    };
    store.insert_job(&job).await.unwrap();
    let plan = PlanRow {
        plan: Some("{}".into()),
        plan_svg: None,
        plan_summary: None,
    };
    store.set_plan(&id, &plan, devices_needed).await.unwrap();
    store
        .transition(&id, JobState::Queued, TransitionChange::default())
        .await
        .unwrap();
    id
}
