//! Full disks: the service's data directory on a small tmpfs this test mounts (skipped, with a
//! message, where it cannot mount). A checkpoint that does not fit fails the job as
//! `storage_full` (the service's fault, no server path in the message), or pauses it with
//! `training.on_storage_error: "pause"` until space is freed; the checkpoint before it stays
//! complete and no partial files remain. An upload that does not fit answers 507 and leaves
//! nothing. The service keeps serving throughout.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use chronospipe::jobs::Capabilities;
use common::TestServer;
use serde_json::{Value, json};

const TEXT: &str = "Memory is a small fast cache; keep what is used soon, move the rest. ";
/// About one checkpoint of the model below (its weights and AdamW moments are ~1.4 MiB).
const ONE_CHECKPOINT_AND_A_HALF: u64 = 2200 << 10;

/// A tmpfs mounted on a fresh directory, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(out) if out.status.success() => Some(Tmpfs(dir)),
            Ok(out) => {
                println!(
                    "skipped: cannot mount a tmpfs here: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                println!("skipped: cannot run mount: {e}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Fills the file system, then gives back all but `free` bytes of the filling.
    fn leave_free(&self, free: u64) {
        let ballast = self.ballast();
        let mut file = std::fs::File::create(&ballast).unwrap();
        let chunk = vec![0u8; 64 << 10];
        let mut written = 0u64;
        while file.write_all(&chunk).is_ok() {
            written += chunk.len() as u64;
        }
        drop(file);
        let len = std::fs::metadata(&ballast).unwrap().len().min(written);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&ballast)
            .unwrap()
            .set_len(len.saturating_sub(free))
            .unwrap();
    }

    fn free_all(&self) {
        let _ = std::fs::remove_file(self.ballast());
    }

    fn ballast(&self) -> PathBuf {
        self.path().join("ballast")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

fn body(train: &str, on_storage_error: &str) -> Value {
    json!({
        "model": {"hidden_size": 64, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 48, "vocab_size": 256, "init": {"seed": 3}},
        "data": {"train": train},
        "training": {"seq_len": 16, "micro_batch_size": 2, "microbatches": 4, "steps": 12,
                     "checkpoint_every": 4, "optimizer": {"kind": "adamw", "lr": 0.003},
                     "on_storage_error": on_storage_error},
        "parallelism": {"stages": 2, "schedule": "chronos"}
    })
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

fn checkpoint_entries(server: &TestServer, id: &str) -> Vec<String> {
    let dir = server
        .data_dir
        .path()
        .join(format!("jobs/{id}/checkpoints"));
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

async fn weights(server: &TestServer, id: &str) -> bytes::Bytes {
    let path = format!("/v1/jobs/{id}/checkpoints/12/files/model.safetensors");
    let response = server.get(&path).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap()
}

async fn full_disks(url: &str) {
    let Some(tmpfs) = Tmpfs::mount("24m") else {
        return;
    };
    let data_dir = tempfile::tempdir_in(tmpfs.path()).unwrap();
    let server = TestServer::start_in(url, Capabilities::production(), data_dir, |_| {}).await;
    let train = server
        .upload("train", "corpus.txt", TEXT.repeat(20).into_bytes())
        .await;
    let server_path = tmpfs.path().to_str().unwrap().to_owned();

    // Room for one checkpoint, not two: the job fails at its second, the first stays whole.
    tmpfs.leave_free(ONE_CHECKPOINT_AND_A_HALF);
    let failed = server.create_job(&body(&train, "fail")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let job = server.wait_for(&failed, "failed").await;
    assert_eq!(job["error"]["code"], "storage_full", "{job}");
    assert_eq!(job["error"]["fault"], "service", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(!message.contains(&server_path), "a server path: {message}");
    assert_eq!(listed_steps(&server, &failed).await, [4]);
    assert_eq!(
        checkpoint_entries(&server, &failed),
        ["step-4"],
        "no partial files"
    );
    assert_eq!(
        server.metric_steps(&failed).await,
        (1..=8).collect::<Vec<_>>()
    );

    // An upload that does not fit: 507, and nothing of it left on disk.
    let files_before = std::fs::read_dir(server.data_dir.path().join("files"))
        .unwrap()
        .count();
    let big = vec![b'x'; 4 << 20];
    let form = reqwest::multipart::Form::new()
        .text("purpose", "train")
        .part(
            "file",
            reqwest::multipart::Part::bytes(big).file_name("big.txt"),
        );
    let refused = server
        .post("/v1/files")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 507);
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["code"], "storage_full", "{problem}");
    assert!(!problem["detail"].as_str().unwrap().contains(&server_path));
    let files_after = std::fs::read_dir(server.data_dir.path().join("files"))
        .unwrap()
        .count();
    assert_eq!(files_after, files_before, "no partial upload is left");
    // The refused upload's connection is closed unread; a new client asks on.
    let client = reqwest::Client::new();
    for path in ["/healthz", "/readyz"] {
        let answer = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(answer.status(), 200, "{path}");
    }

    // With "pause", the same job waits; once space is freed it resumes and finishes.
    tmpfs.free_all();
    tmpfs.leave_free(ONE_CHECKPOINT_AND_A_HALF);
    let paused = server.create_job(&body(&train, "pause")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let job = server.wait_for(&paused, "paused").await;
    assert!(job["error"].is_null(), "{job}");
    assert_eq!(listed_steps(&server, &paused).await, [4]);
    assert_eq!(checkpoint_entries(&server, &paused), ["step-4"]);
    tmpfs.free_all();
    let resumed = server
        .post(&format!("/v1/jobs/{paused}/resume"))
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 200, "{}", resumed.text().await.unwrap());
    server.wait_for(&paused, "succeeded").await;
    assert_eq!(
        server.metric_steps(&paused).await,
        (1..=12).collect::<Vec<_>>(),
        "each step's metric once"
    );

    // The paused-and-resumed job ends where an uninterrupted one does.
    let reference = server.create_job(&body(&train, "fail")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    server.wait_for(&reference, "succeeded").await;
    assert!(weights(&server, &paused).await == weights(&server, &reference).await);

    // Other values are refused by name.
    let bad = server
        .post("/v1/jobs")
        .json(&body(&train, "retry"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    let problem: Value = bad.json().await.unwrap();
    assert_eq!(problem["param"], "training.on_storage_error", "{problem}");
    let _ = server.stop().await;
}
both_databases!(full_disk_tests, super::full_disks);
