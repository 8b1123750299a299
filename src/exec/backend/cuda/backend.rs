//! A GPU as the model's [`Backend`]: tensors in its memory ([`GpuTensor`]), the kernels of
//! `ops` and `attention`, products through cuBLAS (`projection`: projections of one input
//! grouped into one call per shape where the GPU batches them; weights read through their
//! bf16 copies with bf16 activations). Its inventory profile lists the scratch of its
//! choices: attention scores through cuBLAS or the flash kernels' dQ accumulator, the head's
//! per-token losses.

use crate::exec::backend::cpu::kernels::attention::AttnShape;
use crate::exec::backend::cpu::kernels::rope::Rope;
use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::projection::{
    Weight, project, project_backward, project_each, project_input_grad, weight_grads_each,
};
use crate::exec::backend::cuda::tensor::GpuTensor;
use crate::exec::backend::{AttnGrads, AttnKept, AttnScratch, Backend, HeadLoss};
use crate::exec::device::{MemGroup, PoolRef};
use crate::plan::inventory::{Profile, TensorSpec};

type R = Result<(), CudaError>;

/// Rows of a `[rows, cols]` tensor.
fn rows(t: &GpuTensor) -> usize {
    t.shape()[0]
}

fn unsupported(what: &str) -> CudaError {
    CudaError::Unsupported(format!(
        "{what} is missing from the CUDA inventory's scratch"
    ))
}

impl Backend for Gpu {
    type Tensor = GpuTensor;
    type Ids = GpuTensor;
    type Weight<'a> = Weight;
    type Error = CudaError;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn profile(&self) -> Profile {
        self.precision.profile()
    }
    fn alloc(
        &self,
        pool: &PoolRef,
        spec: &TensorSpec,
        group: MemGroup,
    ) -> Result<GpuTensor, CudaError> {
        GpuTensor::from_spec(self, pool, spec, group)
    }
    fn alloc_ids(
        &self,
        pool: &PoolRef,
        spec: &TensorSpec,
        group: MemGroup,
    ) -> Result<GpuTensor, CudaError> {
        GpuTensor::from_spec(self, pool, spec, group)
    }
    fn write_ids(&self, dst: &mut GpuTensor, ids: &[i32]) -> R {
        dst.copy_from_host(self, ids)
    }
    fn shape(t: &GpuTensor) -> &[usize] {
        t.shape()
    }
    fn renamed(t: GpuTensor, name: &str) -> GpuTensor {
        t.renamed(name)
    }
    fn move_tensor(
        &self,
        t: GpuTensor,
        to: &PoolRef,
        group: MemGroup,
        to_host: bool,
    ) -> Result<GpuTensor, CudaError> {
        t.relocate(self, to, group, to_host)
    }
    fn move_ids(
        &self,
        t: GpuTensor,
        to: &PoolRef,
        group: MemGroup,
        to_host: bool,
    ) -> Result<GpuTensor, CudaError> {
        t.relocate(self, to, group, to_host)
    }
    fn await_tensor(&self, t: &GpuTensor) -> R {
        t.await_ready(self)
    }
    fn await_ids(&self, t: &GpuTensor) -> R {
        t.await_ready(self)
    }
    /// Each weight's copy in the activations' type where it keeps one, cast first if the
    /// weight changed since; the f32 weight otherwise.
    fn product_weights<'a>(&'a self, weights: &'a [GpuTensor]) -> Result<Vec<Weight>, CudaError> {
        (weights.iter())
            .map(|w| {
                Ok(Weight {
                    ptr: w.act_copy(self)?.unwrap_or(w.ptr()),
                    out: w.shape()[0],
                    inp: w.shape().get(1).copied().unwrap_or(1),
                })
            })
            .collect()
    }

    fn copy(&self, dst: &mut GpuTensor, src: &GpuTensor) -> R {
        dst.copy_from(self, src)
    }
    fn add(&self, dst: &mut GpuTensor, src: &GpuTensor) -> R {
        Gpu::add(self, dst.ptr(), dst.ptr(), src.ptr(), dst.len())
    }
    fn sum(&self, dst: &mut GpuTensor, a: &GpuTensor, b: &GpuTensor) -> R {
        Gpu::add(self, dst.ptr(), a.ptr(), b.ptr(), dst.len())
    }

    fn bias_add(&self, y: &mut GpuTensor, b: &GpuTensor) -> R {
        Gpu::bias_add(self, y.ptr(), b.ptr(), rows(y), b.len())
    }
    fn bias_backward(&self, db: &mut GpuTensor, dy: &GpuTensor) -> R {
        Gpu::bias_backward(self, db.ptr(), dy.ptr(), rows(dy), db.len())
    }

    fn rmsnorm_forward(
        &self,
        out: &mut GpuTensor,
        rstd: &mut GpuTensor,
        x: &GpuTensor,
        w: &GpuTensor,
        eps: f32,
    ) -> R {
        let (n, h) = (rows(x), x.shape()[1]);
        Gpu::rmsnorm_forward(self, out.ptr(), rstd.ptr(), x.ptr(), w.ptr(), n, h, eps)
    }
    fn rmsnorm_apply(
        &self,
        out: &mut GpuTensor,
        rstd: &GpuTensor,
        x: &GpuTensor,
        w: &GpuTensor,
    ) -> R {
        let (n, h) = (rows(x), x.shape()[1]);
        Gpu::rmsnorm_apply(self, out.ptr(), rstd.ptr(), x.ptr(), w.ptr(), n, h)
    }
    fn rmsnorm_backward(
        &self,
        dy_to_dx: &mut GpuTensor,
        dw: &mut GpuTensor,
        x: &GpuTensor,
        w: &GpuTensor,
        rstd: &GpuTensor,
    ) -> R {
        let (n, h) = (rows(x), x.shape()[1]);
        let (dy, dw) = (dy_to_dx.ptr(), dw.ptr());
        Gpu::rmsnorm_backward(self, dy, dw, x.ptr(), w.ptr(), rstd.ptr(), n, h)
    }
    fn rope(
        &self,
        x: &mut GpuTensor,
        width: usize,
        seq: usize,
        head_dim: usize,
        rope: &Rope,
        inverse: bool,
    ) -> R {
        let n = x.len() / width.max(1);
        Gpu::rope(self, x.ptr(), n, width, seq, head_dim, rope, inverse)
    }

    fn project(&self, y: &mut GpuTensor, x: &GpuTensor, w: Weight, accumulate: bool) -> R {
        project(self, y.ptr(), x.ptr(), w, rows(x), accumulate)
    }
    fn project_each(&self, x: &GpuTensor, outputs: &mut [(&mut GpuTensor, Weight)]) -> R {
        let outputs: Vec<_> = outputs.iter().map(|(y, w)| (y.ptr(), *w)).collect();
        project_each(self, x.ptr(), &outputs, rows(x))
    }
    fn project_backward(
        &self,
        dw: &mut GpuTensor,
        dx: &mut GpuTensor,
        dy: &GpuTensor,
        x: &GpuTensor,
        w: Weight,
        accumulate_dx: bool,
    ) -> R {
        project_backward(
            self,
            dw,
            dx.ptr(),
            dy.ptr(),
            x.ptr(),
            w,
            rows(dy),
            accumulate_dx,
        )
    }
    fn projections_backward(
        &self,
        dx: &mut GpuTensor,
        x: &GpuTensor,
        items: &mut [(&mut GpuTensor, &GpuTensor, Weight)],
    ) -> R {
        let n = rows(x);
        let grads: Vec<_> = (items.iter())
            .map(|(dw, dy, w)| (&**dw, dy.ptr(), *w))
            .collect();
        weight_grads_each(self, x.ptr(), &grads, n)?;
        for (j, (_, dy, w)) in items.iter().enumerate() {
            project_input_grad(self, dx.ptr(), dy.ptr(), *w, n, j > 0)?;
        }
        Ok(())
    }

    fn swiglu_forward(&self, act: &mut GpuTensor, gate: &GpuTensor, up: &GpuTensor) -> R {
        Gpu::swiglu_forward(self, act.ptr(), gate.ptr(), up.ptr(), gate.len())
    }
    /// The activation first, then the down projection's backward, then SwiGLU's.
    fn swiglu_down_backward(
        &self,
        act: &mut GpuTensor,
        d_gate: &mut GpuTensor,
        d_up: &mut GpuTensor,
        d_down: &mut GpuTensor,
        dy: &GpuTensor,
        (gate, up): (&GpuTensor, &GpuTensor),
        w_down: Weight,
    ) -> R {
        let nf = gate.len();
        Gpu::swiglu_forward(self, act.ptr(), gate.ptr(), up.ptr(), nf)?;
        let (n, dy) = (rows(dy), dy.ptr());
        project_backward(self, d_down, d_up.ptr(), dy, act.ptr(), w_down, n, false)?;
        Gpu::swiglu_backward(self, d_gate.ptr(), d_up.ptr(), gate.ptr(), up.ptr(), nf)
    }

    fn embedding_forward(
        &self,
        out: &mut GpuTensor,
        table: &GpuTensor,
        ids: &GpuTensor,
        hidden: usize,
    ) -> R {
        Gpu::embedding_forward(self, out.ptr(), table.ptr(), ids.ptr(), ids.len(), hidden)
    }
    fn embedding_backward(
        &self,
        d_table: &mut GpuTensor,
        d_out: &GpuTensor,
        ids: &GpuTensor,
        hidden: usize,
    ) -> R {
        Gpu::embedding_backward(
            self,
            d_table.ptr(),
            d_out.ptr(),
            ids.ptr(),
            ids.len(),
            hidden,
        )
    }

    /// Flash kernels where the profile lists no scores scratch, else scores through cuBLAS.
    fn attention_forward(
        &self,
        (out, lse): (&mut GpuTensor, &mut GpuTensor),
        (q, k, v): (&GpuTensor, &GpuTensor, &GpuTensor),
        scratch: &mut AttnScratch<GpuTensor>,
        sh: AttnShape,
    ) -> R {
        match &scratch.scores {
            None => self.flash_attention_forward(
                (out.ptr(), lse.ptr()),
                (q.ptr(), k.ptr(), v.ptr()),
                sh,
            ),
            Some(scores) => Gpu::attention_forward(
                self,
                out.ptr(),
                lse.ptr(),
                q.ptr(),
                k.ptr(),
                v.ptr(),
                scores.ptr(),
                sh,
            ),
        }
    }
    /// Flash kernels where the profile lists their dQ accumulator, else scores through cuBLAS.
    fn attention_backward(
        &self,
        g: AttnGrads<'_, GpuTensor>,
        d_out: &GpuTensor,
        kept: AttnKept<'_, GpuTensor>,
        scratch: &mut AttnScratch<GpuTensor>,
        sh: AttnShape,
    ) -> R {
        let grads = (g.dq.ptr(), g.dk.ptr(), g.dv.ptr(), g.delta.ptr());
        let kept = (
            kept.q.ptr(),
            kept.k.ptr(),
            kept.v.ptr(),
            kept.out.ptr(),
            kept.lse.ptr(),
        );
        match scratch {
            AttnScratch {
                dq_acc: Some(dq_acc),
                ..
            } => {
                dq_acc.fill_zero(self)?;
                self.flash_attention_backward(grads, d_out.ptr(), kept, dq_acc.ptr(), sh)
            }
            AttnScratch {
                scores: Some(scores),
                d_scores: Some(d_scores),
                ..
            } => {
                let scratch = (scores.ptr(), d_scores.ptr());
                Gpu::attention_backward(self, grads, d_out.ptr(), kept, scratch, sh)
            }
            _ => Err(unsupported(
                "attention backward's scratch (attn_dq_acc or attn_scores)",
            )),
        }
    }

    /// Per block of tokens: the logits, then each token's loss into `token_loss`; the sum is
    /// read back in token order.
    fn head_loss_forward(
        &self,
        logits_block: &mut GpuTensor,
        token_loss: Option<&mut GpuTensor>,
        head: HeadLoss<'_, '_, Self>,
    ) -> Result<f64, CudaError> {
        let token_loss = token_loss.ok_or_else(|| unsupported("token_loss"))?;
        let HeadLoss {
            x,
            lm_head,
            targets,
            shape: sh,
        } = head;
        for t0 in (0..sh.tokens).step_by(sh.block) {
            let bt = sh.block.min(sh.tokens - t0);
            project(
                self,
                logits_block.ptr(),
                x.at(t0 * sh.hidden),
                lm_head,
                bt,
                false,
            )?;
            self.ce_forward(
                token_loss.at(t0),
                logits_block.ptr(),
                targets.at(t0),
                bt,
                sh.vocab,
            )?;
        }
        self.summed_losses(token_loss)
    }
    /// Per block of tokens: the logits, their gradient (with each token's loss where
    /// `token_loss` is given), then both products of the LM head's backward.
    fn head_loss_backward(
        &self,
        (dx, dw): (&mut GpuTensor, &mut GpuTensor),
        logits_block: &mut GpuTensor,
        token_loss: Option<&mut GpuTensor>,
        head: HeadLoss<'_, '_, Self>,
        scale: f32,
    ) -> R {
        let HeadLoss {
            x,
            lm_head,
            targets,
            shape: sh,
        } = head;
        let logits = logits_block.ptr();
        for t0 in (0..sh.tokens).step_by(sh.block) {
            let bt = sh.block.min(sh.tokens - t0);
            let xb = x.at(t0 * sh.hidden);
            project(self, logits, xb, lm_head, bt, false)?;
            let losses = token_loss.as_ref().map(|t| t.at(t0));
            self.ce_backward(logits, losses, targets.at(t0), bt, sh.vocab, scale)?;
            let dxb = dx.at(t0 * sh.hidden);
            project_backward(self, dw, dxb, logits, xb, lm_head, bt, false)?;
        }
        Ok(())
    }
    /// Waits for the stream.
    fn summed_losses(&self, token_loss: &GpuTensor) -> Result<f64, CudaError> {
        let losses = token_loss.to_host::<f32>(self)?;
        Ok(losses.iter().map(|&l| l as f64).sum())
    }
}
