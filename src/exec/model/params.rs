//! Parameters of one part (embedding, one layer, the head), their gradients, their Hugging Face
//! names and their deterministic initialisation.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::exec::device::{DeviceError, MemGroup, PoolRef};
use crate::exec::model::config::LlamaConfig;
use crate::exec::tensor::Tensor;
use crate::plan::inventory::{MicroShape, Part, Profile};

/// Which part of the model: the unit a pipeline chunk is a contiguous run of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PartId {
    Embedding,
    Layer(usize),
    Head,
}

impl PartId {
    pub fn kind(self) -> Part {
        match self {
            PartId::Embedding => Part::Embedding,
            PartId::Layer(_) => Part::Layer,
            PartId::Head => Part::Head,
        }
    }

    /// Every part of a model with `layers` layers, in forward order.
    pub fn all(layers: usize) -> Vec<PartId> {
        let mut parts = vec![PartId::Embedding];
        parts.extend((0..layers).map(PartId::Layer));
        parts.push(PartId::Head);
        parts
    }

    /// Position in forward order: the key that fixes the order of global sums.
    pub fn order(self, layers: usize) -> usize {
        match self {
            PartId::Embedding => 0,
            PartId::Layer(i) => 1 + i,
            PartId::Head => 1 + layers,
        }
    }

    /// The name a parameter goes by in a model whose embeddings are `tied` or not: the
    /// head's LM head of a tied model is its copy of the embedding's table, and goes by the
    /// table's name (so it initialises, loads and resumes as the table does).
    pub fn param_name(self, inventory_name: &str, tied: bool) -> String {
        if tied && self == PartId::Head && inventory_name == LM_HEAD {
            return TIED_TABLE.to_string();
        }
        self.hf_name(inventory_name)
    }

    /// Whether `name`, a parameter of this part, is the head's copy of a tied table: equal to
    /// the embedding's, so it is counted (gradient norm) and stored (checkpoints) once, as
    /// the embedding's.
    pub fn is_tied_copy(self, name: &str) -> bool {
        self == PartId::Head && name == TIED_TABLE
    }

    /// The Hugging Face name of a parameter given its inventory name.
    pub fn hf_name(self, inventory_name: &str) -> String {
        match self {
            PartId::Embedding => format!("model.{inventory_name}"),
            PartId::Layer(i) => format!("model.layers.{i}.{inventory_name}"),
            PartId::Head if inventory_name == LM_HEAD => inventory_name.to_string(),
            PartId::Head => format!("model.{inventory_name}"),
        }
    }
}

/// The LM head's inventory name.
const LM_HEAD: &str = "lm_head.weight";

/// The embedding's table, by its Hugging Face name: what a tied model's head reads.
pub const TIED_TABLE: &str = "model.embed_tokens.weight";

/// A part's weights and gradients, parallel vectors in inventory order, on the host
/// ([`Tensor`]) or on any backend's storage. The model takes them by name (`model::named`).
#[derive(Debug)]
pub struct PartParams<T = Tensor> {
    pub id: PartId,
    /// Hugging Face names, e.g. `model.layers.3.mlp.up_proj.weight`.
    pub names: Vec<String>,
    pub weights: Vec<T>,
    pub grads: Vec<T>,
}

impl<T> PartParams<T> {
    /// The parameters a checkpoint stores and the gradient norm counts: all but the head's
    /// copy of a tied table.
    pub fn counted(&self) -> impl Iterator<Item = (usize, &String)> {
        let id = self.id;
        (self.names.iter().enumerate()).filter(move |(_, n)| !id.is_tied_copy(n))
    }
}

impl PartParams {
    /// Zero weights and gradients, shaped by the `cpu-f32` inventory, counted in `pool`.
    pub fn allocate(pool: &PoolRef, config: &LlamaConfig, id: PartId) -> Result<Self, DeviceError> {
        // Parameter shapes do not depend on the micro-batch.
        let micro = MicroShape { batch: 1, seq: 1 };
        let inv = Profile::CpuF32.part(&config.dims, micro, id.kind());
        let mut p = PartParams {
            id,
            names: Vec::new(),
            weights: Vec::new(),
            grads: Vec::new(),
        };
        for spec in &inv.params {
            let name = id.param_name(spec.name, config.dims.tied_embeddings);
            p.weights.push(Tensor::zeros(
                pool,
                name.clone(),
                &spec.shape,
                MemGroup::Weights,
            )?);
            p.grads.push(Tensor::zeros(
                pool,
                format!("grad.{name}"),
                &spec.shape,
                MemGroup::Gradients,
            )?);
            p.names.push(name);
        }
        Ok(p)
    }

    /// transformers' default init: norms at one, biases at zero, every matrix normal(0, 0.02).
    /// Each tensor draws from its own stream keyed by seed and name, so any split of the model
    /// into devices initialises identically.
    pub fn init_from_seed(&mut self, seed: u64) {
        for (name, w) in self.names.iter().zip(self.weights.iter_mut()) {
            if name.ends_with(".bias") {
                w.data_mut().fill(0.0);
                continue;
            }
            if w.shape().len() == 1 {
                w.data_mut().fill(1.0);
                continue;
            }
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(name.as_bytes()));
            let data = w.data_mut();
            // Box-Muller, two normals per pair of uniforms.
            for pair in data.chunks_mut(2) {
                let u1: f64 = 1.0 - rng.r#gen::<f64>();
                let u2: f64 = rng.r#gen::<f64>();
                let r = (-2.0 * u1.ln()).sqrt() * 0.02;
                let t = std::f64::consts::TAU * u2;
                pair[0] = (r * t.cos()) as f32;
                if pair.len() > 1 {
                    pair[1] = (r * t.sin()) as f32;
                }
            }
        }
    }

    /// Overwrites the weights with `from`'s (a part of the same layout).
    pub fn copy_weights_from(&mut self, from: &PartParams) {
        for (dst, src) in self.weights.iter_mut().zip(&from.weights) {
            dst.data_mut().copy_from_slice(src.data());
        }
    }

    pub fn zero_grads(&mut self) {
        self.grads.iter_mut().for_each(Tensor::fill_zero);
    }

    pub fn param_count(&self) -> usize {
        self.weights.iter().map(Tensor::len).sum()
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
