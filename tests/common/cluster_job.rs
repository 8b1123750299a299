//! A job across worker processes, seen through the API: the API on its own database with the
//! training text uploaded, waiting for a job's end, its sharded checkpoint's tensors; and the
//! same job trained in one process.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{TestDb, TestServer};
use crate::worker_process::{WorkerProcess, tails};

/// What a test of worker processes starts from: the API (no worker of its own) on a new
/// PostgreSQL database, the training text uploaded (`train`, its file id), the shared data
/// directory and a folder for the workers' logs.
pub struct Cluster {
    pub db: TestDb,
    pub server: TestServer,
    pub train: String,
    pub data_dir: PathBuf,
    pub logs: tempfile::TempDir,
}

pub async fn cluster(text: &str) -> Cluster {
    let db = TestDb::postgres().await;
    let server = TestServer::api_for_workers(&db.url).await;
    let train = (server.upload("train", "corpus.txt", text.as_bytes().to_vec())).await;
    let data_dir = server.data_dir.path().to_owned();
    Cluster {
        db,
        server,
        train,
        data_dir,
        logs: tempfile::tempdir().unwrap(),
    }
}

/// Polls until the job ends; panics with the workers' logs if it fails or takes longer than
/// `within`.
pub async fn finished(
    server: &TestServer,
    id: &str,
    workers: &[WorkerProcess],
    dead: &[PathBuf],
    within: Duration,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let job = server.get_json(&format!("/v1/jobs/{id}")).await;
        match job["status"].as_str() {
            Some("succeeded") => return job,
            Some("failed" | "cancelled") => {
                panic!("job {id} ended badly: {job}\n{}", tails(workers, dead, 30))
            }
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "job {id} unfinished: {job}\n{}",
            tails(workers, dead, 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every tensor of a safetensors file, by name, as raw bytes.
pub fn tensors(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let file = safetensors::SafeTensors::deserialize(bytes).unwrap();
    (file.tensors().into_iter())
        .map(|(name, view)| (name, view.data().to_vec()))
        .collect()
}

/// The weights of the job's checkpoint after `step` in Hugging Face's sharded layout (every
/// file its index names, downloaded through the API), and how many files there were.
pub async fn sharded_weights(
    server: &TestServer,
    id: &str,
    step: u64,
) -> (usize, BTreeMap<String, Vec<u8>>) {
    let download = |file: String| async move {
        let path = format!("/v1/jobs/{id}/checkpoints/{step}/files/{file}");
        let response = server.get(&path).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        response.bytes().await.unwrap()
    };
    let index: Value =
        serde_json::from_slice(&download("model.safetensors.index.json".into()).await).unwrap();
    let files: BTreeSet<String> = (index["weight_map"].as_object().unwrap())
        .values()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect();
    let mut all = BTreeMap::new();
    for file in &files {
        all.extend(tensors(&download(file.clone()).await));
    }
    (files.len(), all)
}

/// `chronospipe train JOB --out OUT` in one process: its final weights.
pub fn train_in_one_process(job: &Path, out: &Path) -> BTreeMap<String, Vec<u8>> {
    let ran = Command::new(env!("CARGO_BIN_EXE_chronospipe"))
        .arg("train")
        .arg(job)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&ran.stderr);
    assert!(ran.status.success(), "{log}");
    tensors(&std::fs::read(out.join("final/model.safetensors")).unwrap())
}
