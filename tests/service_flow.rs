//! The service end to end against a real server on 127.0.0.1:0, on SQLite and PostgreSQL:
//! upload, plan, train (through `common::runner()`), follow the event stream, read metrics,
//! download checkpoints; pause, resume, cancel; SIGTERM requeue. A killed worker's job finished
//! by another from its checkpoint is tested with the real trainer in `service_training.rs`.

mod common;

use std::time::Duration;

use common::{TestServer, job_body, read_sse, read_weights};
use serde_json::Value;

const TEXT: &[u8] = b"the quick brown fox jumps over the lazy dog, again and again and again.\n";

async fn end_to_end(url: &str) {
    let server = TestServer::start(url).await;
    let train = server.upload("train", "corpus.txt", TEXT.to_vec()).await;
    let file = server.get_json(&format!("/v1/files/{train}")).await;
    assert_eq!(file["bytes"], TEXT.len());
    assert_eq!(file["sha256"].as_str().unwrap().len(), 64);

    let job = server.create_job(&job_body(&train, 6)).await;
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["object"], "job");
    assert_eq!(job["plan"]["schedule"], "scripted");
    assert_eq!(job["progress"]["total_steps"], 6);

    let stream = server
        .get(&format!("/v1/jobs/{id}/events/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let events = read_sse(stream, |kind, data| {
        kind == "state" && data["to"] == "succeeded"
    })
    .await;
    let ids: Vec<i64> = events.iter().map(|e| e.0).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as i64).collect::<Vec<_>>(),
        "ids are the sequence numbers"
    );
    let kinds: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "metrics").count(),
        6,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "checkpoint").count(),
        3,
        "{kinds:?}"
    );
    assert!(kinds.contains(&"plan"));

    // Last-Event-ID replays from the store what came after it, and the stream ends.
    let replay = server
        .get(&format!("/v1/jobs/{id}/events/stream"))
        .header("Last-Event-ID", "3")
        .send()
        .await
        .unwrap();
    let replayed = read_sse(replay, |_, _| false).await;
    assert_eq!(replayed.first().unwrap().0, 4);
    assert_eq!(replayed.len(), events.len() - 3);

    let job = server.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["progress"]["step"], 6);
    assert_eq!(job["progress"]["tokens"], 6 * 16 * 2);
    assert_eq!(job["latest_metrics"]["step"], 6);
    assert!(job["finished_at"].as_i64().unwrap() >= job["created_at"].as_i64().unwrap());

    let metrics = server
        .get_json(&format!("/v1/jobs/{id}/metrics?limit=100"))
        .await;
    let steps: Vec<i64> = metrics["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    assert!(
        metrics["data"][0]["loss"].is_number()
            && metrics["data"][0]["device_peak_bytes"].is_array()
    );
    let later = server
        .get_json(&format!("/v1/jobs/{id}/metrics?after_step=4"))
        .await;
    assert_eq!(later["data"].as_array().unwrap().len(), 2);

    let checkpoints = server.get_json(&format!("/v1/jobs/{id}/checkpoints")).await;
    let steps: Vec<i64> = checkpoints["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, vec![2, 4, 6]);
    let path = format!("/v1/jobs/{id}/checkpoints/6/files/model.safetensors");
    let response = server.get(&path).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let length: usize = response.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    let weights = response.bytes().await.unwrap();
    assert_eq!(weights.len(), length);
    assert_eq!(read_weights(&weights).len(), 8, "loads as safetensors");
    let partial = server
        .get(&path)
        .header("Range", "bytes=0-7")
        .send()
        .await
        .unwrap();
    assert_eq!(partial.status(), 206);
    assert_eq!(
        partial.headers()["content-range"],
        format!("bytes 0-7/{length}").as_str()
    );
    assert_eq!(partial.bytes().await.unwrap(), weights.slice(0..8));
    let unchanged = server
        .get(&path)
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(unchanged.status(), 304);
    let beyond = server
        .get(&path)
        .header("Range", format!("bytes={length}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(beyond.status(), 416);
    assert_eq!(beyond.headers()["content-type"], "application/problem+json");
    let outside = server
        .get(&format!("/v1/jobs/{id}/checkpoints/6/files/..%2Fsecret"))
        .send()
        .await
        .unwrap();
    assert_eq!(outside.status(), 404);
    let bad_step = server
        .get(&format!("/v1/jobs/{id}/checkpoints/six/files/config.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_step.status(), 400);
    let config = server
        .get(&format!("/v1/jobs/{id}/checkpoints/6/files/config.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(config.json::<Value>().await.unwrap()["model_type"], "llama");

    let devices = server.get_json("/v1/devices").await;
    assert_eq!(devices["data"].as_array().unwrap().len(), 2);
    assert_eq!(devices["data"][0]["memory_bytes"], 64 << 20);
    let queue = server.get_json("/v1/queue").await;
    assert_eq!(queue["length"], 0);
    let plan = server.get_json(&format!("/v1/jobs/{id}/plan")).await;
    assert_eq!(plan["schedule"], "scripted");
    let svg = server
        .get(&format!("/v1/jobs/{id}/plan.svg"))
        .send()
        .await
        .unwrap();
    assert_eq!(svg.headers()["content-type"], "image/svg+xml");

    let prometheus = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        prometheus.contains("chronospipe_jobs{state=\"succeeded\"} 1"),
        "{prometheus}"
    );
    assert!(
        prometheus.contains("chronospipe_steps_total 6"),
        "{prometheus}"
    );
    assert!(prometheus.contains(
        "chronospipe_http_request_duration_seconds_bucket{method=\"GET\",route=\"/v1/jobs/{id}\""
    ));

    // Finished: the file may go now.
    let deleted = server
        .client
        .delete(server.url(&format!("/v1/files/{train}")))
        .bearer_auth(common::KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    server.stop().await;
}
both_databases!(end_to_end_tests, super::end_to_end);

async fn pause_resume_cancel(url: &str) {
    let server = TestServer::start(url).await;
    let train = server.upload("train", "corpus.txt", TEXT.to_vec()).await;
    let id = server.create_job(&job_body(&train, 12)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    server.wait_for(&id, "running").await;
    let paused = server
        .post(&format!("/v1/jobs/{id}/pause"))
        .send()
        .await
        .unwrap();
    assert_eq!(paused.status(), 200);
    assert_eq!(paused.json::<Value>().await.unwrap()["status"], "pausing");
    let job = server.wait_for(&id, "paused").await;
    assert!(
        job["devices"].as_array().unwrap().is_empty(),
        "devices freed"
    );
    let step = job["progress"]["step"].as_i64().unwrap();
    let checkpoints = server.get_json(&format!("/v1/jobs/{id}/checkpoints")).await;
    assert_eq!(
        checkpoints["data"].as_array().unwrap().last().unwrap()["step"],
        step,
        "paused at a checkpoint"
    );
    let again = server
        .post(&format!("/v1/jobs/{id}/pause"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);

    let resumed = server
        .post(&format!("/v1/jobs/{id}/resume"))
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.json::<Value>().await.unwrap()["status"], "queued");
    let job = server.wait_for(&id, "succeeded").await;
    assert_eq!(job["restart_count"], 0);
    assert_eq!(server.metric_steps(&id).await, (1..=12).collect::<Vec<_>>());

    let id = server.create_job(&job_body(&train, 50)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    server.wait_for(&id, "running").await;
    let cancelled = server
        .post(&format!("/v1/jobs/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        cancelled.json::<Value>().await.unwrap()["status"],
        "cancelling"
    );
    let job = server.wait_for(&id, "cancelled").await;
    assert!(job["progress"]["step"].as_i64().unwrap() < 50);
    let twice = server
        .post(&format!("/v1/jobs/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(twice.status(), 409);
    assert_eq!(
        twice.json::<Value>().await.unwrap()["code"],
        "invalid_state"
    );
    server.stop().await;
}
both_databases!(pause_resume_cancel_tests, super::pause_resume_cancel);

async fn sigterm_requeues(url: &str) {
    let server = TestServer::start(url).await;
    let train = server.upload("train", "corpus.txt", TEXT.to_vec()).await;
    let id = server.create_job(&job_body(&train, 20)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    server.wait_for(&id, "running").await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    // Stopping is what SIGTERM does in `serve`: the running job checkpoints and is requeued.
    let data_dir = server.stop().await;
    let server = TestServer::start_in(url, common::capabilities(), data_dir, |_| {}).await;
    let job = server.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["restart_count"], 1, "{job}");
    let job = server.wait_for(&id, "succeeded").await;
    assert_eq!(job["restart_count"], 1);
    assert_eq!(server.metric_steps(&id).await, (1..=20).collect::<Vec<_>>());
    server.stop().await;
}
both_databases!(sigterm_tests, super::sigterm_requeues);
