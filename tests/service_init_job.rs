//! `model.init.from` naming another job's checkpoint, on SQLite and PostgreSQL: a job starts
//! from a job's latest or a given checkpoint with exactly the weights it would get from the
//! same files uploaded as a model; each way of naming a checkpoint wrongly is a 422 naming
//! `model.init.from`; the checkpoints unfinished jobs start from are reported in use, and one
//! deleted by retention while a job naming it is created refuses that job. The CLI,
//! which has no jobs, refuses a job id there.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chronospipe::exec::run::{Run, RunError};
use chronospipe::jobs::{Capabilities, ExecRunner, Worker, WorkerConfig, parse_devices};
use chronospipe::spec::JobSpec;
use chronospipe::store::{CheckpointUse, NewJob, Store, StoreError, new_id};
use common::TestServer;
use serde_json::{Value, json};

const TEXT: &str = "Weights carry over; the optimizer starts again from nothing. ";

fn body(train: &str, init: Value) -> Value {
    json!({
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 48, "vocab_size": 256, "init": init},
        "data": {"train": train},
        "training": {"seq_len": 16, "micro_batch_size": 2, "microbatches": 2, "steps": 4,
                     "checkpoint_every": 2, "optimizer": {"kind": "adamw", "lr": 0.01}},
    })
}

struct Fixture {
    server: TestServer,
    store: Arc<dyn Store>,
    worker: Arc<Worker>,
    train: String,
}

impl Fixture {
    /// Creates the job and runs it to its end on the test's own worker.
    async fn run(&self, body: &Value) -> String {
        let id = self.server.create_job(body).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let ran = tokio::time::timeout(Duration::from_secs(120), self.worker.try_execute_one())
            .await
            .expect("the job runs in time")
            .unwrap();
        let job = self.server.get_json(&format!("/v1/jobs/{id}")).await;
        assert_eq!(ran.as_deref(), Some(id.as_str()), "{job}");
        let job = self.server.get_json(&format!("/v1/jobs/{id}")).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        id
    }

    async fn first_loss(&self, id: &str) -> f64 {
        let metrics = self
            .server
            .get_json(&format!("/v1/jobs/{id}/metrics"))
            .await;
        metrics["data"][0]["loss"].as_f64().unwrap()
    }

    /// Downloads `job`'s checkpoint at `step` and uploads it as a model file.
    async fn upload_checkpoint(&self, job: &str, step: u64) -> String {
        let file = |name: &str| {
            let request = self
                .server
                .get(&format!("/v1/jobs/{job}/checkpoints/{step}/files/{name}"));
            async move {
                request
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap()
                    .to_vec()
            }
        };
        let part = |bytes: Vec<u8>, name: &str| {
            reqwest::multipart::Part::bytes(bytes).file_name(name.to_owned())
        };
        let form = reqwest::multipart::Form::new()
            .text("purpose", "model")
            .part(
                "file",
                part(file("model.safetensors").await, "model.safetensors"),
            )
            .part("config", part(file("config.json").await, "config.json"));
        let response = self
            .server
            .post("/v1/files")
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// POSTs a job body that must be refused naming `model.init.from`; returns the detail.
    async fn refused(&self, request: reqwest::RequestBuilder) -> String {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 422);
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "invalid_spec", "{problem}");
        assert_eq!(problem["param"], "model.init.from", "{problem}");
        problem["detail"].as_str().unwrap().to_owned()
    }

    async fn refused_init(&self, init: Value) -> String {
        let body = body(&self.train, init);
        self.refused(self.server.post("/v1/jobs").json(&body)).await
    }
}

async fn starts_from_a_job(url: &str) {
    let server =
        TestServer::start_with(url, Capabilities::production(), |o| o.run_worker = false).await;
    let store = chronospipe::store::connect(url).await.unwrap();
    let config = WorkerConfig {
        worker_id: "worker_init".to_owned(),
        poll: Duration::from_millis(50),
        ..WorkerConfig::new(
            server.data_dir.path().to_owned(),
            parse_devices("cpu:2x64MiB").unwrap(),
        )
    };
    let worker = Worker::new(store.clone(), Arc::new(ExecRunner), config);
    let train = server
        .upload("train", "corpus.txt", TEXT.repeat(20).into_bytes())
        .await;
    let f = Fixture {
        server,
        store,
        worker,
        train,
    };

    let source = f.run(&body(&f.train, json!({"seed": 5}))).await;
    let random_loss = f.first_loss(&source).await;

    // The latest checkpoint (step 4), pinned when the job is made; counted in use until the
    // job ends.
    let latest_body = body(&f.train, json!({"from": source}));
    let latest = f.server.create_job(&latest_body).await;
    let latest_id = latest["id"].as_str().unwrap().to_owned();
    assert_eq!(
        latest["spec"]["model"]["init"],
        json!({"from": {"job": source, "step": 4}}),
        "{latest}"
    );
    assert_eq!(
        f.store.checkpoints_in_use(&source).await.unwrap(),
        vec![(4, latest_id.clone())]
    );
    assert_eq!(
        f.worker.try_execute_one().await.unwrap().as_deref(),
        Some(latest_id.as_str())
    );
    let job = f.server.get_json(&format!("/v1/jobs/{latest_id}")).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(
        f.store
            .checkpoints_in_use(&source)
            .await
            .unwrap()
            .is_empty()
    );

    // The same weights uploaded as a model file give the same first loss, to the bit.
    let uploaded = f.upload_checkpoint(&source, 4).await;
    let from_file = f.run(&body(&f.train, json!({"from": uploaded}))).await;
    let latest_loss = f.first_loss(&latest_id).await;
    assert_eq!(latest_loss, f.first_loss(&from_file).await);
    assert!(
        latest_loss < random_loss,
        "{latest_loss} vs a random init's {random_loss}"
    );

    // A given step; the architecture fields may be left to the checkpoint's config.json.
    let mut step_body = body(&f.train, json!({"from": {"job": source, "step": 2}}));
    step_body["model"] = json!({"init": {"from": {"job": source, "step": 2}}});
    let at_step = f.run(&step_body).await;
    let uploaded = f.upload_checkpoint(&source, 2).await;
    let from_file = f.run(&body(&f.train, json!({"from": uploaded}))).await;
    let step_loss = f.first_loss(&at_step).await;
    assert_eq!(step_loss, f.first_loss(&from_file).await);
    assert_ne!(step_loss, latest_loss, "step 2's weights are not step 4's");

    // Retention deleting a checkpoint between a new job's check and its insert: the insert,
    // which locks the checkpoint's row before it holds it, finds no step 3 and writes nothing.
    let tenant = f.store.create_tenant("late").await.unwrap().id;
    let late = NewJob {
        id: new_id("job"),
        tenant_id: tenant.clone(),
        spec: "{}".into(),
        total_steps: 4,
        file_ids: vec![],
        checkpoint_uses: vec![CheckpointUse {
            job_id: source.clone(),
            step: 3,
        }],
        idempotency_key: None,
        request_hash: None,
        planned: None,
        max_restarts: None,
    };
    let err = f.store.insert_job(&late).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::CheckpointGone { step: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("keep_checkpoints"), "{err}");
    let found = f.store.get_job(&tenant, &late.id).await.unwrap();
    assert!(found.is_none());

    refusals(&f, &source).await;
    f.server.stop().await;
}
both_databases!(starts_from_a_job_tests, super::starts_from_a_job);

async fn refusals(f: &Fixture, source: &str) {
    let detail = f.refused_init(json!({"from": "job_0000nosuchjob"})).await;
    assert!(
        detail.contains("no such job \"job_0000nosuchjob\""),
        "{detail}"
    );

    // Another tenant's job is no job at all.
    let other = chronospipe::api::create_key(f.store.as_ref(), "other")
        .await
        .unwrap();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "train")
        .part(
            "file",
            reqwest::multipart::Part::bytes(TEXT.repeat(20).into_bytes()).file_name("t.txt"),
        );
    let upload = f.server.client.post(f.server.url("/v1/files"));
    let response = upload.bearer_auth(&other).multipart(form).send().await;
    let their_train: Value = response.unwrap().json().await.unwrap();
    let their_body = body(their_train["id"].as_str().unwrap(), json!({"from": source}));
    let request = f.server.client.post(f.server.url("/v1/jobs"));
    let detail = f
        .refused(request.bearer_auth(&other).json(&their_body))
        .await;
    assert!(
        detail.contains(&format!("no such job \"{source}\"")),
        "{detail}"
    );

    // A job that has written no checkpoint (its plan failed: bf16 on CPU devices).
    let mut failed = body(&f.train, json!({"seed": 1}));
    failed["training"]["precision"] = json!("bf16");
    let failed = f.server.create_job(&failed).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let failed = failed["id"].as_str().unwrap();
    let detail = f.refused_init(json!({"from": failed})).await;
    assert!(detail.contains("has no checkpoint yet"), "{detail}");
    let detail = f
        .refused_init(json!({"from": {"job": failed, "step": 2}}))
        .await;
    assert!(detail.contains("has no checkpoint yet"), "{detail}");

    let detail = f
        .refused_init(json!({"from": {"job": source, "step": 3}}))
        .await;
    assert!(
        detail.contains("no checkpoint at step 3; its checkpoints are at steps 2, 4"),
        "{detail}"
    );

    // A checkpoint whose weights are not all there is refused, not loaded.
    let row = f.store.get_checkpoint(source, 2).await.unwrap().unwrap();
    let weights = std::path::Path::new(&row.path).join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let detail = f
        .refused_init(json!({"from": {"job": source, "step": 2}}))
        .await;
    assert!(
        detail.contains(&format!(
            "the checkpoint of job {source} at step 2 is not complete: model.safetensors holds {} bytes, its manifest says {len}",
            len / 2
        )),
        "{detail}"
    );
    // The latest one is untouched and still usable for a plan.
    let plan = f
        .server
        .post("/v1/plans")
        .json(&body(&f.train, json!({"from": source})))
        .send()
        .await
        .unwrap();
    assert_eq!(plan.status(), 200);

    // Damaged after the job was made: the run fails by field, the user's to fix, nothing loaded.
    let doomed = f
        .server
        .create_job(&body(&f.train, json!({"from": source})))
        .await;
    let doomed = doomed["id"].as_str().unwrap();
    let row = f.store.get_checkpoint(source, 4).await.unwrap().unwrap();
    std::fs::remove_file(std::path::Path::new(&row.path).join("config.json")).unwrap();
    assert_eq!(
        f.worker.try_execute_one().await.unwrap().as_deref(),
        Some(doomed)
    );
    let job = f.server.get_json(&format!("/v1/jobs/{doomed}")).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "checkpoint_unavailable", "{job}");
    assert_eq!(job["error"]["param"], "model.init.from", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("config.json is missing"), "{job}");
}

/// `chronospipe train` keeps jobs nowhere: a job id in `model.init.from` is refused by name.
#[test]
fn the_cli_refuses_a_job_id() {
    for init in [
        json!({"from": "job_0193abc"}),
        json!({"from": {"job": "job_0193abc", "step": 2}}),
    ] {
        let mut spec: JobSpec = serde_json::from_value(body("corpus.txt", init)).unwrap();
        spec.devices = Some("cpu:1x64MiB".into());
        let Err(RunError::Spec(errors)) = Run::prepare(spec, "") else {
            panic!("a job id is refused by field");
        };
        assert_eq!(errors[0].param, "model.init.from");
        assert!(
            errors[0]
                .message
                .contains("names a job's checkpoint, which only the service resolves"),
            "{}",
            errors[0].message
        );
    }
}
