//! A plan spread over processes: `chronospipe train --rank R --peers ...` on localhost, each
//! process running a block of the plan's CPU devices and reaching the others over TCP. This is
//! how the distributed path is tested on one machine without GPUs: the final weights and
//! optimizer state must be bit-identical to the same plan in one process, and a killed rank
//! must stop the others with an error naming it, not a hang. Every rank writes its shard of
//! each checkpoint (Hugging Face's sharded layout): the shards hold the one-process file's
//! bits, resume in one process (and a one-process checkpoint on ranks) exactly, load in
//! transformers alike, and a rank killed while a checkpoint is written leaves it incomplete.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "common/run_log.rs"]
mod run_log;

use chronospipe::exec::checkpoint::manifest::verify;
use chronospipe::exec::run::{Run, drive};
use chronospipe::exec::transport::RankSpec;
use chronospipe::spec::JobSpec;
use run_log::RunLog;

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
/// checkpoint every 2. Each replica keeps the whole optimizer state unless a test edits
/// `shard_optimizer`.
fn job(dir: &Path, stages: usize, replicas: usize, steps: u64) -> PathBuf {
    job_sized(dir, stages, replicas, steps, 48)
}

/// As `job`, with MLPs `intermediate` wide.
fn job_sized(
    dir: &Path,
    stages: usize,
    replicas: usize,
    steps: u64,
    intermediate: usize,
) -> PathBuf {
    let corpus = dir.join("corpus.txt");
    let text = "Ranks pass activations and gradients over sockets, in the same order. ".repeat(60);
    std::fs::write(&corpus, text).unwrap();
    let spec = format!(
        r#"{{"model": {{"hidden_size": 32, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                     "intermediate_size": {intermediate}, "vocab_size": 256, "init": {{"seed": 11}}}},
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
    st.tensors()
        .into_iter()
        .map(|(name, view)| (name, view.data().to_vec()))
        .collect()
}

/// Every tensor of `stem`'s files in a checkpoint by name, as raw bytes: from
/// `STEM.safetensors`, or from the shards `STEM.safetensors.index.json` names, each tensor
/// in the shard the index says, the index's `total_size` their bytes. Also the files read.
fn checkpoint_bits(dir: &Path, stem: &str) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    let mut all = Vec::new();
    let mut files = Vec::new();
    if index.exists() {
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
        let map = index["weight_map"].as_object().unwrap();
        files = map
            .values()
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        files.sort();
        files.dedup();
        for file in &files {
            for (name, bits) in tensor_bits(&dir.join(file)) {
                assert_eq!(map[&name], file.as_str(), "{name} in {file}");
                all.push((name, bits));
            }
        }
        assert_eq!(all.len(), map.len(), "{}", dir.display());
        let bytes: usize = all.iter().map(|(_, b)| b.len()).sum();
        assert_eq!(index["metadata"]["total_size"], bytes, "{}", dir.display());
    } else {
        let file = format!("{stem}.safetensors");
        all = tensor_bits(&dir.join(&file));
        files.push(file);
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    (all, files)
}

/// `stem`'s tensors of two checkpoints hold the same names and bits, whatever their layouts.
fn assert_same_bits(a: &Path, b: &Path, stem: &str) {
    let ((a_bits, _), (b_bits, _)) = (checkpoint_bits(a, stem), checkpoint_bits(b, stem));
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&a_bits),
        names(&b_bits),
        "{} vs {}",
        a.display(),
        b.display()
    );
    assert!(!a_bits.is_empty() || stem != "model");
    for ((name, x), (_, y)) in a_bits.iter().zip(&b_bits) {
        assert!(
            x == y,
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// The hidden entries (staging left behind) of a run's output directory.
fn staged(out: &Path) -> Vec<String> {
    std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn spec_of(job: &Path) -> JobSpec {
    JobSpec::from_json(&std::fs::read_to_string(job).unwrap()).unwrap()
}

/// Resumes `job` in one process from `checkpoint` and trains to its end into `out`.
fn resume_in_one_process(job: &Path, checkpoint: &Path, out: &Path) {
    let mut run = Run::prepare(spec_of(job), "cpu:1x64MiB").unwrap();
    assert_eq!(run.resume_from(checkpoint).unwrap().step, 2);
    drive(&mut run, &mut RunLog::new(out)).unwrap();
}

/// Resumes `job` on `ranks` ranks (threads of this process) from `checkpoint` and trains to
/// its end into `out`.
fn resume_on_ranks(job: &Path, checkpoint: &Path, out: &Path, ranks: u32) {
    let peers = free_addresses(ranks as usize);
    let threads: Vec<_> = (0..ranks)
        .map(|r| {
            let (spec, peers) = (spec_of(job), peers.clone());
            let (checkpoint, out) = (checkpoint.to_owned(), out.to_owned());
            std::thread::spawn(move || {
                let rank = RankSpec::parse(r, &peers, Duration::from_secs(60)).unwrap();
                let mut run = Run::prepare_rank(spec, "cpu:1x64MiB", rank, u64::MAX).unwrap();
                assert_eq!(run.resume_from(&checkpoint).unwrap().step, 2);
                drive(&mut run, &mut RunLog::new(&out)).unwrap();
                run.close_ranks().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn final_loss(summary: &Path) -> u64 {
    let text = std::fs::read_to_string(summary).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["final_loss"].as_f64().unwrap().to_bits()
}

/// The same plan in one process and as two ranks: the same bits in every checkpoint, one
/// file from one process, a shard from each rank; each resumes exactly in the other's way.
/// `edit` replaces a piece of the job's text.
fn ranks_match_one_process(
    stages: usize,
    replicas: usize,
    edit: Option<(&str, &str)>,
) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path(), stages, replicas, 4);
    if let Some((from, to)) = edit {
        let text = std::fs::read_to_string(&job).unwrap();
        let edited = text.replace(from, to);
        assert_ne!(edited, text);
        std::fs::write(&job, edited).unwrap();
    }
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    train_in_one_process(&job, &one);
    train_on_ranks(&job, &two, 2);
    for checkpoint in ["step-2", "final"] {
        let (a, b) = (one.join(checkpoint), two.join(checkpoint));
        for stem in ["model", "optimizer"] {
            assert_same_bits(&a, &b, stem);
            assert_eq!(checkpoint_bits(&a, stem).1, [format!("{stem}.safetensors")]);
            // Each rank wrote its shard, and it holds tensors.
            let shards: Vec<String> = (1..=2)
                .map(|i| format!("{stem}-0000{i}-of-00002.safetensors"))
                .collect();
            assert_eq!(checkpoint_bits(&b, stem).1, shards, "{}", b.display());
        }
        assert!(verify(&b, true).is_ok(), "{}", b.display());
    }
    assert_eq!(staged(&two), Vec::<String>::new(), "nothing staged is left");
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

    // The ranks' checkpoint resumes in one process, and the one process's on ranks, to the
    // uninterrupted run's bits.
    let resumed = dir.path().join("resumed-in-one");
    resume_in_one_process(&job, &two.join("step-2"), &resumed);
    let spread = dir.path().join("resumed-on-ranks");
    resume_on_ranks(&job, &one.join("step-2"), &spread, 2);
    for out in [resumed, spread] {
        for stem in ["model", "optimizer"] {
            assert_same_bits(&one.join("final"), &out.join("final"), stem);
        }
    }
    (dir, one, two)
}

/// Loads both checkpoints with transformers' `from_pretrained` and compares their logits on
/// the same tokens; skipped (with the reason printed) where Python lacks torch or
/// transformers.
fn load_alike_in_transformers(one: &Path, sharded: &Path) {
    let probe = Command::new("python3")
        .args(["-c", "import torch, transformers"])
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            let why = String::from_utf8_lossy(&out.stderr);
            println!("skipped the transformers check: {}", why.trim());
            return;
        }
        Err(e) => {
            println!("skipped the transformers check: no python3 ({e})");
            return;
        }
    }
    let script = r#"
import sys, torch
from transformers import AutoModelForCausalLM
ids = torch.tensor([[3, 77, 140, 9, 255, 0, 31, 12]])
logits = []
for path in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    with torch.no_grad():
        logits.append(model(ids).logits)
print("max_abs_diff", (logits[0] - logits[1]).abs().max().item())
print("max_abs", logits[0].abs().max().item())
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(one)
        .arg(sharded)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value = |key: &str| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(key));
        line.unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(value("max_abs") > 0.0, "{stdout}");
    assert!(value("max_abs_diff") <= 1e-6, "{stdout}");
}

#[test]
fn two_stages_on_two_ranks_train_the_bits_of_one_process() {
    let (_dir, one, two) = ranks_match_one_process(2, 1, None);
    load_alike_in_transformers(&one.join("final"), &two.join("final"));
}

/// Tied embeddings with the embedding on rank 0 and the head on rank 1: the bits of one
/// process, the table written once (by rank 0, not by rank 1 beside the head's norm), both
/// loading alike in transformers.
#[test]
fn tied_embeddings_on_two_ranks_train_the_bits_of_one_process() {
    // The table's two gradients meet over the link (`TIE`).
    let tied = (
        r#""vocab_size": 256,"#,
        r#""vocab_size": 256, "tie_embeddings": true,"#,
    );
    let (_dir, one, two) = ranks_match_one_process(2, 1, Some(tied));
    let config = std::fs::read_to_string(two.join("final/config.json")).unwrap();
    assert!(
        config.contains(r#""tie_word_embeddings": true"#),
        "{config}"
    );
    let names: Vec<String> = tensor_bits(&two.join("final/model-00002-of-00002.safetensors"))
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert!(names.iter().any(|n| n == "model.norm.weight"), "{names:?}");
    let table = |n: &&String| n.contains("embed_tokens") || n.starts_with("lm_head");
    assert_eq!(
        names.iter().find(table),
        None,
        "rank 1 holds the head, not the table"
    );
    load_alike_in_transformers(&one.join("final"), &two.join("final"));
}

#[test]
fn two_replicas_on_two_ranks_train_the_bits_of_one_process() {
    ranks_match_one_process(1, 2, None);
}

/// Sharded optimizer state (ZeRO-1) with each replica in its own process: the gradients'
/// shards and the updated weights' cross the link, and the checkpoint's optimizer state is
/// gathered from both ranks, all to one process's bits.
#[test]
fn sharded_replicas_on_two_ranks_train_the_bits_of_one_process() {
    let sharded = (r#""shard_optimizer": false"#, r#""shard_optimizer": true"#);
    let (dir, one, _) = ranks_match_one_process(1, 2, Some(sharded));
    // The plan shards: each device holds less than with the whole state.
    let whole_dir = dir.path().join("whole");
    std::fs::create_dir(&whole_dir).unwrap();
    let whole = whole_dir.join("out");
    train_in_one_process(&job(&whole_dir, 1, 2, 4), &whole);
    let peaks = |out: &Path| -> Vec<u64> {
        let text = std::fs::read_to_string(out.join("summary.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        (v["devices"].as_array().unwrap().iter())
            .map(|d| d["measured_peak_bytes"].as_u64().unwrap())
            .collect()
    };
    let (sharded, whole) = (peaks(&one), peaks(&whole));
    assert_eq!(sharded.len(), 2);
    assert!(
        sharded.iter().zip(&whole).all(|(s, w)| s < w),
        "sharded {sharded:?}, whole {whole:?}"
    );
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

#[test]
fn a_rank_killed_while_a_checkpoint_is_written_leaves_the_earlier_one_the_latest() {
    let dir = tempfile::tempdir().unwrap();
    // Wide MLPs: the shards take a while to write and hash.
    let job = job_sized(dir.path(), 2, 1, 6, 4096);
    let out = dir.path().join("out");
    let peers = free_addresses(2);
    let mut zero = Rank::start(&job, &out, 0, &peers);
    let mut one = Rank::start(&job, &out, 1, &peers);
    // Rank 0 completes step 2's checkpoint; step 4's is staged until every shard is written
    // and rank 0 has hashed them all into the manifest. Rank 0 dies in between.
    let deadline = Instant::now() + Duration::from_secs(120);
    let staging = loop {
        assert!(
            Instant::now() < deadline,
            "step 4's checkpoint was never staged: {}",
            zero.stderr()
        );
        assert!(
            zero.child.try_wait().unwrap().is_none(),
            "{}",
            zero.stderr()
        );
        let entries = std::fs::read_dir(&out).into_iter().flatten().flatten();
        let found = entries
            .map(|e| e.file_name().into_string().unwrap())
            .find(|n| n.starts_with(".step-4.") && n.ends_with(".partial"));
        if let Some(name) = found {
            break name;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    zero.child.kill().unwrap(); // SIGKILL, mid-checkpoint
    let status = one.wait(Duration::from_secs(30));
    let stderr = one.stderr();
    assert!(status.is_some_and(|s| !s.success()), "{status:?}\n{stderr}");
    assert!(stderr.contains("lost rank 0"), "{stderr}");
    assert!(
        !out.join("step-4").exists(),
        "a checkpoint rank 0 did not complete is there"
    );
    assert!(verify(&out.join("step-2"), true).is_ok());
    assert!(
        out.join(&staging).exists(),
        "the dead writer's staging stays"
    );

    // The next attempt stages apart from the dead one, completes step 4 and removes what the
    // dead one left staged.
    resume_in_one_process(&job, &out.join("step-2"), &out);
    assert!(verify(&out.join("step-4"), true).is_ok());
    assert!(verify(&out.join("final"), true).is_ok());
    assert_eq!(staged(&out), Vec::<String>::new());
}

/// Validation data on a run spread over ranks: the hidden states of an evaluation cross
/// between the processes and the losses meet, so every rank reports the validation loss of
/// one process to the bit, with the pipeline's stages on two ranks and with replica 0
/// wholly on rank 0.
#[test]
fn validation_on_two_ranks_gives_the_loss_of_one_process() {
    for (stages, replicas) in [(2, 1), (1, 2)] {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path(), stages, replicas, 4);
        let validation = dir.path().join("validation.txt");
        let held_out = "Held-out text is evaluated forward only, between the steps. ";
        std::fs::write(&validation, held_out.repeat(12)).unwrap();
        let text = std::fs::read_to_string(&job).unwrap();
        let with = text.replace(
            r#""data": {"#,
            &format!(r#""data": {{"validation": {validation:?}, "#),
        );
        assert_ne!(with, text);
        std::fs::write(&job, with).unwrap();
        let (one, two) = (dir.path().join("one"), dir.path().join("two"));
        train_in_one_process(&job, &one);
        train_on_ranks(&job, &two, 2);
        let val_loss = |summary: PathBuf| {
            let text = std::fs::read_to_string(&summary).unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            v["val_loss"]
                .as_f64()
                .unwrap_or_else(|| panic!("no val_loss in {}: {v}", summary.display()))
        };
        let expected = val_loss(one.join("summary.json"));
        assert!(expected.is_finite() && expected > 0.0, "{expected}");
        for summary in ["summary.json", "summary-rank-1.json"] {
            assert_eq!(
                val_loss(two.join(summary)).to_bits(),
                expected.to_bits(),
                "{stages} stages x {replicas} replicas: {summary}"
            );
        }
        assert_same_bits(&one.join("final"), &two.join("final"), "model");
    }
}
