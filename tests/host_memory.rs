//! Host memory is a budget: `GET /v1/devices` shows it, the planner keeps a plan's offloads
//! within it, and a job whose offloads (or starting weights) cannot fit it is refused by the
//! field to change, saying how many bytes it needs.

mod common;

use std::sync::Arc;

use chronospipe::jobs::{Capabilities, ExecPlanner, parse_devices};
use common::{TestDb, TestServer};
use serde_json::{Value, json};

const TEXT: &str = "What waits long goes to the host and comes back in time. ";

fn body(train: &str, layers: u32) -> Value {
    json!({
        "model": {"hidden_size": 64, "num_layers": layers, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 176, "vocab_size": 256, "init": {"seed": 3}},
        "data": {"train": train},
        "training": {"seq_len": 16, "micro_batch_size": 1, "microbatches": 4, "steps": 2,
                     "optimizer": {"kind": "adamw", "lr": 0.003}},
        "parallelism": {"stages": 2, "schedule": "chronos", "offload": "chronos"}
    })
}

async fn server_with_host(db: &TestDb, host_memory_bytes: u64) -> TestServer {
    let capabilities = Capabilities {
        planner: Some(Arc::new(ExecPlanner)),
        runner: None,
    };
    TestServer::start_with(&db.url, capabilities, |o| {
        // Too small for the weights, gradients and AdamW state of a device's chunks (~2 MiB):
        // the optimizer state must be offloaded.
        o.devices = parse_devices("cpu:2x1900KiB").unwrap();
        o.run_worker = false;
        o.host_memory_bytes = host_memory_bytes;
    })
    .await
}

async fn plan(server: &TestServer, body: &Value) -> (u16, Value) {
    let answer = server.post("/v1/plans").json(body).send().await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_keep_their_offloads_within_the_host_memory() {
    let db = TestDb::sqlite().await;
    // Room for the weights (~1.1 MiB for 4 layers) but not for the offloaded AdamW state.
    let small = server_with_host(&db, 1536 << 10).await;
    let devices = small.get_json("/v1/devices").await;
    assert_eq!(devices["host_memory_bytes"], 1536 << 10, "{devices}");
    let train = small
        .upload("train", "corpus.txt", TEXT.repeat(10).into_bytes())
        .await;

    let (status, problem) = plan(&small, &body(&train, 4)).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["param"], "parallelism.offload", "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("offloaded tensors need") && detail.contains("--host-memory"),
        "{detail}"
    );
    // Weights that cannot even start in the host pool are refused by the model.
    let (status, problem) = plan(&small, &body(&train, 8)).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["param"], "model", "{problem}");
    let _ = small.stop().await;

    let roomy = server_with_host(&db, 64 << 20).await;
    let (status, planned) = plan(&roomy, &body(&train, 4)).await;
    assert_eq!(status, 200, "{planned}");
    let choices = planned["plan"]["best"]["choices"].to_string();
    assert!(choices.contains("offload"), "{planned}");
    let _ = roomy.stop().await;
    db.drop().await;
}
