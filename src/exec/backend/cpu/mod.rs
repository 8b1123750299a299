//! The f32 CPU backend: tensors in counted host memory ([`Tensor`]) and the kernels of
//! [`kernels`]. Its slice methods ([`CpuBackend::matmul`] and the rest) are the host
//! reference the CUDA checks compare with; the [`Backend`] implementation runs them on tensors.

pub mod kernels;

use crate::exec::backend::{AttnGrads, AttnKept, AttnScratch, Backend, HeadLoss};
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::model::ModelError;
use crate::exec::tensor::Tensor;
use crate::plan::inventory::{Part, Profile, TensorSpec};

use kernels::attention::{self, AttnShape};
use kernels::cross_entropy::{self, HeadShape};
use kernels::matmul::{self, MatRef, Threads};
use kernels::rope::Rope;
use kernels::{bias, embedding, residual, rmsnorm, rope, swiglu};

/// The f32 CPU backend; `threads` is what matrix products may use.
#[derive(Debug, Clone, Copy)]
pub struct CpuBackend {
    pub threads: usize,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend {
            threads: rayon::current_num_threads(),
        }
    }
}

/// The host kernels over slices.
#[allow(clippy::too_many_arguments)]
impl CpuBackend {
    /// `dst (+)= a · b`.
    pub fn matmul(&self, dst: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
        matmul::matmul(dst, a, b, accumulate, Threads(self.threads));
    }
    pub fn rmsnorm_forward(
        &self,
        out: &mut [f32],
        rstd: &mut [f32],
        x: &[f32],
        w: &[f32],
        eps: f32,
    ) {
        rmsnorm::rmsnorm_forward(out, rstd, x, w, eps);
    }
    pub fn rmsnorm_apply(&self, out: &mut [f32], rstd: &[f32], x: &[f32], w: &[f32]) {
        rmsnorm::rmsnorm_apply(out, rstd, x, w);
    }
    pub fn rmsnorm_backward(
        &self,
        dy: &mut [f32],
        dw: &mut [f32],
        x: &[f32],
        w: &[f32],
        rstd: &[f32],
    ) {
        rmsnorm::rmsnorm_backward(dy, dw, x, w, rstd);
    }
    pub fn rope(
        &self,
        x: &mut [f32],
        width: usize,
        seq: usize,
        hd: usize,
        rope: &Rope,
        inverse: bool,
    ) {
        rope::rope_apply(x, width, seq, hd, rope, inverse);
    }
    pub fn swiglu_forward(&self, act: &mut [f32], gate: &[f32], up: &[f32]) {
        swiglu::swiglu_forward(act, gate, up);
    }
    /// Also recomputes `act` (the forward's output) in the same pass.
    pub fn swiglu_backward(
        &self,
        act: &mut [f32],
        d_gate: &mut [f32],
        d_act_to_d_up: &mut [f32],
        gate: &[f32],
        up: &[f32],
    ) {
        swiglu::swiglu_backward(act, d_gate, d_act_to_d_up, gate, up);
    }
    pub fn embedding_forward(&self, out: &mut [f32], table: &[f32], ids: &[i32], hidden: usize) {
        embedding::embedding_forward(out, table, ids, hidden);
    }
    pub fn embedding_backward(
        &self,
        d_table: &mut [f32],
        d_out: &[f32],
        ids: &[i32],
        hidden: usize,
    ) {
        embedding::embedding_backward(d_table, d_out, ids, hidden);
    }
    pub fn attention_forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: AttnShape,
    ) {
        attention::attention_forward(out, lse, q, k, v, shape);
    }
    pub fn attention_backward(
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
        shape: AttnShape,
    ) {
        attention::attention_backward(dq, dk, dv, delta, d_out, q, k, v, out, lse, shape);
    }
    pub fn head_ce_forward(
        &self,
        logits_block: &mut [f32],
        x: &[f32],
        w: &[f32],
        targets: &[i32],
        shape: HeadShape,
    ) -> f64 {
        cross_entropy::head_ce_forward(logits_block, x, w, targets, shape, Threads(self.threads))
    }
    pub fn head_ce_backward(
        &self,
        dx: &mut [f32],
        dw: &mut [f32],
        logits_block: &mut [f32],
        x: &[f32],
        w: &[f32],
        targets: &[i32],
        scale: f32,
        shape: HeadShape,
    ) {
        let threads = Threads(self.threads);
        cross_entropy::head_ce_backward(dx, dw, logits_block, x, w, targets, scale, shape, threads);
    }
}

/// A `[rows, cols]` tensor as a matrix.
fn rows(t: &Tensor) -> MatRef<'_> {
    MatRef::rows(t.data(), t.shape()[0], t.shape()[1])
}

/// The CPU keeps no per-token losses: its profile lists none.
fn no_token_loss(token_loss: Option<&mut Tensor>) -> Result<(), ModelError> {
    match token_loss {
        None => Ok(()),
        Some(_) => Err(ModelError::NotInInventory {
            part: Part::Head,
            name: "token_loss",
        }),
    }
}

impl Backend for CpuBackend {
    type Tensor = Tensor;
    type Ids = Tensor<i32>;
    type Weight<'a> = &'a Tensor;
    type Error = ModelError;

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn profile(&self) -> Profile {
        Profile::CpuF32
    }
    fn alloc(
        &self,
        pool: &PoolRef,
        spec: &TensorSpec,
        group: MemGroup,
    ) -> Result<Tensor, ModelError> {
        Ok(Tensor::from_spec(pool, spec, group)?)
    }
    fn alloc_ids(
        &self,
        pool: &PoolRef,
        spec: &TensorSpec,
        group: MemGroup,
    ) -> Result<Tensor<i32>, ModelError> {
        Ok(Tensor::from_spec(pool, spec, group)?)
    }
    fn write_ids(&self, dst: &mut Tensor<i32>, ids: &[i32]) -> Result<(), ModelError> {
        dst.data_mut().copy_from_slice(ids);
        Ok(())
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
        group: MemGroup,
        _: bool,
    ) -> Result<Tensor, ModelError> {
        Ok(t.transfer(to, group)?)
    }
    fn move_ids(
        &self,
        t: Tensor<i32>,
        to: &PoolRef,
        group: MemGroup,
        _: bool,
    ) -> Result<Tensor<i32>, ModelError> {
        Ok(t.transfer(to, group)?)
    }
    fn await_tensor(&self, _: &Tensor) -> Result<(), ModelError> {
        Ok(())
    }
    fn await_ids(&self, _: &Tensor<i32>) -> Result<(), ModelError> {
        Ok(())
    }
    fn product_weights<'a>(&'a self, weights: &'a [Tensor]) -> Result<Vec<&'a Tensor>, ModelError> {
        Ok(weights.iter().collect())
    }

    fn copy(&self, dst: &mut Tensor, src: &Tensor) -> Result<(), ModelError> {
        residual::copy(dst.data_mut(), src.data());
        Ok(())
    }
    fn add(&self, dst: &mut Tensor, src: &Tensor) -> Result<(), ModelError> {
        residual::add(dst.data_mut(), src.data());
        Ok(())
    }
    fn sum(&self, dst: &mut Tensor, a: &Tensor, b: &Tensor) -> Result<(), ModelError> {
        residual::copy(dst.data_mut(), a.data());
        residual::add(dst.data_mut(), b.data());
        Ok(())
    }

    fn bias_add(&self, y: &mut Tensor, b: &Tensor) -> Result<(), ModelError> {
        bias::bias_add(y.data_mut(), b.data());
        Ok(())
    }
    fn bias_backward(&self, db: &mut Tensor, dy: &Tensor) -> Result<(), ModelError> {
        bias::bias_backward(db.data_mut(), dy.data());
        Ok(())
    }

    fn rmsnorm_forward(
        &self,
        out: &mut Tensor,
        rstd: &mut Tensor,
        x: &Tensor,
        w: &Tensor,
        eps: f32,
    ) -> Result<(), ModelError> {
        rmsnorm::rmsnorm_forward(out.data_mut(), rstd.data_mut(), x.data(), w.data(), eps);
        Ok(())
    }
    fn rmsnorm_apply(
        &self,
        out: &mut Tensor,
        rstd: &Tensor,
        x: &Tensor,
        w: &Tensor,
    ) -> Result<(), ModelError> {
        rmsnorm::rmsnorm_apply(out.data_mut(), rstd.data(), x.data(), w.data());
        Ok(())
    }
    fn rmsnorm_backward(
        &self,
        dy_to_dx: &mut Tensor,
        dw: &mut Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
    ) -> Result<(), ModelError> {
        let (dy, dw) = (dy_to_dx.data_mut(), dw.data_mut());
        rmsnorm::rmsnorm_backward(dy, dw, x.data(), w.data(), rstd.data());
        Ok(())
    }
    fn rope(
        &self,
        x: &mut Tensor,
        width: usize,
        seq: usize,
        head_dim: usize,
        rope: &Rope,
        inverse: bool,
    ) -> Result<(), ModelError> {
        rope::rope_apply(x.data_mut(), width, seq, head_dim, rope, inverse);
        Ok(())
    }

    fn project(
        &self,
        y: &mut Tensor,
        x: &Tensor,
        w: &Tensor,
        accumulate: bool,
    ) -> Result<(), ModelError> {
        self.matmul(y.data_mut(), rows(x), rows(w).t(), accumulate);
        Ok(())
    }
    fn project_each(
        &self,
        x: &Tensor,
        outputs: &mut [(&mut Tensor, &Tensor)],
    ) -> Result<(), ModelError> {
        for (y, w) in outputs.iter_mut() {
            self.matmul(y.data_mut(), rows(x), rows(w).t(), false);
        }
        Ok(())
    }
    fn project_backward(
        &self,
        dw: &mut Tensor,
        dx: &mut Tensor,
        dy: &Tensor,
        x: &Tensor,
        w: &Tensor,
        accumulate_dx: bool,
    ) -> Result<(), ModelError> {
        self.matmul(dw.data_mut(), rows(dy).t(), rows(x), true);
        self.matmul(dx.data_mut(), rows(dy), rows(w), accumulate_dx);
        Ok(())
    }
    fn projections_backward(
        &self,
        dx: &mut Tensor,
        x: &Tensor,
        items: &mut [(&mut Tensor, &Tensor, &Tensor)],
    ) -> Result<(), ModelError> {
        for (dw, dy, _) in items.iter_mut() {
            self.matmul(dw.data_mut(), rows(dy).t(), rows(x), true);
        }
        for (i, (_, dy, w)) in items.iter().enumerate() {
            self.matmul(dx.data_mut(), rows(dy), rows(w), i > 0);
        }
        Ok(())
    }

    fn swiglu_forward(
        &self,
        act: &mut Tensor,
        gate: &Tensor,
        up: &Tensor,
    ) -> Result<(), ModelError> {
        swiglu::swiglu_forward(act.data_mut(), gate.data(), up.data());
        Ok(())
    }
    fn swiglu_down_backward(
        &self,
        act: &mut Tensor,
        d_gate: &mut Tensor,
        d_up: &mut Tensor,
        d_down: &mut Tensor,
        dy: &Tensor,
        (gate, up): (&Tensor, &Tensor),
        w_down: &Tensor,
    ) -> Result<(), ModelError> {
        self.matmul(d_up.data_mut(), rows(dy), rows(w_down), false);
        swiglu::swiglu_backward(
            act.data_mut(),
            d_gate.data_mut(),
            d_up.data_mut(),
            gate.data(),
            up.data(),
        );
        self.matmul(d_down.data_mut(), rows(dy).t(), rows(act), true);
        Ok(())
    }

    fn embedding_forward(
        &self,
        out: &mut Tensor,
        table: &Tensor,
        ids: &Tensor<i32>,
        hidden: usize,
    ) -> Result<(), ModelError> {
        embedding::embedding_forward(out.data_mut(), table.data(), ids.data(), hidden);
        Ok(())
    }
    fn embedding_backward(
        &self,
        d_table: &mut Tensor,
        d_out: &Tensor,
        ids: &Tensor<i32>,
        hidden: usize,
    ) -> Result<(), ModelError> {
        embedding::embedding_backward(d_table.data_mut(), d_out.data(), ids.data(), hidden);
        Ok(())
    }

    fn attention_forward(
        &self,
        (out, lse): (&mut Tensor, &mut Tensor),
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        _: &mut AttnScratch<Tensor>,
        shape: AttnShape,
    ) -> Result<(), ModelError> {
        let (o, l) = (out.data_mut(), lse.data_mut());
        attention::attention_forward(o, l, q.data(), k.data(), v.data(), shape);
        Ok(())
    }
    fn attention_backward(
        &self,
        g: AttnGrads<'_, Tensor>,
        d_out: &Tensor,
        kept: AttnKept<'_, Tensor>,
        _: &mut AttnScratch<Tensor>,
        shape: AttnShape,
    ) -> Result<(), ModelError> {
        attention::attention_backward(
            g.dq.data_mut(),
            g.dk.data_mut(),
            g.dv.data_mut(),
            g.delta.data_mut(),
            d_out.data(),
            kept.q.data(),
            kept.k.data(),
            kept.v.data(),
            kept.out.data(),
            kept.lse.data(),
            shape,
        );
        Ok(())
    }

    fn head_loss_forward(
        &self,
        logits_block: &mut Tensor,
        token_loss: Option<&mut Tensor>,
        h: HeadLoss<'_, '_, Self>,
    ) -> Result<f64, ModelError> {
        no_token_loss(token_loss)?;
        let (x, w, t) = (h.x.data(), h.lm_head.data(), h.targets.data());
        Ok(self.head_ce_forward(logits_block.data_mut(), x, w, t, h.shape))
    }
    fn head_loss_backward(
        &self,
        (dx, dw): (&mut Tensor, &mut Tensor),
        logits_block: &mut Tensor,
        token_loss: Option<&mut Tensor>,
        h: HeadLoss<'_, '_, Self>,
        scale: f32,
    ) -> Result<(), ModelError> {
        no_token_loss(token_loss)?;
        let (x, w, t) = (h.x.data(), h.lm_head.data(), h.targets.data());
        let (dx, dw, logits) = (dx.data_mut(), dw.data_mut(), logits_block.data_mut());
        self.head_ce_backward(dx, dw, logits, x, w, t, scale, h.shape);
        Ok(())
    }
    fn summed_losses(&self, token_loss: &Tensor) -> Result<f64, ModelError> {
        Ok(token_loss.data().iter().map(|&l| l as f64).sum())
    }
}
