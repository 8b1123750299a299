//! The service's subcommands as a user runs them: `openapi`, `keys create`, `worker` without
//! a trainer, and `serve` creating a first key and serving `/docs` offline.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

fn chronospipe() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chronospipe"));
    for (key, _) in std::env::vars() {
        if key.starts_with("CHRONOSPIPE_") || key == "DATABASE_URL" {
            cmd.env_remove(key);
        }
    }
    cmd
}

#[test]
fn openapi_prints_the_committed_document() {
    let out = chronospipe().arg("openapi").output().unwrap();
    assert!(out.status.success());
    let committed =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json")).unwrap();
    assert!(
        out.stdout == committed,
        "run `cargo run -- openapi > openapi/openapi.json`"
    );
}

#[test]
fn keys_create_prints_a_new_key_each_time() {
    let dir = tempfile::tempdir().unwrap();
    let create = || {
        let out = chronospipe()
            .args(["keys", "create", "--name", "alice", "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let (a, b) = (create(), create());
    assert!(a.starts_with("cp_") && b.starts_with("cp_") && a != b);
}

#[test]
fn worker_runs_with_the_trainer_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = chronospipe()
        .args(["worker", "--data-dir"])
        .arg(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the worker exited on its own"
    );
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn get(addr: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn serve_prints_a_first_key_and_serves_docs_offline() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = chronospipe()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--devices",
            "cpu:2x1GiB",
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "server exited before listening"
        );
        let log: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
        if let Some(addr) = log["fields"]["addr"].as_str() {
            break addr.to_owned();
        }
    };
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    stdout.read_line(&mut printed).unwrap();
    assert!(printed.contains("cp_"), "{printed}");

    let docs = get(&addr, "/docs");
    assert!(
        docs.starts_with("HTTP/1.1 200") && docs.contains("/docs/swagger-ui-bundle.js"),
        "{docs}"
    );
    let bundle = get(&addr, "/docs/swagger-ui-bundle.js");
    assert!(bundle.starts_with("HTTP/1.1 200") && bundle.len() > 100_000);
    let spec = get(&addr, "/openapi.json");
    assert!(spec.contains("\"/v1/jobs\""));
    let devices = get(&addr, "/v1/devices");
    assert!(devices.starts_with("HTTP/1.1 401"), "{devices}");
    assert!(get(&addr, "/readyz").starts_with("HTTP/1.1 200"));

    assert!(
        Command::new("kill")
            .arg(child.id().to_string())
            .status()
            .unwrap()
            .success()
    );
    assert!(child.wait().unwrap().success(), "clean exit on SIGTERM");
}

/// `serve --devices` takes the executor's device syntax; GPUs are opened at start, so a
/// machine without a driver (or a malformed form) says so before serving.
#[test]
fn serve_checks_its_gpus_before_serving() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |devices: &str| {
        chronospipe()
            .args(["serve", "--listen", "127.0.0.1:0", "--devices", devices])
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let out = serve("cuda:0x4@0MiB");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cuda:0x4@0MiB") && err.contains("more than 0 bytes"),
        "{err}"
    );

    if !chronospipe::exec::backend::cuda::libs::Libraries::probe().driver {
        // Whole-model GPUs and stages sharing one alike.
        for devices in ["cuda", "cuda:0x4"] {
            let out = serve(devices);
            assert!(!out.status.success());
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("CUDA unavailable: libcuda.so"),
                "{devices}: {err}"
            );
        }
    }
}
