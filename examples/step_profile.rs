//! Where a CPU training step's time goes: runs config A's step (as `train_bench`) through a
//! backend wrapper that times every kernel call, and prints milliseconds per step by kernel.
//! `cargo run --release --example step_profile -- [--steps N]`

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use chronospipe::data::Microbatch;
use chronospipe::exec::backend::{Backend, CpuBackend};
use chronospipe::exec::device::Pool;
use chronospipe::exec::kernels::attention::AttnShape;
use chronospipe::exec::kernels::cross_entropy::HeadShape;
use chronospipe::exec::kernels::matmul::MatRef;
use chronospipe::exec::model::LlamaConfig;
use chronospipe::exec::optim::OptimizerConfig;
use chronospipe::exec::optim::schedule::LrSchedule;
use chronospipe::exec::train::SingleDevice;
use chronospipe::plan::inventory::{MicroShape, ModelDims};

/// Delegates to the CPU backend and adds each call's wall time to its kernel's total.
struct Timed {
    inner: CpuBackend,
}

/// Seconds and calls by kernel name.
static TOTALS: Mutex<BTreeMap<String, (f64, usize)>> = Mutex::new(BTreeMap::new());

impl Timed {
    fn time<R>(&self, name: &str, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        let dt = t.elapsed().as_secs_f64();
        let mut totals = TOTALS.lock().unwrap();
        let e = totals.entry(name.to_string()).or_default();
        e.0 += dt;
        e.1 += 1;
        r
    }
}

#[allow(clippy::too_many_arguments)]
impl Backend for Timed {
    fn name(&self) -> &'static str {
        "cpu-timed"
    }
    fn matmul(&self, dst: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, acc: bool) {
        // Weight gradients are the products whose left operand is a transposed activation.
        let kind = if a.row_stride == 1 {
            "matmul dW"
        } else {
            "matmul fwd/dX"
        };
        let name = format!("{kind} {}x{}x{}", a.rows, b.cols, a.cols);
        self.time(&name, || self.inner.matmul(dst, a, b, acc))
    }
    fn rmsnorm_forward(&self, out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        self.time("rmsnorm forward", || {
            self.inner.rmsnorm_forward(out, rstd, x, w, eps)
        })
    }
    fn rmsnorm_apply(&self, out: &mut [f32], rstd: &[f32], x: &[f32], w: &[f32]) {
        self.time("rmsnorm apply", || {
            self.inner.rmsnorm_apply(out, rstd, x, w)
        })
    }
    fn rmsnorm_backward(&self, dy: &mut [f32], dw: &mut [f32], x: &[f32], w: &[f32], r: &[f32]) {
        self.time("rmsnorm backward", || {
            self.inner.rmsnorm_backward(dy, dw, x, w, r)
        })
    }
    fn rope(&self, x: &mut [f32], width: usize, seq: usize, hd: usize, th: f32, inv: bool) {
        self.time("rope", || self.inner.rope(x, width, seq, hd, th, inv))
    }
    fn swiglu_forward(&self, act: &mut [f32], gate: &[f32], up: &[f32]) {
        self.time("swiglu forward", || {
            self.inner.swiglu_forward(act, gate, up)
        })
    }
    fn swiglu_backward(&self, dg: &mut [f32], du: &mut [f32], gate: &[f32], up: &[f32]) {
        self.time("swiglu backward", || {
            self.inner.swiglu_backward(dg, du, gate, up)
        })
    }
    fn embedding_forward(&self, out: &mut [f32], table: &[f32], ids: &[i32], hidden: usize) {
        self.time("embedding forward", || {
            self.inner.embedding_forward(out, table, ids, hidden)
        })
    }
    fn embedding_backward(&self, dt: &mut [f32], d_out: &[f32], ids: &[i32], hidden: usize) {
        self.time("embedding backward", || {
            self.inner.embedding_backward(dt, d_out, ids, hidden)
        })
    }
    fn attention_forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: AttnShape,
    ) {
        self.time("attention forward", || {
            self.inner.attention_forward(out, lse, q, k, v, s)
        })
    }
    fn attention_backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        delta: &mut [f32],
        d_out: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        s: AttnShape,
    ) {
        self.time("attention backward", || {
            self.inner
                .attention_backward(dq, dk, dv, delta, d_out, q, k, v, out, lse, s)
        })
    }
    fn head_ce_forward(
        &self,
        lb: &mut [f32],
        x: &[f32],
        w: &[f32],
        t: &[i32],
        s: HeadShape,
    ) -> f64 {
        self.time("head+CE forward", || {
            self.inner.head_ce_forward(lb, x, w, t, s)
        })
    }
    fn head_ce_backward(
        &self,
        dx: &mut [f32],
        dw: &mut [f32],
        lb: &mut [f32],
        x: &[f32],
        w: &[f32],
        t: &[i32],
        scale: f32,
        s: HeadShape,
    ) {
        self.time("head+CE backward", || {
            self.inner.head_ce_backward(dx, dw, lb, x, w, t, scale, s)
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = match args.iter().position(|a| a == "--steps") {
        Some(i) => args.get(i + 1).map_or(Ok(8), |s| s.parse())?,
        None => 8,
    };
    let dims = ModelDims {
        hidden: 256,
        layers: 4,
        heads: 4,
        kv_heads: 4,
        ffn: 688,
        vocab: 256,
    };
    let llama = LlamaConfig {
        dims,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
    };
    let mut trainer = SingleDevice::from_seed(
        llama,
        Pool::new("cpu:0", usize::MAX),
        Box::new(Timed {
            inner: CpuBackend::default(),
        }),
        0,
        OptimizerConfig::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        LrSchedule::constant(1e-3),
        None,
    )?;
    let shape = MicroShape { batch: 8, seq: 256 };
    let tokens: Vec<i32> = (0..shape.tokens() as i32 + 1)
        .map(|i| (i * 7919) % 256)
        .collect();
    let mb = Microbatch {
        step: 0,
        index: 0,
        shape,
        windows: vec![0; shape.batch],
        input_ids: tokens[..shape.tokens()].to_vec(),
        targets: tokens[1..].to_vec(),
    };
    for _ in 0..2 {
        trainer.train_step(std::slice::from_ref(&mb))?;
    }
    TOTALS.lock().unwrap().clear();
    let start = Instant::now();
    for _ in 0..steps {
        trainer.train_step(std::slice::from_ref(&mb))?;
    }
    let step_ms = start.elapsed().as_secs_f64() * 1e3 / steps as f64;
    let totals = TOTALS.lock().unwrap();
    let mut rows: Vec<_> = totals.iter().collect();
    rows.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
    println!("{:<40} {:>9} {:>6}", "kernel", "ms/step", "calls");
    let mut timed = 0.0;
    for (name, (secs, calls)) in rows {
        let ms = secs * 1e3 / steps as f64;
        timed += ms;
        println!("{name:<40} {ms:>9.2} {:>6}", calls / steps);
    }
    println!(
        "{:<40} {:>9.2}",
        "outside kernels (optimizer, allocation)",
        step_ms - timed
    );
    println!("{:<40} {:>9.2}", "step", step_ms);
    Ok(())
}
