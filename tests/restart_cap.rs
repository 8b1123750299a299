//! The cap on requeues, on SQLite and PostgreSQL: a job spanning workers whose attempts keep
//! being lost goes back to the queue `max_restarts` times, then fails with
//! `too_many_restarts` naming the last cause, its devices freed. And the layout a reservation
//! keeps for its ranks.

mod common;
#[path = "common/store_rows.rs"]
mod store_rows;

use std::sync::Arc;

use chronospipe::store::{GangOutcome, JobState, RankPlacement, Store, connect};
use store_rows::{planned_job, registration};

const LEASE_MS: i64 = 60_000;

async fn register(store: &dyn Store, worker: &str) {
    let registration = registration(worker, "h", 2, true);
    store
        .register_worker(&registration, LEASE_MS)
        .await
        .unwrap();
}

/// A queued job needing four devices that may be requeued `max_restarts` times.
async fn queued(store: &dyn Store, tenant: &str, max_restarts: i64) -> String {
    let job = planned_job(tenant, 4, Some(max_restarts));
    store.insert_job(&job).await.unwrap();
    job.id
}

fn ranks() -> Vec<RankPlacement> {
    ["a", "b"]
        .iter()
        .flat_map(|w| {
            (0..2).map(move |d| RankPlacement {
                worker_id: (*w).to_owned(),
                device_id: format!("cpu:{d}"),
            })
        })
        .collect()
}

/// Reserves the job (keeping `layout`), starts every rank and loses the attempt.
async fn lose_an_attempt(store: &dyn Store, job: &str, layout: &str) -> i64 {
    let outcome = store
        .reserve_gang_laid_out(job, &ranks(), LEASE_MS, Some(layout))
        .await
        .unwrap();
    let GangOutcome::Reserved(reservation) = outcome else {
        panic!("not reserved: {outcome:?}");
    };
    assert_eq!(reservation.layout.as_deref(), Some(layout));
    let attempt = reservation.attempt;
    for (rank, place) in ranks().iter().enumerate() {
        (store.claim_rank(job, attempt, rank as i64, &place.worker_id, LEASE_MS))
            .await
            .unwrap();
    }
    let why = format!("rank 3 (worker b) ended: peer lost in attempt {attempt}");
    assert!(store.release_reservation(job, attempt, &why).await.unwrap());
    attempt
}

async fn requeues_are_capped(url: &str) {
    let store: Arc<dyn Store> = connect(url).await.unwrap();
    let tenant = store.create_tenant("t").await.unwrap().id;
    register(store.as_ref(), "a").await;
    register(store.as_ref(), "b").await;
    let job = queued(store.as_ref(), &tenant, 1).await;
    let layout = r#"{"devices":"cpu:4x64MiB","stages":2,"data_parallel":2}"#;

    // The first loss: back in the queue, one restart.
    lose_an_attempt(store.as_ref(), &job, layout).await;
    let row = store.get_job_any(&job).await.unwrap().unwrap();
    assert_eq!((row.state.as_str(), row.restart_count), ("queued", 1));
    assert!(row.error.is_none());

    // The second is past the cap: failed, naming the cause; its devices freed.
    let attempt = lose_an_attempt(store.as_ref(), &job, layout).await;
    let row = store.get_job_any(&job).await.unwrap().unwrap();
    assert_eq!(row.job_state().unwrap(), JobState::Failed);
    assert_eq!(row.restart_count, 1);
    let error: serde_json::Value = serde_json::from_str(row.error.as_deref().unwrap()).unwrap();
    assert_eq!(error["code"], "too_many_restarts");
    assert_eq!(error["fault"], "service");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("max_restarts 1"), "{message}");
    assert!(
        message.contains(&format!("peer lost in attempt {attempt}")),
        "{message}"
    );
    let devices = store.cluster_devices().await.unwrap();
    assert!(devices.iter().all(|d| d.job_id.is_none()), "{devices:?}");

    // A cap of 0: the first loss fails the job.
    let uncapped = queued(store.as_ref(), &tenant, 0).await;
    lose_an_attempt(store.as_ref(), &uncapped, layout).await;
    let row = store.get_job_any(&uncapped).await.unwrap().unwrap();
    assert_eq!(row.job_state().unwrap(), JobState::Failed, "a cap of 0");
}
both_databases!(requeue_cap, super::requeues_are_capped);
