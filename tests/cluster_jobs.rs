//! Jobs across worker processes: the API alone (`serve --no-worker`) plus three
//! `chronospipe worker --devices cpu:2x64MiB` processes on one PostgreSQL database (a database
//! of this test's own on the `DATABASE_URL` server). A job planned over 6 devices is too big
//! for any one worker: it is reserved across the three, each runs its ranks inside itself,
//! they meet through the store's rendezvous rows and train over TCP. Its final weights are
//! bit-identical to `chronospipe train` of the same job on `cpu:6x64MiB` in one process. Then
//! a worker is killed with SIGKILL mid-job and another started: the job is requeued once,
//! resumes from its last complete checkpoint, records each step's metric once and ends with
//! the same weights. Last, two jobs that each need 4 of the 6 devices both finish, one after
//! the other.

#[path = "common/cluster_job.rs"]
mod cluster_job;
mod common;
#[path = "common/worker_process.rs"]
mod worker_process;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use cluster_job::{Cluster, cluster, finished, sharded_weights, train_in_one_process};
use serde_json::{Value, json};
use worker_process::{WorkerProcess, tails};

const TEXT: &str = "Ranks on three workers meet through the store and talk over sockets. ";
const STEPS: u64 = 300;
const LEASE_SECONDS: &str = "3";

fn body(train: &str, stages: u64, replicas: u64, steps: u64) -> Value {
    json!({
        "model": {"hidden_size": 32, "num_layers": 6, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 48, "vocab_size": 256, "init": {"seed": 11}},
        "data": {"train": train},
        "training": {"seq_len": 16, "micro_batch_size": 2, "microbatches": 4, "steps": steps,
                     "checkpoint_every": 4, "grad_clip": 1.0,
                     "optimizer": {"kind": "adamw", "lr": 0.01}, "seed": 5},
        "parallelism": {"stages": stages, "schedule": "1f1b", "data_parallel": replicas},
        "devices": format!("cpu:{}x64MiB", stages * replicas)
    })
}

/// `chronospipe train` of the same job in one process on `cpu:6x64MiB`.
fn one_process_weights(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, TEXT.repeat(40)).unwrap();
    let job = dir.join("job.json");
    let spec = body(corpus.to_str().unwrap(), 3, 2, STEPS);
    std::fs::write(&job, spec.to_string()).unwrap();
    train_in_one_process(&job, &dir.join("out"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_too_big_for_one_worker_runs_across_three() {
    let Cluster {
        db,
        server,
        train,
        data_dir,
        logs,
    } = cluster(&TEXT.repeat(40)).await;
    let mut workers: Vec<WorkerProcess> = (0..3)
        .map(|n| WorkerProcess::start(&db.url, &data_dir, logs.path(), n, LEASE_SECONDS))
        .collect();
    let mut dead = Vec::new();
    let reference_dir = tempfile::tempdir().unwrap();
    let reference = tokio::task::spawn_blocking({
        let dir = reference_dir.path().to_owned();
        move || one_process_weights(&dir)
    });

    // Across the three workers: 2 replicas x 3 stages, six ranks.
    let whole = server.create_job(&body(&train, 3, 2, STEPS)).await;
    let whole = whole["id"].as_str().unwrap().to_owned();
    let job = finished(&server, &whole, &workers, &dead, Duration::from_secs(240)).await;
    assert_eq!(job["restart_count"], 0, "{job}");
    let (files, across) = sharded_weights(&server, &whole, STEPS).await;
    assert!(files > 1, "one shard per writing rank: {files} files");
    let reference = reference.await.unwrap();
    assert!(!across.is_empty());
    assert!(
        across == reference,
        "the weights across workers differ from one process's"
    );
    let devices = server.get_json("/v1/devices").await;
    let listed: Vec<&Value> = (devices["data"].as_array().unwrap().iter())
        .filter(|d| d["worker"].is_string())
        .collect();
    assert_eq!(listed.len(), 6, "the three workers' devices: {devices}");
    assert!(
        listed.iter().all(|d| d["in_use"] == false),
        "the job's end freed its devices: {devices}"
    );

    // A worker killed mid-job, another started: requeued once, resumed, the same weights.
    let killed_job = server.create_job(&body(&train, 3, 2, STEPS)).await;
    let killed_job = killed_job["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let job = server.get_json(&format!("/v1/jobs/{killed_job}")).await;
        if job["latest_metrics"]["step"].as_u64().unwrap_or(0) >= 40 {
            assert_eq!(job["status"], "running", "too late to kill: {job}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "job never got going: {job}\n{}",
            tails(&workers, &dead, 20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let victim = workers.remove(1);
    // `Child::kill` is SIGKILL: no goodbye, no lease given back.
    dead.push(victim.kill());
    workers.push(WorkerProcess::start(
        &db.url,
        &data_dir,
        logs.path(),
        3,
        LEASE_SECONDS,
    ));
    let job = finished(
        &server,
        &killed_job,
        &workers,
        &dead,
        Duration::from_secs(240),
    )
    .await;
    assert_eq!(
        job["restart_count"],
        1,
        "{job}\n{}",
        tails(&workers, &dead, 20)
    );
    assert_eq!(
        server.metric_steps(&killed_job).await,
        (1..=STEPS as i64).collect::<Vec<_>>(),
        "each step's metric once"
    );
    let (files, resumed) = sharded_weights(&server, &killed_job, STEPS).await;
    assert!(files > 1, "one shard per writing rank: {files} files");
    assert!(
        resumed == reference,
        "the resumed job's weights differ from an uninterrupted run's"
    );

    // Two jobs each needing 4 of the 6 devices: never each holding part; both finish.
    let a = server.create_job(&body(&train, 2, 2, 8)).await;
    let b = server.create_job(&body(&train, 2, 2, 8)).await;
    for id in [&a, &b] {
        let id = id["id"].as_str().unwrap();
        let job = finished(&server, id, &workers, &dead, Duration::from_secs(240)).await;
        assert_eq!(job["restart_count"], 0, "{job}");
    }

    drop(workers);
    let _ = server.stop().await;
    db.drop().await;
}
