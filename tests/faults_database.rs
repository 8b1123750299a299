//! Database outages: a PostgreSQL server this test starts itself (its own port and data
//! directory) is stopped with `-m immediate` and started again several times while a job
//! trains on the service. Meanwhile the API answers 503 with `Retry-After` and `/readyz` is
//! not ready; both recover without a restart. The job keeps training through every outage
//! (no restart), records each step's metric exactly once, and ends with the weights of an
//! uninterrupted run. Skipped, with a message, where PostgreSQL's server binaries are missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chronospipe::jobs::{
    Capabilities, EventLevel, ExecPlanner, ExecRunner, JobRunner, RunControl, RunEnd, RunFailure,
    RunRequest, RunSink, SinkError, StepMetrics, Worker, WorkerConfig, parse_devices,
};
use common::TestServer;
use serde_json::{Value, json};

const TEXT: &str = "Memory is a small fast cache; keep what is used soon, move the rest. ";
const STEPS: i64 = 120;

/// A PostgreSQL server of this test's own, run as the `postgres` user.
struct OwnPostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

fn as_postgres(bin: &Path, tool: &str, args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(tool))
        .args(args)
        .output()
        .expect("runuser runs")
}

impl OwnPostgres {
    fn start() -> Option<OwnPostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("pg_ctl").is_file())
            .max()?;
        let dir = tempfile::tempdir().unwrap();
        let chown = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir.path())
            .status();
        if !chown.is_ok_and(|s| s.success()) {
            println!("skipped: no postgres user to run a PostgreSQL server as");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = OwnPostgres { bin, dir, port };
        let data = pg.data();
        let init = as_postgres(
            &pg.bin,
            "initdb",
            &["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        );
        if !init.status.success() {
            println!(
                "skipped: initdb failed: {}",
                String::from_utf8_lossy(&init.stderr)
            );
            return None;
        }
        pg.ctl(&["start"]);
        Some(pg)
    }

    fn data(&self) -> String {
        format!("{}/data", self.dir.path().display())
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn ctl(&self, action: &[&str]) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.dir.path().display()
        );
        let data = self.data();
        let log = format!("{}/log", self.dir.path().display());
        let mut args = vec!["-D", &data, "-l", &log, "-o", &options, "-w"];
        args.extend_from_slice(action);
        let out = as_postgres(&self.bin, "pg_ctl", &args);
        assert!(
            out.status.success(),
            "pg_ctl {action:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.data();
        as_postgres(
            &self.bin,
            "pg_ctl",
            &["-D", &data, "-m", "immediate", "stop"],
        );
    }
}

/// The real trainer, a few milliseconds slower per step, so that outages land mid-run.
/// Steps from `hold_from` on wait until the test lifts it (sets it to `i64::MAX`), so an
/// outage cannot miss the job however fast the machine trains (training goes on during
/// outages, and a finished job's records are written as soon as the database is back).
#[derive(Clone)]
struct Unhurried {
    hold_from: Arc<AtomicI64>,
}

impl Unhurried {
    fn new(hold_from: i64) -> Unhurried {
        Unhurried {
            hold_from: Arc::new(AtomicI64::new(hold_from)),
        }
    }
}

struct UnhurriedSink<'a>(&'a mut dyn RunSink, &'a AtomicI64);

impl RunSink for UnhurriedSink<'_> {
    fn step(&mut self, metrics: &StepMetrics) -> Result<(), SinkError> {
        std::thread::sleep(Duration::from_millis(40));
        while metrics.step as i64 >= self.1.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.0.step(metrics)
    }
    fn before_checkpoint(&mut self, step: u64) -> Result<(), SinkError> {
        self.0.before_checkpoint(step)
    }
    fn checkpoint(&mut self, step: u64, dir: &Path) -> Result<(), SinkError> {
        self.0.checkpoint(step, dir)
    }
    fn event(&mut self, level: EventLevel, message: &str) -> Result<(), SinkError> {
        self.0.event(level, message)
    }
    fn evaluation(&mut self, evaluation: &chronospipe::jobs::Evaluation) -> Result<(), SinkError> {
        self.0.evaluation(evaluation)
    }
    fn retain_checkpoints(&mut self, keep: u64) -> Result<(), SinkError> {
        self.0.retain_checkpoints(keep)
    }
    fn stopped_early(&mut self, step: u64, best_step: Option<u64>) -> Result<(), SinkError> {
        self.0.stopped_early(step, best_step)
    }
}

impl JobRunner for Unhurried {
    fn run(
        &self,
        request: RunRequest,
        sink: &mut dyn RunSink,
        control: &RunControl,
    ) -> Result<RunEnd, RunFailure> {
        ExecRunner.run(request, &mut UnhurriedSink(sink, &self.hold_from), control)
    }
}

fn body(train: &str) -> Value {
    json!({
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 48, "vocab_size": 256, "init": {"seed": 5}},
        "data": {"train": train},
        "training": {"seq_len": 16, "micro_batch_size": 2, "microbatches": 2, "steps": STEPS,
                     "checkpoint_every": 10, "optimizer": {"kind": "adamw", "lr": 0.003}},
        "parallelism": {"stages": 2, "schedule": "1f1b"}
    })
}

async fn weights(server: &TestServer, id: &str) -> bytes::Bytes {
    let path = format!("/v1/jobs/{id}/checkpoints/{STEPS}/files/model.safetensors");
    let response = server.get(&path).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap()
}

fn newest_checkpoint_on_disk(server: &TestServer, id: &str) -> i64 {
    let dir = server
        .data_dir
        .path()
        .join(format!("jobs/{id}/checkpoints"));
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_prefix("step-")?.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_trains_through_database_restarts() {
    let Some(pg) = OwnPostgres::start() else {
        return;
    };
    let runner = Unhurried::new(STEPS - 5);
    let capabilities = Capabilities {
        planner: Some(Arc::new(ExecPlanner)),
        runner: Some(Arc::new(runner.clone())),
    };
    let server = TestServer::start_with(&pg.url(), capabilities, |o| {
        o.lease = Duration::from_secs(15);
    })
    .await;
    let train = server
        .upload("train", "corpus.txt", TEXT.repeat(20).into_bytes())
        .await;
    let id = server.create_job(&body(&train)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // A fresh client for each question: pooled connections die with the server.
    let ask = |path: String| {
        let request = reqwest::Client::new()
            .get(server.url(&path))
            .header("authorization", format!("Bearer {}", common::KEY));
        async move { request.send().await.unwrap() }
    };
    let mut seen_steps = Vec::new();
    let mut outages = Vec::new();
    for outage in 0..4 {
        let step = loop {
            let answer = ask(format!("/v1/jobs/{id}")).await;
            if answer.status() == 200 {
                let job: Value = answer.json().await.unwrap();
                let step = job["progress"]["step"].as_i64().unwrap();
                if step >= 10 + 25 * outage {
                    break step;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        seen_steps.push(step);
        let away = std::time::Instant::now();
        pg.ctl(&["-m", "immediate", "stop"]);
        if outage == 3 {
            // The job's last steps train while the database is away.
            runner.hold_from.store(i64::MAX, Ordering::Relaxed);
        }
        for path in [format!("/v1/jobs/{id}"), "/readyz".to_owned()] {
            let answer = ask(path.clone()).await;
            assert_eq!(answer.status(), 503, "{path} while the database is away");
            assert_eq!(answer.headers()["retry-after"], "2", "{path}");
            let problem: Value = answer.json().await.unwrap();
            assert_eq!(problem["code"], "database_unavailable", "{problem}");
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        if outage == 0 {
            // Training went on while the database was away: newer checkpoints are on disk.
            let newest = newest_checkpoint_on_disk(&server, &id);
            assert!(
                newest >= step + 10,
                "step {step} recorded, {newest} on disk"
            );
        }
        pg.ctl(&["start"]);
        let mut ready = false;
        for _ in 0..100 {
            if ask("/readyz".into()).await.status() == 200 {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready, "/readyz recovers without a restart");
        outages.push(away.elapsed().as_secs_f64());
    }
    assert!(
        *seen_steps.last().unwrap() < STEPS,
        "every outage came while the job ran: {seen_steps:?}"
    );

    let job = server.wait_for(&id, "succeeded").await;
    // The uninterrupted run, after the outages: the worker claims again by itself.
    let reference = server.create_job(&body(&train)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    server.wait_for(&reference, "succeeded").await;
    let took =
        |job: &Value| job["finished_at"].as_f64().unwrap() - job["started_at"].as_f64().unwrap();
    let uninterrupted = server.get_json(&format!("/v1/jobs/{reference}")).await;
    println!(
        "database away {outages:.2?} s (at recorded steps {seen_steps:?}); the job took {:.2} s, \
         uninterrupted {:.2} s",
        took(&job),
        took(&uninterrupted)
    );
    assert_eq!(
        job["restart_count"], 0,
        "trained through the outages: {job}"
    );
    assert_eq!(
        server.metric_steps(&id).await,
        (1..=STEPS).collect::<Vec<_>>(),
        "each step's metric exactly once"
    );
    assert!(
        weights(&server, &id).await == weights(&server, &reference).await,
        "the weights differ from an uninterrupted run's"
    );
    let _ = server.stop().await;
}

/// The recorded step of the job, asked on a fresh connection; `None` while the API refuses.
async fn recorded_step(server: &TestServer, id: &str) -> Option<i64> {
    let answer = reqwest::Client::new()
        .get(server.url(&format!("/v1/jobs/{id}")))
        .header("authorization", format!("Bearer {}", common::KEY))
        .send()
        .await
        .ok()?;
    let job: Value = answer.json().await.ok()?;
    job["progress"]["step"].as_i64()
}

/// With a record queue of 4, an outage fills it within a few steps: training then waits at a
/// step boundary (no newer checkpoint appears) until the database is back, and the job ends
/// as it would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_record_queue_holds_training_until_the_database_is_back() {
    let Some(pg) = OwnPostgres::start() else {
        return;
    };
    let capabilities = Capabilities {
        planner: Some(Arc::new(ExecPlanner)),
        runner: Some(Arc::new(Unhurried::new(i64::MAX))),
    };
    let server = TestServer::start_with(&pg.url(), capabilities, |o| o.run_worker = false).await;
    let train = server
        .upload("train", "corpus.txt", TEXT.repeat(20).into_bytes())
        .await;
    let id = server.create_job(&body(&train)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let config = WorkerConfig {
        lease: Duration::from_secs(15),
        poll: Duration::from_millis(50),
        record_queue: 4,
        ..WorkerConfig::new(
            server.data_dir.path().to_owned(),
            parse_devices("cpu:2x64MiB").unwrap(),
        )
    };
    let store = chronospipe::store::connect(&pg.url()).await.unwrap();
    let worker = Worker::new(store, Arc::new(Unhurried::new(i64::MAX)), config);
    let running = tokio::spawn(async move { worker.try_execute_one().await.map(|_| ()) });
    let step = loop {
        if let Some(step) = recorded_step(&server, &id).await.filter(|s| *s >= 5) {
            break step;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    pg.ctl(&["-m", "immediate", "stop"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = newest_checkpoint_on_disk(&server, &id);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        newest_checkpoint_on_disk(&server, &id),
        held,
        "training waits while its record queue is full"
    );
    // 1.5 s at 40 ms a step would be 37 steps; the queue holds 4 records and one in flight.
    assert!(held <= step + 20, "step {step} recorded, {held} on disk");
    pg.ctl(&["start"]);
    tokio::time::timeout(Duration::from_secs(120), running)
        .await
        .expect("the job ends once the database is back")
        .unwrap()
        .unwrap();
    let job = server.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["restart_count"], 0, "{job}");
    assert_eq!(
        server.metric_steps(&id).await,
        (1..=STEPS).collect::<Vec<_>>()
    );
    let _ = server.stop().await;
}

/// A database that stays away longer than the worker's patience: the worker stops waiting for
/// it (the job's end no longer waits without bound), and once the database is back the job,
/// whose lease ran out, is resumed by another worker from its last recorded checkpoint and
/// ends with each step's metric recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_gives_a_job_back_when_the_database_stays_away() {
    let Some(pg) = OwnPostgres::start() else {
        return;
    };
    let capabilities = Capabilities {
        planner: Some(Arc::new(ExecPlanner)),
        runner: None,
    };
    let server = TestServer::start_with(&pg.url(), capabilities, |o| o.run_worker = false).await;
    let train = server
        .upload("train", "corpus.txt", TEXT.repeat(20).into_bytes())
        .await;
    let id = server.create_job(&body(&train)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let config = |patience: Duration| WorkerConfig {
        lease: Duration::from_secs(3),
        poll: Duration::from_millis(50),
        patience,
        ..WorkerConfig::new(
            server.data_dir.path().to_owned(),
            parse_devices("cpu:2x64MiB").unwrap(),
        )
    };
    let store = chronospipe::store::connect(&pg.url()).await.unwrap();
    let impatient = Worker::new(
        store,
        Arc::new(Unhurried::new(i64::MAX)),
        config(Duration::from_secs(2)),
    );
    let running = tokio::spawn(async move { impatient.try_execute_one().await.map(|_| ()) });
    let recorded = loop {
        if let Some(step) = recorded_step(&server, &id).await.filter(|s| *s >= 15) {
            break step;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    pg.ctl(&["-m", "immediate", "stop"]);
    let away = std::time::Instant::now();
    // The records' patience, then the job's end's (each a few backoff waits): not forever.
    let ended = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the worker stops waiting for a database that does not come back")
        .unwrap();
    let gave_up_s = away.elapsed().as_secs_f64();
    assert!(
        ended.is_err(),
        "the job's end could not be recorded: {ended:?}"
    );
    pg.ctl(&["start"]);
    let store = chronospipe::store::connect(&pg.url()).await.unwrap();
    let other = Worker::new(
        store,
        Arc::new(ExecRunner),
        config(Duration::from_secs(600)),
    );
    let mut resumed = None;
    for _ in 0..300 {
        resumed = other.try_execute_one().await.unwrap();
        if resumed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(resumed.as_deref(), Some(id.as_str()), "the job is resumed");
    let job = server.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["restart_count"], 1, "{job}");
    assert_eq!(
        server.metric_steps(&id).await,
        (1..=STEPS).collect::<Vec<_>>()
    );
    println!(
        "step {recorded} recorded when the database went away; the worker gave up after {gave_up_s:.1} s"
    );
    let _ = server.stop().await;
}
