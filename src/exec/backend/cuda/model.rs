//! The Llama model's parts on one CUDA device, each forward with its backward, allocating
//! exactly the `cuda-f32` inventory's tensors (the CPU executor's stash names and shapes) and
//! holding each part's scratch for the whole of its forward or backward, as the planner's
//! memory model assumes, so its predicted peaks hold here; and
//! [`GpuTrainer`]: a whole-model training step with the CPU trainer's semantics (mean loss over
//! the step's tokens, global-norm clipping, AdamW or SGD with PyTorch's update).

use cudarc::driver::{CudaSlice, DevicePtr};

use crate::data::Microbatch;
use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::ops::Gemm;
use crate::exec::backend::cuda::tensor::{DevPtr, GpuTensor};
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::kernels::attention::AttnShape;
use crate::exec::model::params::{head_param as hp, layer_param as lp};
use crate::exec::model::{LlamaConfig, ModelError, PartId, PartParams, check_tokens};
use crate::exec::optim::OptimizerConfig;
use crate::exec::optim::clip::clip_factor;
use crate::exec::optim::schedule::LrSchedule;
use crate::exec::tensor::Element;
use crate::exec::train::StepReport;
use crate::plan::inventory::{
    CUDA_LOGITS_BLOCK_TOKENS, MicroShape, Part, PartInventory, Profile, TensorSpec,
};

type Result<T> = std::result::Result<T, CudaError>;

/// What every part's forward and backward needs besides its parameters.
#[derive(Clone, Copy)]
pub struct GpuCtx<'a> {
    pub gpu: &'a Gpu,
    pub pool: &'a PoolRef,
    pub config: &'a LlamaConfig,
    pub micro: MicroShape,
}

impl GpuCtx<'_> {
    fn attn_shape(&self) -> AttnShape {
        let d = self.config.dims;
        AttnShape {
            batch: self.micro.batch,
            seq: self.micro.seq,
            heads: d.heads,
            kv_heads: d.kv_heads,
            head_dim: d.head_dim(),
        }
    }
}

/// Allocates a part's tensors by their inventory names.
struct Alloc<'a> {
    ctx: GpuCtx<'a>,
    part: Part,
    inv: PartInventory,
}

impl<'a> Alloc<'a> {
    fn new(ctx: GpuCtx<'a>, part: Part) -> Self {
        let inv = Profile::CudaF32.part(&ctx.config.dims, ctx.micro, part);
        Alloc { ctx, part, inv }
    }

    fn from<T>(&self, list: &[TensorSpec], name: &'static str) -> Result<GpuTensor<T>>
    where
        T: Element + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
    {
        let spec = list
            .iter()
            .find(|s| s.name == name)
            .ok_or(ModelError::NotInInventory {
                part: self.part,
                name,
            })?;
        GpuTensor::from_spec(self.ctx.gpu, self.ctx.pool, spec, MemGroup::Activations)
    }

    fn stash<T>(&self, name: &'static str) -> Result<GpuTensor<T>>
    where
        T: Element + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
    {
        self.from(&self.inv.stash, name)
    }

    fn fwd(&self, name: &'static str) -> Result<GpuTensor> {
        self.from(&self.inv.forward_scratch, name)
    }

    fn bwd(&self, name: &'static str) -> Result<GpuTensor> {
        self.from(&self.inv.backward_scratch, name)
    }

    fn output(&self) -> Result<GpuTensor> {
        let spec = self.inv.output.as_ref().ok_or(ModelError::NotInInventory {
            part: self.part,
            name: "output",
        })?;
        GpuTensor::from_spec(self.ctx.gpu, self.ctx.pool, spec, MemGroup::Activations)
    }
}

impl From<ModelError> for CudaError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Device(d) => CudaError::Device(d),
            other => CudaError::Unsupported(other.to_string()),
        }
    }
}

/// One part's parameters, gradients and optimizer state on the device.
pub struct GpuPart {
    pub id: PartId,
    pub weights: Vec<GpuTensor>,
    pub grads: Vec<GpuTensor>,
    exp_avg: Vec<GpuTensor>,
    exp_avg_sq: Vec<GpuTensor>,
}

impl GpuPart {
    /// Copies a host part's weights to the device, with zero gradients and optimizer state.
    pub fn upload(
        gpu: &Gpu,
        pool: &PoolRef,
        host: &PartParams,
        optimizer: &OptimizerConfig,
    ) -> Result<GpuPart> {
        let mut p = GpuPart {
            id: host.id,
            weights: Vec::new(),
            grads: Vec::new(),
            exp_avg: Vec::new(),
            exp_avg_sq: Vec::new(),
        };
        let adam = matches!(optimizer, OptimizerConfig::AdamW { .. });
        for (name, w) in host.names.iter().zip(&host.weights) {
            let shape = w.shape();
            let group = MemGroup::Weights;
            p.weights.push(GpuTensor::from_host(
                gpu,
                pool,
                name,
                shape,
                w.data(),
                group,
            )?);
            let g = MemGroup::Gradients;
            p.grads.push(GpuTensor::zeros(gpu, pool, name, shape, g)?);
            if adam {
                let o = MemGroup::OptimizerState;
                p.exp_avg.push(GpuTensor::zeros(gpu, pool, name, shape, o)?);
                p.exp_avg_sq
                    .push(GpuTensor::zeros(gpu, pool, name, shape, o)?);
            }
        }
        Ok(p)
    }

    /// Copies weights and gradients into a host part of the same layout.
    pub fn download(&self, gpu: &Gpu, host: &mut PartParams) -> Result<()> {
        for (src, dst) in self.weights.iter().zip(host.weights.iter_mut()) {
            dst.data_mut().copy_from_slice(&src.to_host(gpu)?);
        }
        for (src, dst) in self.grads.iter().zip(host.grads.iter_mut()) {
            dst.data_mut().copy_from_slice(&src.to_host(gpu)?);
        }
        Ok(())
    }
}

pub struct EmbeddingStash {
    token_ids: GpuTensor<i32>,
}

/// The layer's kept tensors: the CPU `LayerStash`'s names and shapes.
pub struct LayerStash {
    input: GpuTensor,
    attn_norm_rstd: GpuTensor,
    q: GpuTensor,
    k: GpuTensor,
    v: GpuTensor,
    attn_out: GpuTensor,
    attn_lse: GpuTensor,
    resid_mid: GpuTensor,
    mlp_norm_rstd: GpuTensor,
    gate: GpuTensor,
    up: GpuTensor,
}

pub struct HeadStash {
    input: GpuTensor,
    final_norm_rstd: GpuTensor,
    targets: GpuTensor<i32>,
}

/// `y[n, out] (+)= x[n, in] · W[out, in]^T`, the projections' forward.
fn project(
    gpu: &Gpu,
    y: DevPtr,
    x: DevPtr,
    w: &GpuTensor,
    n: usize,
    accumulate: bool,
) -> Result<()> {
    let (out, inp) = (w.shape()[0], w.shape()[1]);
    gpu.gemm(
        y,
        x,
        w.ptr(),
        Gemm::dense(n, out, inp, false, true, accumulate),
    )
}

/// Backward of [`project`]: `dW += dy^T · x` and `dx (+)= dy · W`.
#[allow(clippy::too_many_arguments)]
fn project_backward(
    gpu: &Gpu,
    dw: &GpuTensor,
    dx: DevPtr,
    dy: DevPtr,
    x: DevPtr,
    w: &GpuTensor,
    n: usize,
    accumulate_dx: bool,
) -> Result<()> {
    let (out, inp) = (w.shape()[0], w.shape()[1]);
    gpu.gemm(dw.ptr(), dy, x, Gemm::dense(out, inp, n, true, false, true))?;
    gpu.gemm(
        dx,
        dy,
        w.ptr(),
        Gemm::dense(n, inp, out, false, false, accumulate_dx),
    )
}

pub fn embedding_forward(
    ctx: GpuCtx<'_>,
    p: &GpuPart,
    ids: &[i32],
) -> Result<(EmbeddingStash, GpuTensor)> {
    let d = ctx.config.dims;
    check_tokens("input_ids", ids, d.vocab)?;
    let a = Alloc::new(ctx, Part::Embedding);
    let mut token_ids: GpuTensor<i32> = a.stash("token_ids")?;
    if ids.len() != token_ids.len() {
        return Err(CudaError::Unsupported(format!(
            "{} input ids for a micro-batch of {} tokens",
            ids.len(),
            token_ids.len()
        )));
    }
    token_ids.copy_from_host(ctx.gpu, ids)?;
    let out = a.output()?;
    let table = &p.weights[0];
    ctx.gpu
        .embedding_forward(out.ptr(), table.ptr(), token_ids.ptr(), ids.len(), d.hidden)?;
    Ok((EmbeddingStash { token_ids }, out))
}

pub fn embedding_backward(
    ctx: GpuCtx<'_>,
    p: &mut GpuPart,
    st: EmbeddingStash,
    grad_output: GpuTensor,
) -> Result<()> {
    let n = st.token_ids.len();
    ctx.gpu.embedding_backward(
        p.grads[0].ptr(),
        grad_output.ptr(),
        st.token_ids.ptr(),
        n,
        ctx.config.dims.hidden,
    )
}

pub fn layer_forward(
    ctx: GpuCtx<'_>,
    p: &GpuPart,
    input: GpuTensor,
) -> Result<(LayerStash, GpuTensor)> {
    let (gpu, cfg, m) = (ctx.gpu, ctx.config, ctx.micro);
    let d = cfg.dims;
    let (n, h, kv, f) = (m.tokens(), d.hidden, d.kv_width(), d.ffn);
    let a = Alloc::new(ctx, Part::Layer);
    let mut st = LayerStash {
        input,
        attn_norm_rstd: a.stash("attn_norm_rstd")?,
        q: a.stash("q")?,
        k: a.stash("k")?,
        v: a.stash("v")?,
        attn_out: a.stash("attn_out")?,
        attn_lse: a.stash("attn_lse")?,
        resid_mid: a.stash("resid_mid")?,
        mlp_norm_rstd: a.stash("mlp_norm_rstd")?,
        gate: a.stash("gate")?,
        up: a.stash("up")?,
    };
    let norm_out = a.fwd("norm_out")?;
    let act = a.fwd("act")?;
    let scores = a.fwd("attn_scores")?;
    let mut output = a.output()?;
    let w = &p.weights;
    let hd = d.head_dim();

    gpu.rmsnorm_forward(
        norm_out.ptr(),
        st.attn_norm_rstd.ptr(),
        st.input.ptr(),
        w[lp::INPUT_NORM].ptr(),
        n,
        h,
        cfg.rms_norm_eps,
    )?;
    for (dst, wi) in [(&st.q, lp::Q), (&st.k, lp::K), (&st.v, lp::V)] {
        project(gpu, dst.ptr(), norm_out.ptr(), &w[wi], n, false)?;
    }
    gpu.rope(st.q.ptr(), n, h, m.seq, hd, cfg.rope_theta, false)?;
    gpu.rope(st.k.ptr(), n, kv, m.seq, hd, cfg.rope_theta, false)?;
    gpu.attention_forward(
        st.attn_out.ptr(),
        st.attn_lse.ptr(),
        st.q.ptr(),
        st.k.ptr(),
        st.v.ptr(),
        scores.ptr(),
        ctx.attn_shape(),
    )?;
    st.resid_mid.copy_from(gpu, &st.input)?;
    project(
        gpu,
        st.resid_mid.ptr(),
        st.attn_out.ptr(),
        &w[lp::O],
        n,
        true,
    )?;

    gpu.rmsnorm_forward(
        norm_out.ptr(),
        st.mlp_norm_rstd.ptr(),
        st.resid_mid.ptr(),
        w[lp::POST_NORM].ptr(),
        n,
        h,
        cfg.rms_norm_eps,
    )?;
    project(gpu, st.gate.ptr(), norm_out.ptr(), &w[lp::GATE], n, false)?;
    project(gpu, st.up.ptr(), norm_out.ptr(), &w[lp::UP], n, false)?;
    gpu.swiglu_forward(act.ptr(), st.gate.ptr(), st.up.ptr(), n * f)?;
    output.copy_from(gpu, &st.resid_mid)?;
    project(gpu, output.ptr(), act.ptr(), &w[lp::DOWN], n, true)?;
    Ok((st, output))
}

/// Adds the micro-batch's parameter gradients; returns the gradient of the layer's input.
pub fn layer_backward(
    ctx: GpuCtx<'_>,
    p: &mut GpuPart,
    st: LayerStash,
    grad_output: GpuTensor,
) -> Result<GpuTensor> {
    let (gpu, cfg, m) = (ctx.gpu, ctx.config, ctx.micro);
    let d = cfg.dims;
    let (n, h, kv, f) = (m.tokens(), d.hidden, d.kv_width(), d.ffn);
    let a = Alloc::new(ctx, Part::Layer);
    let norm_out = a.bwd("norm_out")?;
    let act = a.bwd("act")?;
    let d_gate = a.bwd("d_gate")?;
    let d_up = a.bwd("d_up")?;
    let d_norm_out = a.bwd("d_norm_out")?;
    let mut d_resid_mid = a.bwd("d_resid_mid")?;
    let d_attn_out = a.bwd("d_attn_out")?;
    let d_q = a.bwd("d_q")?;
    let d_k = a.bwd("d_k")?;
    let d_v = a.bwd("d_v")?;
    let attn_delta = a.bwd("attn_delta")?;
    let scores = a.bwd("attn_scores")?;
    let d_scores = a.bwd("attn_d_scores")?;
    let (w, g) = (&p.weights, &p.grads);
    let dy = grad_output.ptr();
    let hd = d.head_dim();

    // MLP block, recomputing its normalised input and activation from the stash.
    gpu.rmsnorm_apply(
        norm_out.ptr(),
        st.mlp_norm_rstd.ptr(),
        st.resid_mid.ptr(),
        w[lp::POST_NORM].ptr(),
        n,
        h,
    )?;
    gpu.swiglu_forward(act.ptr(), st.gate.ptr(), st.up.ptr(), n * f)?;
    project_backward(
        gpu,
        &g[lp::DOWN],
        d_up.ptr(),
        dy,
        act.ptr(),
        &w[lp::DOWN],
        n,
        false,
    )?;
    gpu.swiglu_backward(d_gate.ptr(), d_up.ptr(), st.gate.ptr(), st.up.ptr(), n * f)?;
    project_backward(
        gpu,
        &g[lp::GATE],
        d_norm_out.ptr(),
        d_gate.ptr(),
        norm_out.ptr(),
        &w[lp::GATE],
        n,
        false,
    )?;
    project_backward(
        gpu,
        &g[lp::UP],
        d_norm_out.ptr(),
        d_up.ptr(),
        norm_out.ptr(),
        &w[lp::UP],
        n,
        true,
    )?;
    gpu.rmsnorm_backward(
        d_norm_out.ptr(),
        g[lp::POST_NORM].ptr(),
        st.resid_mid.ptr(),
        w[lp::POST_NORM].ptr(),
        st.mlp_norm_rstd.ptr(),
        n,
        h,
    )?;
    d_resid_mid.copy_from(gpu, &grad_output)?;
    gpu.add_into(d_resid_mid.ptr(), d_norm_out.ptr(), n * h)?;

    // Attention block.
    project_backward(
        gpu,
        &g[lp::O],
        d_attn_out.ptr(),
        d_resid_mid.ptr(),
        st.attn_out.ptr(),
        &w[lp::O],
        n,
        false,
    )?;
    gpu.attention_backward(
        (d_q.ptr(), d_k.ptr(), d_v.ptr(), attn_delta.ptr()),
        d_attn_out.ptr(),
        (
            st.q.ptr(),
            st.k.ptr(),
            st.v.ptr(),
            st.attn_out.ptr(),
            st.attn_lse.ptr(),
        ),
        (scores.ptr(), d_scores.ptr()),
        ctx.attn_shape(),
    )?;
    gpu.rope(d_q.ptr(), n, h, m.seq, hd, cfg.rope_theta, true)?;
    gpu.rope(d_k.ptr(), n, kv, m.seq, hd, cfg.rope_theta, true)?;
    gpu.rmsnorm_apply(
        norm_out.ptr(),
        st.attn_norm_rstd.ptr(),
        st.input.ptr(),
        w[lp::INPUT_NORM].ptr(),
        n,
        h,
    )?;
    let projections = [(&d_q, lp::Q), (&d_k, lp::K), (&d_v, lp::V)];
    for (i, (dp, wi)) in projections.into_iter().enumerate() {
        project_backward(
            gpu,
            &g[wi],
            d_norm_out.ptr(),
            dp.ptr(),
            norm_out.ptr(),
            &w[wi],
            n,
            i > 0,
        )?;
    }
    gpu.rmsnorm_backward(
        d_norm_out.ptr(),
        g[lp::INPUT_NORM].ptr(),
        st.input.ptr(),
        w[lp::INPUT_NORM].ptr(),
        st.attn_norm_rstd.ptr(),
        n,
        h,
    )?;
    gpu.add_into(d_resid_mid.ptr(), d_norm_out.ptr(), n * h)?;
    Ok(d_resid_mid)
}

/// Final norm, LM head and cross-entropy; returns the stash and the summed loss.
pub fn head_forward(
    ctx: GpuCtx<'_>,
    p: &GpuPart,
    input: GpuTensor,
    targets: &[i32],
) -> Result<(HeadStash, f64)> {
    let (gpu, d) = (ctx.gpu, ctx.config.dims);
    check_tokens("targets", targets, d.vocab)?;
    let (n, h, v) = (ctx.micro.tokens(), d.hidden, d.vocab);
    let a = Alloc::new(ctx, Part::Head);
    let mut st = HeadStash {
        input,
        final_norm_rstd: a.stash("final_norm_rstd")?,
        targets: a.stash("targets")?,
    };
    if targets.len() != n {
        return Err(CudaError::Unsupported(format!(
            "{} targets for a micro-batch of {n} tokens",
            targets.len()
        )));
    }
    st.targets.copy_from_host(gpu, targets)?;
    let norm_out = a.fwd("norm_out")?;
    let logits = a.fwd("logits_block")?;
    let token_loss = a.fwd("token_loss")?;
    let w = &p.weights;
    gpu.rmsnorm_forward(
        norm_out.ptr(),
        st.final_norm_rstd.ptr(),
        st.input.ptr(),
        w[hp::NORM].ptr(),
        n,
        h,
        ctx.config.rms_norm_eps,
    )?;
    for t0 in (0..n).step_by(CUDA_LOGITS_BLOCK_TOKENS) {
        let bt = CUDA_LOGITS_BLOCK_TOKENS.min(n - t0);
        project(
            gpu,
            logits.ptr(),
            norm_out.at(t0 * h),
            &w[hp::LM_HEAD],
            bt,
            false,
        )?;
        gpu.ce_forward(token_loss.at(t0), logits.ptr(), st.targets.at(t0), bt, v)?;
    }
    // Summed in token order in f64, as the CPU head does.
    let loss: f64 = token_loss.to_host(gpu)?.iter().map(|&l| l as f64).sum();
    Ok((st, loss))
}

/// Backward with the loss scaled by `scale`; returns the gradient of the head's input.
pub fn head_backward(
    ctx: GpuCtx<'_>,
    p: &mut GpuPart,
    st: HeadStash,
    scale: f32,
) -> Result<GpuTensor> {
    let (gpu, d) = (ctx.gpu, ctx.config.dims);
    let (n, h, v) = (ctx.micro.tokens(), d.hidden, d.vocab);
    let a = Alloc::new(ctx, Part::Head);
    let norm_out = a.bwd("norm_out")?;
    let logits = a.bwd("logits_block")?;
    let d_norm_out = a.bwd("d_norm_out")?;
    let (w, g) = (&p.weights, &p.grads);
    gpu.rmsnorm_apply(
        norm_out.ptr(),
        st.final_norm_rstd.ptr(),
        st.input.ptr(),
        w[hp::NORM].ptr(),
        n,
        h,
    )?;
    for t0 in (0..n).step_by(CUDA_LOGITS_BLOCK_TOKENS) {
        let bt = CUDA_LOGITS_BLOCK_TOKENS.min(n - t0);
        let x = norm_out.at(t0 * h);
        project(gpu, logits.ptr(), x, &w[hp::LM_HEAD], bt, false)?;
        gpu.ce_backward(logits.ptr(), st.targets.at(t0), bt, v, scale)?;
        project_backward(
            gpu,
            &g[hp::LM_HEAD],
            d_norm_out.at(t0 * h),
            logits.ptr(),
            x,
            &w[hp::LM_HEAD],
            bt,
            false,
        )?;
    }
    gpu.rmsnorm_backward(
        d_norm_out.ptr(),
        g[hp::NORM].ptr(),
        st.input.ptr(),
        w[hp::NORM].ptr(),
        st.final_norm_rstd.ptr(),
        n,
        h,
    )?;
    Ok(d_norm_out)
}

/// The whole model and its optimizer on one GPU.
pub struct GpuTrainer {
    pub gpu: Gpu,
    pub pool: PoolRef,
    pub config: LlamaConfig,
    /// Every part in forward order.
    pub parts: Vec<GpuPart>,
    pub optimizer: OptimizerConfig,
    pub schedule: LrSchedule,
    pub grad_clip: Option<f32>,
    /// Steps completed so far.
    pub step: u64,
    /// One f64 on the device for the sum of squared gradients (8 bytes, not counted).
    norm_acc: CudaSlice<f64>,
}

impl GpuTrainer {
    /// Uploads host parts (every part of the model, in forward order).
    pub fn upload(
        gpu: Gpu,
        pool: PoolRef,
        config: LlamaConfig,
        host: &[PartParams],
        optimizer: OptimizerConfig,
        schedule: LrSchedule,
        grad_clip: Option<f32>,
    ) -> Result<GpuTrainer> {
        config.validate()?;
        let want = PartId::all(config.dims.layers);
        let got: Vec<PartId> = host.iter().map(|p| p.id).collect();
        if got != want {
            return Err(CudaError::Unsupported(format!(
                "the GPU trainer holds the whole model: parts {want:?}, got {got:?}"
            )));
        }
        let parts = host
            .iter()
            .map(|p| GpuPart::upload(&gpu, &pool, p, &optimizer))
            .collect::<Result<Vec<_>>>()?;
        let norm_acc = gpu.stream.alloc_zeros::<f64>(1)?;
        Ok(GpuTrainer {
            gpu,
            pool,
            config,
            parts,
            optimizer,
            schedule,
            grad_clip,
            step: 0,
            norm_acc,
        })
    }

    /// Forward and backward of one micro-batch through every part; returns its summed loss.
    pub fn forward_backward(&mut self, mb: &Microbatch, loss_scale: f32) -> Result<f64> {
        let ctx = GpuCtx {
            gpu: &self.gpu,
            pool: &self.pool,
            config: &self.config,
            micro: mb.shape,
        };
        let layers = self.config.dims.layers;
        let (embedding, rest) = self.parts.split_at_mut(1);
        let (layer_parts, head) = rest.split_at_mut(layers);
        let (emb_st, mut x) = embedding_forward(ctx, &embedding[0], &mb.input_ids)?;
        let mut stashes = Vec::with_capacity(layers);
        for p in layer_parts.iter() {
            let (st, y) = layer_forward(ctx, p, x)?;
            stashes.push(st);
            x = y;
        }
        let (head_st, loss) = head_forward(ctx, &head[0], x, &mb.targets)?;
        let mut grad = head_backward(ctx, &mut head[0], head_st, loss_scale)?;
        for (p, st) in layer_parts.iter_mut().zip(stashes).rev() {
            grad = layer_backward(ctx, p, st, grad)?;
        }
        embedding_backward(ctx, &mut embedding[0], emb_st, grad)?;
        Ok(loss)
    }

    /// The global L2 norm of every gradient.
    pub fn grad_norm(&mut self) -> Result<f64> {
        let gpu = &self.gpu;
        gpu.stream.memset_zeros(&mut self.norm_acc)?;
        let acc = DevPtr(self.norm_acc.device_ptr(&gpu.stream).0);
        for g in self.parts.iter().flat_map(|p| &p.grads) {
            gpu.sum_squares(acc, g.ptr(), g.len())?;
        }
        let sum = gpu.stream.clone_dtoh(&self.norm_acc)?[0];
        Ok(sum.sqrt())
    }

    /// Clips by `factor`, applies the update for step `step` (from 1) with `lr`, zeroes grads.
    pub fn update(&mut self, step: u64, lr: f32, factor: f32) -> Result<()> {
        let gpu = &self.gpu;
        let c = self.optimizer.coeffs(step, lr);
        for p in &mut self.parts {
            for i in 0..p.weights.len() {
                let (w, g) = (p.weights[i].ptr(), p.grads[i].ptr());
                let n = p.weights[i].len();
                match self.optimizer {
                    OptimizerConfig::Sgd => gpu.sgd_update(w, g, n, factor, lr)?,
                    OptimizerConfig::AdamW {
                        beta1, beta2, eps, ..
                    } => gpu.adamw_update(
                        w,
                        g,
                        p.exp_avg[i].ptr(),
                        p.exp_avg_sq[i].ptr(),
                        n,
                        factor,
                        (beta1, beta2, eps),
                        c.kernel_args(),
                    )?,
                }
            }
            for g in &mut p.grads {
                g.fill_zero(gpu)?;
            }
        }
        Ok(())
    }

    /// One optimizer step over all of the step's micro-batches, in order.
    pub fn train_step(&mut self, microbatches: &[Microbatch]) -> Result<StepReport> {
        let total_tokens: usize = microbatches.iter().map(|m| m.shape.tokens()).sum();
        if total_tokens == 0 {
            return Err(CudaError::Unsupported("a step without tokens".into()));
        }
        let loss_scale = 1.0 / total_tokens as f32;
        let mut loss_sum = 0.0;
        for mb in microbatches {
            loss_sum += self.forward_backward(mb, loss_scale)?;
        }
        let step = self.step;
        let loss = loss_sum / total_tokens as f64;
        let grad_norm = self.grad_norm()?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(CudaError::Unsupported(format!(
                "step {step} diverged: loss {loss}, gradient norm {grad_norm}"
            )));
        }
        let factor = self.grad_clip.map_or(1.0, |c| clip_factor(grad_norm, c));
        let lr = self.schedule.lr_at(step);
        self.update(step + 1, lr, factor)?;
        self.step += 1;
        Ok(StepReport {
            step,
            loss,
            grad_norm,
            lr,
        })
    }
}
