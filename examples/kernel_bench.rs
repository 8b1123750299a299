//! Throughput of the CPU kernels that dominate a training step, on config A's shapes.
//! `cargo run --release --example kernel_bench [FILTER]` prints milliseconds and GFLOP/s per
//! kernel (only those whose name contains FILTER, when given).

use std::time::Instant;

use chronospipe::exec::backend::cpu::kernels::attention::{
    AttnShape, attention_backward, attention_forward,
};
use chronospipe::exec::backend::cpu::kernels::matmul::{MatRef, Threads, matmul};
use chronospipe::exec::backend::cpu::kernels::swiglu::{swiglu_backward, swiglu_forward};

/// Mean time of 10 runs after one warm-up, with the rate for `flops` per run.
fn report<F: FnMut()>(name: &str, flops: f64, mut run: F) {
    if let Some(filter) = std::env::args().nth(1)
        && !name.contains(&filter)
    {
        return;
    }
    run();
    let reps = 10;
    let start = Instant::now();
    for _ in 0..reps {
        run();
    }
    let secs = start.elapsed().as_secs_f64() / reps as f64;
    println!(
        "{name:<32} {:>8.3} ms {:>7.1} GFLOP/s",
        secs * 1e3,
        flops / secs / 1e9
    );
}

fn main() {
    let (n, h, f) = (2048usize, 256usize, 688usize);
    let wave =
        |len: usize| -> Vec<f32> { (0..len).map(|i| ((i % 97) as f32 * 0.01).sin()).collect() };
    // The machine's product roofline, to compare machines by.
    let big = wave(1024 * 1024);
    let mut big_out = vec![0.0f32; 1024 * 1024];
    for threads in [1, 2] {
        report(
            &format!("matmul 1024^3, {threads} thread(s)"),
            2.0 * 1024f64.powi(3),
            || {
                let m = MatRef::rows(&big, 1024, 1024);
                matmul(&mut big_out, m, m, false, Threads(threads))
            },
        );
    }
    let (x_nh, x_nf, w_fh) = (wave(n * h), wave(n * f), wave(f * h));
    let mut out = vec![0.0f32; n * f];
    let linear = 2.0 * (n * h * f) as f64;
    report("matmul x[n,h] W[f,h]^T", linear, || {
        matmul(
            &mut out,
            MatRef::rows(&x_nh, n, h),
            MatRef::rows(&w_fh, f, h).t(),
            false,
            Threads(2),
        )
    });
    report("matmul x[n,f] W[h,f]^T", linear, || {
        matmul(
            &mut out,
            MatRef::rows(&x_nf, n, f),
            MatRef::rows(&w_fh, h, f).t(),
            false,
            Threads(2),
        )
    });
    let mut grad = vec![0.0f32; f * h];
    report("matmul dy[n,f]^T x[n,h] (+=)", linear, || {
        matmul(
            &mut grad,
            MatRef::rows(&x_nf, n, f).t(),
            MatRef::rows(&x_nh, n, h),
            true,
            Threads(2),
        )
    });

    let (gate, up) = (wave(n * f), wave(n * f));
    let mut act = vec![0.0f32; n * f];
    report("swiglu forward", 4.0 * (n * f) as f64, || {
        swiglu_forward(&mut act, &gate, &up)
    });
    let mut d_gate = vec![0.0f32; n * f];
    report("swiglu backward", 8.0 * (n * f) as f64, || {
        swiglu_backward(&mut out[..n * f], &mut d_gate, &mut act, &gate, &up)
    });

    let sh = AttnShape {
        batch: 8,
        seq: 256,
        heads: 4,
        kv_heads: 4,
        head_dim: 64,
    };
    let q = wave(n * h);
    let (mut o, mut lse) = (vec![0.0; n * h], vec![0.0; 8 * 4 * 256]);
    // Causal: half the score matrix, two products (QK^T, PV) forward, four backward.
    let attn = 8.0 * 4.0 * 256.0 * 256.0 * 0.5 * 64.0 * 2.0 * 2.0;
    report("attention forward", attn, || {
        attention_forward(&mut o, &mut lse, &q, &q, &q, sh)
    });
    let (mut dq, mut dk, mut dv, mut delta) = (
        vec![0.0; n * h],
        vec![0.0; n * h],
        vec![0.0; n * h],
        vec![0.0; lse.len()],
    );
    report("attention backward", 2.5 * attn, || {
        attention_backward(
            &mut dq, &mut dk, &mut dv, &mut delta, &q, &q, &q, &q, &o, &lse, sh,
        )
    });
}
