//! `chronospipe worker` child processes for the suites that kill workers: each on
//! `cpu:2x64MiB`, logging to its own file, its ranks reachable on 127.0.0.1; a dropped one is
//! killed, so a failing test leaves no worker behind.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// One worker process: its log file and the running child.
pub struct WorkerProcess {
    pub log: PathBuf,
    pub child: Child,
}

impl WorkerProcess {
    /// Starts worker `n` (logging to `logs/worker-N.log`) with leases of `lease_seconds`.
    pub fn start(
        database_url: &str,
        data_dir: &Path,
        logs: &Path,
        n: usize,
        lease_seconds: &str,
    ) -> WorkerProcess {
        Self::start_with_env(database_url, data_dir, logs, n, lease_seconds, &[])
    }

    /// `start`, with `env` set in the worker's environment (fault injection).
    pub fn start_with_env(
        database_url: &str,
        data_dir: &Path,
        logs: &Path,
        n: usize,
        lease_seconds: &str,
        env: &[(&str, &str)],
    ) -> WorkerProcess {
        let log = logs.join(format!("worker-{n}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_chronospipe"))
            .args(["worker", "--devices", "cpu:2x64MiB"])
            .args(["--lease-seconds", lease_seconds])
            .args(["--rank-address", "127.0.0.1"])
            .arg("--database-url")
            .arg(database_url)
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "warn,chronospipe=info")
            .envs(env.iter().copied())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("the chronospipe binary starts");
        WorkerProcess { log, child }
    }

    /// Kills the process (SIGKILL) and waits for it; returns its log.
    pub fn kill(mut self) -> PathBuf {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.log.clone()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `lines` lines of every worker's log, the live ones' and the `dead` ones'.
pub fn tails(workers: &[WorkerProcess], dead: &[PathBuf], lines: usize) -> String {
    let mut out = String::new();
    for log in workers.iter().map(|w| &w.log).chain(dead) {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        out.push_str(&format!("--- {}\n{tail}\n", log.display()));
    }
    out
}
