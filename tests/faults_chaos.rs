//! Workers killed at random under load: three `chronospipe worker` processes on one PostgreSQL
//! database (a database of this test's own on the `DATABASE_URL` server), twelve small jobs
//! queued, and every few seconds one worker killed with SIGKILL and started again, for about a
//! minute. Every job succeeds, every step's metric is recorded exactly once, every job's final
//! weights equal those of an uninterrupted run of its job, and at the end no job is leased.

mod common;
#[path = "common/worker_process.rs"]
mod worker_process;

use std::time::{Duration, Instant};

use common::{TestDb, TestServer};
use serde_json::{Value, json};
use sqlx::Connection;
use worker_process::{WorkerProcess, tails};

const TEXT: &str = "Chaos is a ladder; leases keep the climbers apart. ";
const JOBS: usize = 12;
const SEEDS: [u64; 3] = [3, 5, 8];
const STEPS: i64 = 150;
/// How long the workers are killed and restarted for, and how often one is killed.
const CHAOS: Duration = Duration::from_secs(60);
const KILL_EVERY: Duration = Duration::from_millis(3500);
/// Each worker's lease: a killed worker's job is taken over this long after its last renewal.
const LEASE_SECONDS: &str = "2";

fn body(train: &str, seed: u64) -> Value {
    json!({
        "model": {"hidden_size": 64, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 96, "vocab_size": 256, "init": {"seed": seed}},
        "data": {"train": train},
        "training": {"seq_len": 32, "micro_batch_size": 2, "microbatches": 4, "steps": STEPS,
                     "checkpoint_every": 4, "optimizer": {"kind": "adamw", "lr": 0.003}},
        "parallelism": {"stages": 2, "schedule": "1f1b"}
    })
}

async fn job_ids(
    server: &TestServer,
    train: &str,
    seeds: impl Iterator<Item = u64>,
) -> Vec<String> {
    let mut ids = Vec::new();
    for seed in seeds {
        let job = server.create_job(&body(train, seed)).await;
        ids.push(job["id"].as_str().unwrap().to_owned());
    }
    ids
}

async fn all_succeeded(server: &TestServer, ids: &[String]) -> Result<(), String> {
    for id in ids {
        let job = server.get_json(&format!("/v1/jobs/{id}")).await;
        match job["status"].as_str() {
            Some("succeeded") => {}
            Some("failed" | "cancelled") => panic!("job {id} ended badly: {job}"),
            other => return Err(format!("{id}: {other:?}")),
        }
    }
    Ok(())
}

async fn weights(server: &TestServer, id: &str) -> bytes::Bytes {
    let path = format!("/v1/jobs/{id}/checkpoints/{STEPS}/files/model.safetensors");
    let response = server.get(&path).send().await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response.bytes().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_survive_workers_killed_at_random() {
    let db = TestDb::postgres().await;
    let server = TestServer::api_for_workers(&db.url).await;
    let train = server
        .upload("train", "corpus.txt", TEXT.repeat(40).into_bytes())
        .await;
    let ids = job_ids(&server, &train, (0..JOBS).map(|i| SEEDS[i % SEEDS.len()])).await;
    let logs = tempfile::tempdir().unwrap();
    let data_dir = server.data_dir.path().to_owned();
    let mut workers: Vec<WorkerProcess> = (0..3)
        .map(|n| WorkerProcess::start(&db.url, &data_dir, logs.path(), n, LEASE_SECONDS))
        .collect();
    let mut dead_logs = Vec::new();

    let started = Instant::now();
    let mut kills = 0;
    let mut rng_state = 0x2545_f491_4f6c_dd1du64;
    while started.elapsed() < CHAOS && all_succeeded(&server, &ids).await.is_err() {
        tokio::time::sleep(KILL_EVERY).await;
        // xorshift: which worker dies is random but repeatable.
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        let victim = (rng_state % workers.len() as u64) as usize;
        let n = 3 + kills;
        let killed = std::mem::replace(
            &mut workers[victim],
            WorkerProcess::start(&db.url, &data_dir, logs.path(), n, LEASE_SECONDS),
        );
        // `Child::kill` is SIGKILL: no checkpoint, no requeue, no lease given back.
        dead_logs.push(killed.kill());
        kills += 1;
    }
    let chaos_s = started.elapsed().as_secs_f64();
    let mut waited = 0;
    while let Err(pending) = all_succeeded(&server, &ids).await {
        waited += 1;
        assert!(
            waited < 1200,
            "jobs still unfinished 120 s after the chaos ({pending}):\n{}",
            tails(&workers, &dead_logs, 15)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_done_s = started.elapsed().as_secs_f64();

    // Uninterrupted runs of each seed's job, for the weights.
    let references = job_ids(&server, &train, SEEDS.iter().copied()).await;
    while all_succeeded(&server, &references).await.is_err() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut restarts = 0;
    for id in &ids {
        let job = server.get_json(&format!("/v1/jobs/{id}")).await;
        restarts += job["restart_count"].as_i64().unwrap();
    }
    println!(
        "{kills} workers killed in {chaos_s:.1} s; {restarts} job restarts; all {JOBS} jobs done \
         {all_done_s:.1} s after the start"
    );
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            server.metric_steps(id).await,
            (1..=STEPS).collect::<Vec<_>>(),
            "job {id}: each step's metric exactly once"
        );
        let reference = &references[i % SEEDS.len()];
        assert!(
            weights(&server, id).await == weights(&server, reference).await,
            "job {id} (seed {}) ends with other weights than an uninterrupted run",
            SEEDS[i % SEEDS.len()]
        );
    }
    for id in &references {
        let job = server.get_json(&format!("/v1/jobs/{id}")).await;
        assert_eq!(
            job["restart_count"], 0,
            "the reference ran uninterrupted: {job}"
        );
    }
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let leased: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT id, worker_id FROM jobs WHERE worker_id IS NOT NULL OR lease_token IS NOT NULL \
         OR lease_expires_at IS NOT NULL",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(leased.is_empty(), "leases held at the end: {leased:?}");
    assert!(
        restarts > 0,
        "no kill landed on a running job:\n{}",
        tails(&workers, &dead_logs, 15)
    );
    drop(workers);
    drop(conn);
    let _ = server.stop().await;
    db.drop().await;
}
