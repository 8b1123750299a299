//! Jobs that name no `devices`, planned over the cluster: the API alone (`serve --no-worker`)
//! and `chronospipe worker --devices cpu:2x64MiB` processes on one PostgreSQL database (a
//! database of this test's own on the `DATABASE_URL` server), each job `data_parallel: "auto"`.
//! The workers share this machine and are told so through their network's figures (loopback:
//! 100 GB/s, 1 us), so the degrees chosen over the cluster use every free device.
//!
//! First a rendezvous that never completes: one of three workers exits as soon as it finds a
//! rank reserved on its devices (`CHRONOSPIPE_FAULT_EXIT_BEFORE_RENDEZVOUS`), so the job
//! planned over all six devices never meets; its reservation is released, it is not counted
//! as a restart, and the job runs later, planned again over the four devices left. Then, with
//! a third worker again, a job planned over six devices loses a worker to SIGKILL mid-job and
//! no replacement comes: it resumes from its last complete checkpoint planned over the four
//! devices left, records each step's metric once, ends with restart count 1 and with the
//! weights of a one-process run resumed from that checkpoint on four devices, bit for bit
//! (and those of an uninterrupted six-device run within rounding: another plan sums in
//! another order).

#[path = "common/cluster_job.rs"]
mod cluster_job;
mod common;
#[path = "common/run_log.rs"]
mod run_log;
#[path = "common/worker_process.rs"]
mod worker_process;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use chronospipe::exec::run::{Run, drive};
use chronospipe::spec::JobSpec;
use cluster_job::{Cluster, cluster, finished, sharded_weights, tensors, train_in_one_process};
use common::TestServer;
use run_log::RunLog;
use serde_json::{Value, json};
use worker_process::{WorkerProcess, tails};

const TEXT: &str = "A cluster shrinks; the job carries on with what is left of it. ";
const STEPS: u64 = 120;
const LEASE_SECONDS: &str = "3";
const FAULT: &str = "CHRONOSPIPE_FAULT_EXIT_BEFORE_RENDEZVOUS";
/// Two stages, as many replicas as the devices allow (3 on six, 2 on four): 12
/// micro-batches share out either way.
fn body(train: &str, steps: u64) -> Value {
    json!({
        "model": {"hidden_size": 32, "num_layers": 6, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 48, "vocab_size": 256, "init": {"seed": 17}},
        "data": {"train": train},
        "training": {"seq_len": 16, "micro_batch_size": 1, "microbatches": 12, "steps": steps,
                     "checkpoint_every": 4, "grad_clip": 1.0,
                     "optimizer": {"kind": "adamw", "lr": 0.01}, "seed": 5},
        "parallelism": {"stages": 2, "schedule": "1f1b", "data_parallel": "auto"}
    })
}

async fn job(server: &TestServer, id: &str) -> Value {
    server.get_json(&format!("/v1/jobs/{id}")).await
}

/// Waits until the live workers' devices are `count`.
async fn cluster_of(server: &TestServer, count: usize, workers: &[WorkerProcess]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let devices = server.get_json("/v1/devices").await;
        let listed = (devices["data"].as_array().unwrap().iter())
            .filter(|d| d["worker"].is_string())
            .count();
        if listed == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{listed} devices, not {count}: {devices}\n{}",
            tails(workers, &[], 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The job's body in `dir` with its corpus, on `devices`.
fn local_body(dir: &Path, devices: &str) -> Value {
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, TEXT.repeat(40)).unwrap();
    let mut spec = body(corpus.to_str().unwrap(), STEPS);
    spec["devices"] = devices.into();
    spec
}

/// `chronospipe train` of the same job in one process on `cpu:6x64MiB`, into `dir/out`.
fn six_device_weights(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let job = dir.join("job.json");
    std::fs::write(&job, local_body(dir, "cpu:6x64MiB").to_string()).unwrap();
    train_in_one_process(&job, &dir.join("out"))
}

/// The six-device run of `dir/out` resumed in one process from its checkpoint after `step`
/// on four devices, two stages x two replicas (what the cluster planned after losing a
/// worker).
fn resumed_on_four(dir: &Path, step: u64) -> BTreeMap<String, Vec<u8>> {
    let mut spec = local_body(dir, "cpu:4x64MiB");
    spec["parallelism"]["data_parallel"] = 2.into();
    let spec = JobSpec::from_json(&spec.to_string()).unwrap();
    let mut run = Run::prepare(spec, "").unwrap();
    let checkpoint = dir.join("out").join(format!("step-{step}"));
    assert_eq!(run.resume_from(&checkpoint).unwrap().step, step);
    let out = dir.join(format!("resumed-{step}"));
    drive(&mut run, &mut RunLog::new(&out)).unwrap();
    tensors(&std::fs::read(out.join("final/model.safetensors")).unwrap())
}

/// The step of the checkpoint the job resumed from: the newest recorded before it was
/// requeued.
async fn resumed_from(server: &TestServer, id: &str) -> u64 {
    let events = all_events(server, id).await;
    let requeued = (events.iter())
        .filter(|e| e["kind"] == "state" && e["data"]["from"] == "running")
        .find(|e| e["data"]["to"] == "queued")
        .map(|e| e["created_at"].as_i64().unwrap())
        .unwrap_or_else(|| panic!("never requeued: {events:?}"));
    let checkpoints = server
        .get_json(&format!("/v1/jobs/{id}/checkpoints?limit=100"))
        .await;
    (checkpoints["data"].as_array().unwrap().iter())
        .filter(|c| c["created_at"].as_i64().unwrap() <= requeued)
        .map(|c| c["step"].as_u64().unwrap())
        .max()
        .unwrap_or_else(|| panic!("no checkpoint before {requeued}: {checkpoints}"))
}

/// Every event of the job, page by page.
async fn all_events(server: &TestServer, id: &str) -> Vec<Value> {
    let mut events: Vec<Value> = Vec::new();
    loop {
        let after = events.last().map_or(0, |e| e["id"].as_i64().unwrap());
        let path = format!("/v1/jobs/{id}/events?after={after}&limit=100");
        let page = server.get_json(&path).await;
        let data = page["data"].as_array().unwrap();
        if data.is_empty() {
            return events;
        }
        events.extend(data.iter().cloned());
    }
}

/// sqrt(sum (a - b)^2 / sum b^2) over every tensor, their bytes read as f32.
fn relative(a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let f32s = |bytes: &[u8]| -> Vec<f64> {
        (bytes.chunks_exact(4))
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
            .collect()
    };
    let (mut diff, mut norm) = (0.0, 0.0);
    for (x, y) in a.values().zip(b.values()) {
        for (x, y) in f32s(x).into_iter().zip(f32s(y)) {
            diff += (x - y).powi(2);
            norm += y.powi(2);
        }
    }
    (diff / norm).sqrt()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_planned_over_the_cluster_survive_losing_workers() {
    let Cluster {
        db,
        server,
        train,
        data_dir,
        logs,
    } = cluster(&TEXT.repeat(40)).await;
    // The workers share this machine: their links cost nothing in the plan.
    let start = |n: usize| WorkerProcess::start(&db.url, &data_dir, logs.path(), n, LEASE_SECONDS);
    let reference_dir = tempfile::tempdir().unwrap();
    let reference = tokio::task::spawn_blocking({
        let dir = reference_dir.path().to_owned();
        move || six_device_weights(&dir)
    });

    // A worker that dies between the reservation and the rendezvous.
    let env = [(FAULT, "1")];
    let faulty =
        WorkerProcess::start_with_env(&db.url, &data_dir, logs.path(), 2, LEASE_SECONDS, &env);
    let mut workers = vec![start(0), start(1), faulty];
    cluster_of(&server, 6, &workers).await;
    let never_met = server.create_job(&body(&train, 8)).await;
    assert_eq!(never_met["plan"]["devices"], 6, "{never_met}");
    let never_met = never_met["id"].as_str().unwrap().to_owned();
    let done = finished(&server, &never_met, &workers, &[], Duration::from_secs(150)).await;
    assert_eq!(
        done["restart_count"], 0,
        "an attempt that never met: {done}"
    );
    assert_eq!(
        done["plan"]["devices"], 4,
        "planned again over four: {done}"
    );
    let mut faulty = workers.remove(2);
    let mut dead = vec![faulty.log.clone()];
    assert_eq!(
        faulty.child.try_wait().unwrap().and_then(|s| s.code()),
        Some(86),
        "the faulty worker exited at its reservation\n{}",
        tails(&workers, &dead, 30)
    );
    let events = all_events(&server, &never_met).await;
    let requeued = (events.iter())
        .filter(|e| e["kind"] == "state" && e["data"]["to"] == "queued")
        .count();
    assert_eq!(
        requeued, 2,
        "queued when made, released once, then run: {events:?}"
    );
    let planned: Vec<&str> = (events.iter())
        .filter(|e| e["kind"] == "info")
        .filter_map(|e| e["data"]["message"].as_str())
        .filter(|m| m.starts_with("planned over the cluster"))
        .collect();
    assert_eq!(planned.len(), 2, "{planned:?}");
    assert!(
        planned[0].contains("cpu:6x64MiB: 2 stages x 3 replicas"),
        "{planned:?}"
    );
    assert!(
        planned[1].contains("cpu:4x64MiB: 2 stages x 2 replicas"),
        "{planned:?}"
    );

    // Six devices again; a worker killed mid-job and none to replace it.
    workers.push(start(3));
    cluster_of(&server, 6, &workers).await;
    let elastic = server.create_job(&body(&train, STEPS)).await;
    let elastic = elastic["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let job = job(&server, &elastic).await;
        if job["latest_metrics"]["step"].as_u64().unwrap_or(0) >= 30 {
            assert_eq!(job["status"], "running", "too late to kill: {job}");
            assert_eq!(job["devices"].as_array().unwrap().len(), 6, "{job}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "job never got going: {job}\n{}",
            tails(&workers, &dead, 20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // `Child::kill` is SIGKILL: no goodbye, no lease given back.
    dead.push(workers.remove(1).kill());
    let done = finished(&server, &elastic, &workers, &dead, Duration::from_secs(150)).await;
    assert_eq!(
        done["restart_count"],
        1,
        "{done}\n{}",
        tails(&workers, &dead, 20)
    );
    assert_eq!(done["plan"]["devices"], 4, "resumed over four: {done}");
    assert_eq!(
        server.metric_steps(&elastic).await,
        (1..=STEPS as i64).collect::<Vec<_>>(),
        "each step's metric once"
    );
    // Exactly a one-process run resumed the same way; and near the uninterrupted run (each
    // of the ~90 steps after the resume sums its gradients in another order).
    let (_, across) = sharded_weights(&server, &elastic, STEPS).await;
    let reference = reference.await.unwrap();
    let step = resumed_from(&server, &elastic).await;
    let dir = reference_dir.path().to_owned();
    let resumed = tokio::task::spawn_blocking(move || resumed_on_four(&dir, step));
    assert!(
        across == resumed.await.unwrap(),
        "the weights differ from one process resumed from step {step} on four devices"
    );
    let off = relative(&across, &reference);
    eprintln!("resumed from step {step}: {off:e} from an uninterrupted six-device run");
    assert!(off <= 1e-3, "{off:e} from an uninterrupted six-device run");

    drop(faulty);
    drop(workers);
    let _ = server.stop().await;
    db.drop().await;
}
