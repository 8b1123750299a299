//! The API's contract on SQLite and PostgreSQL: tenant isolation, idempotency, every error
//! status with its problem+json body, pagination edges.

mod common;

use std::path::Path;

use common::{KEY, TestServer, job_body};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn problem(response: reqwest::Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status.as_u16());
    assert_eq!(body["type"], format!("urn:chronospipe:problem:{code}"));
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    body
}

async fn tenant_isolation(url: &str) {
    let server =
        TestServer::start_with(url, common::capabilities(), |o| o.run_worker = false).await;
    let store = chronospipe::store::connect(url).await.unwrap();
    let other = chronospipe::api::create_key(store.as_ref(), "other")
        .await
        .unwrap();
    let train = server
        .upload("train", "a.txt", common::ONE_WINDOW.to_vec())
        .await;
    let job = server.create_job(&job_body(&train, 2)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let as_other = |method: reqwest::Method, path: &str| {
        server
            .client
            .request(method, server.url(path))
            .bearer_auth(&other)
    };
    for path in [
        format!("/v1/files/{train}"),
        format!("/v1/jobs/{job}"),
        format!("/v1/jobs/{job}/events"),
        format!("/v1/jobs/{job}/events/stream"),
        format!("/v1/jobs/{job}/metrics"),
        format!("/v1/jobs/{job}/checkpoints"),
        format!("/v1/jobs/{job}/plan"),
        format!("/v1/jobs/{job}/checkpoints/2/files/model.safetensors"),
    ] {
        problem(
            as_other(reqwest::Method::GET, &path).send().await.unwrap(),
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
    }
    for action in ["cancel", "pause", "resume"] {
        let path = format!("/v1/jobs/{job}/{action}");
        problem(
            as_other(reqwest::Method::POST, &path).send().await.unwrap(),
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
    }
    let path = format!("/v1/files/{train}");
    problem(
        as_other(reqwest::Method::DELETE, &path)
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let jobs: Value = as_other(reqwest::Method::GET, "/v1/jobs")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jobs["data"], json!([]));
    let files: Value = as_other(reqwest::Method::GET, "/v1/files")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(files["data"], json!([]));
    // Another tenant's file id is unknown in a job body.
    let response = as_other(reqwest::Method::POST, "/v1/jobs")
        .json(&job_body(&train, 2))
        .send()
        .await
        .unwrap();
    let body = problem(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_spec").await;
    assert_eq!(body["param"], "data.train");
    // The queue counts their job without naming it.
    let queue: Value = as_other(reqwest::Method::GET, "/v1/queue")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(queue["length"], 1);
    assert_eq!(queue["data"][0]["job"], Value::Null);
    assert_eq!(
        server.get_json("/v1/queue").await["data"][0]["job"],
        job.as_str()
    );
    server.stop().await;
}
both_databases!(tenant_isolation_tests, super::tenant_isolation);

async fn idempotency(url: &str) {
    let server =
        TestServer::start_with(url, common::capabilities(), |o| o.run_worker = false).await;
    let train = server
        .upload("train", "a.txt", common::ONE_WINDOW.to_vec())
        .await;
    let body = job_body(&train, 3);
    let first = server
        .post("/v1/jobs")
        .header("Idempotency-Key", "k-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    // Same key, same body (reformatted): the same job.
    let text = serde_json::to_string_pretty(&body).unwrap();
    let again = server
        .post("/v1/jobs")
        .header("Idempotency-Key", "k-1")
        .header("content-type", "application/json")
        .body(text)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["id"], first["id"]);
    // Same key, other body: 422.
    let other = server
        .post("/v1/jobs")
        .header("Idempotency-Key", "k-1")
        .json(&job_body(&train, 4))
        .send()
        .await
        .unwrap();
    let p = problem(
        other,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    assert_eq!(p["param"], "Idempotency-Key");
    // Concurrent requests with one new key: one job.
    let racers: Vec<_> = (0..6)
        .map(|_| {
            server
                .post("/v1/jobs")
                .header("Idempotency-Key", "k-race")
                .json(&body)
                .send()
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for response in futures_util::future::join_all(racers).await {
        let response = response.unwrap();
        assert!(
            response.status() == 201 || response.status() == 200,
            "{}",
            response.status()
        );
        ids.insert(
            response.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    // No key: a new job each time.
    let a = server.create_job(&body).await;
    let b = server.create_job(&body).await;
    assert_ne!(a["id"], b["id"]);
    let jobs = server.get_json("/v1/jobs?limit=100").await;
    assert_eq!(jobs["data"].as_array().unwrap().len(), 4);
    server.stop().await;
}
both_databases!(idempotency_tests, super::idempotency);

async fn error_statuses(url: &str) {
    let server =
        TestServer::start_with(url, common::capabilities(), |o| o.run_worker = false).await;
    let train = server
        .upload("train", "a.txt", common::ONE_WINDOW.to_vec())
        .await;

    // 401
    let none = server
        .client
        .get(server.url("/v1/jobs"))
        .send()
        .await
        .unwrap();
    problem(none, StatusCode::UNAUTHORIZED, "missing_api_key").await;
    let wrong = server
        .client
        .get(server.url("/v1/jobs"))
        .bearer_auth("cp_nope")
        .send()
        .await
        .unwrap();
    problem(wrong, StatusCode::UNAUTHORIZED, "invalid_api_key").await;
    // 400
    let bad = server
        .post("/v1/jobs")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    problem(bad, StatusCode::BAD_REQUEST, "invalid_json").await;
    let unknown = server
        .post("/v1/jobs")
        .json(&json!({"modle": {}}))
        .send()
        .await
        .unwrap();
    let p = problem(unknown, StatusCode::BAD_REQUEST, "invalid_json").await;
    assert_eq!(p["param"], "modle");
    let p = problem(
        server.get("/v1/jobs?limit=0").send().await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_limit",
    )
    .await;
    assert_eq!(p["param"], "limit");
    problem(
        server.get("/v1/jobs?limit=abc").send().await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
    let p = problem(
        server.get("/v1/jobs?status=done").send().await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_status",
    )
    .await;
    assert_eq!(p["param"], "status");
    let p = problem(
        server.get("/v1/jobs?after=job_nope").send().await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_cursor",
    )
    .await;
    assert_eq!(p["param"], "after");
    assert_eq!(p["detail"], "no job \"job_nope\" to list after");
    let p = problem(
        server
            .get("/v1/files?after=file_nope")
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_cursor",
    )
    .await;
    assert_eq!(p["detail"], "no file \"file_nope\" to list after");
    let form = reqwest::multipart::Form::new()
        .text("purpose", "weights")
        .part("file", reqwest::multipart::Part::bytes(b"x".to_vec()));
    let p = problem(
        server
            .post("/v1/files")
            .multipart(form)
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_purpose",
    )
    .await;
    assert_eq!(p["param"], "purpose");
    // 404
    problem(
        server.get("/v1/jobs/job_nope").send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    problem(
        server.get("/v1/files/file_nope").send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    // 422: the spec, with the field's path and every problem
    let mut body = job_body(&train, 2);
    body["training"]["seq_len"] = json!(0);
    body["model"]["num_layers"] = json!(0);
    let p = problem(
        server.post("/v1/jobs").json(&body).send().await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_spec",
    )
    .await;
    let params: Vec<&str> = p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["param"].as_str().unwrap())
        .collect();
    assert!(
        params.contains(&"training.seq_len") && params.contains(&"model.num_layers"),
        "{p}"
    );
    let p = problem(
        server
            .post("/v1/jobs")
            .json(&job_body("file_missing", 2))
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_spec",
    )
    .await;
    assert_eq!(p["param"], "data.train");
    // 422: a model that is not safetensors, a tokenizer that is not tokenizer.json
    let form = reqwest::multipart::Form::new()
        .text("purpose", "model")
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"not weights".to_vec()),
        );
    let p = problem(
        server
            .post("/v1/files")
            .multipart(form)
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_file",
    )
    .await;
    assert_eq!(p["param"], "file");
    let form = reqwest::multipart::Form::new()
        .text("purpose", "tokenizer")
        .part("file", reqwest::multipart::Part::bytes(b"{}".to_vec()));
    problem(
        server
            .post("/v1/files")
            .multipart(form)
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_file",
    )
    .await;
    // A real safetensors model with its config uploads; a config whose settings the model
    // does not compute (biases on the MLP) is refused naming the config's field.
    let dir = tempfile::tempdir().unwrap();
    common::write_weights(dir.path(), &[1.0, 2.0]);
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata");
    let config_of =
        |fixture: &str| std::fs::read(testdata.join(fixture).join("config.json")).unwrap();
    let model_form = |config: Vec<u8>| {
        reqwest::multipart::Form::new()
            .text("purpose", "model")
            .part(
                "file",
                reqwest::multipart::Part::bytes(
                    std::fs::read(dir.path().join("model.safetensors")).unwrap(),
                )
                .file_name("model.safetensors"),
            )
            .part(
                "config",
                reqwest::multipart::Part::bytes(config).file_name("config.json"),
            )
    };
    assert_eq!(
        server
            .post("/v1/files")
            .multipart(model_form(config_of("hf-llama-tiny")))
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    let mut config: Value = serde_json::from_slice(&config_of("hf-llama-tiny")).unwrap();
    config["mlp_bias"] = true.into();
    let mlp_bias = config.to_string().into_bytes();
    let p = problem(
        server
            .post("/v1/files")
            .multipart(model_form(mlp_bias))
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_file",
    )
    .await;
    assert_eq!(p["param"], "config");
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("config.json field mlp_bias"), "{detail}");
    // 422: no plan fits; the smallest memory that would and the closest configuration
    let mut small = job_body(&train, 2);
    small["devices"] = json!("cpu:2x1KiB");
    let p = problem(
        server.post("/v1/plans").json(&small).send().await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "plan_does_not_fit",
    )
    .await;
    assert_eq!(p["smallest_memory_bytes"], common::SMALLEST_FIT);
    assert!(p["closest"].is_object());
    // 422: GPUs (or stages of one) the service does not have, and a cap in the body
    for (devices, want) in [
        (
            "cuda:3",
            "this service has no GPU cuda:3; its devices are cpu:0, cpu:1",
        ),
        (
            "cuda:0x4",
            "this service has no GPU cuda:0/stage0; its devices are cpu:0, cpu:1",
        ),
        ("cuda:0@1GiB", "name the GPU without `@SIZE`"),
    ] {
        let mut on_gpu = job_body(&train, 1);
        on_gpu["devices"] = json!(devices);
        let p = problem(
            server.post("/v1/plans").json(&on_gpu).send().await.unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_spec",
        )
        .await;
        assert_eq!(p["param"], "devices");
        assert!(p["detail"].as_str().unwrap().contains(want), "{p}");
    }
    let plan: Value = server
        .post("/v1/plans")
        .json(&job_body(&train, 2))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(plan["object"], "plan");
    assert!(plan["summary"]["runners_up"].is_array());
    // A job that does not fit is created and failed, the user at fault.
    let failed = server.create_job(&small).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["code"], "plan_does_not_fit");
    assert_eq!(failed["error"]["fault"], "user");
    // 409: a file an unfinished job uses; an action the state does not allow
    let job = server.create_job(&job_body(&train, 2)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let delete = server
        .client
        .delete(server.url(&format!("/v1/files/{train}")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    problem(delete, StatusCode::CONFLICT, "file_in_use").await;
    problem(
        server
            .post(&format!("/v1/jobs/{job}/resume"))
            .send()
            .await
            .unwrap(),
        StatusCode::CONFLICT,
        "invalid_state",
    )
    .await;
    // 413: a JSON body over the limit
    let huge = "x".repeat(2 << 20);
    let too_big = server
        .post("/v1/jobs")
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    problem(too_big, StatusCode::PAYLOAD_TOO_LARGE, "too_large").await;
    let data_dir = server.stop().await;

    // 413 upload and 429 with Retry-After, on a server with small limits.
    let server = TestServer::start_in(url, common::capabilities(), data_dir, |o| {
        o.run_worker = false;
        o.limits.max_upload_bytes = 1000;
        o.limits.rate_per_second = 1.0;
        o.limits.rate_burst = 3.0;
    })
    .await;
    let form = reqwest::multipart::Form::new()
        .text("purpose", "train")
        .part("file", reqwest::multipart::Part::bytes(vec![b'a'; 5000]));
    let p = problem(
        server
            .post("/v1/files")
            .multipart(form)
            .send()
            .await
            .unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    )
    .await;
    assert_eq!(p["param"], "file");
    let mut limited = None;
    for _ in 0..5 {
        let response = server.get("/v1/jobs").send().await.unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(response);
            break;
        }
    }
    let limited = limited.expect("rate limited within 5 requests");
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    problem(limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    server.stop().await;
}
both_databases!(error_status_tests, super::error_statuses);

async fn pagination(url: &str) {
    let server =
        TestServer::start_with(url, common::capabilities(), |o| o.run_worker = false).await;
    let train = server
        .upload("train", "a.txt", common::ONE_WINDOW.to_vec())
        .await;
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(
            server.create_job(&job_body(&train, 2)).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    created.reverse(); // newest first
    let page = server.get_json("/v1/jobs?limit=2").await;
    assert_eq!(page["object"], "list");
    let ids = |page: &Value| {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&page), created[..2]);
    assert_eq!(page["has_more"], true);
    let page = server
        .get_json(&format!("/v1/jobs?limit=2&after={}", created[1]))
        .await;
    assert_eq!(ids(&page), created[2..4]);
    assert_eq!(page["has_more"], true);
    let page = server
        .get_json(&format!("/v1/jobs?limit=2&after={}", created[3]))
        .await;
    assert_eq!(ids(&page), created[4..]);
    assert_eq!(page["has_more"], false);
    // Exactly `limit` left: no more.
    let page = server
        .get_json(&format!("/v1/jobs?limit=4&after={}", created[0]))
        .await;
    assert_eq!(ids(&page).len(), 4);
    assert_eq!(page["has_more"], false);
    // After the last one: empty.
    let page = server
        .get_json(&format!("/v1/jobs?after={}", created[4]))
        .await;
    assert_eq!(page["data"], json!([]));
    assert_eq!(page["has_more"], false);
    let page = server.get_json("/v1/jobs?limit=100").await;
    assert_eq!(ids(&page), created);
    assert_eq!(
        server
            .get("/v1/jobs?limit=101")
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    // Status filter, and queue positions in claim order (oldest first).
    let cancelled = server
        .post(&format!("/v1/jobs/{}/cancel", created[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(
        cancelled.json::<Value>().await.unwrap()["status"],
        "cancelled"
    );
    let page = server.get_json("/v1/jobs?status=cancelled").await;
    assert_eq!(ids(&page), created[..1]);
    let page = server.get_json("/v1/jobs?status=queued").await;
    let positions: Vec<i64> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["queue_position"].as_i64().unwrap())
        .collect();
    assert_eq!(positions, vec![4, 3, 2, 1]);
    // Events page.
    let events = server
        .get_json(&format!("/v1/jobs/{}/events?limit=1", created[0]))
        .await;
    assert_eq!(events["data"][0]["id"], 1);
    assert_eq!(events["has_more"], true);
    let rest = server
        .get_json(&format!("/v1/jobs/{}/events?after=1", created[0]))
        .await;
    assert_eq!(rest["data"][0]["id"], 2);
    // Files page.
    let files = server.get_json("/v1/files?limit=1").await;
    assert_eq!(files["data"].as_array().unwrap().len(), 1);
    assert_eq!(files["has_more"], false);
    server.stop().await;
}
both_databases!(pagination_tests, super::pagination);

async fn refuses_jobs_without_a_trainer(url: &str) {
    let server =
        TestServer::start_with(url, chronospipe::jobs::Capabilities::default(), |_| {}).await;
    let train = server
        .upload("train", "a.txt", common::ONE_WINDOW.to_vec())
        .await;
    let response = server
        .post("/v1/jobs")
        .json(&job_body(&train, 2))
        .send()
        .await
        .unwrap();
    let p = problem(
        response,
        StatusCode::SERVICE_UNAVAILABLE,
        "jobs_unavailable",
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("no trainer"), "{p}");
    let response = server
        .post("/v1/plans")
        .json(&job_body(&train, 2))
        .send()
        .await
        .unwrap();
    problem(
        response,
        StatusCode::SERVICE_UNAVAILABLE,
        "planner_unavailable",
    )
    .await;
    server.stop().await;
}
both_databases!(no_trainer_tests, super::refuses_jobs_without_a_trainer);

async fn event_stream_keeps_alive(url: &str) {
    let server = TestServer::start_with(url, common::capabilities(), |o| {
        o.run_worker = false;
        o.limits.keep_alive = std::time::Duration::from_millis(200);
    })
    .await;
    let train = server
        .upload("train", "a.txt", common::ONE_WINDOW.to_vec())
        .await;
    let id = server.create_job(&job_body(&train, 2)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = server
        .get(&format!("/v1/jobs/{id}/events/stream"))
        .send()
        .await
        .unwrap();
    use futures_util::StreamExt;
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    // The queued job has three events, then nothing happens: an SSE comment keeps it alive.
    while !text.lines().any(|l| l.starts_with(':')) {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next())
            .await
            .expect("a keep-alive in time")
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("id: 3") || text.contains("id:3"), "{text}");
    drop(stream);
    server.stop().await;
}
both_databases!(keep_alive_tests, super::event_stream_keeps_alive);

async fn queue_position_is_capped(url: &str) {
    use chronospipe::store::{NewJob, PlanRow, Planned, QUEUE_POSITION_CAP, connect, new_id};
    let store = connect(url).await.unwrap();
    let tenant = store.create_tenant("t").await.unwrap().id;
    let mut ids = Vec::new();
    for _ in 0..QUEUE_POSITION_CAP + 5 {
        let last = new_id("job");
        ids.push(last.clone());
        let job = NewJob {
            id: last.clone(),
            tenant_id: tenant.clone(),
            spec: "{}".into(),
            total_steps: 1,
            file_ids: vec![],
            checkpoint_uses: vec![],
            idempotency_key: None,
            request_hash: None,
            planned: Some(Planned::Queued {
                plan: PlanRow {
                    plan: None,
                    plan_svg: None,
                    plan_summary: None,
                },
                devices_needed: 1,
            }),
            max_restarts: None,
        };
        store.insert_job(&job).await.unwrap();
    }
    let last = ids.last().unwrap();
    assert_eq!(
        store.queue_position(last).await.unwrap(),
        QUEUE_POSITION_CAP + 1
    );
    // The batch form agrees with the one-job form, in the order asked, capped the same way.
    let asked: Vec<&str> = [1000, 0, 999, 1004, 41]
        .iter()
        .map(|&i| ids[i].as_str())
        .collect();
    let mut one_by_one = Vec::new();
    for id in &asked {
        one_by_one.push(store.queue_position(id).await.unwrap());
    }
    assert_eq!(
        one_by_one,
        vec![QUEUE_POSITION_CAP + 1, 1, 1000, QUEUE_POSITION_CAP + 1, 42]
    );
    assert_eq!(store.queue_positions(&asked).await.unwrap(), one_by_one);
}
both_databases!(queue_position_tests, super::queue_position_is_capped);
