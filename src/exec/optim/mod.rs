//! Optimizers with PyTorch's semantics, applied part by part so each pipeline device steps its
//! own parameters.

pub mod clip;
pub mod schedule;

use multiversion::multiversion;
use rayon::prelude::*;

use crate::exec::device::{DeviceError, MemGroup, PoolRef};
use crate::exec::model::PartParams;
use crate::exec::tensor::Tensor;
use crate::spec::OptimizerSpec;

/// The update rule and its constants (the learning rate comes from the schedule each step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerConfig {
    /// Plain SGD, no momentum: `p -= lr * g`.
    Sgd,
    /// `torch.optim.AdamW`: decoupled weight decay, bias-corrected moments.
    AdamW {
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    },
}

impl OptimizerConfig {
    pub fn from_spec(spec: &OptimizerSpec) -> Self {
        match *spec {
            OptimizerSpec::Sgd { .. } => OptimizerConfig::Sgd,
            OptimizerSpec::Adamw {
                betas,
                eps,
                weight_decay,
                ..
            } => OptimizerConfig::AdamW {
                beta1: betas[0] as f32,
                beta2: betas[1] as f32,
                eps: eps as f32,
                weight_decay: weight_decay as f32,
            },
        }
    }
}

/// A job spec's default optimizer: AdamW with betas (0.9, 0.95), eps 1e-8, weight decay 0.1.
impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig::from_spec(&OptimizerSpec::default())
    }
}

/// One part's optimizer state (AdamW's moments; empty for SGD), counted as optimizer state.
#[derive(Debug)]
pub struct PartOptimState {
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
}

impl PartOptimState {
    /// Allocates zeroed state for `part` in `pool`.
    pub fn allocate(
        pool: &PoolRef,
        config: &OptimizerConfig,
        part: &PartParams,
    ) -> Result<Self, DeviceError> {
        let mut st = PartOptimState {
            exp_avg: Vec::new(),
            exp_avg_sq: Vec::new(),
        };
        if let OptimizerConfig::AdamW { .. } = config {
            for (name, w) in part.names.iter().zip(&part.weights) {
                let g = MemGroup::OptimizerState;
                st.exp_avg.push(Tensor::zeros(
                    pool,
                    format!("exp_avg.{name}"),
                    w.shape(),
                    g,
                )?);
                st.exp_avg_sq.push(Tensor::zeros(
                    pool,
                    format!("exp_avg_sq.{name}"),
                    w.shape(),
                    g,
                )?);
            }
        }
        Ok(st)
    }

    /// Moves the state to another pool (offload between steps, prefetch before the next).
    pub fn transfer(self, to: &PoolRef) -> Result<Self, DeviceError> {
        let g = MemGroup::OptimizerState;
        let move_all = |v: Vec<Tensor>| -> Result<Vec<Tensor>, DeviceError> {
            v.into_iter().map(|t| t.transfer(to, g)).collect()
        };
        Ok(PartOptimState {
            exp_avg: move_all(self.exp_avg)?,
            exp_avg_sq: move_all(self.exp_avg_sq)?,
        })
    }
}

/// The constants of one step's update, computed once (PyTorch computes the bias corrections
/// in f64 and hands f32 values to its kernels; so do we).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateCoeffs {
    lr: f32,
    step_size: f32,
    bc2_sqrt: f32,
    decay: f32,
}

impl UpdateCoeffs {
    /// The learning rate of this step.
    pub fn lr(&self) -> f32 {
        self.lr
    }

    /// `(decay, step_size, bc2_sqrt)` as a device kernel takes them.
    pub fn kernel_args(&self) -> (f32, f32, f32) {
        (self.decay, self.step_size, self.bc2_sqrt)
    }
}

impl OptimizerConfig {
    /// Coefficients for step `step` (counted from 1, as PyTorch's bias correction does).
    pub fn coeffs(&self, step: u64, lr: f32) -> UpdateCoeffs {
        match *self {
            OptimizerConfig::Sgd => UpdateCoeffs {
                lr,
                step_size: lr,
                bc2_sqrt: 1.0,
                decay: 1.0,
            },
            OptimizerConfig::AdamW {
                beta1,
                beta2,
                weight_decay,
                ..
            } => {
                let bc1 = 1.0 - (beta1 as f64).powi(step as i32);
                let bc2_sqrt = (1.0 - (beta2 as f64).powi(step as i32)).sqrt();
                UpdateCoeffs {
                    lr,
                    step_size: (lr as f64 / bc1) as f32,
                    bc2_sqrt: bc2_sqrt as f32,
                    decay: 1.0 - lr * weight_decay,
                }
            }
        }
    }
}

/// Updates weights `w` from gradients `g` element by element, the gradients multiplied by
/// `clip_factor` first, and leaves `g` zeroed for the next step's sums (one pass over memory
/// instead of three); `m` and `v` are AdamW's moments for the same elements (empty for SGD).
/// Any split of a tensor into ranges gives the same bits.
pub fn update_elements(
    config: &OptimizerConfig,
    c: &UpdateCoeffs,
    clip_factor: f32,
    w: &mut [f32],
    g: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    const CHUNK: usize = 1 << 14;
    match *config {
        OptimizerConfig::Sgd => w
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks_mut(CHUNK))
            .for_each(|(w, g)| sgd_chunk(c.lr, clip_factor, w, g)),
        OptimizerConfig::AdamW {
            beta1, beta2, eps, ..
        } => w
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks_mut(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((w, g), (m, v))| {
                adamw_chunk(c, (beta1, beta2, eps), clip_factor, w, g, m, v)
            }),
    }
}

#[multiversion(targets = "simd")]
fn sgd_chunk(lr: f32, clip_factor: f32, w: &mut [f32], g: &mut [f32]) {
    for (w, g) in w.iter_mut().zip(g) {
        *w -= lr * (*g * clip_factor);
        *g = 0.0;
    }
}

#[multiversion(targets = "simd")]
fn adamw_chunk(
    c: &UpdateCoeffs,
    (beta1, beta2, eps): (f32, f32, f32),
    clip_factor: f32,
    w: &mut [f32],
    g: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    let rows = w.iter_mut().zip(g).zip(m.iter_mut().zip(v.iter_mut()));
    for ((w, g_slot), (m, v)) in rows {
        let g = *g_slot * clip_factor;
        *g_slot = 0.0;
        *w *= c.decay;
        *m += (g - *m) * (1.0 - beta1);
        *v = *v * beta2 + (1.0 - beta2) * g * g;
        let denom = v.sqrt() / c.bc2_sqrt + eps;
        *w -= c.step_size * (*m / denom);
    }
}

/// Applies one update to `part` with its gradients times `clip_factor`, and zeroes the
/// gradients. `step` counts from 1, as PyTorch's bias correction does.
pub fn step_part(
    config: &OptimizerConfig,
    step: u64,
    lr: f32,
    clip_factor: f32,
    part: &mut PartParams,
    state: &mut PartOptimState,
) {
    let c = config.coeffs(step, lr);
    for (i, (w, g)) in part.weights.iter_mut().zip(&mut part.grads).enumerate() {
        let (m, v): (&mut [f32], &mut [f32]) =
            match (state.exp_avg.get_mut(i), state.exp_avg_sq.get_mut(i)) {
                (Some(m), Some(v)) => (m.data_mut(), v.data_mut()),
                _ => (&mut [], &mut []),
            };
        update_elements(config, &c, clip_factor, w.data_mut(), g.data_mut(), m, v);
    }
}

/// The end of a step for the parts one device holds: scale gradients by the clipping factor,
/// apply the update with learning rate `lr`, zero the gradients for the next step.
pub fn update_parts(
    config: &OptimizerConfig,
    step: u64,
    lr: f32,
    clip_factor: f32,
    parts: &mut [PartParams],
    states: &mut [PartOptimState],
) {
    for (part, state) in parts.iter_mut().zip(states.iter_mut()) {
        step_part(config, step, lr, clip_factor, part, state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_job_specs_adamw() {
        let want = OptimizerConfig::AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        assert_eq!(OptimizerConfig::default(), want);
    }
}
