//! The pipeline runtime's engine on CUDA devices: a plan's devices are pipeline stages, each
//! with its own pool, on one GPU or several. Stages that share a GPU share its compute stream,
//! so a tensor handed from one to the next is ordered after the kernels that made it without
//! any event; a send between stages on one GPU hands the buffer over. A send between GPUs goes
//! through NCCL (`nccl`: one communicator for the job's GPUs), or through host memory where
//! NCCL is missing or cannot start. Data parallelism sums a gradient's replica copies, whole
//! or (sharded optimizer state) by owned ranges, and gathers updated weights (`replicas`).
//! Offload and prefetch run on the GPU's copy stream through pinned host memory (`offload`),
//! overlapping compute: every operation here first makes the compute stream wait for
//! prefetches into the tensors it reads.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::DevicePtr;

use crate::exec::backend::cuda::dev_ptr::DevPtr;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::nccl::Nccl;
use crate::exec::backend::cuda::nccl_ranks::RankLinks;
use crate::exec::backend::cuda::tensor::{Detached, GpuTensor};
use crate::exec::backend::cuda::{CudaError, Precision};
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::model::head::head_forward_backward;
use crate::exec::model::part::{MicroTokens, PartOutput, StashOf, backward_part, forward_part};
use crate::exec::model::{LlamaConfig, PartCtx, PartId, PartParams};
use crate::exec::optim::OptimizerConfig;
use crate::exec::optim::clip::tensor_squares;
use crate::exec::pipeline::PipelineError;
use crate::exec::pipeline::engine::{AcrossRanks, At, Engine, HostPart, Kept, Update};
use crate::exec::transport::frame::WireTensor;
use crate::plan::inventory::{DType, keeps_act_copy};

mod ranks;
mod replicas;
mod wire;

type Result<T> = std::result::Result<T, PipelineError>;

/// One part's kept activations on a GPU.
pub type GpuStash = StashOf<Gpu>;
/// One part's weights and gradients on a GPU (or offloaded to the host).
pub type GpuPart = PartParams<GpuTensor>;

/// A tensor between stages, and the plan device that sent it.
pub struct GpuMessage {
    tensor: Detached,
    from: u32,
}

/// The GPUs a plan runs on.
pub struct GpuEngine {
    /// The communicator between the GPUs, when there are several and NCCL is here (dropped
    /// before the GPUs).
    pub(super) nccl: Option<Nccl>,
    /// A rank's links to the other processes' replicas of its stages (`ranks`), dropped
    /// before the GPUs too (the links' streams hold their contexts, should the mesh's
    /// failure hook hold them a moment longer).
    rank_links: Option<Arc<RankLinks>>,
    /// Each GPU once.
    pub(super) gpus: Vec<Gpu>,
    /// For each run-wide plan device (replica by replica), the index in `gpus` of the GPU it
    /// runs on.
    pub(super) stage_gpu: Vec<usize>,
    /// Devices per replica: run-wide device `d` is stage `d % stages` of replica
    /// `d / stages` (every device one replica's until `replicate` or `open_rank` says otherwise).
    pub(super) stages: usize,
    /// The run-wide index of `stage_gpu[0]`: 0, or where a rank's devices start
    /// (`open_rank`).
    first: usize,
}

impl GpuEngine {
    /// Opens the GPU of every stage (`ordinals[stage]`, repeats allowed) once.
    pub fn open(ordinals: &[usize], precision: Precision) -> std::result::Result<Self, CudaError> {
        let mut gpus: Vec<Gpu> = Vec::new();
        let mut stage_gpu = Vec::with_capacity(ordinals.len());
        for &ordinal in ordinals {
            let index = match gpus.iter().position(|g| g.ordinal == ordinal) {
                Some(i) => i,
                None => {
                    gpus.push(Gpu::open(ordinal, precision)?);
                    gpus.len() - 1
                }
            };
            stage_gpu.push(index);
        }
        // Without NCCL (not installed, or it cannot start here) sends between GPUs still
        // work, through host memory: slower, so say so.
        let nccl = match gpus.len() {
            1 => None,
            _ => Nccl::open(&gpus)
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "stages on different GPUs exchange tensors through host memory");
                })
                .ok(),
        };
        let stages = stage_gpu.len();
        Ok(GpuEngine {
            nccl,
            rank_links: None,
            gpus,
            stage_gpu,
            stages,
            first: 0,
        })
    }

    /// Runs `replicas` copies of a `stages`-device pipeline on the first stages x replicas
    /// devices given to `open`, replica by replica; makes the NCCL communicator of each
    /// stage's replicas on distinct GPUs.
    pub fn replicate(
        &mut self,
        stages: usize,
        replicas: usize,
    ) -> std::result::Result<(), CudaError> {
        if stages == 0 || stages * replicas > self.stage_gpu.len() {
            return Err(CudaError::Unsupported(format!(
                "{replicas} replicas of {stages} stages need {} devices; the engine has {}",
                stages * replicas,
                self.stage_gpu.len()
            )));
        }
        self.stages = stages;
        for stage in 0..stages {
            let gpus = self.replica_gpus(stage, replicas);
            if gpus.len() < 2 {
                continue;
            }
            match &self.nccl {
                Some(nccl) => {
                    let ordinals: Vec<usize> = gpus.iter().map(|&g| self.gpus[g].ordinal).collect();
                    nccl.add_group(&ordinals)?;
                }
                None => tracing::warn!(
                    stage,
                    "replicas on different GPUs sum their gradients through host memory (no NCCL)"
                ),
            }
        }
        Ok(())
    }

    /// The GPUs (indices in `gpus`) that hold stage `stage` of the first `replicas` replicas,
    /// each once, in replica order.
    fn replica_gpus(&self, stage: usize, replicas: usize) -> Vec<usize> {
        let mut gpus = Vec::new();
        for r in 0..replicas {
            let g = self.stage_gpu[r * self.stages + stage];
            if !gpus.contains(&g) {
                gpus.push(g);
            }
        }
        gpus
    }

    /// One stage on an opened GPU.
    pub fn of(gpu: Gpu) -> Self {
        GpuEngine {
            nccl: None,
            rank_links: None,
            gpus: vec![gpu],
            stage_gpu: vec![0],
            stages: 1,
            first: 0,
        }
    }

    /// The GPU that runs plan device `device`, to change its settings (profiling).
    pub fn gpu_mut(&mut self, device: u32) -> &mut Gpu {
        &mut self.gpus[self.stage_gpu[device as usize - self.first]]
    }

    /// Waits for everything queued on every GPU, NCCL's transfers included.
    pub fn synchronize(&self) -> std::result::Result<(), CudaError> {
        self.gpus.iter().try_for_each(Gpu::synchronize)?;
        self.nccl.as_ref().map_or(Ok(()), Nccl::synchronize)
    }

    /// Whether sends between GPUs go through NCCL.
    pub fn has_nccl(&self) -> bool {
        self.nccl.is_some()
    }

    /// The GPU that runs plan device `device`.
    pub fn gpu(&self, device: u32) -> &Gpu {
        &self.gpus[self.stage_gpu[device as usize - self.first]]
    }

    fn ctx<'a>(&'a self, at: At<'a>) -> PartCtx<'a, Gpu> {
        PartCtx {
            backend: self.gpu(at.device),
            pool: at.pool,
            config: at.config,
            micro: at.micro,
        }
    }
}

/// Makes the compute stream wait for any prefetch into the part's weights or gradients.
fn await_part(gpu: &Gpu, part: &GpuPart) -> std::result::Result<(), CudaError> {
    for t in part.weights.iter().chain(&part.grads) {
        t.await_ready(gpu)?;
    }
    Ok(())
}

impl Engine for GpuEngine {
    type Tensor = GpuTensor;
    type Stash = GpuStash;
    type Part = GpuPart;
    type Message = GpuMessage;

    fn forward(
        &self,
        at: At<'_>,
        part: &GpuPart,
        input: Option<GpuTensor>,
        tokens: MicroTokens<'_>,
    ) -> Result<(GpuStash, PartOutput<GpuTensor>)> {
        let ctx = self.ctx(at);
        await_part(ctx.backend, part)?;
        if let Some(x) = &input {
            x.await_ready(ctx.backend)?;
        }
        Ok(forward_part(&ctx, part, input, tokens)?)
    }

    fn backward(
        &self,
        at: At<'_>,
        part: &mut GpuPart,
        stash: GpuStash,
        grad_output: Option<GpuTensor>,
        loss_scale: f32,
    ) -> Result<Option<GpuTensor>> {
        let ctx = self.ctx(at);
        await_part(ctx.backend, part)?;
        stash.await_ready(ctx.backend)?;
        if let Some(g) = &grad_output {
            g.await_ready(ctx.backend)?;
        }
        Ok(backward_part(&ctx, part, stash, grad_output, loss_scale)?)
    }

    /// The head's one-pass forward and backward (`model::head::head_forward_backward`), as
    /// a one-stage plan runs it.
    fn one_pass_head(&self) -> bool {
        true
    }

    fn head_forward_backward(
        &self,
        at: At<'_>,
        part: &mut GpuPart,
        input: GpuTensor,
        tokens: MicroTokens<'_>,
        loss_scale: f32,
    ) -> Result<(GpuTensor, f64)> {
        let ctx = self.ctx(at);
        await_part(ctx.backend, part)?;
        input.await_ready(ctx.backend)?;
        let targets = tokens.targets;
        Ok(head_forward_backward(
            &ctx, part, input, targets, loss_scale,
        )?)
    }

    fn keep_input(&self, first: GpuStash) -> Kept<GpuTensor, GpuStash> {
        match first.into_input() {
            Ok(input) => Kept::Input(input),
            Err(embedding) => Kept::Stash(embedding),
        }
    }

    fn regroup(&self, t: GpuTensor, group: MemGroup) -> GpuTensor {
        t.regroup(group)
    }

    fn move_tensor(
        &self,
        device: u32,
        t: GpuTensor,
        to: &PoolRef,
        group: MemGroup,
        to_host: bool,
    ) -> Result<GpuTensor> {
        Ok(t.relocate(self.gpu(device), to, group, to_host)?)
    }

    fn move_stash(
        &self,
        device: u32,
        s: GpuStash,
        to: &PoolRef,
        to_host: bool,
    ) -> Result<GpuStash> {
        Ok(s.relocate(self.gpu(device), to, to_host)?)
    }

    fn send(&self, device: u32, t: GpuTensor) -> Result<GpuMessage> {
        let tensor = t.detach(self.gpu(device), self.nccl.is_some())?;
        Ok(GpuMessage {
            tensor,
            from: device,
        })
    }

    fn receive(&self, device: u32, m: GpuMessage, pool: &PoolRef) -> Result<GpuTensor> {
        let (from, to) = (self.gpu(m.from), self.gpu(device));
        let group = MemGroup::Activations;
        Ok(m.tensor.attach(from, to, self.nccl.as_ref(), pool, group)?)
    }

    fn wire_out(&self, device: u32, t: GpuTensor) -> Result<WireTensor> {
        self.copy_out(device, t)
    }

    fn wire_in(&self, device: u32, t: WireTensor, pool: &PoolRef) -> Result<GpuTensor> {
        self.copy_in(device, t, pool)
    }

    fn values<'t>(
        &self,
        device: u32,
        t: &'t GpuTensor,
        within: Range<usize>,
    ) -> Result<Cow<'t, [f32]>> {
        self.read_values(device, t, within)
    }

    fn len(&self, t: &GpuTensor) -> usize {
        t.len()
    }

    /// Host weights become host-resident GPU tensors without a copy; the pipeline uploads
    /// each group when it places the chunk.
    fn adopt(&self, part: PartParams, host: &PoolRef) -> Result<GpuPart> {
        let id = part.id;
        let mut weights = Vec::with_capacity(part.weights.len());
        let mut grads = Vec::with_capacity(part.weights.len());
        let PartParams {
            names,
            weights: host_weights,
            ..
        } = part;
        let gpu = &self.gpus[0];
        let profile = gpu.precision.profile();
        for (name, w) in names.iter().zip(host_weights) {
            let (_, shape, data) = w.into_data();
            let mut weight = GpuTensor::on_host(host, name, &shape, data, MemGroup::Weights)?;
            if keeps_act_copy(profile, id.kind(), &shape) {
                weight = weight.keep_act_copy(gpu, host)?;
            }
            weights.push(weight);
            let g = MemGroup::Gradients;
            grads.push(GpuTensor::zeros_on_host(host, name, &shape, DType::F32, g)?);
        }
        Ok(GpuPart {
            id,
            names,
            weights,
            grads,
        })
    }

    fn part_id(&self, part: &GpuPart) -> PartId {
        part.id
    }

    fn params_mut<'p>(
        &self,
        part: &'p mut GpuPart,
    ) -> (&'p mut Vec<GpuTensor>, &'p mut Vec<GpuTensor>) {
        (&mut part.weights, &mut part.grads)
    }

    fn param_names<'p>(&self, part: &'p GpuPart) -> &'p [String] {
        &part.names
    }

    fn param_lens(&self, part: &GpuPart) -> Vec<usize> {
        part.weights.iter().map(GpuTensor::len).collect()
    }

    fn host_zeros(
        &self,
        host: &PoolRef,
        name: &str,
        len: usize,
        group: MemGroup,
    ) -> Result<GpuTensor> {
        Ok(GpuTensor::zeros_on_host(
            host,
            name,
            &[len],
            DType::F32,
            group,
        )?)
    }

    fn grad_squares(&self, device: u32, part: &GpuPart) -> Result<f64> {
        let gpu = self.gpu(device);
        await_part(gpu, part)?;
        let acc = gpu.stream.alloc_zeros::<f64>(1).map_err(CudaError::from)?;
        let at = DevPtr::new(acc.device_ptr(&gpu.stream).0, DType::F64);
        // A device's first step sums every local part's gradients, and a plan may hold
        // another chunk's in host memory until its own step: those are summed here.
        let mut on_host = 0.0;
        for g in part.counted().map(|(i, _)| &part.grads[i]) {
            if g.is_on_host() {
                on_host += tensor_squares(&g.to_host::<f32>(gpu)?);
            } else {
                gpu.sum_squares(at, g.ptr(), g.len())?;
            }
        }
        let sum = gpu.stream.clone_dtoh(&acc).map_err(CudaError::from)?;
        Ok(sum[0] + on_host)
    }

    fn update(
        &self,
        device: u32,
        u: Update<'_>,
        w: &mut GpuTensor,
        g: &mut GpuTensor,
        local: Range<usize>,
        moments: Option<(&mut GpuTensor, &mut GpuTensor)>,
        within: Range<usize>,
    ) -> Result<()> {
        let gpu = self.gpu(device);
        for t in [&*w, &*g]
            .into_iter()
            .chain(moments.iter().flat_map(|(m, v)| [&**m, &**v]))
        {
            t.await_ready(gpu)?;
        }
        let n = local.len();
        let (wp, gp) = (w.at(local.start), g.at(local.start));
        let copy = w.act_copy_at(local.start);
        match (u.config, moments) {
            (OptimizerConfig::Sgd, _) => {
                gpu.sgd_update(wp, copy, gp, n, u.clip_factor, u.coeffs.lr())?
            }
            (
                &OptimizerConfig::AdamW {
                    beta1, beta2, eps, ..
                },
                Some((m, v)),
            ) => gpu.adamw_update(
                wp,
                copy,
                gp,
                m.at(within.start),
                v.at(within.start),
                n,
                u.clip_factor,
                (beta1, beta2, eps),
                u.coeffs.kernel_args(),
            )?,
            (OptimizerConfig::AdamW { .. }, None) => {
                return Err(CudaError::Unsupported("AdamW without its moments".into()).into());
            }
        }
        // The update kernels cleared the range's gradients.
        Ok(())
    }

    /// Sums on each GPU its copies in replica order (`replica_add` into the first), then
    /// the GPUs' sums across GPUs (NCCL all-reduce, or through host memory without NCCL),
    /// then copies each GPU's sum into its other copies. Copy `r` is replica `r`'s, on the
    /// GPU of its device for this stage.
    fn sum_replicas(&self, device: u32, copies: &mut [&mut GpuTensor]) -> Result<()> {
        self.sum_copies(device, copies)
    }

    /// As `sum_replicas` over each owned range, then into its owner's copy (NCCL reduce
    /// into the owner's GPU across GPUs), zeros elsewhere.
    fn scatter_ranges(
        &self,
        device: u32,
        copies: &mut [&mut GpuTensor],
        owned: &[(usize, Range<usize>)],
    ) -> Result<()> {
        self.scatter_copies(device, copies, owned)
    }

    /// Device copies from the owner's copy (NCCL broadcast from its GPU across GPUs).
    fn gather_ranges(
        &self,
        device: u32,
        copies: &mut [&mut GpuTensor],
        owned: &[(usize, Range<usize>)],
    ) -> Result<()> {
        self.gather_copies(device, copies, owned)
    }

    fn sum_here(&self, device: u32, copies: &mut [&mut GpuTensor]) -> Result<()> {
        self.sum_on_gpu(device, copies)
    }

    fn links_ranks(&self, stage: u32) -> bool {
        (self.rank_links.as_ref()).is_some_and(|links| links.links(stage))
    }

    fn across_ranks(
        &self,
        device: u32,
        op: AcrossRanks,
        replicas: &[u32],
        copies: &mut [&mut GpuTensor],
    ) -> Result<()> {
        self.meet_ranks(device, op, replicas, copies)
    }

    fn zero_grads(&self, device: u32, part: &mut GpuPart) -> Result<()> {
        let gpu = self.gpu(device);
        for g in &mut part.grads {
            g.fill_zero(gpu)?;
        }
        Ok(())
    }

    fn host_part<'p>(
        &self,
        device: u32,
        part: &'p GpuPart,
        host: &PoolRef,
        config: &LlamaConfig,
    ) -> Result<HostPart<'p>> {
        let gpu = self.gpu(device);
        let mut copy = PartParams::allocate(host, config, part.id)?;
        for (src, dst) in part.weights.iter().zip(copy.weights.iter_mut()) {
            let len = src.len();
            src.read_range(gpu, 0..len, dst.data_mut())?;
        }
        Ok(HostPart::Copied(copy))
    }

    fn load_part(&self, device: u32, part: &mut GpuPart, from: &PartParams) -> Result<()> {
        let gpu = self.gpu(device);
        for (dst, src) in part.weights.iter_mut().zip(&from.weights) {
            dst.copy_from_host(gpu, src.data())?;
        }
        Ok(())
    }

    fn read(
        &self,
        device: u32,
        t: &GpuTensor,
        within: Range<usize>,
        dst: &mut [f32],
    ) -> Result<()> {
        Ok(t.read_range(self.gpu(device), within, dst)?)
    }

    fn write(
        &self,
        device: u32,
        t: &mut GpuTensor,
        within: Range<usize>,
        src: &[f32],
    ) -> Result<()> {
        Ok(t.write_range(self.gpu(device), within, src)?)
    }
}
