//! The service with the real planner and trainer (`Capabilities::production()`), on SQLite and
//! PostgreSQL: a job trains through the pipeline executor, streams its metrics, and its
//! downloaded checkpoint is byte-identical to the same job run directly through `exec::run`
//! and loads with the executor's loader.

mod common;

use std::path::PathBuf;

use chronospipe::exec::checkpoint::model_files::{load_hf_parts, read_hf_config};
use chronospipe::exec::device::Pool;
use chronospipe::exec::model::PartId;
use chronospipe::exec::run::{Observer, Run, RunError, StepMetrics, drive};
use std::sync::Arc;
use std::time::Duration;

use chronospipe::jobs::{Capabilities, ExecRunner, Worker, WorkerConfig, parse_devices};
use chronospipe::spec::JobSpec;
use common::{TestServer, read_sse};
use serde_json::{Value, json};

const TEXT: &str = "Memory is a small fast cache; keep what is used soon, move the rest. ";

fn body(train: &str) -> Value {
    json!({
        "model": {"hidden_size": 32, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 48, "vocab_size": 256, "init": {"seed": 3}},
        "data": {"train": train},
        "training": {"seq_len": 16, "micro_batch_size": 2, "microbatches": 4, "steps": 4,
                     "checkpoint_every": 2, "optimizer": {"kind": "adamw", "lr": 0.003}},
        "parallelism": {"stages": 2, "schedule": "chronos"}
    })
}

struct Direct(PathBuf);

impl Observer for Direct {
    fn step(&mut self, _: &StepMetrics) -> Result<(), RunError> {
        Ok(())
    }
    fn checkpoint_dir(&self, step: u64, _: bool) -> PathBuf {
        self.0.join(format!("step-{step}"))
    }
}

async fn trains_for_real(url: &str) {
    let server = TestServer::start_with(url, Capabilities::production(), |_| {}).await;
    let corpus = TEXT.repeat(20);
    let train = server
        .upload("train", "corpus.txt", corpus.clone().into_bytes())
        .await;

    let plan = server
        .post("/v1/plans")
        .json(&body(&train))
        .send()
        .await
        .unwrap();
    assert_eq!(plan.status(), 200);
    let plan: Value = plan.json().await.unwrap();
    assert_eq!(plan["summary"]["stages"], 2, "{plan}");
    assert_eq!(plan["summary"]["schedule"], "chronos:0", "{plan}");
    assert_eq!(
        plan["summary"]["peak_bytes"].as_array().unwrap().len(),
        2,
        "{plan}"
    );
    // bf16 activations need CUDA devices: a plan is refused by field, a job is created and
    // failed by field, the user at fault.
    let mut bf16 = body(&train);
    bf16["training"]["precision"] = json!("bf16");
    let refused = server.post("/v1/plans").json(&bf16).send().await.unwrap();
    assert_eq!(refused.status(), 422);
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["param"], "training.precision", "{problem}");
    let failed = server.create_job(&bf16).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "invalid_spec", "{failed}");
    assert_eq!(failed["error"]["param"], "training.precision", "{failed}");
    assert_eq!(failed["error"]["fault"], "user", "{failed}");

    let job = server.create_job(&body(&train)).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let stream = server
        .get(&format!("/v1/jobs/{id}/events/stream"))
        .send()
        .await
        .unwrap();
    let events = read_sse(stream, |kind, data| {
        kind == "state" && (data["to"] == "succeeded" || data["to"] == "failed")
    })
    .await;
    let job = server.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{events:?}");
    let metrics = server.get_json(&format!("/v1/jobs/{id}/metrics")).await;
    let losses: Vec<f64> = metrics["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 4);
    assert!(losses[3] < losses[0], "the loss falls: {losses:?}");

    let download = |name: &str| {
        let path = format!("/v1/jobs/{id}/checkpoints/4/files/{name}");
        let request = server.get(&path);
        async move { request.send().await.unwrap().bytes().await.unwrap() }
    };
    let dir = tempfile::tempdir().unwrap();
    let got = dir.path().join("got");
    std::fs::create_dir_all(&got).unwrap();
    for name in ["model.safetensors", "config.json"] {
        std::fs::write(got.join(name), download(name).await).unwrap();
    }

    // The same job straight through the executor gives the same bytes.
    let corpus_path = dir.path().join("corpus.txt");
    std::fs::write(&corpus_path, &corpus).unwrap();
    let mut spec: JobSpec = serde_json::from_value(body(corpus_path.to_str().unwrap())).unwrap();
    spec.devices = Some("cpu:2x64MiB".into());
    let direct = dir.path().join("direct");
    let mut run = Run::prepare(spec, "").unwrap();
    drive(&mut run, &mut Direct(direct.clone())).unwrap();
    assert!(
        std::fs::read(got.join("model.safetensors")).unwrap()
            == std::fs::read(direct.join("step-4/model.safetensors")).unwrap(),
        "the service's checkpoint differs from a direct run's"
    );

    let config = read_hf_config(&got).unwrap();
    let parts = load_hf_parts(
        &got,
        &config,
        &PartId::all(config.dims.layers),
        &Pool::new("host", usize::MAX),
    )
    .unwrap();
    assert_eq!(parts.len(), 4 + 2);
    server.stop().await;
}
both_databases!(trains_for_real_tests, super::trains_for_real);

/// A worker killed mid-job: another finishes it from its last checkpoint, every step's metrics
/// are recorded exactly once, and the final weights equal an uninterrupted run's.
async fn crash_recovery_with_the_real_trainer(url: &str) {
    let server =
        TestServer::start_with(url, Capabilities::production(), |o| o.run_worker = false).await;
    let train = server
        .upload("train", "corpus.txt", TEXT.repeat(20).into_bytes())
        .await;
    let mut job = body(&train);
    job["training"]["steps"] = json!(24);
    job["training"]["checkpoint_every"] = json!(4);
    job["model"]["hidden_size"] = json!(64);
    let config = |id: &str| WorkerConfig {
        worker_id: id.to_owned(),
        lease: Duration::from_secs(1),
        poll: Duration::from_millis(50),
        ..WorkerConfig::new(
            server.data_dir.path().to_owned(),
            parse_devices("cpu:2x64MiB").unwrap(),
        )
    };
    let store = chronospipe::store::connect(url).await.unwrap();
    let survivor = Worker::new(store, Arc::new(ExecRunner), config("worker_b"));

    let reference = server.create_job(&job).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        survivor.try_execute_one().await.unwrap().as_deref(),
        Some(reference.as_str())
    );

    let id = server.create_job(&job).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (url_a, config_a) = (url.to_owned(), config("worker_a"));
    doomed.spawn(async move {
        let store = chronospipe::store::connect(&url_a).await.unwrap();
        let _ = Worker::new(store, Arc::new(ExecRunner), config_a)
            .try_execute_one()
            .await;
    });
    for _ in 0..500 {
        let job = server.get_json(&format!("/v1/jobs/{id}")).await;
        if job["progress"]["step"].as_i64().unwrap() >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    doomed.shutdown_background();

    tokio::time::timeout(Duration::from_secs(60), async {
        while survivor.try_execute_one().await.unwrap().as_deref() != Some(id.as_str()) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the survivor finishes the job");
    let job = server.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["restart_count"], 1, "{job}");
    assert_eq!(server.metric_steps(&id).await, (1..=24).collect::<Vec<_>>());
    let weights = |job: &str| {
        let request = server.get(&format!(
            "/v1/jobs/{job}/checkpoints/24/files/model.safetensors"
        ));
        async move { request.send().await.unwrap().bytes().await.unwrap() }
    };
    assert!(
        weights(&id).await == weights(&reference).await,
        "the resumed job's weights differ from the uninterrupted run's"
    );
    server.stop().await;
}
both_databases!(
    crash_recovery_tests,
    super::crash_recovery_with_the_real_trainer
);

/// The chat fixture's tokenizer, uploaded with its `tokenizer_config.json` and
/// `chat_template.jinja` (or `template` in place of the latter); returns the file's id.
async fn upload_chat_tokenizer(server: &TestServer, template: Option<&str>) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat");
    let part = |name: &str, bytes: Vec<u8>| {
        reqwest::multipart::Part::bytes(bytes).file_name(name.to_owned())
    };
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let template = template.map_or_else(|| read("chat_template.jinja"), |t| t.as_bytes().to_vec());
    let form = reqwest::multipart::Form::new()
        .text("purpose", "tokenizer")
        .part("file", part("tokenizer.json", read("tokenizer.json")))
        .part(
            "tokenizer_config",
            part("tokenizer_config.json", read("tokenizer_config.json")),
        )
        .part("chat_template", part("chat_template.jinja", template));
    let response = server
        .post("/v1/files")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    let file: Value = response.json().await.unwrap();
    file["id"].as_str().unwrap().to_owned()
}

async fn finished_job(server: &TestServer, body: &Value) -> Value {
    let id = server.create_job(body).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let stream = server
        .get(&format!("/v1/jobs/{id}/events/stream"))
        .send()
        .await
        .unwrap();
    read_sse(stream, |kind, data| {
        kind == "state" && (data["to"] == "succeeded" || data["to"] == "failed")
    })
    .await;
    server.get_json(&format!("/v1/jobs/{id}")).await
}

/// A chat JSONL file trains with the tokenizer's own template and reports a loss; a line that
/// is not a chat record is a 422 at upload naming it; a template that fails to render fails the
/// job naming the record.
async fn chat_jsonl_trains(url: &str) {
    let server = TestServer::start_with(url, Capabilities::production(), |_| {}).await;
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat");
    let chats = std::fs::read_to_string(fixture.join("chat.jsonl")).unwrap();
    let bad = format!("{chats}{{\"text\": \"a document\"}}\n");
    let form = reqwest::multipart::Form::new()
        .text("purpose", "train")
        .part("file", reqwest::multipart::Part::bytes(bad.into_bytes()));
    let response = server
        .post("/v1/files")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("line 4") && detail.contains("one kind per file"),
        "{problem}"
    );

    let train = server
        .upload("train", "chat.jsonl", chats.repeat(4).into_bytes())
        .await;
    let tokenizer = upload_chat_tokenizer(&server, None).await;
    let mut job = body(&train);
    job["model"]["vocab_size"] = json!(320);
    job["data"]["tokenizer"] = json!(tokenizer);
    job["training"]["steps"] = json!(3);
    let done = finished_job(&server, &job).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let id = done["id"].as_str().unwrap();
    let metrics = server.get_json(&format!("/v1/jobs/{id}/metrics")).await;
    let losses: Vec<f64> = metrics["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 3, "{metrics}");
    // About ln(320) from a fresh model: a mean over counted tokens, not diluted by masked ones.
    assert!(losses.iter().all(|l| (4.0..8.0).contains(l)), "{losses:?}");

    let failing =
        upload_chat_tokenizer(&server, Some("{{ raise_exception('no chats here') }}")).await;
    job["data"]["tokenizer"] = json!(failing);
    // The training data is rendered when the job is made: a 422 naming the record, not a
    // job that fails when it starts.
    let response = server.post("/v1/jobs").json(&job).send().await.unwrap();
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["param"], "data.train", "{problem}");
    let message = problem["detail"].as_str().unwrap();
    assert!(
        message.contains("line 1") && message.contains("no chats here"),
        "{problem}"
    );
    server.stop().await;
}
both_databases!(chat_jsonl_trains_tests, super::chat_jsonl_trains);
