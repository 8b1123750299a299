//! The Llama model's parts on one CUDA device, each forward with its backward, allocating
//! exactly the inventory's tensors for the device's precision (`cuda-f32`: the CPU
//! executor's stash names and shapes; `cuda-bf16`: the same in bf16, the products reading
//! each projection weight's bf16 copy, kept beside it: `act_copy`) and holding each part's
//! scratch for the whole of its forward or backward, as the planner's memory model assumes,
//! so its predicted peaks hold here; and
//! [`GpuTrainer`]: a whole-model training step with the CPU trainer's semantics (mean loss over
//! the step's tokens, global-norm clipping, AdamW or SGD with PyTorch's update).

mod embedding;
mod head;
mod layer;
mod projection;
mod trainer;

pub use embedding::{EmbeddingStash, embedding_backward, embedding_forward};
pub use head::{HeadStash, head_backward, head_forward, head_forward_backward};
pub use layer::{LayerStash, layer_backward, layer_forward};
pub use trainer::GpuTrainer;

use projection::{Weight, project, project_backward};

use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::tensor::{DevPtr, GpuTensor};
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::kernels::attention::AttnShape;
use crate::exec::model::{LlamaConfig, ModelError, PartId, PartParams};
use crate::exec::optim::{OptimizerConfig, PartOptimState};
use crate::exec::tensor::Tensor;
use crate::plan::inventory::{
    DType, MicroShape, Part, PartInventory, TensorSpec, cuda_flash_attention, keeps_act_copy,
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
    /// Whether layers run attention on the flash kernels (the inventory's rule).
    fn flash_attention(&self) -> bool {
        cuda_flash_attention(self.gpu.precision.profile(), &self.config.dims)
    }

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
        let profile = ctx.gpu.precision.profile();
        let inv = profile.part(&ctx.config.dims, ctx.micro, part);
        Alloc { ctx, part, inv }
    }

    fn from(&self, list: &[TensorSpec], name: &'static str) -> Result<GpuTensor> {
        let spec = list
            .iter()
            .find(|s| s.name == name)
            .ok_or(ModelError::NotInInventory {
                part: self.part,
                name,
            })?;
        GpuTensor::from_spec(self.ctx.gpu, self.ctx.pool, spec, MemGroup::Activations)
    }

    fn stash(&self, name: &'static str) -> Result<GpuTensor> {
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

/// What a part's products read as its weights, indexed like the part's weights: each
/// weight's copy in the activations' type where it keeps one (projection weights with bf16
/// activations), cast first if the weight changed since; the f32 weight otherwise.
struct ProductWeights {
    ptrs: Vec<DevPtr>,
}

impl ProductWeights {
    fn of(gpu: &Gpu, p: &GpuPart) -> Result<ProductWeights> {
        let ptrs = (p.weights.iter())
            .map(|w| Ok(w.act_copy(gpu)?.unwrap_or(w.ptr())))
            .collect::<Result<_>>()?;
        Ok(ProductWeights { ptrs })
    }

    /// Weight `i` of `p` as its products read it.
    fn get(&self, p: &GpuPart, i: usize) -> Weight {
        let shape = p.weights[i].shape();
        Weight {
            ptr: self.ptrs[i],
            out: shape[0],
            inp: shape[1],
        }
    }
}

impl From<ModelError> for CudaError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Device(d) => CudaError::Device(d),
            other => CudaError::Model(Box::new(other)),
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
    /// A part of the given weights and gradients, without optimizer state (the pipeline
    /// keeps moments in its optimizer slices).
    pub fn new(id: PartId, weights: Vec<GpuTensor>, grads: Vec<GpuTensor>) -> GpuPart {
        GpuPart {
            id,
            weights,
            grads,
            exp_avg: Vec::new(),
            exp_avg_sq: Vec::new(),
        }
    }

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
        let profile = gpu.precision.profile();
        for (name, w) in host.names.iter().zip(&host.weights) {
            let shape = w.shape();
            let group = MemGroup::Weights;
            let mut weight = GpuTensor::from_host(gpu, pool, name, shape, w.data(), group)?;
            if keeps_act_copy(profile, host.id.kind(), shape) {
                weight = weight.keep_act_copy(gpu, pool)?;
            }
            p.weights.push(weight);
            let zeros = |group| GpuTensor::zeros(gpu, pool, name, shape, DType::F32, group);
            p.grads.push(zeros(MemGroup::Gradients)?);
            if adam {
                p.exp_avg.push(zeros(MemGroup::OptimizerState)?);
                p.exp_avg_sq.push(zeros(MemGroup::OptimizerState)?);
            }
        }
        Ok(p)
    }

    /// Copies weights and gradients into a host part of the same layout.
    pub fn download(&self, gpu: &Gpu, host: &mut PartParams) -> Result<()> {
        let weights = self.weights.iter().zip(host.weights.iter_mut());
        copy_to_host(
            gpu,
            weights.chain(self.grads.iter().zip(host.grads.iter_mut())),
        )
    }

    /// Copies what a checkpoint keeps, the weights and the optimizer state (none for SGD),
    /// into host tensors of the same layout; gradients stay as they are (zero between steps).
    pub fn download_checkpoint(
        &self,
        gpu: &Gpu,
        host: &mut PartParams,
        state: &mut PartOptimState,
    ) -> Result<()> {
        let weights = self.weights.iter().zip(host.weights.iter_mut());
        let moments = (self.exp_avg.iter().zip(state.exp_avg.iter_mut()))
            .chain(self.exp_avg_sq.iter().zip(state.exp_avg_sq.iter_mut()));
        copy_to_host(gpu, weights.chain(moments))
    }

    /// Replaces weights and optimizer state with a host part's (a checkpoint's).
    pub fn load(&mut self, gpu: &Gpu, host: &PartParams, state: &PartOptimState) -> Result<()> {
        for (dst, src) in self.weights.iter_mut().zip(&host.weights) {
            dst.copy_from_host(gpu, src.data())?;
        }
        let pairs = self
            .exp_avg
            .iter_mut()
            .zip(&state.exp_avg)
            .chain(self.exp_avg_sq.iter_mut().zip(&state.exp_avg_sq));
        for (dst, src) in pairs {
            dst.copy_from_host(gpu, src.data())?;
        }
        Ok(())
    }
}

/// Copies each device tensor into its host tensor of the same length.
fn copy_to_host<'a>(
    gpu: &Gpu,
    pairs: impl Iterator<Item = (&'a GpuTensor, &'a mut Tensor)>,
) -> Result<()> {
    for (src, dst) in pairs {
        src.read_range(gpu, 0..src.len(), dst.data_mut())?;
    }
    Ok(())
}
