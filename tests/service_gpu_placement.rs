//! A service on four GPUs (`cuda:0,1,2,3@8GiB`, no GPU needed: the planner only plans and a
//! scripted runner stands in for training), and on four CPU devices, on SQLite and
//! PostgreSQL: each job is planned over as many devices as its `parallelism` asks or the
//! planner picks, smaller jobs run side by side on disjoint devices, `/v1/devices` names the
//! job on each, and the job view shows its replica x stage placement while it runs. Layouts
//! the devices cannot hold are refused by field.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chronospipe::jobs::{Capabilities, ExecPlanner, parse_devices};
use common::{ScriptedRunner, TestServer, job_body};
use serde_json::{Value, json};

fn body(train: &str, parallelism: Value) -> Value {
    let mut body = job_body(train, 400);
    body["model"]["num_layers"] = json!(4);
    body["training"]["microbatches"] = json!(4);
    body["parallelism"] = parallelism;
    body
}

async fn plan(server: &TestServer, body: &Value) -> Value {
    let response = server.post("/v1/plans").json(body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn refused(server: &TestServer, body: &Value) -> (String, String) {
    let response = server.post("/v1/plans").json(body).send().await.unwrap();
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.unwrap();
    let param = problem["param"].as_str().unwrap_or_default().to_owned();
    (
        param,
        problem["detail"].as_str().unwrap_or_default().to_owned(),
    )
}

/// (stages, replicas, devices, step time) of a plan response.
fn shape(plan: &Value) -> (u64, u64, u64, f64) {
    let s = &plan["summary"];
    let n = |k: &str| s[k].as_u64().unwrap();
    (
        n("stages"),
        n("replicas"),
        n("devices"),
        s["step_time_s"].as_f64().unwrap(),
    )
}

async fn jobs_share_out_the_gpus(url: &str) {
    jobs_share_out_the_devices(url, "cuda:0,1,2,3@8GiB", "cuda").await;
}

/// The same on CPU devices: the view's placement is the same for every device kind.
async fn jobs_share_out_the_cpus(url: &str) {
    jobs_share_out_the_devices(url, "cpu:4x1GiB", "cpu").await;
}

async fn jobs_share_out_the_devices(url: &str, spec: &str, kind: &str) {
    let capabilities = Capabilities {
        planner: Some(Arc::new(ExecPlanner)),
        runner: Some(Arc::new(ScriptedRunner {
            step_delay: Duration::from_millis(50),
            fail_at: None,
        })),
    };
    let server = TestServer::start_with(url, capabilities, |o| {
        o.devices = parse_devices(spec).unwrap();
    })
    .await;
    let train = server
        .upload(
            "train",
            "corpus.txt",
            "GPUs side by side. ".repeat(40).into(),
        )
        .await;

    // Fixed layouts use exactly stages x replicas GPUs.
    let layouts = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 4)];
    let mut fixed = Vec::new();
    for (stages, replicas) in layouts {
        let p = plan(
            &server,
            &body(
                &train,
                json!({"stages": stages, "data_parallel": replicas, "schedule": "1f1b"}),
            ),
        )
        .await;
        let (s, r, d, t) = shape(&p);
        assert_eq!((s, r, d), (stages, replicas, stages * replicas), "{p}");
        assert_eq!(p["plan"]["plan"]["replicas"], replicas, "{p}");
        if d == 4 {
            fixed.push(t);
        }
    }
    // "auto": each pipeline degree gets the most replicas the 4 GPUs and the batch allow,
    // and the planner picks the fastest (no slower than any fixed layout on all 4).
    let auto = plan(
        &server,
        &body(
            &train,
            json!({"stages": "auto", "data_parallel": "auto", "schedule": "1f1b"}),
        ),
    )
    .await;
    let (s, r, d, t) = shape(&auto);
    assert_eq!(s * r, d, "{auto}");
    assert!(d <= 4, "{auto}");
    assert_eq!(auto["plan"]["best"]["data_parallel"], r, "{auto}");
    let fastest = fixed.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(t <= fastest * (1.0 + 1e-9), "auto {t} s vs fixed {fixed:?}");

    // Refused by field, saying what would fit.
    let (param, detail) = refused(
        &server,
        &body(&train, json!({"stages": "auto", "data_parallel": 3})),
    )
    .await;
    assert_eq!(param, "parallelism.data_parallel", "{detail}");
    let mut three = body(&train, json!({"stages": "auto", "data_parallel": 3}));
    three["training"]["microbatches"] = json!(3);
    let (param, detail) = refused(&server, &three).await;
    assert_eq!(param, "parallelism.data_parallel", "{detail}");
    assert!(detail.contains("do not divide the 4 devices"), "{detail}");
    let (param, detail) = refused(
        &server,
        &body(&train, json!({"stages": 3, "data_parallel": 2})),
    )
    .await;
    assert_eq!(param, "parallelism.stages", "{detail}");
    assert!(detail.contains("need 6 devices but 4"), "{detail}");

    // Two 2-GPU jobs side by side on disjoint GPUs; a 4-GPU job waits for them.
    let pipeline = server
        .create_job(&body(&train, json!({"stages": 2, "schedule": "1f1b"})))
        .await;
    let replicas = server
        .create_job(&body(&train, json!({"stages": 1, "data_parallel": 2})))
        .await;
    let whole = server
        .create_job(&body(&train, json!({"stages": 2, "data_parallel": 2})))
        .await;
    let id = |j: &Value| j["id"].as_str().unwrap().to_owned();
    let (a, b, c) = (id(&pipeline), id(&replicas), id(&whole));
    let a_view = server.wait_for(&a, "running").await;
    let b_view = server.wait_for(&b, "running").await;
    let placement = |v: &Value| -> Vec<(u64, u64, String)> {
        (v["placement"].as_array().unwrap().iter())
            .map(|p| {
                let n = |k: &str| p[k].as_u64().unwrap();
                (
                    n("replica"),
                    n("stage"),
                    p["device"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    let (pa, pb) = (placement(&a_view), placement(&b_view));
    assert_eq!(pa.len(), 2, "{a_view}");
    assert_eq!(pb.len(), 2, "{b_view}");
    assert_eq!(
        (pa[0].0, pa[0].1, pa[1].0, pa[1].1),
        (0, 0, 0, 1),
        "{a_view}"
    );
    assert_eq!(
        (pb[0].0, pb[0].1, pb[1].0, pb[1].1),
        (0, 0, 1, 0),
        "{b_view}"
    );
    let mut held: Vec<&String> = pa.iter().chain(&pb).map(|p| &p.2).collect();
    held.sort();
    let all: Vec<String> = (0..4).map(|d| format!("{kind}:{d}")).collect();
    assert_eq!(held, all.iter().collect::<Vec<_>>());
    let queued = server.get_json(&format!("/v1/jobs/{c}")).await;
    assert_eq!(queued["status"], "queued", "{queued}");
    assert_eq!(queued["placement"], json!([]), "{queued}");

    // Which job holds each GPU.
    let devices = server.get_json("/v1/devices").await;
    for device in devices["data"].as_array().unwrap() {
        let on = device["id"].as_str().unwrap();
        let job = if pa.iter().any(|p| p.2 == on) { &a } else { &b };
        assert_eq!(device["kind"], kind, "{devices}");
        assert_eq!(device["job"].as_str(), Some(job.as_str()), "{devices}");
    }

    for job in [&a, &b, &c] {
        server
            .post(&format!("/v1/jobs/{job}/cancel"))
            .send()
            .await
            .unwrap();
    }
    server.stop().await;
}

both_databases!(gpu_placement_tests, super::jobs_share_out_the_gpus);
both_databases!(cpu_placement_tests, super::jobs_share_out_the_cpus);
