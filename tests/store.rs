//! The store's queue semantics on SQLite and PostgreSQL: claims respect free devices and never
//! hand one job to two workers; leases expire into the queue; transitions are checked.

mod common;
#[path = "common/store_rows.rs"]
mod store_rows;

use std::collections::HashSet;
use std::sync::Arc;

use chronospipe::store::{
    CheckpointRow, JobState, Lease, StepRecord, Store, StoreError, TransitionChange, connect,
};
use store_rows::queued_job;

fn devices(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("cpu:{i}")).collect()
}

async fn claims(url: &str) {
    let store: Arc<dyn Store> = connect(url).await.unwrap();
    let tenant = store.create_tenant("t").await.unwrap().id;
    let big = queued_job(store.as_ref(), &tenant, 3).await;
    let mut small = HashSet::new();
    for _ in 0..12 {
        small.insert(queued_job(store.as_ref(), &tenant, 1).await);
    }
    // The 3-device job is skipped while only 2 devices are free; smaller ones go first.
    let claim = store
        .claim_job("w0", &devices(2), 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(claim.job.id, big);
    assert_eq!(claim.job.devices.as_deref(), Some("[\"cpu:0\"]"));
    assert!(claim.resume_from.is_none());
    assert!(small.remove(&claim.job.id));

    // Four workers racing: every job is claimed exactly once.
    let mut tasks = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(claim) = store
                .claim_job(&format!("w{}", w + 1), &devices(1), 60_000)
                .await
                .unwrap()
            {
                mine.push(claim.job.id);
            }
            mine
        }));
    }
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap());
    }
    assert_eq!(claimed.len(), small.len(), "{claimed:?}");
    assert_eq!(claimed.iter().cloned().collect::<HashSet<_>>(), small);
    let big_claim = store
        .claim_job("w9", &devices(4), 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(big_claim.job.id, big);
    assert_eq!(store.devices_in_use("w9").await.unwrap().len(), 3);
}
both_databases!(claim_tests, super::claims);

async fn leases(url: &str) {
    let store = connect(url).await.unwrap();
    let tenant = store.create_tenant("t").await.unwrap().id;
    let id = queued_job(store.as_ref(), &tenant, 1).await;
    let claim = store
        .claim_job("dead", &devices(1), -1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.job.state, "running");
    let dead = claim.lease;
    let other = Lease::mint(&id, "other");
    let step = StepRecord {
        step: 1,
        tokens: 32,
        data: "{\"step\":1}".into(),
        lease_ms: -1,
    };
    assert_eq!(
        store.record_step(&dead, "k1", &step).await.unwrap(),
        JobState::Running
    );
    assert!(matches!(
        store.record_step(&other, "k1", &step).await,
        Err(StoreError::LeaseLost { .. })
    ));

    assert_eq!(store.requeue_expired().await.unwrap(), vec![id.clone()]);
    let job = store.get_job_any(&id).await.unwrap().unwrap();
    assert_eq!(
        (job.state.as_str(), job.restart_count, job.worker_id),
        ("queued", 1, None)
    );
    assert!(matches!(
        store.heartbeat(&dead, 1000).await,
        Err(StoreError::LeaseLost { .. })
    ));
    // A worker whose lease is gone writes no more events either.
    assert!(matches!(
        store.record_event(&dead, "k2", "info", "{}").await,
        Err(StoreError::LeaseLost { .. })
    ));

    let claim = store
        .claim_job("alive", &devices(1), 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.job.id, id);
    let alive = claim.lease;
    assert_eq!(
        store.heartbeat(&alive, 60_000).await.unwrap(),
        JobState::Running
    );
    // The lease runs 60 s by the database's clock: nothing has expired.
    assert!(store.requeue_expired().await.unwrap().is_empty());
    store
        .record_event(&alive, "k1", "info", "{}")
        .await
        .unwrap();
    // Without a checkpoint the resumed run starts over: its old metrics go.
    assert_eq!(store.discard_metrics_after(&alive, 0).await.unwrap(), 1);
    assert_eq!(store.get_job_any(&id).await.unwrap().unwrap().step, 0);

    let done = TransitionChange {
        lease: Some(alive),
        ..Default::default()
    };
    store
        .transition(&id, JobState::Succeeded, done)
        .await
        .unwrap();
    let again = store
        .transition(&id, JobState::Running, TransitionChange::default())
        .await;
    assert!(matches!(again, Err(StoreError::Transition(_))), "{again:?}");
    let kinds: Vec<String> = store
        .list_events(&id, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "state").count(),
        6,
        "{kinds:?}"
    );
    let seqs: Vec<i64> = store
        .list_events(&id, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
}
both_databases!(lease_tests, super::leases);

/// A lease is the claim's, not the worker's: a worker that claims its own expired job again
/// (same worker id) gets a new token, and the earlier claim's run is refused everything it
/// writes once the job is claimed again. A record whose commit landed but whose answer was
/// lost, sent again with its key, is written once.
async fn lease_tokens(url: &str) {
    let store = connect(url).await.unwrap();
    let tenant = store.create_tenant("t").await.unwrap().id;
    let id = queued_job(store.as_ref(), &tenant, 1).await;
    let first = store
        .claim_job("w", &devices(1), -1)
        .await
        .unwrap()
        .unwrap()
        .lease;
    assert_eq!(
        (first.job_id.as_str(), first.worker_id.as_str()),
        (id.as_str(), "w")
    );
    let step = |n: i64| StepRecord {
        step: n,
        tokens: 32 * n,
        data: format!("{{\"step\":{n}}}"),
        lease_ms: -1,
    };
    store
        .record_step(&first, "first/1", &step(1))
        .await
        .unwrap();
    // The lease ran out; the same worker id claims the job again.
    assert_eq!(store.requeue_expired().await.unwrap(), vec![id.clone()]);
    let second = store
        .claim_job("w", &devices(1), 60_000)
        .await
        .unwrap()
        .unwrap()
        .lease;
    assert_eq!(second.worker_id, first.worker_id);
    assert_ne!(second.token, first.token);
    let lost = |r: Result<(), StoreError>| matches!(r, Err(StoreError::LeaseLost { .. }));
    assert!(lost(store.heartbeat(&first, 60_000).await.map(|_| ())));
    assert!(lost(
        store
            .record_step(&first, "first/2", &step(2))
            .await
            .map(|_| ())
    ));
    assert!(lost(
        store.record_event(&first, "first/3", "info", "{}").await
    ));
    let checkpoint = CheckpointRow {
        job_id: id.clone(),
        step: 2,
        path: "/nowhere".into(),
        files: "[]".into(),
        created_at: 0,
        val_loss: None,
    };
    assert!(lost(
        store
            .record_checkpoint(&first, "first/4", &checkpoint)
            .await
    ));
    assert!(lost(
        store.discard_metrics_after(&first, 0).await.map(|_| ())
    ));
    let failed = TransitionChange {
        lease: Some(first.clone()),
        error: Some("{}".into()),
        ..Default::default()
    };
    assert!(lost(
        store
            .transition(&id, JobState::Failed, failed)
            .await
            .map(|_| ())
    ));
    // Nothing of the fenced run reached the store.
    assert_eq!(store.latest_checkpoint(&id).await.unwrap(), None);
    let job = store.get_job_any(&id).await.unwrap().unwrap();
    assert_eq!((job.state.as_str(), job.step), ("running", 1));

    // The new claim writes; a step sent twice under one key is recorded once.
    assert_eq!(store.discard_metrics_after(&second, 0).await.unwrap(), 1);
    for _ in 0..2 {
        store
            .record_step(&second, "second/1", &step(1))
            .await
            .unwrap();
        store
            .record_event(&second, "second/2", "info", "{}")
            .await
            .unwrap();
        store
            .record_checkpoint(
                &second,
                "second/3",
                &CheckpointRow {
                    step: 1,
                    ..checkpoint.clone()
                },
            )
            .await
            .unwrap();
    }
    let kinds: Vec<String> = store
        .list_events(&id, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .filter(|k| k != "state")
        .collect();
    assert_eq!(
        kinds,
        ["metrics", "metrics", "info", "checkpoint"],
        "first run's step 1, then the second run's records once each"
    );
    let done = TransitionChange {
        lease: Some(second.clone()),
        ..Default::default()
    };
    store
        .transition(&id, JobState::Succeeded, done)
        .await
        .unwrap();
    let job = store.get_job_any(&id).await.unwrap().unwrap();
    assert_eq!((job.state.as_str(), job.worker_id), ("succeeded", None));
    assert!(lost(store.heartbeat(&second, 60_000).await.map(|_| ())));
}
both_databases!(lease_token_tests, super::lease_tokens);
