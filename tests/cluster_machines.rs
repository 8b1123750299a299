//! Machines, not workers: two `chronospipe worker --devices cpu:2x64MiB` processes on this one
//! box, told they run on two machines (`CHRONOSPIPE_MACHINE`, as `--machine` would), with the
//! API alone (`serve --no-worker`) on one PostgreSQL database of this test's own. A job too big
//! for either runs across both; before its first step its ranks measure the link between the
//! two machines, which the store keeps and `GET /v1/devices` lists, and its final weights are
//! still bit-identical to `chronospipe train` of the job in one process (measuring sends
//! nothing the training sees). A job naming no `devices` is then planned over the cluster
//! with that measured link, and says so.

#[path = "common/cluster_job.rs"]
mod cluster_job;
mod common;
#[path = "common/worker_process.rs"]
mod worker_process;

use std::time::{Duration, Instant};

use chronospipe::store::connect;
use cluster_job::{Cluster, cluster, finished, sharded_weights, train_in_one_process};
use common::TestServer;
use serde_json::{Value, json};
use worker_process::{WorkerProcess, tails};

const TEXT: &str = "Two machines on one box measure the link between them. ";
const LEASE_SECONDS: &str = "3";
const STEPS: u64 = 6;
const MACHINES: [&str; 2] = ["machine-a", "machine-b"];

/// Two stages, 12 micro-batches a step; `devices` named or left to the cluster's planning.
fn body(train: &str, devices: Option<&str>, replicas: Value) -> Value {
    let mut body = json!({
        "model": {"hidden_size": 32, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 48, "vocab_size": 256, "init": {"seed": 3}},
        "data": {"train": train},
        "training": {"seq_len": 16, "micro_batch_size": 1, "microbatches": 12, "steps": STEPS,
                     "checkpoint_every": 3, "optimizer": {"kind": "adamw", "lr": 0.01},
                     "seed": 5},
        "parallelism": {"stages": 2, "schedule": "1f1b", "data_parallel": replicas}
    });
    if let Some(devices) = devices {
        body["devices"] = devices.into();
    }
    body
}

/// Waits until the two workers have registered their four devices.
async fn both_registered(server: &TestServer, workers: &[WorkerProcess]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let devices = server.get_json("/v1/devices").await;
        let hosts: Vec<&str> = (devices["data"].as_array().unwrap().iter())
            .filter(|d| d["worker"].is_string())
            .filter_map(|d| d["host"].as_str())
            .collect();
        if hosts.len() == 4 {
            return devices;
        }
        assert!(
            Instant::now() < deadline,
            "{devices}\n{}",
            tails(workers, &[], 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ranks_on_two_machines_measure_the_link_between_them() {
    let Cluster {
        db,
        server,
        train,
        data_dir,
        logs,
    } = cluster(&TEXT.repeat(40)).await;
    let workers: Vec<WorkerProcess> = (0..2)
        .map(|n| {
            let env = [("CHRONOSPIPE_MACHINE", MACHINES[n])];
            WorkerProcess::start_with_env(&db.url, &data_dir, logs.path(), n, LEASE_SECONDS, &env)
        })
        .collect();
    let devices = both_registered(&server, &workers).await;
    let mut hosts: Vec<&str> = (devices["data"].as_array().unwrap().iter())
        .filter_map(|d| d["host"].as_str())
        .collect();
    hosts.sort();
    hosts.dedup();
    assert_eq!(
        hosts, MACHINES,
        "each worker on the machine it was told: {devices}"
    );
    assert_eq!(devices["links"], json!([]), "nothing measured yet");

    // Two stages x two replicas on four devices: two ranks on each machine.
    let reference_dir = tempfile::tempdir().unwrap();
    let reference = tokio::task::spawn_blocking({
        let dir = reference_dir.path().to_owned();
        move || {
            let corpus = dir.join("corpus.txt");
            std::fs::write(&corpus, TEXT.repeat(40)).unwrap();
            let spec = body(corpus.to_str().unwrap(), Some("cpu:4x64MiB"), 2.into());
            std::fs::write(dir.join("job.json"), spec.to_string()).unwrap();
            train_in_one_process(&dir.join("job.json"), &dir.join("out"))
        }
    });
    let named = body(&train, Some("cpu:4x64MiB"), 2.into());
    let named = server.create_job(&named).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    finished(&server, &named, &workers, &[], Duration::from_secs(180)).await;
    let (_, across) = sharded_weights(&server, &named, STEPS).await;
    let reference = reference.await.unwrap();
    assert!(!across.is_empty());
    assert!(
        across == reference,
        "the weights across two machines differ from one process's"
    );
    let store = connect(&db.url).await.unwrap();
    let links = store.network_links().await.unwrap();
    assert_eq!(links.len(), 1, "one pair of machines: {links:?}");
    let link = &links[0];
    assert_eq!(
        (link.machine_a.as_str(), link.machine_b.as_str()),
        (MACHINES[0], MACHINES[1])
    );
    // Loopback: far above a megabyte a second, far below ten milliseconds a message.
    assert!(
        link.bytes_per_s > 1e6 && link.bytes_per_s.is_finite(),
        "{link:?}"
    );
    assert!(link.latency_s > 0.0 && link.latency_s < 0.01, "{link:?}");
    let devices = server.get_json("/v1/devices").await;
    let listed = devices["links"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{devices}");
    assert_eq!(listed[0]["machines"], json!(MACHINES));
    // The store's figures, through JSON: serde_json's default float parsing may land one ulp
    // away from the number printed.
    for (field, stored) in [
        ("bytes_per_s", link.bytes_per_s),
        ("latency_s", link.latency_s),
    ] {
        let listed = listed[0][field].as_f64().unwrap();
        assert!(
            (listed - stored).abs() <= 1e-12 * stored.abs(),
            "{field}: {listed} listed, {stored} stored"
        );
    }

    // Planned over the cluster: the placement is costed by the measured link, and says so.
    // Two stages x two replicas need both machines (with "auto" replicas, the measured link
    // may rightly keep two stages on one worker).
    let planned = body(&train, None, 2.into());
    let planned = server.create_job(&planned).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    finished(&server, &planned, &workers, &[], Duration::from_secs(180)).await;
    let events = server
        .get_json(&format!("/v1/jobs/{planned}/events?limit=100"))
        .await;
    let said: Vec<&str> = (events["data"].as_array().unwrap().iter())
        .filter_map(|e| e["data"]["message"].as_str())
        .filter(|m| m.starts_with("planned over the cluster"))
        .collect();
    assert_eq!(said.len(), 1, "{events}");
    assert!(
        said[0].contains("GB/s (measured)") && said[0].contains("ms (measured)"),
        "{}",
        said[0]
    );

    drop(workers);
    let _ = server.stop().await;
    db.drop().await;
}
