//! A plan spread over processes: `chronospipe train --rank R --peers ...` on localhost, each
//! process running a block of the plan's CPU devices and reaching the others over TCP. This is
//! how the distributed path is tested on one machine without GPUs: the final weights and
//! optimizer state must be bit-identical to the same plan in one process, and a killed rank
//! must stop the others with an error naming it, not a hang.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn chronospipe() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chronospipe"));
    for (key, _) in std::env::vars() {
        if key.starts_with("CHRONOSPIPE_") || key == "DATABASE_URL" {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// A job file of a small model on `stages` x `replicas` CPU devices, `steps` steps with a
/// checkpoint every 2. Each replica keeps the whole optimizer state (ranks do not shard it),
/// so one process runs the same plan.
fn job(dir: &Path, stages: usize, replicas: usize, steps: u64) -> PathBuf {
    let corpus = dir.join("corpus.txt");
    let text = "Ranks pass activations and gradients over sockets, in the same order. ".repeat(60);
    std::fs::write(&corpus, text).unwrap();
    let spec = format!(
        r#"{{"model": {{"hidden_size": 32, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                     "intermediate_size": 48, "vocab_size": 256, "init": {{"seed": 11}}}},
            "data": {{"train": {corpus:?}}},
            "training": {{"seq_len": 16, "micro_batch_size": 2, "microbatches": 4,
                         "steps": {steps}, "checkpoint_every": 2, "grad_clip": 1.0,
                         "optimizer": {{"kind": "adamw", "lr": 0.01}}, "shuffle": true,
                         "seed": 5}},
            "parallelism": {{"stages": {stages}, "schedule": "1f1b",
                            "data_parallel": {replicas}, "shard_optimizer": false}},
            "devices": "cpu:{}x64MiB"}}"#,
        stages * replicas
    );
    let path = dir.join("job.json");
    std::fs::write(&path, spec).unwrap();
    path
}

/// Addresses on free localhost ports, one per rank.
fn free_addresses(n: usize) -> String {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    addrs.join(",")
}

/// A rank's process with its standard error collected as it comes.
struct Rank {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Rank {
    fn start(job: &Path, out: &Path, rank: usize, peers: &str) -> Rank {
        let mut child = chronospipe()
            .arg("train")
            .arg(job)
            .arg("--out")
            .arg(out)
            .args(["--rank", &rank.to_string(), "--peers", peers])
            .args(["--connect-timeout", "60"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let collected = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                collected
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Rank { child, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits up to `within` for the process to end.
    fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last of standard error.
                std::thread::sleep(Duration::from_millis(100));
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Rank {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn train_in_one_process(job: &Path, out: &Path) {
    let status = chronospipe()
        .arg("train")
        .arg(job)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

fn train_on_ranks(job: &Path, out: &Path, ranks: usize) {
    let peers = free_addresses(ranks);
    let mut started: Vec<Rank> = (0..ranks)
        .map(|r| Rank::start(job, out, r, &peers))
        .collect();
    for (r, rank) in started.iter_mut().enumerate() {
        let status = rank.wait(Duration::from_secs(100));
        assert!(
            status.is_some_and(|s| s.success()),
            "rank {r} ended with {status:?}: {}",
            rank.stderr()
        );
    }
}

/// Every tensor of a safetensors file by name, as its raw bytes (so bits, not values).
fn tensor_bits(file: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.data().to_vec()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

fn assert_same_bits(a: &Path, b: &Path) {
    let (a_bits, b_bits) = (tensor_bits(a), tensor_bits(b));
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&a_bits),
        names(&b_bits),
        "{} vs {}",
        a.display(),
        b.display()
    );
    for ((name, x), (_, y)) in a_bits.iter().zip(&b_bits) {
        assert!(
            x == y,
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn final_loss(summary: &Path) -> u64 {
    let text = std::fs::read_to_string(summary).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["final_loss"].as_f64().unwrap().to_bits()
}

/// The same plan in one process and as two ranks: the same bits in every checkpoint.
fn ranks_match_one_process(stages: usize, replicas: usize) {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path(), stages, replicas, 4);
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    train_in_one_process(&job, &one);
    train_on_ranks(&job, &two, 2);
    for checkpoint in ["step-2", "final"] {
        for file in ["model.safetensors", "optimizer.safetensors"] {
            let file = Path::new(checkpoint).join(file);
            assert_same_bits(&one.join(&file), &two.join(&file));
        }
        assert!(two.join(checkpoint).join("manifest.json").exists());
    }
    assert_eq!(
        final_loss(&one.join("summary.json")),
        final_loss(&two.join("summary.json"))
    );
    // Rank 1 reports its own devices only.
    let rank1: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(two.join("summary-rank-1.json")).unwrap())
            .unwrap();
    let devices = rank1["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1, "{rank1}");
    assert_eq!(devices[0]["device"], 1);
    assert_eq!(
        devices[0]["measured_peak_bytes"], devices[0]["predicted_peak_bytes"],
        "{rank1}"
    );
}

#[test]
fn two_stages_on_two_ranks_train_the_bits_of_one_process() {
    ranks_match_one_process(2, 1);
}

#[test]
fn two_replicas_on_two_ranks_train_the_bits_of_one_process() {
    ranks_match_one_process(1, 2);
}

#[test]
fn a_killed_rank_stops_the_other_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path(), 2, 1, 100_000);
    let out = dir.path().join("out");
    let peers = free_addresses(2);
    let mut zero = Rank::start(&job, &out, 0, &peers);
    let mut one = Rank::start(&job, &out, 1, &peers);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !one.stderr().contains("step 2/") {
        assert!(
            Instant::now() < deadline,
            "rank 1 never stepped: {}",
            one.stderr()
        );
        assert!(
            zero.child.try_wait().unwrap().is_none(),
            "{}",
            zero.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    one.child.kill().unwrap(); // SIGKILL: no goodbye, no abort frame
    let killed = Instant::now();
    let status = zero.wait(Duration::from_secs(10));
    let stderr = zero.stderr();
    assert!(
        status.is_some_and(|s| !s.success()),
        "rank 0: {status:?}\n{stderr}"
    );
    assert!(killed.elapsed() < Duration::from_secs(10));
    assert!(stderr.contains("lost rank 1"), "{stderr}");
    // A clean end of stream, a reset, or a send into the dead link: which comes first is a
    // race, the cause named is the same.
    assert!(
        stderr.contains("the process ended or was killed"),
        "{stderr}"
    );
}

#[test]
fn a_rank_of_another_job_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let job_a = job(dir.path(), 2, 1, 4);
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let job_b = job(&other, 2, 1, 6);
    let peers = free_addresses(2);
    let mut zero = Rank::start(&job_a, &dir.path().join("a"), 0, &peers);
    let mut one = Rank::start(&job_b, &dir.path().join("b"), 1, &peers);
    for rank in [&mut zero, &mut one] {
        let status = rank.wait(Duration::from_secs(60));
        let stderr = rank.stderr();
        assert!(status.is_some_and(|s| !s.success()), "{status:?}\n{stderr}");
        assert!(stderr.contains("runs another job or plan"), "{stderr}");
    }
}
