//! A chunk's parameters and optimizer state on its device. The optimizer state comes in the
//! plan's slices: equal contiguous ranges of the chunk's flattened parameters (parts in model
//! order, tensors in inventory order), each offloaded, prefetched and stepped on its own. A
//! chunk whose optimizer state is sharded over the replicas (ZeRO-1) splits only its
//! replica's shard (`plan::reduction::shard`) into the slices.

use std::ops::Range;

use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::model::PartParams;
use crate::exec::optim::{OptimizerConfig, PartOptimState};
use crate::plan::ir::Group;
use crate::plan::reduction::{shard, shard_len};

use super::PipelineError;
use super::engine::{Engine, Update};
use super::reduce_point::Shards;

/// AdamW's moments for one range of the chunk's parameters (none for SGD).
pub struct OptimizerSlice<T> {
    pub start: usize,
    pub end: usize,
    moments: Option<(T, T)>,
    pub on_host: bool,
}

pub struct ChunkState<E: Engine> {
    pub index: u32,
    pub parts: Vec<E::Part>,
    /// The flattened parameters whose optimizer state this copy keeps and steps: all of
    /// them, or its replica's shard.
    pub owned: Range<usize>,
    pub optimizer: Vec<OptimizerSlice<E::Tensor>>,
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

/// Every (slice, tensor) overlap of the flattened chunk (parts in order, tensors in order);
/// `lens` holds each part's tensor lengths.
fn overlaps<T>(lens: &[Vec<usize>], slices: &[OptimizerSlice<T>]) -> Vec<Overlap> {
    let mut out = Vec::new();
    let mut start = 0;
    for (part, tensors) in lens.iter().enumerate() {
        for (tensor, &len) in tensors.iter().enumerate() {
            let end = start + len;
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

impl<E: Engine> ChunkState<E> {
    /// The chunk with `parts` (the engine's, in the host pool `host`) and zeroed optimizer
    /// state in `slices` slices, every group on the host. With `sharded` = (replica,
    /// replicas) the state is that replica's shard's, padded to the length every replica
    /// allocates.
    pub fn new_on_host(
        engine: &E,
        index: u32,
        parts: Vec<E::Part>,
        optimizer: &OptimizerConfig,
        (slices, sharded): (u32, Option<(u32, u32)>),
        host: &PoolRef,
    ) -> Result<Self, PipelineError> {
        let total: usize = parts
            .iter()
            .map(|p| engine.param_lens(p).iter().sum::<usize>())
            .sum();
        let (owned, kept) = match sharded {
            Some((replica, replicas)) => {
                (shard(total, replicas, replica), shard_len(total, replicas))
            }
            None => (0..total, total),
        };
        let k = slices.max(1) as usize;
        let mut start = owned.start;
        let mut state = Vec::with_capacity(k);
        for i in 0..k {
            let len = kept / k + usize::from(i < kept % k);
            let moments = match optimizer {
                OptimizerConfig::Sgd => None,
                OptimizerConfig::AdamW { .. } => {
                    let g = MemGroup::OptimizerState;
                    let name = |m: &str| format!("{m}.chunk{index}.slice{i}");
                    Some((
                        engine.host_zeros(host, &name("exp_avg"), len, g)?,
                        engine.host_zeros(host, &name("exp_avg_sq"), len, g)?,
                    ))
                }
            };
            // The padding past the owned range (the last shard's) is allocated, never used.
            let end = (start + len).min(owned.end);
            state.push(OptimizerSlice {
                start,
                end,
                moments,
                on_host: true,
            });
            start = end;
        }
        Ok(ChunkState {
            index,
            parts,
            owned,
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
        engine: &E,
        device: u32,
        group: Group,
        pool: &PoolRef,
        to_host: bool,
    ) -> Result<(), PipelineError> {
        let move_one = |t: E::Tensor, g: MemGroup| engine.move_tensor(device, t, pool, g, to_host);
        match group {
            Group::Weights { .. } | Group::Grads { .. } => {
                let weights = matches!(group, Group::Weights { .. });
                let mem = if weights {
                    MemGroup::Weights
                } else {
                    MemGroup::Gradients
                };
                for part in &mut self.parts {
                    let (w, g) = engine.params_mut(part);
                    let list = if weights { w } else { g };
                    *list = std::mem::take(list)
                        .into_iter()
                        .map(|t| move_one(t, mem))
                        .collect::<Result<_, _>>()?;
                }
                if weights {
                    self.weights_on_host = to_host;
                } else {
                    self.grads_on_host = to_host;
                }
            }
            Group::Optimizer { slice, .. } => {
                let s = self
                    .optimizer
                    .get_mut(slice as usize)
                    .ok_or(PipelineError::NoSuchSlice { group })?;
                if let Some((m, v)) = s.moments.take() {
                    let g = MemGroup::OptimizerState;
                    s.moments = Some((move_one(m, g)?, move_one(v, g)?));
                }
                s.on_host = to_host;
            }
            Group::Stash { .. } => return Err(PipelineError::NotChunkGroup { group }),
        }
        Ok(())
    }

    pub fn lens(&self, engine: &E) -> Vec<Vec<usize>> {
        self.parts.iter().map(|p| engine.param_lens(p)).collect()
    }

    /// What each of `replicas` owns of the chunk when its state is sharded, in replica order.
    pub fn shards(&self, engine: &E, replicas: u32) -> Shards {
        let lens = self.lens(engine);
        let total = lens.iter().flatten().sum();
        (0..replicas)
            .map(|r| owned_ranges(&lens, &shard(total, replicas, r)))
            .collect()
    }

    /// Clips, updates and zeroes the gradients of the parameters in slice `slice`, element by
    /// element exactly as a whole-tensor update would.
    pub fn step_slice(
        &mut self,
        engine: &E,
        device: u32,
        update: Update<'_>,
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
        for o in overlaps(&self.lens(engine), &self.optimizer) {
            if o.slice != k {
                continue;
            }
            let (w, g) = engine.params_mut(&mut self.parts[o.part]);
            let moments = self.optimizer[k].moments.as_mut().map(|(m, v)| (m, v));
            let (w, g) = (&mut w[o.tensor], &mut g[o.tensor]);
            engine.update(device, update, w, g, o.local, moments, o.within)?;
        }
        Ok(())
    }

    /// The optimizer state per part and tensor, copied into `pool` (for checkpoints); of a
    /// sharded chunk only this copy's shard, the rest zero (see `fill_states`).
    pub fn gather_states(
        &self,
        engine: &E,
        device: u32,
        config: &OptimizerConfig,
        host_parts: &[&PartParams],
        pool: &PoolRef,
    ) -> Result<Vec<PartOptimState>, PipelineError> {
        let mut states = host_parts
            .iter()
            .map(|p| PartOptimState::allocate(pool, config, p))
            .collect::<Result<Vec<_>, _>>()?;
        self.fill_states(engine, device, &mut states)?;
        Ok(states)
    }

    /// Copies the optimizer state this copy keeps into its places in `states` (per part and
    /// tensor): every replica's copy of a sharded chunk fills its own shard.
    pub fn fill_states(
        &self,
        engine: &E,
        device: u32,
        states: &mut [PartOptimState],
    ) -> Result<(), PipelineError> {
        for o in overlaps(&self.lens(engine), &self.optimizer) {
            let Some((m, v)) = &self.optimizer[o.slice].moments else {
                continue;
            };
            let st = &mut states[o.part];
            let dst = &mut st.exp_avg[o.tensor].data_mut()[o.local.clone()];
            engine.read(device, m, o.within.clone(), dst)?;
            let dst = &mut st.exp_avg_sq[o.tensor].data_mut()[o.local];
            engine.read(device, v, o.within, dst)?;
        }
        Ok(())
    }

    /// Loads per-part optimizer state (from a checkpoint) into the slices.
    pub fn scatter_states(
        &mut self,
        engine: &E,
        device: u32,
        states: &[PartOptimState],
    ) -> Result<(), PipelineError> {
        for o in overlaps(&self.lens(engine), &self.optimizer) {
            let Some((m, v)) = &mut self.optimizer[o.slice].moments else {
                continue;
            };
            let st = &states[o.part];
            let src = &st.exp_avg[o.tensor].data()[o.local.clone()];
            engine.write(device, m, o.within.clone(), src)?;
            let src = &st.exp_avg_sq[o.tensor].data()[o.local];
            engine.write(device, v, o.within, src)?;
        }
        Ok(())
    }
}

/// Each tensor's elements in `owned` (of the flattened chunk), as (part, tensor, range in
/// the tensor); `lens` holds each part's tensor lengths.
pub fn owned_ranges(
    lens: &[Vec<usize>],
    owned: &Range<usize>,
) -> Vec<(usize, usize, Range<usize>)> {
    let mut out = Vec::new();
    let mut start = 0;
    for (part, tensors) in lens.iter().enumerate() {
        for (tensor, &len) in tensors.iter().enumerate() {
            let (lo, hi) = (start.max(owned.start), (start + len).min(owned.end));
            if lo < hi {
                out.push((part, tensor, lo - start..hi - start));
            }
            start += len;
        }
    }
    out
}
