//! A chunk's parameters and optimizer state on its device. The optimizer state comes in the
//! plan's slices: equal contiguous ranges of the chunk's flattened parameters (parts in model
//! order, tensors in inventory order), each offloaded, prefetched and stepped on its own.

use std::ops::Range;

use crate::exec::device::{DeviceError, MemGroup, PoolRef};
use crate::exec::model::PartParams;
use crate::exec::optim::{OptimizerConfig, PartOptimState, UpdateCoeffs, update_elements};
use crate::exec::tensor::Tensor;
use crate::plan::ir::Group;

use super::PipelineError;

/// AdamW's moments for one range of the chunk's parameters (none for SGD).
#[derive(Debug)]
pub struct OptimizerSlice {
    pub start: usize,
    pub end: usize,
    moments: Option<(Tensor, Tensor)>,
    pub on_host: bool,
}

#[derive(Debug)]
pub struct ChunkState {
    pub index: u32,
    pub parts: Vec<PartParams>,
    pub optimizer: Vec<OptimizerSlice>,
    pub weights_on_host: bool,
    pub grads_on_host: bool,
}

/// Where a tensor and an optimizer slice share parameters: `local` indexes the tensor,
/// `within` the slice.
struct Overlap {
    slice: usize,
    part: usize,
    tensor: usize,
    local: Range<usize>,
    within: Range<usize>,
}

/// Every (slice, tensor) overlap of the flattened chunk (parts in order, tensors in order).
fn overlaps(parts: &[PartParams], slices: &[OptimizerSlice]) -> Vec<Overlap> {
    let mut out = Vec::new();
    let mut start = 0;
    for (part, p) in parts.iter().enumerate() {
        for (tensor, w) in p.weights.iter().enumerate() {
            let end = start + w.len();
            for (slice, s) in slices.iter().enumerate() {
                let (lo, hi) = (start.max(s.start), end.min(s.end));
                if lo < hi {
                    out.push(Overlap {
                        slice,
                        part,
                        tensor,
                        local: lo - start..hi - start,
                        within: lo - s.start..hi - s.start,
                    });
                }
            }
            start = end;
        }
    }
    out
}

impl ChunkState {
    /// The chunk with `parts` (already in the host pool `host`) and zeroed optimizer state in
    /// `slices` slices, every group on the host.
    pub fn new_on_host(
        index: u32,
        parts: Vec<PartParams>,
        optimizer: &OptimizerConfig,
        slices: u32,
        host: &PoolRef,
    ) -> Result<ChunkState, DeviceError> {
        let total: usize = parts.iter().map(PartParams::param_count).sum();
        let k = slices.max(1) as usize;
        let mut start = 0;
        let mut state = Vec::with_capacity(k);
        for i in 0..k {
            let len = total / k + usize::from(i < total % k);
            let moments = match optimizer {
                OptimizerConfig::Sgd => None,
                OptimizerConfig::AdamW { .. } => {
                    let g = MemGroup::OptimizerState;
                    let name = |m: &str| format!("{m}.chunk{index}.slice{i}");
                    Some((
                        Tensor::zeros(host, name("exp_avg"), &[len], g)?,
                        Tensor::zeros(host, name("exp_avg_sq"), &[len], g)?,
                    ))
                }
            };
            state.push(OptimizerSlice {
                start,
                end: start + len,
                moments,
                on_host: true,
            });
            start += len;
        }
        Ok(ChunkState {
            index,
            parts,
            optimizer: state,
            weights_on_host: true,
            grads_on_host: true,
        })
    }

    /// Whether a weights, gradients or optimizer-state group is on the host now.
    pub fn on_host(&self, group: Group) -> bool {
        match group {
            Group::Weights { .. } => self.weights_on_host,
            Group::Grads { .. } => self.grads_on_host,
            Group::Optimizer { slice, .. } => self
                .optimizer
                .get(slice as usize)
                .is_some_and(|s| s.on_host),
            Group::Stash { .. } => false,
        }
    }

    /// Moves a weights, gradients or optimizer-state group into `pool` (the host's when
    /// `to_host`). Stashes are not a chunk's: the device worker moves them.
    pub fn place(
        &mut self,
        group: Group,
        pool: &PoolRef,
        to_host: bool,
    ) -> Result<(), PipelineError> {
        let move_all = |v: &mut Vec<Tensor>, g: MemGroup| -> Result<(), DeviceError> {
            let moved = std::mem::take(v)
                .into_iter()
                .map(|t| t.transfer(pool, g))
                .collect::<Result<Vec<_>, _>>()?;
            *v = moved;
            Ok(())
        };
        match group {
            Group::Weights { .. } => {
                for part in &mut self.parts {
                    move_all(&mut part.weights, MemGroup::Weights)?;
                }
                self.weights_on_host = to_host;
            }
            Group::Grads { .. } => {
                for part in &mut self.parts {
                    move_all(&mut part.grads, MemGroup::Gradients)?;
                }
                self.grads_on_host = to_host;
            }
            Group::Optimizer { slice, .. } => {
                let s = self
                    .optimizer
                    .get_mut(slice as usize)
                    .ok_or(PipelineError::NoSuchSlice { group })?;
                if let Some((m, v)) = s.moments.take() {
                    let g = MemGroup::OptimizerState;
                    s.moments = Some((m.transfer(pool, g)?, v.transfer(pool, g)?));
                }
                s.on_host = to_host;
            }
            Group::Stash { .. } => return Err(PipelineError::NotChunkGroup { group }),
        }
        Ok(())
    }

    /// Clips, updates and zeroes the gradients of the parameters in slice `slice`, element by
    /// element exactly as a whole-tensor update would.
    pub fn step_slice(
        &mut self,
        config: &OptimizerConfig,
        coeffs: &UpdateCoeffs,
        clip_factor: f32,
        slice: u32,
    ) -> Result<(), PipelineError> {
        let group = Group::Optimizer {
            chunk: self.index,
            slice,
        };
        let (k, on_host) = match self.optimizer.get(slice as usize) {
            Some(s) => (slice as usize, s.on_host),
            None => return Err(PipelineError::NoSuchSlice { group }),
        };
        if on_host || self.weights_on_host || self.grads_on_host {
            return Err(PipelineError::GroupOnHost { group });
        }
        for o in overlaps(&self.parts, &self.optimizer) {
            if o.slice != k {
                continue;
            }
            let part = &mut self.parts[o.part];
            let (w, g) = (&mut part.weights[o.tensor], &mut part.grads[o.tensor]);
            let g = &mut g.data_mut()[o.local.clone()];
            let (m, v): (&mut [f32], &mut [f32]) = match &mut self.optimizer[k].moments {
                Some((m, v)) => (
                    &mut m.data_mut()[o.within.clone()],
                    &mut v.data_mut()[o.within],
                ),
                None => (&mut [], &mut []),
            };
            update_elements(
                config,
                coeffs,
                clip_factor,
                &mut w.data_mut()[o.local],
                g,
                m,
                v,
            );
        }
        Ok(())
    }

    /// The optimizer state per part and tensor, copied into `pool` (for checkpoints).
    pub fn gather_states(
        &self,
        config: &OptimizerConfig,
        pool: &PoolRef,
    ) -> Result<Vec<PartOptimState>, DeviceError> {
        let mut states = self
            .parts
            .iter()
            .map(|p| PartOptimState::allocate(pool, config, p))
            .collect::<Result<Vec<_>, _>>()?;
        for o in overlaps(&self.parts, &self.optimizer) {
            let Some((m, v)) = &self.optimizer[o.slice].moments else {
                continue;
            };
            let st = &mut states[o.part];
            st.exp_avg[o.tensor].data_mut()[o.local.clone()]
                .copy_from_slice(&m.data()[o.within.clone()]);
            st.exp_avg_sq[o.tensor].data_mut()[o.local].copy_from_slice(&v.data()[o.within]);
        }
        Ok(states)
    }

    /// Loads per-part optimizer state (from a checkpoint) into the slices.
    pub fn scatter_states(&mut self, states: &[PartOptimState]) {
        for o in overlaps(&self.parts, &self.optimizer) {
            let Some((m, v)) = &mut self.optimizer[o.slice].moments else {
                continue;
            };
            let st = &states[o.part];
            m.data_mut()[o.within.clone()]
                .copy_from_slice(&st.exp_avg[o.tensor].data()[o.local.clone()]);
            v.data_mut()[o.within].copy_from_slice(&st.exp_avg_sq[o.tensor].data()[o.local]);
        }
    }
}
