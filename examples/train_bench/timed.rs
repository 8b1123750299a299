//! A backend that times every operation of the CPU backend, for `--profile`: where a step's
//! time goes, by operation and (for products) by shape.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use chronospipe::exec::backend::cpu::kernels::attention::AttnShape;
use chronospipe::exec::backend::cpu::kernels::rope::Rope;
use chronospipe::exec::backend::{AttnGrads, AttnKept, AttnScratch, Backend, CpuBackend, HeadLoss};
use chronospipe::exec::device::{MemGroup, PoolRef};
use chronospipe::exec::model::ModelError;
use chronospipe::exec::tensor::Tensor;
use chronospipe::plan::inventory::{Profile, TensorSpec};

/// Delegates to the CPU backend and adds each call's wall time to its operation's total.
pub struct Timed {
    pub inner: CpuBackend,
}

/// Seconds and calls by operation name.
static TOTALS: Mutex<BTreeMap<String, (f64, usize)>> = Mutex::new(BTreeMap::new());

type R = Result<(), ModelError>;

impl Timed {
    fn time<T>(&self, name: &str, f: impl FnOnce() -> T) -> T {
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

/// `what n x out x in` of a product of `x` [n, in] through `w` [out, in].
fn product(what: &str, x: &Tensor, w: &Tensor) -> String {
    format!("{what} {}x{}x{}", x.shape()[0], w.shape()[0], w.shape()[1])
}

impl Backend for Timed {
    type Tensor = Tensor;
    type Ids = Tensor<i32>;
    type Weight<'a> = &'a Tensor;
    type Error = ModelError;

    fn name(&self) -> &'static str {
        "cpu-timed"
    }
    fn profile(&self) -> Profile {
        self.inner.profile()
    }
    fn alloc(
        &self,
        pool: &PoolRef,
        spec: &TensorSpec,
        group: MemGroup,
    ) -> Result<Tensor, ModelError> {
        self.inner.alloc(pool, spec, group)
    }
    fn alloc_ids(
        &self,
        pool: &PoolRef,
        spec: &TensorSpec,
        group: MemGroup,
    ) -> Result<Tensor<i32>, ModelError> {
        self.inner.alloc_ids(pool, spec, group)
    }
    fn write_ids(&self, dst: &mut Tensor<i32>, ids: &[i32]) -> R {
        self.inner.write_ids(dst, ids)
    }
    fn shape(t: &Tensor) -> &[usize] {
        t.shape()
    }
    fn renamed(t: Tensor, name: &str) -> Tensor {
        t.renamed(name)
    }
    fn move_tensor(
        &self,
        t: Tensor,
        to: &PoolRef,
        g: MemGroup,
        host: bool,
    ) -> Result<Tensor, ModelError> {
        self.inner.move_tensor(t, to, g, host)
    }
    fn move_ids(
        &self,
        t: Tensor<i32>,
        to: &PoolRef,
        g: MemGroup,
        host: bool,
    ) -> Result<Tensor<i32>, ModelError> {
        self.inner.move_ids(t, to, g, host)
    }
    fn await_tensor(&self, t: &Tensor) -> R {
        self.inner.await_tensor(t)
    }
    fn await_ids(&self, t: &Tensor<i32>) -> R {
        self.inner.await_ids(t)
    }
    fn product_weights<'a>(&'a self, weights: &'a [Tensor]) -> Result<Vec<&'a Tensor>, ModelError> {
        self.inner.product_weights(weights)
    }
    fn copy(&self, dst: &mut Tensor, src: &Tensor) -> R {
        self.time("residual copy", || self.inner.copy(dst, src))
    }
    fn add(&self, dst: &mut Tensor, src: &Tensor) -> R {
        self.time("residual add", || self.inner.add(dst, src))
    }
    fn bias_add(&self, y: &mut Tensor, b: &Tensor) -> R {
        self.time("bias add", || self.inner.bias_add(y, b))
    }
    fn bias_backward(&self, db: &mut Tensor, dy: &Tensor) -> R {
        self.time("bias backward", || self.inner.bias_backward(db, dy))
    }
    fn sum(&self, dst: &mut Tensor, a: &Tensor, b: &Tensor) -> R {
        self.time("residual sum", || self.inner.sum(dst, a, b))
    }
    fn rmsnorm_forward(
        &self,
        out: &mut Tensor,
        rstd: &mut Tensor,
        x: &Tensor,
        w: &Tensor,
        eps: f32,
    ) -> R {
        self.time("rmsnorm forward", || {
            Backend::rmsnorm_forward(&self.inner, out, rstd, x, w, eps)
        })
    }
    fn rmsnorm_apply(&self, out: &mut Tensor, rstd: &Tensor, x: &Tensor, w: &Tensor) -> R {
        self.time("rmsnorm apply", || {
            Backend::rmsnorm_apply(&self.inner, out, rstd, x, w)
        })
    }
    fn rmsnorm_backward(
        &self,
        dy: &mut Tensor,
        dw: &mut Tensor,
        x: &Tensor,
        w: &Tensor,
        r: &Tensor,
    ) -> R {
        self.time("rmsnorm backward", || {
            Backend::rmsnorm_backward(&self.inner, dy, dw, x, w, r)
        })
    }
    fn rope(
        &self,
        x: &mut Tensor,
        width: usize,
        seq: usize,
        hd: usize,
        rope: &Rope,
        inv: bool,
    ) -> R {
        self.time("rope", || {
            Backend::rope(&self.inner, x, width, seq, hd, rope, inv)
        })
    }
    fn project(&self, y: &mut Tensor, x: &Tensor, w: &Tensor, acc: bool) -> R {
        self.time(&product("project", x, w), || {
            self.inner.project(y, x, w, acc)
        })
    }
    fn project_each(&self, x: &Tensor, outputs: &mut [(&mut Tensor, &Tensor)]) -> R {
        let name = product("project each", x, outputs[0].1);
        self.time(&name, || self.inner.project_each(x, outputs))
    }
    fn project_backward(
        &self,
        dw: &mut Tensor,
        dx: &mut Tensor,
        dy: &Tensor,
        x: &Tensor,
        w: &Tensor,
        acc: bool,
    ) -> R {
        let name = product("project backward", x, w);
        self.time(&name, || self.inner.project_backward(dw, dx, dy, x, w, acc))
    }
    fn projections_backward(
        &self,
        dx: &mut Tensor,
        x: &Tensor,
        items: &mut [(&mut Tensor, &Tensor, &Tensor)],
    ) -> R {
        let name = product("projections backward", x, items[0].2);
        self.time(&name, || self.inner.projections_backward(dx, x, items))
    }
    fn swiglu_forward(&self, act: &mut Tensor, gate: &Tensor, up: &Tensor) -> R {
        self.time("swiglu forward", || {
            Backend::swiglu_forward(&self.inner, act, gate, up)
        })
    }
    fn swiglu_down_backward(
        &self,
        act: &mut Tensor,
        d_gate: &mut Tensor,
        d_up: &mut Tensor,
        d_down: &mut Tensor,
        dy: &Tensor,
        gate_up: (&Tensor, &Tensor),
        w_down: &Tensor,
    ) -> R {
        let name = product("swiglu + down backward", dy, w_down);
        self.time(&name, || {
            self.inner
                .swiglu_down_backward(act, d_gate, d_up, d_down, dy, gate_up, w_down)
        })
    }
    fn embedding_forward(
        &self,
        out: &mut Tensor,
        table: &Tensor,
        ids: &Tensor<i32>,
        h: usize,
    ) -> R {
        self.time("embedding forward", || {
            Backend::embedding_forward(&self.inner, out, table, ids, h)
        })
    }
    fn embedding_backward(
        &self,
        dt: &mut Tensor,
        d_out: &Tensor,
        ids: &Tensor<i32>,
        h: usize,
    ) -> R {
        self.time("embedding backward", || {
            Backend::embedding_backward(&self.inner, dt, d_out, ids, h)
        })
    }
    fn attention_forward(
        &self,
        out_lse: (&mut Tensor, &mut Tensor),
        qkv: (&Tensor, &Tensor, &Tensor),
        scratch: &mut AttnScratch<Tensor>,
        s: AttnShape,
    ) -> R {
        self.time("attention forward", || {
            Backend::attention_forward(&self.inner, out_lse, qkv, scratch, s)
        })
    }
    fn attention_backward(
        &self,
        grads: AttnGrads<'_, Tensor>,
        d_out: &Tensor,
        kept: AttnKept<'_, Tensor>,
        scratch: &mut AttnScratch<Tensor>,
        s: AttnShape,
    ) -> R {
        self.time("attention backward", || {
            Backend::attention_backward(&self.inner, grads, d_out, kept, scratch, s)
        })
    }
    fn head_loss_forward(
        &self,
        logits: &mut Tensor,
        token_loss: Option<&mut Tensor>,
        head: HeadLoss<'_, '_, Self>,
    ) -> Result<f64, ModelError> {
        let head = HeadLoss {
            x: head.x,
            lm_head: head.lm_head,
            targets: head.targets,
            shape: head.shape,
        };
        self.time("head+CE forward", || {
            self.inner.head_loss_forward(logits, token_loss, head)
        })
    }
    fn head_loss_backward(
        &self,
        dx_dw: (&mut Tensor, &mut Tensor),
        logits: &mut Tensor,
        token_loss: Option<&mut Tensor>,
        head: HeadLoss<'_, '_, Self>,
        scale: f32,
    ) -> R {
        let head = HeadLoss {
            x: head.x,
            lm_head: head.lm_head,
            targets: head.targets,
            shape: head.shape,
        };
        self.time("head+CE backward", || {
            self.inner
                .head_loss_backward(dx_dw, logits, token_loss, head, scale)
        })
    }
    fn summed_losses(&self, token_loss: &Tensor) -> Result<f64, ModelError> {
        self.inner.summed_losses(token_loss)
    }
}

/// Forgets what was timed so far (the warm-up steps).
pub fn reset() {
    TOTALS.lock().unwrap().clear();
}

/// Prints milliseconds per step by operation, largest first, and what the step spent outside
/// them.
pub fn print_table(steps: usize, step_ms: f64) {
    let totals = TOTALS.lock().unwrap();
    let mut rows: Vec<_> = totals.iter().collect();
    rows.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
    println!("{:<48} {:>9} {:>6}", "operation", "ms/step", "calls");
    let mut timed = 0.0;
    for (name, (secs, calls)) in rows {
        let ms = secs * 1e3 / steps as f64;
        timed += ms;
        println!("{name:<48} {ms:>9.2} {:>6}", calls / steps);
    }
    let outside = "outside operations (optimizer, glue)";
    println!("{outside:<48} {:>9.2}", step_ms - timed);
    println!("{:<48} {step_ms:>9.2}", "step (mean)");
}
