//! `chronospipe selftest --gpu`: the CUDA backend's checks and timings, from the binary itself,
//! so a GPU machine without a Rust toolchain needs only this binary and the test fixture.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use crate::exec::backend::cuda::Precision;
use crate::exec::backend::cuda::selftest::{self, SelftestOptions};

#[derive(Debug, Args)]
pub struct SelftestArgs {
    /// Check the CUDA backend (the only backend this command checks; `cargo test` covers CPU).
    #[arg(long)]
    pub gpu: bool,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// The Hugging Face fixture with `reference.safetensors` (PyTorch's results).
    #[arg(long, default_value = "../shared/testdata/hf-llama-tiny")]
    pub fixture: PathBuf,
    /// Sequences per micro-batch in the timing runs (sequence length 1024).
    #[arg(long, default_value_t = 8)]
    pub micro_batch_size: usize,
    /// Micro-batches per step in the timing runs.
    #[arg(long, default_value_t = 2)]
    pub microbatches: usize,
    /// Sequences of the extra timing row per precision: one micro-batch this large (0: none).
    #[arg(long, default_value_t = 32)]
    pub large_micro_batch: usize,
    /// Attention heads of the timed ~125M model (hidden 768). 8 makes heads of 96, which no
    /// flash kernel covers, so bf16 attention runs through cuBLAS: `scripts/gpu-check` times
    /// bf16 that way when the flash kernels fail.
    #[arg(long, default_value_t = 12, value_parser = parse_timing_heads)]
    pub timing_heads: usize,
    /// Timed steps per precision (after two warm-up steps).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Only the parity checks.
    #[arg(long)]
    pub skip_timing: bool,
    /// Only the timings: for comparing kernels once a full run's checks have passed.
    #[arg(long, conflicts_with = "skip_timing")]
    pub skip_checks: bool,
    /// Only these precisions (comma-separated: f32, tf32, bf16), checks and timings alike;
    /// running each in its own process keeps one precision's failure from hiding the others'.
    #[arg(long, value_delimiter = ',', value_parser = parse_precision,
          default_value = "f32,tf32,bf16")]
    pub precision: Vec<Precision>,
    /// After the timings, show where one step's time goes, operation by operation.
    #[arg(long)]
    pub profile: bool,
}

pub fn run(args: &SelftestArgs) -> anyhow::Result<()> {
    if !args.gpu {
        bail!(
            "selftest checks the CUDA backend: pass --gpu (the CPU backend is covered by `scripts/test`)"
        );
    }
    let opts = SelftestOptions {
        device: args.device,
        fixture: args.fixture.clone(),
        micro_batch_size: args.micro_batch_size,
        microbatches: args.microbatches,
        large_micro_batch: args.large_micro_batch,
        timing_heads: args.timing_heads,
        steps: args.steps,
        skip_timing: args.skip_timing,
        skip_checks: args.skip_checks,
        precisions: args.precision.clone(),
        profile: args.profile,
    };
    if !selftest::run(&opts)? {
        bail!("some GPU checks failed (the FAIL lines above)");
    }
    Ok(())
}

fn parse_precision(name: &str) -> Result<Precision, String> {
    Precision::EACH
        .into_iter()
        .find(|p| p.name() == name)
        .ok_or_else(|| format!("unknown precision `{name}`: one of f32, tf32, bf16"))
}

fn parse_timing_heads(text: &str) -> Result<usize, String> {
    let heads: usize = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of heads"))?;
    selftest::llama_125m_with_heads(heads)
        .map(|_| heads)
        .map_err(|e| {
            format!("{heads} heads for the timed model (hidden 768): {e}; try 6, 8, 12 or 24")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_heads_must_split_the_hidden_size_into_even_heads() {
        assert_eq!(parse_timing_heads("8"), Ok(8));
        assert_eq!(parse_timing_heads("12"), Ok(12));
        for bad in ["0", "7", "768", "eight"] {
            let err = parse_timing_heads(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }
}
