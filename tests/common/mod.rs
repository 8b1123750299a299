//! Shared by the integration tests: a database per test (SQLite file or a fresh PostgreSQL
//! database), a real server on 127.0.0.1:0, and the test doubles for the planner and the
//! trainer. The doubles make the service's own tests fast and scripted (a job's steps, its
//! failures); suites that train for real use `Capabilities::production()` instead.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chronospipe::api::Limits;
use chronospipe::jobs::{
    Capabilities, DeviceInfo, JobRunner, PlanCandidate, PlanFailure, PlanOutcome, PlanSummary,
    Planner, RunControl, RunEnd, RunFailure, RunRequest, RunSink, SinkError, StepMetrics,
    StopRequest, parse_devices,
};
use chronospipe::service::{ServiceOptions, run_service};
use chronospipe::spec::JobSpec;
use serde_json::{Value, json};
use sqlx::Connection;

pub const KEY: &str = "cp_test_key_tenant_a";

/// The trainer the tests run jobs with.
pub fn runner() -> Arc<dyn JobRunner> {
    Arc::new(ScriptedRunner::default())
}

/// The planner the tests plan with.
pub fn planner() -> Arc<dyn Planner> {
    Arc::new(ScriptedPlanner)
}

pub fn capabilities() -> Capabilities {
    Capabilities {
        planner: Some(planner()),
        runner: Some(runner()),
    }
}

// ---- databases ----

pub struct TestDb {
    pub url: String,
    pg_name: Option<String>,
    _dir: tempfile::TempDir,
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("test.sqlite").display());
        TestDb {
            url,
            pg_name: None,
            _dir: dir,
        }
    }

    /// A fresh database on the server `DATABASE_URL` names.
    pub async fn postgres() -> TestDb {
        let base = std::env::var("DATABASE_URL")
            .expect("DATABASE_URL must point at PostgreSQL; run the suite through scripts/test");
        let name = format!(
            "cp_test_{}",
            chronospipe::store::new_id("db").trim_start_matches("db_")
        );
        let mut conn = sqlx::PgConnection::connect(&base)
            .await
            .expect("connects to DATABASE_URL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let (prefix, _) = base
            .rsplit_once('/')
            .expect("DATABASE_URL has a database name");
        TestDb {
            url: format!("{prefix}/{name}"),
            pg_name: Some(name),
            _dir: tempfile::tempdir().unwrap(),
        }
    }

    pub async fn drop(self) {
        if let Some(name) = &self.pg_name {
            let base = std::env::var("DATABASE_URL").unwrap();
            if let Ok(mut conn) = sqlx::PgConnection::connect(&base).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
            }
        }
    }
}

/// `both_databases!(name, scenario)`: `name::sqlite` and `name::postgres` run `scenario(url)`.
#[macro_export]
macro_rules! both_databases {
    ($name:ident, $scenario:path) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                let db = $crate::common::TestDb::sqlite().await;
                $scenario(&db.url).await;
                db.drop().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                let db = $crate::common::TestDb::postgres().await;
                $scenario(&db.url).await;
                db.drop().await;
            }
        }
    };
}

// ---- a real server ----

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub data_dir: tempfile::TempDir,
    pub database_url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub fn test_options(database_url: &str, data_dir: &Path) -> ServiceOptions {
    ServiceOptions {
        database_url: database_url.to_owned(),
        data_dir: data_dir.to_owned(),
        devices: parse_devices("cpu:2x64MiB").unwrap(),
        api_key: Some(KEY.to_owned()),
        run_worker: true,
        limits: Limits {
            rate_per_second: 1000.0,
            rate_burst: 1000.0,
            ..Limits::default()
        },
        lease: Duration::from_secs(2),
        poll: Duration::from_millis(50),
        host_memory_bytes: 1 << 30,
        rank_address: None,
        machine: None,
        network: Default::default(),
    }
}

impl TestServer {
    pub async fn start(database_url: &str) -> TestServer {
        Self::start_with(database_url, capabilities(), |_| {}).await
    }

    /// The API alone with the real planner: jobs are run by worker processes.
    pub async fn api_for_workers(database_url: &str) -> TestServer {
        let capabilities = Capabilities {
            planner: Some(Arc::new(chronospipe::jobs::ExecPlanner)),
            runner: None,
        };
        Self::start_with(database_url, capabilities, |o| o.run_worker = false).await
    }

    pub async fn start_with(
        database_url: &str,
        capabilities: Capabilities,
        configure: impl FnOnce(&mut ServiceOptions),
    ) -> TestServer {
        Self::start_in(
            database_url,
            capabilities,
            tempfile::tempdir().unwrap(),
            configure,
        )
        .await
    }

    pub async fn start_in(
        database_url: &str,
        capabilities: Capabilities,
        data_dir: tempfile::TempDir,
        configure: impl FnOnce(&mut ServiceOptions),
    ) -> TestServer {
        let mut options = test_options(database_url, data_dir.path());
        configure(&mut options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            run_service(options, capabilities, listener, async move {
                let _ = stopped.await;
            })
            .await
            .expect("service runs");
        });
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if client
                .get(format!("{base}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        TestServer {
            base,
            client,
            data_dir,
            database_url: database_url.to_owned(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Like SIGTERM: stop claiming, checkpoint and requeue, then return. Gives back the data
    /// directory for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("stops in time")
                .unwrap();
        }
        self.data_dir
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).bearer_auth(KEY)
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(KEY)
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.get(path).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }

    /// Uploads `content` with `purpose`; returns the file id.
    pub async fn upload(&self, purpose: &str, name: &str, content: Vec<u8>) -> String {
        let form = reqwest::multipart::Form::new()
            .text("purpose", purpose.to_owned())
            .part(
                "file",
                reqwest::multipart::Part::bytes(content).file_name(name.to_owned()),
            );
        let response = self.post("/v1/files").multipart(form).send().await.unwrap();
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
        response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub async fn create_job(&self, body: &Value) -> Value {
        let response = self.post("/v1/jobs").json(body).send().await.unwrap();
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
        response.json().await.unwrap()
    }

    /// The steps of the job's recorded metrics, in order, page by page.
    pub async fn metric_steps(&self, id: &str) -> Vec<i64> {
        let mut steps: Vec<i64> = Vec::new();
        loop {
            let after = steps.last().copied().unwrap_or(0);
            let path = format!("/v1/jobs/{id}/metrics?after_step={after}&limit=100");
            let page = self.get_json(&path).await;
            let data = page["data"].as_array().unwrap();
            if data.is_empty() {
                return steps;
            }
            steps.extend(data.iter().map(|m| m["step"].as_i64().unwrap()));
        }
    }

    /// Polls until the job is in `status`.
    pub async fn wait_for(&self, id: &str, status: &str) -> Value {
        for _ in 0..600 {
            let job = self.get_json(&format!("/v1/jobs/{id}")).await;
            if job["status"] == status {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("job {id} never reached {status}");
    }
}

/// Training text of one window of `job_body`'s 16 tokens and a target: the least a job is
/// created with.
pub const ONE_WINDOW: &[u8] = b"a window of text.";

/// A tiny job over `train`: `steps` steps, a checkpoint every 2.
pub fn job_body(train: &str, steps: u64) -> Value {
    json!({
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 176, "vocab_size": 256,
                  "init": {"seed": 7}},
        "data": {"train": train, "tokenizer": "bytes"},
        "training": {"seq_len": 16, "micro_batch_size": 1, "microbatches": 2, "steps": steps, "checkpoint_every": 2}
    })
}

/// Reads a Server-Sent Events stream into `(id, event, data)` until `stop` says so.
pub async fn read_sse(
    response: reqwest::Response,
    mut stop: impl FnMut(&str, &Value) -> bool,
) -> Vec<(i64, String, Value)> {
    use futures_util::StreamExt;
    let mut events = Vec::new();
    let mut buffer = String::new();
    let mut stream = response.bytes_stream();
    let (mut id, mut event, mut data) = (0i64, String::new(), String::new());
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("event in time")
    {
        buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buffer.find('\n') {
            let line = buffer[..end].trim_end_matches('\r').to_owned();
            buffer.drain(..=end);
            if line.is_empty() {
                if !event.is_empty() {
                    let value: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                    let done = stop(&event, &value);
                    events.push((id, std::mem::take(&mut event), value));
                    data.clear();
                    if done {
                        return events;
                    }
                }
            } else if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().parse().unwrap();
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
    }
    events
}

// ---- test doubles ----

/// Plans without a planner: one device per stage asked for (default 1); a plan "does not fit"
/// when a device has under 1 MiB.
pub struct ScriptedPlanner;

pub const SMALLEST_FIT: u64 = 1 << 20;

impl Planner for ScriptedPlanner {
    fn plan(
        &self,
        spec: &JobSpec,
        devices: &[DeviceInfo],
        _host_memory_bytes: u64,
    ) -> Result<PlanOutcome, PlanFailure> {
        if let Some(small) = devices.iter().find(|d| d.memory_bytes < SMALLEST_FIT) {
            return Err(PlanFailure::DoesNotFit {
                message: format!(
                    "device {} has {} bytes; the smallest plan needs {SMALLEST_FIT}",
                    small.id, small.memory_bytes
                ),
                smallest_memory_bytes: SMALLEST_FIT,
                closest: json!({"schedule": "1f1b", "stages": 1, "recompute": "all"}),
            });
        }
        let stages = spec
            .parallelism
            .stages
            .count()
            .unwrap_or(1)
            .min(devices.len()) as u32;
        Ok(PlanOutcome {
            plan: json!({"schedule": "scripted", "programs": vec![["F0.0", "B0.0"]; stages as usize]}),
            svg: "<svg xmlns=\"http://www.w3.org/2000/svg\"/>".to_owned(),
            summary: PlanSummary {
                schedule: "scripted".into(),
                stages,
                replicas: 1,
                devices: stages,
                actions_per_device: vec![2; stages as usize],
                peak_bytes: vec![SMALLEST_FIT; stages as usize],
                eval_peak_bytes: vec![SMALLEST_FIT; stages as usize],
                step_time_s: 0.01,
                bubble_ratio: 0.0,
                runners_up: vec![PlanCandidate {
                    label: "1f1b".into(),
                    max_peak_bytes: SMALLEST_FIT * 2,
                    step_time_s: 0.02,
                    bubble_ratio: 0.5,
                }],
            },
        })
    }
}

/// Trains nothing: each step folds the step number and the training bytes into 8 "weights",
/// sleeps `step_delay`, reports metrics, and checkpoints every `checkpoint_every` steps as
/// `model.safetensors` + `config.json`. Resumes from a checkpoint's weights, honours stop
/// requests between steps, and fails at `fail_at` when set.
#[derive(Clone)]
pub struct ScriptedRunner {
    pub step_delay: Duration,
    pub fail_at: Option<u64>,
}

impl Default for ScriptedRunner {
    fn default() -> Self {
        ScriptedRunner {
            step_delay: Duration::from_millis(100),
            fail_at: None,
        }
    }
}

pub const WEIGHTS: &str = "model.embed_tokens.weight";

pub fn write_weights(dir: &Path, weights: &[f32]) {
    std::fs::create_dir_all(dir).unwrap();
    let bytes: Vec<u8> = weights.iter().flat_map(|w| w.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![weights.len()], &bytes)
            .unwrap();
    let data = safetensors::serialize([(WEIGHTS, view)], &None).unwrap();
    std::fs::write(dir.join("model.safetensors"), data).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}"#,
    )
    .unwrap();
    // Written last, as every checkpoint writer must: the checkpoint is complete.
    chronospipe::exec::checkpoint::manifest::write_manifest(dir).unwrap();
}

pub fn read_weights(bytes: &[u8]) -> Vec<f32> {
    let tensors = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let t = tensors.tensor(WEIGHTS).unwrap();
    t.data()
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

impl JobRunner for ScriptedRunner {
    fn run(
        &self,
        request: RunRequest,
        sink: &mut dyn RunSink,
        control: &RunControl,
    ) -> Result<RunEnd, RunFailure> {
        let sink_failed = |e: SinkError| RunFailure::service("sink_failed", e.to_string());
        let text = std::fs::read(&request.spec.data.train)
            .map_err(|e| RunFailure::user("file_not_found", e.to_string(), Some("data.train")))?;
        let total = (request.spec.training.steps).expect("scripted jobs give training.steps");
        let every = request.spec.training.checkpoint_every.unwrap_or(1).max(1);
        let tokens =
            (request.spec.training.seq_len * request.spec.training.sequences_per_step()) as u64;
        let (mut step, mut weights) = match &request.resume_from {
            Some(resume) => (
                resume.step,
                read_weights(&std::fs::read(resume.dir.join("model.safetensors")).unwrap()),
            ),
            None => (0, vec![0.5f32; 8]),
        };
        let mut saved = step;
        while step < total {
            match control.requested() {
                Some(StopRequest::Cancel | StopRequest::Abandon) => return Ok(RunEnd::Cancelled),
                Some(StopRequest::Pause | StopRequest::Shutdown) => {
                    if saved != step {
                        sink.before_checkpoint(step).map_err(sink_failed)?;
                        let dir = request.checkpoint_dir(step);
                        write_weights(&dir, &weights);
                        sink.checkpoint(step, &dir).map_err(sink_failed)?;
                    }
                    return Ok(RunEnd::Stopped { step });
                }
                None => {}
            }
            std::thread::sleep(self.step_delay);
            step += 1;
            if self.fail_at == Some(step) {
                return Err(RunFailure::service(
                    "executor_crashed",
                    format!("scripted crash at step {step}"),
                ));
            }
            let byte = text[(step as usize) % text.len().max(1)] as f32;
            for (i, w) in weights.iter_mut().enumerate() {
                *w = *w * 0.9 + (step as f32) * 0.01 + byte * 1e-4 * (i as f32 + 1.0);
            }
            let metrics = StepMetrics {
                step,
                loss: weights[0] as f64,
                learning_rate: 3e-4,
                grad_norm: Some(1.0),
                tokens,
                tokens_per_second: tokens as f64 / self.step_delay.as_secs_f64().max(1e-3),
                step_time_ms: self.step_delay.as_secs_f64() * 1e3,
                device_peak_bytes: vec![SMALLEST_FIT; request.devices.len()],
                val_loss: None,
            };
            sink.step(&metrics).map_err(sink_failed)?;
            if step % every == 0 || step == total {
                sink.before_checkpoint(step).map_err(sink_failed)?;
                let dir = request.checkpoint_dir(step);
                write_weights(&dir, &weights);
                sink.checkpoint(step, &dir).map_err(sink_failed)?;
                saved = step;
            }
        }
        Ok(RunEnd::Completed)
    }
}
