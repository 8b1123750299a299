//! The cluster in the store, on SQLite and PostgreSQL: workers register devices and stay live
//! by heartbeat; claims record which job holds each device and every end releases it; gang
//! reservations take all of a job's devices across workers or none, with an attempt number,
//! rank leases and a start timeout; ranks meet through rendezvous rows that never mix
//! attempts; `GET /v1/devices` shows every live worker's devices.

mod common;
#[path = "common/store_rows.rs"]
mod store_rows;

use std::sync::Arc;
use std::time::Duration;

use chronospipe::jobs::cluster::host_name;
use chronospipe::jobs::rendezvous::TCP_ADDRESS;
use chronospipe::jobs::{GangError, Rendezvous, RendezvousError, reserve_across_workers};
use chronospipe::store::{
    ClusterDeviceRow, ClusterError, GangOutcome, GangRefusal, JobState, RankPlacement, Reservation,
    Store, StoreError, TransitionChange, WorkerDevice, connect,
};
use store_rows::{queued_job, registration};

const LEASE_MS: i64 = 60_000;
/// A rendezvous key that only rank 0 publishes.
const FROM_RANK_0: &str = "from_rank_0";

fn place(worker: &str, device: usize) -> RankPlacement {
    RankPlacement {
        worker_id: worker.to_owned(),
        device_id: format!("cpu:{device}"),
    }
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("cpu:{i}")).collect()
}

/// `(worker, device)` of each device `job` holds.
async fn held_by(store: &dyn Store, job: &str) -> Vec<(String, String)> {
    let devices: Vec<ClusterDeviceRow> = store.cluster_devices().await.unwrap();
    devices
        .into_iter()
        .filter(|d| d.job_id.as_deref() == Some(job))
        .map(|d| (d.worker_id, d.device_id))
        .collect()
}

async fn state(store: &dyn Store, job: &str) -> JobState {
    let job = store.get_job_any(job).await.unwrap().unwrap();
    job.job_state().unwrap()
}

fn reserved(outcome: GangOutcome) -> Reservation {
    match outcome {
        GangOutcome::Reserved(reservation) => reservation,
        GangOutcome::Refused(refusal) => panic!("refused: {refusal}"),
    }
}

fn refused(outcome: GangOutcome) -> GangRefusal {
    match outcome {
        GangOutcome::Refused(refusal) => refusal,
        GangOutcome::Reserved(r) => panic!("reserved attempt {}", r.attempt),
    }
}

async fn membership(url: &str) {
    let store: Arc<dyn Store> = connect(url).await.unwrap();
    let tenant = store.create_tenant("t").await.unwrap().id;
    store
        .register_worker(&registration("w1", "h1", 2, false), LEASE_MS)
        .await
        .unwrap();
    let mut bounded = registration("w2", "h2", 1, false);
    bounded.host_memory_bytes = Some(3 << 30);
    store.register_worker(&bounded, LEASE_MS).await.unwrap();
    let devices = store.cluster_devices().await.unwrap();
    // Each device comes with its worker's host memory (none: unbounded).
    let host_memory: Vec<Option<i64>> = devices.iter().map(|d| d.host_memory_bytes).collect();
    assert_eq!(host_memory, [None, None, Some(3 << 30)]);
    let listed: Vec<(&str, &str, &str)> = devices
        .iter()
        .map(|d| (d.worker_id.as_str(), d.host.as_str(), d.device_id.as_str()))
        .collect();
    assert_eq!(
        listed,
        [
            ("w1", "h1", "cpu:0"),
            ("w1", "h1", "cpu:1"),
            ("w2", "h2", "cpu:0")
        ]
    );
    assert!(
        devices
            .iter()
            .all(|d| d.job_id.is_none() && d.kind == "cpu")
    );
    assert!(matches!(
        store.worker_heartbeat("w9", LEASE_MS).await,
        Err(StoreError::Cluster(ClusterError::WorkerUnknown(w))) if w == "w9"
    ));
    store.worker_heartbeat("w1", LEASE_MS).await.unwrap();

    // A claim records the devices it takes; a claim never takes a held device, even when the
    // worker offers it.
    let one = queued_job(store.as_ref(), &tenant, 1).await;
    let two = queued_job(store.as_ref(), &tenant, 2).await;
    let claim = store.claim_job("w1", &ids(2), LEASE_MS).await.unwrap();
    let claim = claim.unwrap();
    assert_eq!(claim.job.id, one);
    assert_eq!(
        held_by(store.as_ref(), &one).await,
        [("w1".into(), "cpu:0".into())]
    );
    assert!(
        store
            .claim_job("w1", &ids(2), LEASE_MS)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(state(store.as_ref(), &two).await, JobState::Queued);

    // Its end frees them; then the 2-device job fits.
    let done = TransitionChange {
        lease: Some(claim.lease),
        ..TransitionChange::default()
    };
    store
        .transition(&one, JobState::Succeeded, done)
        .await
        .unwrap();
    assert!(held_by(store.as_ref(), &one).await.is_empty());
    let claim = store.claim_job("w1", &ids(2), -1).await.unwrap().unwrap();
    assert_eq!(claim.job.id, two);
    assert_eq!(held_by(store.as_ref(), &two).await.len(), 2);
    // A lease that runs out frees them too.
    assert_eq!(store.requeue_expired().await.unwrap(), vec![two.clone()]);
    assert!(held_by(store.as_ref(), &two).await.is_empty());

    // A worker not heard from within its lease is not live; registering again revives it
    // with the devices it lists now.
    store
        .register_worker(&registration("w2", "h2", 1, false), -1)
        .await
        .unwrap();
    let live: Vec<String> = store
        .cluster_devices()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.worker_id)
        .collect();
    assert_eq!(live, ["w1", "w1"]);
    let mut moved = registration("w2", "h3", 0, false);
    moved.devices.push(WorkerDevice {
        device_id: "cuda:0".into(),
        kind: "cuda".into(),
        memory_bytes: 80 << 30,
    });
    store.register_worker(&moved, LEASE_MS).await.unwrap();
    let w2: Vec<ClusterDeviceRow> = store
        .cluster_devices()
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.worker_id == "w2")
        .collect();
    assert_eq!(w2.len(), 1);
    assert_eq!(
        (
            w2[0].device_id.as_str(),
            w2[0].host.as_str(),
            w2[0].memory_bytes
        ),
        ("cuda:0", "h3", 80 << 30)
    );
    store.deregister_worker("w1").await.unwrap();
    assert!(
        store
            .cluster_devices()
            .await
            .unwrap()
            .iter()
            .all(|d| d.worker_id == "w2")
    );
}
both_databases!(membership_tests, super::membership);

async fn gangs(url: &str) {
    let store: Arc<dyn Store> = connect(url).await.unwrap();
    let tenant = store.create_tenant("t").await.unwrap().id;
    for w in ["w1", "w2", "w3", "w5"] {
        let host = format!("host-{w}");
        store
            .register_worker(&registration(w, &host, 2, true), LEASE_MS)
            .await
            .unwrap();
    }
    store
        .register_worker(&registration("w4", "host-w4", 2, false), LEASE_MS)
        .await
        .unwrap();
    store
        .register_worker(&registration("dead", "host-dead", 2, true), -1)
        .await
        .unwrap();
    let a = queued_job(store.as_ref(), &tenant, 4).await;
    let b = queued_job(store.as_ref(), &tenant, 4).await;
    let small = queued_job(store.as_ref(), &tenant, 1).await;

    let a_ranks = [
        place("w1", 0),
        place("w1", 1),
        place("w2", 0),
        place("w2", 1),
    ];
    let first = reserved(store.reserve_gang(&a, &a_ranks, LEASE_MS).await.unwrap());
    assert_eq!((first.attempt, first.state.as_str()), (1, "reserved"));
    assert_eq!(first.ranks.len(), 4);
    assert_eq!(
        (
            first.ranks[2].worker_id.as_str(),
            first.ranks[2].device_id.as_str()
        ),
        ("w2", "cpu:0")
    );
    let job_a = store.get_job_any(&a).await.unwrap().unwrap();
    assert_eq!(job_a.state, "running");
    assert_eq!(job_a.worker_id.as_deref(), Some("w1"));
    assert_eq!(held_by(store.as_ref(), &a).await.len(), 4);
    // Every rank has its own claim token, rank 0's included; rank 0's fences the job's records.
    let tokens: Vec<String> = (first.ranks.iter())
        .map(|r| r.lease_token.clone().expect("every rank has a token"))
        .collect();
    let distinct: std::collections::BTreeSet<&String> = tokens.iter().collect();
    assert_eq!(distinct.len(), 4, "{tokens:?}");
    let rank0 = chronospipe::store::Lease {
        job_id: a.clone(),
        worker_id: "w1".into(),
        token: tokens[0].clone(),
    };
    store.heartbeat(&rank0, LEASE_MS).await.unwrap();
    let rank1 = chronospipe::store::Lease {
        token: tokens[1].clone(),
        ..rank0.clone()
    };
    assert!(matches!(
        store.heartbeat(&rank1, LEASE_MS).await,
        Err(StoreError::LeaseLost { .. })
    ));
    // Queued jobs too big for a worker of two devices: A is running, B and the small one not.
    let over: Vec<String> = (store.queued_jobs_over(2).await.unwrap().into_iter())
        .map(|(job, needed)| {
            assert_eq!(needed, 4);
            job
        })
        .collect();
    assert_eq!(over, std::slice::from_ref(&b));

    // B needs two of A's devices: it takes none, not even those that are free.
    let b_ranks = [
        place("w3", 0),
        place("w3", 1),
        place("w2", 0),
        place("w2", 1),
    ];
    assert_eq!(
        refused(store.reserve_gang(&b, &b_ranks, LEASE_MS).await.unwrap()),
        GangRefusal::DeviceHeld {
            worker: "w2".into(),
            device: "cpu:0".into(),
            job: a.clone()
        }
    );
    assert!(held_by(store.as_ref(), &b).await.is_empty());
    assert_eq!(state(store.as_ref(), &b).await, JobState::Queued);
    assert!(store.latest_reservation(&b).await.unwrap().is_none());
    let refusals = [
        (vec![], GangRefusal::NoRanks),
        (
            vec![place("w3", 0), place("w3", 0)],
            GangRefusal::DeviceTwice {
                worker: "w3".into(),
                device: "cpu:0".into(),
            },
        ),
        (
            vec![place("w3", 0), place("w4", 0)],
            GangRefusal::RanksUnsupported {
                worker: "w4".into(),
            },
        ),
        (
            vec![place("w3", 0), place("dead", 0)],
            GangRefusal::WorkerNotLive {
                worker: "dead".into(),
            },
        ),
        (
            vec![place("w3", 0), place("w5", 7)],
            GangRefusal::UnknownDevice {
                worker: "w5".into(),
                device: "cpu:7".into(),
            },
        ),
    ];
    for (ranks, refusal) in refusals {
        assert_eq!(
            refused(store.reserve_gang(&b, &ranks, LEASE_MS).await.unwrap()),
            refusal
        );
        assert!(held_by(store.as_ref(), &b).await.is_empty(), "{refusal}");
    }
    assert!(matches!(
        store.reserve_gang(&a, &b_ranks, LEASE_MS).await,
        Err(StoreError::Transition(_))
    ));
    // A one-worker claim cannot take devices a gang holds.
    assert!(
        store
            .claim_job("w2", &ids(2), LEASE_MS)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(state(store.as_ref(), &small).await, JobState::Queued);

    // Each worker sees its ranks and claims each with its own lease.
    let w2_ranks: Vec<i64> = store
        .worker_ranks("w2")
        .await
        .unwrap()
        .iter()
        .map(|r| r.rank)
        .collect();
    assert_eq!(w2_ranks, [2, 3]);
    assert!(matches!(
        store.claim_rank(&a, 1, 0, "w2", LEASE_MS).await,
        Err(StoreError::Cluster(ClusterError::RankLost { rank: 0, .. }))
    ));
    for (rank, worker) in [(0, "w1"), (1, "w1"), (2, "w2")] {
        let row = store
            .claim_rank(&a, 1, rank, worker, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(row.state, "running");
    }
    let waiting = store.latest_reservation(&a).await.unwrap().unwrap();
    assert_eq!(waiting.state, "reserved");
    store.claim_rank(&a, 1, 3, "w2", -1).await.unwrap();
    let started = store.latest_reservation(&a).await.unwrap().unwrap();
    assert_eq!(started.state, "running");
    assert_eq!(
        store
            .heartbeat_rank(&a, 1, 0, "w1", LEASE_MS)
            .await
            .unwrap(),
        JobState::Running
    );

    // Rank 3's lease ran out: the attempt ends, its devices are free, the job is queued.
    assert_eq!(
        store.expire_reservations().await.unwrap(),
        vec![(a.clone(), 1)]
    );
    let ended = store.latest_reservation(&a).await.unwrap().unwrap();
    assert_eq!(ended.state, "released");
    assert!(ended.reason.unwrap().contains("rank 3"));
    assert!(ended.ranks.iter().all(|r| r.state == "released"));
    let job_a = store.get_job_any(&a).await.unwrap().unwrap();
    assert_eq!((job_a.state.as_str(), job_a.restart_count), ("queued", 1));
    assert!(held_by(store.as_ref(), &a).await.is_empty());
    assert!(store.worker_ranks("w2").await.unwrap().is_empty());
    assert!(matches!(
        store.claim_rank(&a, 1, 0, "w1", LEASE_MS).await,
        Err(StoreError::Cluster(ClusterError::AttemptOver {
            attempt: 1,
            ..
        }))
    ));
    assert!(matches!(
        store.heartbeat_rank(&a, 1, 0, "w1", LEASE_MS).await,
        Err(StoreError::Cluster(ClusterError::RankLost { .. }))
    ));

    // B runs now. A's next attempt, on other workers, does not start in time: released, not
    // a restart, and the attempt after it is 3.
    reserved(store.reserve_gang(&b, &b_ranks, LEASE_MS).await.unwrap());
    let a_ranks = [
        place("w1", 0),
        place("w1", 1),
        place("w5", 0),
        place("w5", 1),
    ];
    let second = reserved(store.reserve_gang(&a, &a_ranks, -1).await.unwrap());
    assert_eq!(second.attempt, 2);
    store.claim_rank(&a, 2, 0, "w1", LEASE_MS).await.unwrap();
    assert_eq!(
        store.expire_reservations().await.unwrap(),
        vec![(a.clone(), 2)]
    );
    let late = store.latest_reservation(&a).await.unwrap().unwrap();
    assert!(late.reason.unwrap().contains("did not all start"));
    let job_a = store.get_job_any(&a).await.unwrap().unwrap();
    assert_eq!((job_a.state.as_str(), job_a.restart_count), ("queued", 1));
    assert!(held_by(store.as_ref(), &a).await.is_empty());
    assert_eq!(held_by(store.as_ref(), &b).await.len(), 4);

    // Whatever ends the job (here its success; a gang's ranks carry no claim token yet, so
    // the end is not fenced by one) frees its devices.
    let third = reserved(store.reserve_gang(&a, &a_ranks, LEASE_MS).await.unwrap());
    assert_eq!(third.attempt, 3);
    let done = TransitionChange::default();
    store
        .transition(&a, JobState::Succeeded, done)
        .await
        .unwrap();
    assert!(held_by(store.as_ref(), &a).await.is_empty());
    let over = store.latest_reservation(&a).await.unwrap().unwrap();
    assert_eq!((over.attempt, over.state.as_str()), (3, "released"));
    // A cancel asked while ranks wait ends the job as cancelled when the attempt is released.
    store
        .transition(&b, JobState::Cancelling, TransitionChange::default())
        .await
        .unwrap();
    assert!(store.release_reservation(&b, 1, "test").await.unwrap());
    assert!(!store.release_reservation(&b, 1, "again").await.unwrap());
    assert_eq!(state(store.as_ref(), &b).await, JobState::Cancelled);
    assert!(held_by(store.as_ref(), &b).await.is_empty());

    // A pause asked while the ranks run reaches each rank's heartbeat; when a rank's lease runs
    // out the job ends paused (a restart: its ranks had started).
    let c = queued_job(store.as_ref(), &tenant, 2).await;
    let c_ranks = [place("w1", 0), place("w5", 0)];
    reserved(store.reserve_gang(&c, &c_ranks, LEASE_MS).await.unwrap());
    store.claim_rank(&c, 1, 0, "w1", LEASE_MS).await.unwrap();
    store.claim_rank(&c, 1, 1, "w5", -1).await.unwrap();
    store
        .transition(&c, JobState::Pausing, TransitionChange::default())
        .await
        .unwrap();
    assert_eq!(
        store
            .heartbeat_rank(&c, 1, 0, "w1", LEASE_MS)
            .await
            .unwrap(),
        JobState::Pausing
    );
    assert_eq!(
        store.expire_reservations().await.unwrap(),
        vec![(c.clone(), 1)]
    );
    let job_c = store.get_job_any(&c).await.unwrap().unwrap();
    assert_eq!((job_c.state.as_str(), job_c.restart_count), ("paused", 1));
    assert!(held_by(store.as_ref(), &c).await.is_empty());
}
both_databases!(gang_tests, super::gangs);

/// Eight jobs each need both devices of two neighbouring workers of four, all reserving at
/// once: each ends up with all of its devices or none.
async fn gang_races(url: &str) {
    let store: Arc<dyn Store> = connect(url).await.unwrap();
    let tenant = store.create_tenant("t").await.unwrap().id;
    for w in 0..4 {
        let worker = format!("g{w}");
        store
            .register_worker(&registration(&worker, &worker, 2, true), LEASE_MS)
            .await
            .unwrap();
    }
    let mut jobs = Vec::new();
    for _ in 0..8 {
        jobs.push(queued_job(store.as_ref(), &tenant, 4).await);
    }
    let mut tasks = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let (store, job) = (store.clone(), job.clone());
        let (w0, w1) = (format!("g{}", i % 4), format!("g{}", (i + 1) % 4));
        // Half list their ranks in the other order: locks are still taken in one order.
        let mut ranks = vec![place(&w0, 0), place(&w0, 1), place(&w1, 0), place(&w1, 1)];
        if i % 2 == 1 {
            ranks.reverse();
        }
        tasks.push(tokio::spawn(async move {
            store.reserve_gang(&job, &ranks, LEASE_MS).await
        }));
    }
    let mut won = 0;
    for (task, job) in tasks.into_iter().zip(&jobs) {
        let outcome = task.await.unwrap().unwrap();
        let held = held_by(store.as_ref(), job).await.len();
        match outcome {
            GangOutcome::Reserved(_) => {
                won += 1;
                assert_eq!(held, 4, "{job}");
                assert_eq!(state(store.as_ref(), job).await, JobState::Running);
            }
            GangOutcome::Refused(_) => {
                assert_eq!(held, 0, "{job}");
                assert_eq!(state(store.as_ref(), job).await, JobState::Queued);
            }
        }
    }
    // Four workers hold at most two such gangs, and at least one gang got through.
    assert!((1..=2).contains(&won), "{won} reserved");
}
both_databases!(gang_race_tests, super::gang_races);

async fn rendezvous(url: &str) {
    let store: Arc<dyn Store> = connect(url).await.unwrap();
    let tenant = store.create_tenant("t").await.unwrap().id;
    for w in ["w1", "w2"] {
        store
            .register_worker(&registration(w, w, 1, true), LEASE_MS)
            .await
            .unwrap();
    }
    store
        .register_worker(&registration("w3", "w3", 1, false), LEASE_MS)
        .await
        .unwrap();
    let job = queued_job(store.as_ref(), &tenant, 2).await;
    let one_worker = reserve_across_workers(
        store.as_ref(),
        &job,
        &[place("w1", 0)],
        Duration::from_secs(60),
    )
    .await;
    assert!(matches!(one_worker, Err(GangError::OneWorker { .. })));
    let unsupported = reserve_across_workers(
        store.as_ref(),
        &job,
        &[place("w1", 0), place("w3", 0)],
        Duration::from_secs(60),
    )
    .await;
    let message = unsupported.unwrap_err().to_string();
    assert!(message.contains("w3 cannot run a rank"), "{message}");
    let ranks = [place("w1", 0), place("w2", 0)];
    let first = reserve_across_workers(store.as_ref(), &job, &ranks, Duration::from_secs(60))
        .await
        .unwrap();

    // Both ranks publish and meet: what rank 0 alone publishes reaches rank 1, and each sees
    // both addresses in rank order.
    let blob: Vec<u8> = (0..128).collect();
    let mut meetings = Vec::new();
    for rank in 0..2 {
        let meet = Rendezvous::new(store.clone(), &first, rank, Duration::from_secs(20)).unwrap();
        let blob = blob.clone();
        meetings.push(tokio::spawn(async move {
            if rank == 1 {
                // The other rank waits for this one's address meanwhile.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let address = format!("10.0.0.{rank}:2900{rank}");
            meet.publish(TCP_ADDRESS, address.as_bytes()).await.unwrap();
            if rank == 0 {
                meet.publish(FROM_RANK_0, &blob).await.unwrap();
            }
            let id = meet.wait_for_rank(FROM_RANK_0, 0).await.unwrap();
            let addresses = meet.wait_for_all(TCP_ADDRESS).await.unwrap();
            (id, addresses)
        }));
    }
    for meeting in meetings {
        let (id, addresses) = meeting.await.unwrap();
        assert_eq!(id, blob);
        assert_eq!(
            addresses,
            [b"10.0.0.0:29000".to_vec(), b"10.0.0.1:29001".to_vec()]
        );
    }
    assert!(matches!(
        Rendezvous::new(store.clone(), &first, 2, Duration::from_secs(1)),
        Err(RendezvousError::NoSuchRank { world: 2, .. })
    ));

    // A rank that waits past the deadline says who was missing and releases the attempt.
    let rank0 = Rendezvous::new(store.clone(), &first, 0, Duration::from_millis(300)).unwrap();
    match rank0.wait_for_all("ready").await {
        Err(RendezvousError::Deadline {
            missing, attempt, ..
        }) => {
            assert_eq!((missing, attempt), (vec![0, 1], 1));
        }
        other => panic!("expected the deadline, got {other:?}"),
    }
    assert_eq!(state(store.as_ref(), &job).await, JobState::Queued);
    assert!(held_by(store.as_ref(), &job).await.is_empty());
    let released = store.latest_reservation(&job).await.unwrap().unwrap();
    assert!(released.reason.unwrap().contains("gave up waiting"));
    assert!(matches!(
        store.read_rendezvous(&job, 1, TCP_ADDRESS).await,
        Err(StoreError::Cluster(ClusterError::AttemptOver {
            attempt: 1,
            ..
        }))
    ));
    assert!(matches!(
        store
            .publish_rendezvous(&job, 1, 0, TCP_ADDRESS, b"stale")
            .await,
        Err(StoreError::Cluster(ClusterError::AttemptOver { .. }))
    ));

    // The next attempt starts empty: nothing of attempt 1 is seen.
    let second = reserve_across_workers(store.as_ref(), &job, &ranks, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(second.attempt, 2);
    assert!(
        store
            .read_rendezvous(&job, 2, TCP_ADDRESS)
            .await
            .unwrap()
            .is_empty()
    );
    store
        .publish_rendezvous(&job, 2, 1, TCP_ADDRESS, b"10.0.0.1:29011")
        .await
        .unwrap();
    assert_eq!(
        store.read_rendezvous(&job, 2, TCP_ADDRESS).await.unwrap(),
        [(1, b"10.0.0.1:29011".to_vec())]
    );
    // A rank waiting when its attempt is released elsewhere stops at once.
    let waiter = Rendezvous::new(store.clone(), &second, 1, Duration::from_secs(20)).unwrap();
    let waiting = tokio::spawn(async move { waiter.wait_for_rank(FROM_RANK_0, 0).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        store
            .release_reservation(&job, 2, "a rank died")
            .await
            .unwrap()
    );
    let stopped = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter stops")
        .unwrap();
    assert!(matches!(
        stopped,
        Err(RendezvousError::AttemptOver { attempt: 2, .. })
    ));
}
both_databases!(rendezvous_tests, super::rendezvous);

/// A served worker registers itself; `/v1/devices` lists its devices and every other live
/// worker's, with the holder named only to its tenant; a stopped worker leaves the cluster.
async fn devices_view(url: &str) {
    let server = common::TestServer::start(url).await;
    let store: Arc<dyn Store> = connect(url).await.unwrap();
    for (worker, host) in [("worker_remote1", "far-1"), ("worker_remote2", "far-2")] {
        let mut remote = registration(worker, host, 0, true);
        remote.devices.push(WorkerDevice {
            device_id: "cuda:0".into(),
            kind: "cuda".into(),
            memory_bytes: 80 << 30,
        });
        store.register_worker(&remote, LEASE_MS).await.unwrap();
    }
    // Another tenant's job across the two remote workers (more devices than the served
    // worker has, so it never claims it).
    let other = store.create_tenant("other").await.unwrap().id;
    let theirs = queued_job(store.as_ref(), &other, 3).await;
    let ranks = [
        RankPlacement {
            worker_id: "worker_remote1".into(),
            device_id: "cuda:0".into(),
        },
        RankPlacement {
            worker_id: "worker_remote2".into(),
            device_id: "cuda:0".into(),
        },
    ];
    reserved(store.reserve_gang(&theirs, &ranks, LEASE_MS).await.unwrap());

    let mut devices = server.get_json("/v1/devices").await;
    for _ in 0..100 {
        if devices["data"][0]["host"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        devices = server.get_json("/v1/devices").await;
    }
    let data = devices["data"].as_array().unwrap();
    assert_eq!(data.len(), 4, "{devices}");
    let local = data[0]["worker"].as_str().unwrap().to_owned();
    assert!(local.starts_with("worker_"), "{local}");
    for device in &data[..2] {
        assert_eq!(device["worker"], local.as_str());
        assert_eq!(device["host"], host_name().as_str());
        assert_eq!(device["memory_bytes"], 64 << 20);
        assert_eq!(device["in_use"], false);
    }
    for (device, (worker, host)) in data[2..]
        .iter()
        .zip([("worker_remote1", "far-1"), ("worker_remote2", "far-2")])
    {
        assert_eq!(device["id"], "cuda:0");
        assert_eq!(device["kind"], "cuda");
        assert_eq!(
            (&device["worker"], &device["host"]),
            (&worker.into(), &host.into())
        );
        assert_eq!(device["memory_bytes"], 80_u64 << 30);
        assert_eq!(device["in_use"], true);
        assert!(device["job"].is_null(), "another tenant's job is not named");
    }

    let registered = store.cluster_devices().await.unwrap();
    assert_eq!(
        registered.iter().filter(|d| d.worker_id == local).count(),
        2
    );
    server.stop().await;
    let left = store.cluster_devices().await.unwrap();
    assert!(left.iter().all(|d| d.worker_id != local), "{left:?}");
    assert_eq!(left.len(), 2);
}
both_databases!(devices_view_tests, super::devices_view);
