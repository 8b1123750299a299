//! A data-parallel job through the service (`Capabilities::production()`) on SQLite and
//! PostgreSQL: 2 replicas x 2 stages on a worker's 4 CPU devices, planned over all of them,
//! trained, and its checkpoint byte-identical to the same job run directly.

mod common;

use std::path::PathBuf;

use chronospipe::exec::run::{Observer, Run, RunError, StepMetrics, drive};
use chronospipe::jobs::{Capabilities, parse_devices};
use chronospipe::spec::JobSpec;
use common::{TestServer, read_sse};
use serde_json::{Value, json};

const TEXT: &str = "Two pipelines share each step and sum what they learned. ";

fn body(train: &str) -> Value {
    json!({
        "model": {"hidden_size": 32, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 48, "vocab_size": 256, "init": {"seed": 3}},
        "data": {"train": train},
        "training": {"seq_len": 16, "micro_batch_size": 2, "microbatches": 4, "steps": 2,
                     "checkpoint_every": 2, "optimizer": {"kind": "adamw", "lr": 0.003}},
        "parallelism": {"stages": 2, "schedule": "1f1b", "data_parallel": 2}
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

async fn a_data_parallel_job_runs_on_all_its_devices(url: &str) {
    let server = TestServer::start_with(url, Capabilities::production(), |o| {
        o.devices = parse_devices("cpu:4x64MiB").unwrap();
    })
    .await;
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
    assert_eq!(plan["summary"]["devices"], 4, "{plan}");
    assert_eq!(plan["summary"]["replicas"], 2, "{plan}");
    assert_eq!(plan["plan"]["plan"]["replicas"], 2, "{plan}");
    // Replicas on CPU devices shard their optimizer state unless told not to: each chunk's
    // gradients are reduce-scattered and its weights gathered after the step.
    let programs = plan["plan"]["plan"]["programs"].to_string();
    for action in ["RS0", "AG0", "RS1", "AG1"] {
        assert!(programs.contains(&format!("\"{action}\"")), "{plan}");
    }

    // "auto": the planner picks stages x replicas over the worker's 4 devices and says so.
    let mut auto = body(&train);
    auto["parallelism"]["data_parallel"] = json!("auto");
    auto["parallelism"]["stages"] = json!("auto");
    let chosen = server.post("/v1/plans").json(&auto).send().await.unwrap();
    assert_eq!(chosen.status(), 200);
    let chosen: Value = chosen.json().await.unwrap();
    let replicas = &chosen["plan"]["plan"]["replicas"];
    assert_eq!(
        chosen["plan"]["best"]["data_parallel"], *replicas,
        "{chosen}"
    );
    assert!(replicas.as_u64().unwrap() > 1, "{chosen}");
    let (stages, devices) = (&chosen["summary"]["stages"], &chosen["summary"]["devices"]);
    assert_eq!(
        stages.as_u64().unwrap() * replicas.as_u64().unwrap(),
        devices.as_u64().unwrap(),
        "{chosen}"
    );

    let mut three = body(&train);
    three["parallelism"]["data_parallel"] = json!(3);
    three["training"]["microbatches"] = json!(3);
    let refused = server.post("/v1/plans").json(&three).send().await.unwrap();
    assert_eq!(refused.status(), 422);
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["param"], "parallelism.stages", "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("2 stages x 3 replicas need 6 devices but 4 are available"),
        "{detail}"
    );

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
    // Its devices are given back once it ends, and with them its placement (shown while it
    // runs: tests/service_gpu_placement.rs).
    assert_eq!(job["placement"], json!([]), "{job}");
    let metrics = server.get_json(&format!("/v1/jobs/{id}/metrics")).await;
    assert_eq!(
        metrics["data"].as_array().map(Vec::len),
        Some(2),
        "{metrics}"
    );

    let path = format!("/v1/jobs/{id}/checkpoints/2/files/model.safetensors");
    let got = server
        .get(&path)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let corpus_path = dir.path().join("corpus.txt");
    std::fs::write(&corpus_path, &corpus).unwrap();
    let mut spec: JobSpec = serde_json::from_value(body(corpus_path.to_str().unwrap())).unwrap();
    spec.devices = Some("cpu:4x64MiB".into());
    let direct = dir.path().join("direct");
    let mut run = Run::prepare(spec, "").unwrap();
    drive(&mut run, &mut Direct(direct.clone())).unwrap();
    assert!(
        got[..] == std::fs::read(direct.join("step-2/model.safetensors")).unwrap()[..],
        "the service's checkpoint differs from a direct run's"
    );
    server.stop().await;
}
both_databases!(
    data_parallel_tests,
    super::a_data_parallel_job_runs_on_all_its_devices
);
