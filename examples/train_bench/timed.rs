//! A backend that times every kernel call of the CPU backend, for `--profile`: where a step's
//! time goes, by kernel and (for products) by shape.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use chronospipe::exec::backend::{Backend, CpuBackend};
use chronospipe::exec::kernels::attention::AttnShape;
use chronospipe::exec::kernels::cross_entropy::HeadShape;
use chronospipe::exec::kernels::matmul::MatRef;
use chronospipe::exec::kernels::rope::Rope;

/// Delegates to the CPU backend and adds each call's wall time to its kernel's total.
pub struct Timed {
    pub inner: CpuBackend,
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
    fn copy(&self, dst: &mut [f32], src: &[f32]) {
        self.time("residual copy", || self.inner.copy(dst, src))
    }
    fn add(&self, dst: &mut [f32], src: &[f32]) {
        self.time("residual add", || self.inner.add(dst, src))
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
    fn rope(&self, x: &mut [f32], width: usize, seq: usize, hd: usize, th: &Rope, inv: bool) {
        self.time("rope", || self.inner.rope(x, width, seq, hd, th, inv))
    }
    fn swiglu_forward(&self, act: &mut [f32], gate: &[f32], up: &[f32]) {
        self.time("swiglu forward", || {
            self.inner.swiglu_forward(act, gate, up)
        })
    }
    fn swiglu_backward(&self, a: &mut [f32], dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32]) {
        self.time("swiglu backward", || {
            self.inner.swiglu_backward(a, dg, du, g, u)
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

/// Forgets what was timed so far (the warm-up steps).
pub fn reset() {
    TOTALS.lock().unwrap().clear();
}

/// Prints milliseconds per step by kernel, largest first, and what the step spent outside them.
pub fn print_table(steps: usize, step_ms: f64) {
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
    let outside = "outside kernels (optimizer, glue)";
    println!("{outside:<40} {:>9.2}", step_ms - timed);
    println!("{:<40} {step_ms:>9.2}", "step (mean)");
}
