//! What the tests hold this project against: the fixtures PyTorch and transformers made
//! (`../shared/testdata`), a relative-error check that prints how close each tensor came, and
//! transformers itself, run in Python where Python has it. Each test binary uses a part.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use chronospipe::exec::compare::rel_err;

/// A fixture folder of `../shared/testdata`.
pub fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/testdata")
        .join(name)
}

/// Prints an OK / NOT OK line and returns whether it passed (relative error under 1e-4).
pub fn compare(name: &str, ours: &[f32], reference: &[f32]) -> bool {
    let err = rel_err(ours, reference);
    let ok = err < 1e-4;
    println!(
        "{} {name}: rel err {err:.2e}",
        if ok { "OK    " } else { "NOT OK" }
    );
    ok
}

/// Whether `python3` imports torch, transformers and safetensors; says SKIPPED when not.
pub fn transformers_available() -> bool {
    let probe = Command::new("python3")
        .args(["-c", "import torch, transformers, safetensors"])
        .output();
    let there = probe.is_ok_and(|o| o.status.success());
    if !there {
        println!("SKIPPED: python3 with torch, transformers and safetensors is not available");
    }
    there
}

/// Runs a Python `script` with `args`; panics with its output if it fails, else returns the
/// last line it printed.
pub fn python_last_line<A: AsRef<OsStr>>(script: &str, args: &[A]) -> String {
    let result = Command::new("python3")
        .args(["-c", script])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    stdout.lines().last().unwrap_or_default().trim().to_owned()
}
