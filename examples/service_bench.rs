//! Latency of `GET /v1/jobs/{id}` and `POST /v1/jobs` under a fixed request rate, from a
//! second process. Two roles:
//!
//! ```sh
//! cargo run --example service_bench -- serve DATABASE_URL DATA_DIR ADDR   # terminal 1
//! cargo run --example service_bench -- load http://ADDR get 1000 10      # terminal 2
//! cargo run --example service_bench -- load http://ADDR post 1000 10
//! ```
//!
//! `serve` runs the real service without a worker and with a fixed-answer planner (planning
//! is the planner's cost, not the service's; jobs stay queued). `load` sends requests on a
//! fixed schedule (open loop) and measures each from its scheduled start, so a slow server
//! cannot hide latency by slowing the sender.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chronospipe::api::Limits;
use chronospipe::jobs::{
    Capabilities, DeviceInfo, PlanFailure, PlanOutcome, PlanSummary, Planner, parse_devices,
};
use chronospipe::service::{ServiceOptions, run_service, shutdown_signal};
use chronospipe::spec::JobSpec;
use serde_json::{Value, json};

const KEY: &str = "cp_bench_key";

struct FixedPlanner;

impl Planner for FixedPlanner {
    fn plan(
        &self,
        _: &JobSpec,
        devices: &[DeviceInfo],
        _host_memory_bytes: u64,
    ) -> Result<PlanOutcome, PlanFailure> {
        Ok(PlanOutcome {
            plan: json!({"schedule": "fixed"}),
            svg: String::new(),
            summary: PlanSummary {
                schedule: "fixed".into(),
                stages: 1,
                replicas: 1,
                devices: 1,
                actions_per_device: vec![2],
                peak_bytes: vec![devices.first().map_or(0, |d| d.memory_bytes / 2)],
                eval_peak_bytes: vec![devices.first().map_or(0, |d| d.memory_bytes / 4)],
                step_time_s: 0.01,
                bubble_ratio: 0.0,
                runners_up: vec![],
            },
        })
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["serve", url, dir, addr] => serve(url, dir, addr).await,
        ["load", base, kind, rate, seconds] => {
            load(base, kind, rate.parse().unwrap(), seconds.parse().unwrap()).await
        }
        _ => eprintln!(
            "usage: service_bench serve DATABASE_URL DATA_DIR ADDR | load BASE_URL get|post RATE SECONDS"
        ),
    }
}

async fn serve(url: &str, dir: &str, addr: &str) {
    let options = ServiceOptions {
        database_url: url.to_owned(),
        data_dir: dir.into(),
        devices: parse_devices("cpu:4x1GiB").unwrap(),
        api_key: Some(KEY.to_owned()),
        run_worker: false,
        limits: Limits {
            rate_per_second: 1e6,
            rate_burst: 1e6,
            ..Limits::default()
        },
        lease: Duration::from_secs(30),
        poll: Duration::from_millis(500),
        host_memory_bytes: 1 << 30,
        rank_address: None,
        machine: None,
        network: Default::default(),
    };
    let capabilities = Capabilities {
        planner: Some(Arc::new(FixedPlanner)),
        runner: None,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    eprintln!("serving on {}", listener.local_addr().unwrap());
    run_service(options, capabilities, listener, shutdown_signal())
        .await
        .unwrap();
}

fn body(train: &str) -> Value {
    json!({
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 176, "vocab_size": 256},
        "data": {"train": train},
        "training": {"seq_len": 32, "micro_batch_size": 1, "microbatches": 2, "steps": 10}
    })
}

async fn load(base: &str, kind: &str, rate: u64, seconds: u64) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()
        .unwrap();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "train")
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"bench text".to_vec()),
        );
    let file: Value = client
        .post(format!("{base}/v1/files"))
        .bearer_auth(KEY)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let train = file["id"].as_str().expect("uploaded").to_owned();
    let job: Value = client
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(KEY)
        .json(&body(&train))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job_url = format!("{base}/v1/jobs/{}", job["id"].as_str().expect("created"));
    let post_body = Arc::new(body(&train));

    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due).await;
        let request = match kind {
            "get" => client.get(&job_url),
            _ => client
                .post(format!("{base}/v1/jobs"))
                .json(post_body.as_ref()),
        }
        .bearer_auth(KEY);
        tasks.push(tokio::spawn(async move {
            let ok = request.send().await.is_ok_and(|r| r.status().is_success());
            (Instant::now().duration_since(due.into_std()), ok)
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut errors = 0;
    for task in tasks {
        let (latency, ok) = task.await.unwrap();
        latencies.push(latency);
        errors += usize::from(!ok);
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort();
    let at = |q: f64| {
        latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)].as_secs_f64()
            * 1e3
    };
    println!(
        "{kind} {rate}/s for {seconds} s: {} requests ({:.0}/s achieved), {errors} errors; latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
        latencies.len(),
        latencies.len() as f64 / elapsed,
        at(0.50),
        at(0.90),
        at(0.99),
        at(1.0)
    );
}
