//! The CUDA backend's bf16 flash-attention kernels, without a GPU: `tests/host_cuda/` builds
//! `kernels/flash_attention.cu` (with `attn_delta` and `cast_to_act`, as the backend launches
//! them) for the host with a C++20 compiler, each block's 128 threads as threads and the
//! tensor-core product by the PTX ISA's fragment layouts; the results are held against the CPU
//! backend's attention with the shapes and tolerances of `selftest --gpu`'s flash checks.
//! This checks the kernels' indexing, masking, online softmax and grouped heads; the GPU run
//! of the same checks (`scripts/gpu-check`) checks the hardware's side.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use chronospipe::exec::backend::cuda::selftest::{
    FLASH_OUTPUTS, cpu_attention, flash_check_shapes, flash_inputs,
};
use chronospipe::exec::compare::rel_err;
use half::bf16;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The C++ compiler: `$CXX`, else `c++` or `g++` on the path.
fn compiler() -> String {
    let candidates = std::env::var("CXX")
        .into_iter()
        .chain(["c++".into(), "g++".into()]);
    for cxx in candidates {
        if Command::new(&cxx).arg("--version").output().is_ok() {
            return cxx;
        }
    }
    panic!(
        "no C++ compiler (set CXX, or install g++ 10 or newer): the flash kernels' host check needs one"
    );
}

fn build(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/host_cuda/flash_attention.cpp");
    let binary = dir.join("flash_attention");
    let out = Command::new(compiler())
        .args(["-std=c++20", "-O2", "-pthread", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .expect("running the C++ compiler");
    assert!(
        out.status.success(),
        "compiling {}:\n{}",
        source.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    binary
}

/// Waits for `child`, killing it after `limit`: a kernel whose threads miss a barrier would
/// otherwise hang the suite.
fn wait_at_most(mut child: Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            panic!("the host build of the flash kernels ran past {limit:?} (a missed barrier?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
        .collect()
}

/// Splits the program's output into `counts` tensors: bf16 for the first four, then f32.
fn parse_output(bytes: &[u8], counts: [usize; 6]) -> Vec<Vec<f32>> {
    let mut at = 0;
    let mut tensors = Vec::new();
    for (i, n) in counts.into_iter().enumerate() {
        let size = if i < 4 { 2 } else { 4 };
        let chunk = &bytes[at..at + n * size];
        at += n * size;
        tensors.push(if i < 4 {
            (chunk.chunks_exact(2))
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        } else {
            (chunk.chunks_exact(4))
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        });
    }
    assert_eq!(at, bytes.len(), "output longer than its tensors");
    tensors
}

#[test]
fn flash_kernels_run_on_the_host_match_the_cpu_attention() {
    let dir = tempfile::tempdir().unwrap();
    let binary = build(dir.path());
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let mut failures = Vec::new();
    for sh in flash_check_shapes() {
        let inputs = flash_inputs(&mut rng, &sh);
        let (input, output) = (dir.path().join("in.bin"), dir.path().join("out.bin"));
        std::fs::write(
            &input,
            inputs
                .iter()
                .flat_map(|t| bf16_bytes(t))
                .collect::<Vec<u8>>(),
        )
        .unwrap();
        let dims = [sh.head_dim, sh.batch, sh.seq, sh.heads, sh.kv_heads];
        let child = Command::new(&binary)
            .args(dims.map(|d| d.to_string()))
            .arg(&input)
            .arg(&output)
            .spawn()
            .unwrap();
        let status = wait_at_most(child, Duration::from_secs(300));
        assert!(status.success(), "{binary:?} failed on {sh:?}");
        let (n, stats) = (sh.batch * sh.seq, sh.batch * sh.heads * sh.seq);
        let (w, kvw) = (n * sh.heads * sh.head_dim, n * sh.kv_heads * sh.head_dim);
        // The program writes out, dq, dk, dv, lse, delta; the reference is out, lse, dq, dk,
        // dv, delta.
        let got = parse_output(
            &std::fs::read(&output).unwrap(),
            [w, w, kvw, kvw, stats, stats],
        );
        let got = [&got[0], &got[4], &got[1], &got[2], &got[3], &got[5]];
        let want = cpu_attention(&inputs, sh);
        for ((ours, reference), (name, tolerance)) in got.into_iter().zip(&want).zip(FLASH_OUTPUTS)
        {
            let err = rel_err(ours, reference);
            println!("{sh:?} {name}: rel err {err:.2e} (< {tolerance:.0e})");
            if err.is_nan() || err >= tolerance {
                failures.push(format!("{sh:?} {name}: {err:.2e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}
