//! The CUDA backend against the CPU backend, for machines with an NVIDIA GPU and a Rust
//! toolchain: `cargo test --release -- --ignored gpu_`. Without a toolchain there, the same
//! checks run from the binary (`scripts/gpu-check`).

use std::path::PathBuf;

use chronospipe::exec::backend::cuda::selftest::{self, SelftestOptions};

fn options() -> SelftestOptions {
    SelftestOptions {
        device: 0,
        fixture: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/testdata/hf-llama-tiny"
        )),
        micro_batch_size: 8,
        microbatches: 2,
        steps: 5,
        skip_timing: true,
        profile: false,
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA 13 libraries on the loader path"]
fn gpu_kernels_and_a_training_step_match_the_cpu_backend() {
    assert!(
        selftest::run(&options()).unwrap(),
        "some GPU checks failed (FAIL lines above)"
    );
}
