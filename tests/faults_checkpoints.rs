//! Torn and corrupt checkpoints: a worker is killed mid-job and its newest checkpoint is then
//! truncated (or has one byte altered). The checkpoint list and downloads refuse it, and the
//! next worker resumes from the checkpoint before it with a warning event: every step's metric
//! is recorded once and the final weights equal an uninterrupted run's.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chronospipe::jobs::Capabilities;
use chronospipe::jobs::{ExecRunner, Worker, WorkerConfig, parse_devices};
use common::TestServer;
use serde_json::{Value, json};

const TEXT: &str = "Memory is a small fast cache; keep what is used soon, move the rest. ";

fn body(train: &str) -> Value {
    json!({
        "model": {"hidden_size": 64, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 48, "vocab_size": 256, "init": {"seed": 3}},
        "data": {"train": train},
        "training": {"seq_len": 16, "micro_batch_size": 2, "microbatches": 4, "steps": 24,
                     "checkpoint_every": 4, "optimizer": {"kind": "adamw", "lr": 0.003}},
        "parallelism": {"stages": 2, "schedule": "chronos"}
    })
}

fn worker_config(server: &TestServer, id: &str) -> WorkerConfig {
    WorkerConfig {
        worker_id: id.to_owned(),
        lease: Duration::from_secs(1),
        poll: Duration::from_millis(50),
        ..WorkerConfig::new(
            server.data_dir.path().to_owned(),
            parse_devices("cpu:2x64MiB").unwrap(),
        )
    }
}

/// Runs job `id` on a worker of its own runtime until `step` is recorded, then kills it
/// (its runtime dropped: no checkpoint, no requeue, the lease left to expire).
async fn kill_after(server: &TestServer, url: &str, id: &str, step: i64) {
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (url, config) = (url.to_owned(), worker_config(server, "worker_doomed"));
    doomed.spawn(async move {
        let store = chronospipe::store::connect(&url).await.unwrap();
        let _ = Worker::new(store, Arc::new(ExecRunner), config)
            .try_execute_one()
            .await;
    });
    for _ in 0..2000 {
        let job = server.get_json(&format!("/v1/jobs/{id}")).await;
        if job["progress"]["step"].as_i64().unwrap() >= step {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    doomed.shutdown_background();
}

fn checkpoint_dir(server: &TestServer, id: &str, step: u64) -> PathBuf {
    server
        .data_dir
        .path()
        .join(format!("jobs/{id}/checkpoints/step-{step}"))
}

async fn listed_steps(server: &TestServer, id: &str) -> Vec<i64> {
    let list = server.get_json(&format!("/v1/jobs/{id}/checkpoints")).await;
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_i64().unwrap())
        .collect()
}

async fn download(server: &TestServer, id: &str, step: u64, name: &str) -> reqwest::Response {
    server
        .get(&format!("/v1/jobs/{id}/checkpoints/{step}/files/{name}"))
        .send()
        .await
        .unwrap()
}

async fn warnings(server: &TestServer, id: &str) -> Vec<String> {
    let events = server
        .get_json(&format!("/v1/jobs/{id}/events?after=0&limit=100"))
        .await;
    events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "warning")
        .map(|e| e["data"]["message"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The survivor takes the job once its lease has expired and runs it to its end.
async fn finish_on(survivor: &Arc<Worker>, id: &str) {
    tokio::time::timeout(Duration::from_secs(120), async {
        while survivor.try_execute_one().await.unwrap().as_deref() != Some(id) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the survivor finishes the job");
}

async fn weights(server: &TestServer, id: &str) -> bytes::Bytes {
    let response = download(server, id, 24, "model.safetensors").await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap()
}

async fn torn_and_altered(url: &str) {
    let server =
        TestServer::start_with(url, Capabilities::production(), |o| o.run_worker = false).await;
    let train = server
        .upload("train", "corpus.txt", TEXT.repeat(20).into_bytes())
        .await;
    let job = body(&train);
    let store = chronospipe::store::connect(url).await.unwrap();
    let survivor = Worker::new(
        store,
        Arc::new(ExecRunner),
        worker_config(&server, "survivor"),
    );
    let reference = server.create_job(&job).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    finish_on(&survivor, &reference).await;
    assert!(
        checkpoint_dir(&server, &reference, 24)
            .join("manifest.json")
            .is_file()
    );

    // A truncated file: the list hides the checkpoint, a download refuses it.
    let torn = server.create_job(&job).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    kill_after(&server, url, &torn, 9).await;
    assert_eq!(listed_steps(&server, &torn).await, [4, 8]);
    let model = checkpoint_dir(&server, &torn, 8).join("model.safetensors");
    let len = std::fs::metadata(&model).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_eq!(listed_steps(&server, &torn).await, [4]);
    let refused = download(&server, &torn, 8, "config.json").await;
    assert_eq!(refused.status(), 404);
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["code"], "checkpoint_incomplete", "{problem}");

    // One altered byte keeps the size: the download's sha256 check refuses the file.
    let altered = server.create_job(&job).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    kill_after(&server, url, &altered, 9).await;
    let optimizer = checkpoint_dir(&server, &altered, 8).join("optimizer.safetensors");
    let mut bytes = std::fs::read(&optimizer).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&optimizer, &bytes).unwrap();
    let refused = download(&server, &altered, 8, "optimizer.safetensors").await;
    assert_eq!(refused.status(), 404);
    assert_eq!(
        download(&server, &altered, 4, "optimizer.safetensors")
            .await
            .status(),
        200
    );

    let expected_weights = weights(&server, &reference).await;
    for (id, why) in [
        (&torn, "model.safetensors holds"),
        (
            &altered,
            "optimizer.safetensors differs from its manifest's sha256",
        ),
    ] {
        finish_on(&survivor, id).await;
        let job = server.get_json(&format!("/v1/jobs/{id}")).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["restart_count"], 1, "{job}");
        let warnings = warnings(&server, id).await;
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("checkpoint of step 8") && w.contains(why)),
            "{warnings:?}"
        );
        assert!(
            warnings
                .iter()
                .all(|w| !w.contains(server.data_dir.path().to_str().unwrap())),
            "a warning shows a server path: {warnings:?}"
        );
        assert_eq!(
            server.metric_steps(id).await,
            (1..=24).collect::<Vec<_>>(),
            "each step's metric once"
        );
        assert_eq!(listed_steps(&server, id).await, [4, 8, 12, 16, 20, 24]);
        assert!(
            weights(&server, id).await == expected_weights,
            "the resumed job's weights differ from the uninterrupted run's"
        );
    }
    server.stop().await;
}
both_databases!(torn_and_altered_tests, super::torn_and_altered);
