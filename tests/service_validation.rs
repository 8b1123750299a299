//! Validation loss, early stopping, checkpoint retention and epochs through the service, on
//! SQLite and PostgreSQL: each bad combination, and data too short for a window, is a 422 at
//! creation naming its field (data of one window trains any number of steps); a job with
//! validation data reports `val_loss` in its metric rows, its events and its latest metrics,
//! stops early and succeeds with `stopped_early`, marks its best checkpoint and deletes the
//! checkpoints retention lets go, from the store and from disk; an `epochs` job trains the
//! steps its data's windows come to.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chronospipe::jobs::{Capabilities, ExecRunner, Worker, WorkerConfig, parse_devices};
use common::TestServer;
use serde_json::{Value, json};

const TRAIN: &str = "Keep what is used soon near; move the rest away. ";
const VALID: &str = "Memory is a cache: near, fast and small. ";

fn body(train: &str, validation: Option<&str>, training: Value) -> Value {
    let mut body = json!({
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 48, "vocab_size": 256, "init": {"seed": 5}},
        "data": {"train": train},
        "training": {"seq_len": 16, "micro_batch_size": 2, "microbatches": 2,
                     "optimizer": {"kind": "adamw", "lr": 0.01}},
    });
    if let Some(v) = validation {
        body["data"]["validation"] = json!(v);
    }
    for (k, v) in training.as_object().unwrap() {
        body["training"][k] = v.clone();
    }
    body
}

async fn refused(server: &TestServer, body: &Value, param: &str) -> String {
    let response = server.post("/v1/jobs").json(body).send().await.unwrap();
    assert_eq!(response.status(), 422, "{body}");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["param"], param, "{problem}");
    problem["detail"].as_str().unwrap().to_owned()
}

/// Has `worker` run the queued job `id` and returns its view once it ended.
async fn run_queued(server: &TestServer, worker: &Arc<Worker>, id: &str) -> Value {
    let ran = tokio::time::timeout(Duration::from_secs(120), worker.try_execute_one())
        .await
        .expect("the job runs in time")
        .unwrap();
    assert_eq!(ran.as_deref(), Some(id));
    server.get_json(&format!("/v1/jobs/{id}")).await
}

async fn validates_and_stops_early(url: &str) {
    let server =
        TestServer::start_with(url, Capabilities::production(), |o| o.run_worker = false).await;
    let store = chronospipe::store::connect(url).await.unwrap();
    let config = WorkerConfig {
        worker_id: "worker_validation".to_owned(),
        poll: Duration::from_millis(50),
        ..WorkerConfig::new(
            server.data_dir.path().to_owned(),
            parse_devices("cpu:2x64MiB").unwrap(),
        )
    };
    let worker = Worker::new(store, Arc::new(ExecRunner), config);
    let train = server
        .upload("train", "train.txt", TRAIN.repeat(30).into_bytes())
        .await;
    let valid = server
        .upload("validation", "valid.txt", VALID.repeat(3).into_bytes())
        .await;

    // Each bad combination, by field.
    let both = body(&train, None, json!({"steps": 4, "epochs": 1}));
    assert!(
        refused(&server, &both, "training.epochs")
            .await
            .contains("not both")
    );
    let neither = body(&train, None, json!({}));
    refused(&server, &neither, "training.steps").await;
    let blind = body(&train, None, json!({"steps": 4, "eval_every": 2}));
    let detail = refused(&server, &blind, "training.eval_every").await;
    assert!(detail.contains("data.validation"), "{detail}");
    let blind = body(
        &train,
        None,
        json!({"steps": 4, "early_stopping": {"patience": 1}}),
    );
    refused(&server, &blind, "training.early_stopping").await;
    let none_kept = body(&train, None, json!({"steps": 4, "keep_checkpoints": 0}));
    refused(&server, &none_kept, "training.keep_checkpoints").await;
    // Data too short is refused when the job is created, not when it starts: validation
    // data without one window of 16 tokens and a target (17 bytes) ...
    let short = server
        .upload("validation", "short.txt", b"too short".to_vec())
        .await;
    let detail = refused(
        &server,
        &body(&train, Some(&short), json!({"steps": 4})),
        "data.validation",
    )
    .await;
    assert!(
        detail.contains("9 tokens") && detail.contains("17"),
        "{detail}"
    );
    // ... and training data without one window, with epochs or with steps; what would fit
    // is named.
    let tiny = server
        .upload("train", "tiny.txt", b"two words".to_vec())
        .await;
    for training in [json!({"epochs": 1}), json!({"steps": 4})] {
        let detail = refused(&server, &body(&tiny, None, training), "data.train").await;
        assert!(
            detail.contains("9 tokens")
                && detail.contains("17")
                && detail.contains("training.seq_len of at most 8"),
            "{detail}"
        );
    }

    // A learning rate that overfits the training sentence: the validation loss falls, then
    // rises; two evaluations in a row above the lowest stop the run.
    let stopping = body(
        &train,
        Some(&valid),
        json!({"steps": 30, "checkpoint_every": 1, "keep_checkpoints": 1,
               "optimizer": {"kind": "adamw", "lr": 0.05},
               "early_stopping": {"patience": 2}}),
    );
    let job = server.create_job(&stopping).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let job = run_queued(&server, &worker, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["stopped_early"], true, "{job}");
    let metrics = server
        .get_json(&format!("/v1/jobs/{id}/metrics?limit=100"))
        .await;
    let val: Vec<f64> = (metrics["data"].as_array().unwrap().iter())
        .map(|r| r["val_loss"].as_f64().expect("every step evaluates"))
        .collect();
    // Stopped at the second evaluation in a row above the lowest, not before.
    let last = val.len();
    let lowest = (0..last)
        .min_by(|&a, &b| val[a].total_cmp(&val[b]))
        .unwrap();
    assert_eq!(lowest + 3, last, "{val:?}");
    let (best, last) = (lowest as i64 + 1, last as i64);
    assert_eq!(job["progress"]["step"], last, "{job}");
    assert_eq!(
        job["latest_metrics"]["val_loss"].as_f64(),
        val.last().copied()
    );

    let events = server
        .get_json(&format!("/v1/jobs/{id}/events?limit=100"))
        .await;
    let of_kind = |kind: &str| -> Vec<Value> {
        (events["data"].as_array().unwrap().iter())
            .filter(|e| e["kind"] == kind)
            .map(|e| e["data"].clone())
            .collect()
    };
    let evaluations = of_kind("evaluation");
    assert_eq!(evaluations.len(), val.len(), "{events}");
    assert_eq!(evaluations[0]["val_loss"].as_f64(), Some(val[0]));
    assert_eq!(evaluations[0]["val_windows"], 7, "{events}");
    let stopped = of_kind("stopped_early");
    assert_eq!(
        stopped,
        [json!({"step": last, "best_step": best})],
        "{events}"
    );
    let mut deleted: Vec<i64> = (of_kind("checkpoint_deleted").iter())
        .map(|e| e["step"].as_i64().unwrap())
        .collect();
    deleted.sort();
    let gone: Vec<i64> = (1..last).filter(|&s| s != best).collect();
    assert_eq!(deleted, gone, "{events}");

    // The lowest validation loss's checkpoint and the latest are kept and the first marked
    // best; the others are gone from the store and the disk.
    let checkpoints = server.get_json(&format!("/v1/jobs/{id}/checkpoints")).await;
    let kept: Vec<(i64, bool, Option<f64>)> = (checkpoints["data"].as_array().unwrap().iter())
        .map(|c| {
            (
                c["step"].as_i64().unwrap(),
                c["best"] == true,
                c["val_loss"].as_f64(),
            )
        })
        .collect();
    let at = |step: i64| Some(val[step as usize - 1]);
    assert_eq!(
        kept,
        [(best, true, at(best)), (last, false, at(last))],
        "{checkpoints}"
    );
    let on_disk = server
        .data_dir
        .path()
        .join("jobs")
        .join(&id)
        .join("checkpoints");
    for step in 1..=last {
        let there = on_disk.join(format!("step-{step}")).exists();
        assert_eq!(there, step == best || step == last, "step {step}");
    }

    // One epoch over 91 windows of 16 tokens, 4 sequences a step: 23 steps.
    let epochs = body(&train, None, json!({"epochs": 1, "checkpoint_every": 100}));
    let job = server.create_job(&epochs).await;
    assert_eq!(job["progress"]["total_steps"], 23, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let job = run_queued(&server, &worker, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["progress"]["step"], 23, "{job}");
    assert_eq!(job["stopped_early"], false, "{job}");

    // One window (17 bytes) is all a run needs: its steps cycle through the windows, so a
    // job of more sequences than the data has windows is accepted and trains.
    let one = server
        .upload("train", "one.txt", TRAIN.as_bytes()[..17].to_vec())
        .await;
    let job = server
        .create_job(&body(&one, None, json!({"steps": 3})))
        .await;
    assert_eq!(job["progress"]["total_steps"], 3, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let job = run_queued(&server, &worker, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["progress"]["step"], 3, "{job}");
    server.stop().await;
}
both_databases!(
    validates_and_stops_early_tests,
    super::validates_and_stops_early
);
