//! The binary as a user runs it: help, version, configuration precedence, the health endpoint.

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

fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn help_and_version() {
    let help = stdout_of(chronospipe().arg("--help"));
    assert!(help.contains("serve") && help.contains("config"), "{help}");
    let version = stdout_of(chronospipe().arg("--version"));
    assert_eq!(
        version.trim(),
        format!("chronospipe {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn config_print_takes_flags_over_environment_over_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:9001\"\ndevices = \"cpu:1x1GiB\"\ndata_dir = \"/from/file\"\n",
    )
    .unwrap();
    let printed = stdout_of(
        chronospipe()
            .args(["config", "print", "--listen", "127.0.0.1:9003"])
            .env("CHRONOSPIPE_CONFIG", &file)
            .env("CHRONOSPIPE_LISTEN", "127.0.0.1:9002")
            .env("CHRONOSPIPE_DEVICES", "cpu:2x2GiB")
            .env("DATABASE_URL", "postgres://u:pw@db/x")
            .env("CHRONOSPIPE_API_KEY", "sk-very-secret"),
    );
    let settings: toml::Value = toml::from_str(&printed).unwrap();
    assert_eq!(settings["listen"].as_str(), Some("127.0.0.1:9003"));
    assert_eq!(settings["devices"].as_str(), Some("cpu:2x2GiB"));
    assert_eq!(settings["data_dir"].as_str(), Some("/from/file"));
    assert_eq!(
        settings["database_url"].as_str(),
        Some("postgres://u:<redacted>@db/x")
    );
    assert!(
        !printed.contains("sk-very-secret") && !printed.contains("pw@"),
        "{printed}"
    );
}

#[test]
fn serve_answers_healthz_and_stops_on_sigterm() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut child = chronospipe()
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--data-dir")
        .arg(data_dir.path())
        .stdout(Stdio::null())
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
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"status\":\"ok\""), "{response}");

    let status = Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(child.wait().unwrap().success(), "clean exit on SIGTERM");
}

/// Without `--gpu` the command says what it checks; without CUDA it names the missing library
/// and exits with an error, never a panic (with CUDA it runs the checks, which the ignored
/// `tests/gpu.rs` covers).
#[test]
fn selftest_needs_gpu_and_reports_missing_cuda_cleanly() {
    let out = chronospipe().arg("selftest").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --gpu"));
    if chronospipe::exec::backend::cuda::libs::Libraries::probe()
        .require_compute()
        .is_ok()
    {
        return;
    }
    let out = chronospipe()
        .args(["selftest", "--gpu", "--skip-timing"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("CUDA unavailable: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
