//! Data parallelism on GPUs: one tensor's copies, one per replica of a stage, on one GPU or
//! several. Copies on one GPU are summed with the `replica_add` kernel into the first of them
//! in replica order (so one GPU sums as the CPU engine does, bit for bit) and handed on with
//! device copies; across GPUs, the GPUs' sums meet through NCCL in the stage's replica group
//! (an all-reduce for a whole sum; for sharded state, per owned range, a reduce into the
//! owner's GPU and a broadcast from it), or through host memory where NCCL is missing. Tied
//! embeddings' `TIE` sums copies on one GPU the same way.

use std::ops::Range;

use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::nccl::{Rooted, RootedOp};
use crate::exec::backend::cuda::ready::Ready;
use crate::exec::backend::cuda::tensor::GpuTensor;
use crate::exec::pipeline::PipelineError;

use super::GpuEngine;

type Result<T> = std::result::Result<T, PipelineError>;

/// Where one tensor's replica copies are.
struct Spread {
    /// Per replica, its GPU (an index in `GpuEngine::gpus`).
    gpu_of: Vec<usize>,
    /// Per GPU, in replica order of first appearance: (GPU, the replica whose copy gathers
    /// that GPU's sum, its first there).
    holders: Vec<(usize, usize)>,
}

impl Spread {
    /// The replica whose copy holds the sum on replica `r`'s GPU.
    fn holder_of(&self, r: usize) -> usize {
        let g = self.gpu_of[r];
        (self.holders.iter().find(|(h, _)| *h == g)).map_or(r, |&(_, holder)| holder)
    }
}

impl GpuEngine {
    /// Where `copies` (of `device`'s stage, replica by replica) are, once checked: as many as
    /// the engine has replicas for, of one length, none in host memory.
    fn spread(&self, device: u32, copies: &[&mut GpuTensor]) -> Result<Spread> {
        let reduction = PipelineError::Reduction;
        let Some(first) = copies.first() else {
            return Ok(Spread {
                gpu_of: Vec::new(),
                holders: Vec::new(),
            });
        };
        let (name, len) = (first.name(), first.len());
        let stage = device as usize % self.stages;
        if (copies.len() - 1) * self.stages + stage >= self.stage_gpu.len() {
            return Err(reduction(format!(
                "{} replica copies of {name} on stage {stage}, but the engine runs {} devices \
                 of {} stages",
                copies.len(),
                self.stage_gpu.len(),
                self.stages
            )));
        }
        if let Some(other) = copies.iter().find(|t| t.len() != len || t.is_on_host()) {
            return Err(reduction(format!(
                "{name} has {len} elements in replica 0 and {} in another, or is in host \
                 memory there",
                other.len()
            )));
        }
        let gpu_of: Vec<usize> = (0..copies.len())
            .map(|r| self.stage_gpu[r * self.stages + stage])
            .collect();
        let mut holders: Vec<(usize, usize)> = Vec::new();
        for (r, &g) in gpu_of.iter().enumerate() {
            if !holders.iter().any(|(h, _)| *h == g) {
                holders.push((g, r));
            }
        }
        Ok(Spread { gpu_of, holders })
    }

    /// Adds elements `range` of every copy into its GPU's holder's, in replica order.
    fn add_into_holders(
        &self,
        copies: &mut [&mut GpuTensor],
        spread: &Spread,
        range: Range<usize>,
    ) -> Result<()> {
        for r in 0..copies.len() {
            let holder = spread.holder_of(r);
            if holder == r || range.is_empty() {
                continue;
            }
            let gpu = &self.gpus[spread.gpu_of[r]];
            copies[holder].await_ready(gpu)?;
            copies[r].await_ready(gpu)?;
            let (acc, x) = (copies[holder].at(range.start), copies[r].at(range.start));
            gpu.replica_add(acc, x, range.len())?;
        }
        Ok(())
    }

    /// Sums each copy in replica order (`replica_add` into each GPU's holder), the GPUs'
    /// sums across GPUs, then each GPU's sum into its other copies.
    pub(super) fn sum_copies(&self, device: u32, copies: &mut [&mut GpuTensor]) -> Result<()> {
        let spread = self.spread(device, copies)?;
        let Some(len) = copies.first().map(|c| c.len()) else {
            return Ok(());
        };
        self.add_into_holders(copies, &spread, 0..len)?;
        if spread.holders.len() > 1 {
            self.sum_across_gpus(copies, &spread.holders, len)?;
        }
        for r in 0..copies.len() {
            let holder = spread.holder_of(r);
            if holder != r {
                let (sum, copy) = pair_mut(copies, holder, r);
                copy.copy_from(&self.gpus[spread.gpu_of[r]], sum)?;
            }
        }
        Ok(())
    }

    /// `Engine::sum_here`: copies on one GPU summed in the order given into each.
    pub(super) fn sum_on_gpu(&self, device: u32, copies: &mut [&mut GpuTensor]) -> Result<()> {
        let gpu = self.gpu(device);
        let Some((first, rest)) = copies.split_first_mut() else {
            return Ok(());
        };
        let len = first.len();
        let elsewhere = |t: &GpuTensor| t.len() != len || t.is_on_host();
        if elsewhere(first) || rest.iter().any(|t| elsewhere(t)) {
            return Err(PipelineError::Reduction(format!(
                "{}: the copies summed on device {device} differ in length or one is in host \
                 memory",
                first.name()
            )));
        }
        first.await_ready(gpu)?;
        for other in rest.iter() {
            other.await_ready(gpu)?;
            gpu.replica_add(first.ptr(), other.ptr(), len)
                .map_err(PipelineError::Cuda)?;
        }
        for other in rest.iter_mut() {
            other.copy_from(gpu, first)?;
        }
        Ok(())
    }

    /// `RS` on one tensor: per `(owner, range)`, the range's sum over every copy into the
    /// owner's copy, zeros in the others'.
    pub(super) fn scatter_copies(
        &self,
        device: u32,
        copies: &mut [&mut GpuTensor],
        owned: &[(usize, Range<usize>)],
    ) -> Result<()> {
        let spread = self.spread(device, copies)?;
        check_owned(copies, owned)?;
        for (_, range) in owned {
            self.add_into_holders(copies, &spread, range.clone())?;
        }
        if spread.holders.len() > 1 {
            self.across_gpus(copies, &spread, owned, Rooted::Sum)?;
        }
        for (owner, range) in owned {
            let holder = spread.holder_of(*owner);
            if holder != *owner {
                let (sum, copy) = pair_mut(copies, holder, *owner);
                copy.copy_range_from(&self.gpus[spread.gpu_of[*owner]], sum, range.clone())?;
            }
            for (r, copy) in copies.iter_mut().enumerate() {
                if r != *owner {
                    copy.zero_range(&self.gpus[spread.gpu_of[r]], range.clone())?;
                }
            }
        }
        Ok(())
    }

    /// `AG` on one tensor: per `(owner, range)`, the owner's elements into every other copy
    /// (to each other GPU's holder first, then on each GPU from there).
    pub(super) fn gather_copies(
        &self,
        device: u32,
        copies: &mut [&mut GpuTensor],
        owned: &[(usize, Range<usize>)],
    ) -> Result<()> {
        let spread = self.spread(device, copies)?;
        check_owned(copies, owned)?;
        if spread.holders.len() > 1 {
            self.across_gpus(copies, &spread, owned, Rooted::Copy)?;
        }
        for (owner, range) in owned {
            let owner_gpu = spread.gpu_of[*owner];
            for r in 0..copies.len() {
                let g = spread.gpu_of[r];
                let src = if g == owner_gpu {
                    *owner
                } else {
                    spread.holder_of(r)
                };
                if src != r {
                    let (from, copy) = pair_mut(copies, src, r);
                    copy.copy_range_from(&self.gpus[g], from, range.clone())?;
                }
            }
        }
        Ok(())
    }

    /// Per `(owner, range)`, between the GPUs' holders (the owner itself on its GPU): the
    /// holders' sums into the owner's (`Sum`), or the owner's elements into the other GPUs'
    /// holders (`Copy`). Through NCCL in the stage's replica group, or host memory without.
    fn across_gpus(
        &self,
        copies: &mut [&mut GpuTensor],
        spread: &Spread,
        owned: &[(usize, Range<usize>)],
        kind: Rooted,
    ) -> Result<()> {
        let gpus: Vec<&Gpu> = spread.holders.iter().map(|&(g, _)| &self.gpus[g]).collect();
        // Per range: the root's position among the holders, and each GPU's copy taking part
        // (the holders, which hold their GPU's sums; a gathering's root gives the owner's).
        let at = |owner: usize| -> (usize, Vec<usize>) {
            let root = (spread.holders.iter())
                .position(|&(g, _)| g == spread.gpu_of[owner])
                .unwrap_or(0);
            let takers = (spread.holders.iter().enumerate())
                .map(|(i, &(_, holder))| {
                    if i == root && kind == Rooted::Copy {
                        owner
                    } else {
                        holder
                    }
                })
                .collect();
            (root, takers)
        };
        for (gpu, &(_, holder)) in gpus.iter().zip(&spread.holders) {
            copies[holder].await_ready(gpu)?;
        }
        for (owner, _) in owned {
            copies[*owner].await_ready(&self.gpus[spread.gpu_of[*owner]])?;
        }
        if let Some(nccl) = &self.nccl {
            let ops: Vec<RootedOp> = owned
                .iter()
                .filter(|(_, range)| !range.is_empty())
                .map(|(owner, range)| {
                    let (root, takers) = at(*owner);
                    let addrs = (takers.iter())
                        .map(|&r| copies[r].at(range.start).addr)
                        .collect();
                    RootedOp {
                        root,
                        addrs,
                        len: range.len(),
                    }
                })
                .collect();
            if !ops.is_empty() {
                nccl.rooted(&gpus, kind, &ops)?;
            }
            if kind == Rooted::Copy {
                // The broadcasts wrote the other GPUs' weights: their bf16 copies are stale.
                for &(_, holder) in &spread.holders {
                    copies[holder].mark_written();
                }
            }
            return Ok(());
        }
        for (owner, range) in owned {
            let (root, takers) = at(*owner);
            let read = |i: usize| -> std::result::Result<Vec<f32>, CudaError> {
                let mut values = vec![0f32; range.len()];
                copies[takers[i]].read_range(gpus[i], range.clone(), &mut values)?;
                Ok(values)
            };
            let mut values = read(if kind == Rooted::Sum { 0 } else { root })?;
            if kind == Rooted::Sum {
                for i in 1..gpus.len() {
                    let more = read(i)?;
                    values.iter_mut().zip(&more).for_each(|(s, v)| *s += v);
                }
            }
            for (i, &r) in takers.iter().enumerate() {
                if (kind == Rooted::Sum) == (i == root) {
                    copies[r].write_range(gpus[i], range.clone(), &values)?;
                }
            }
        }
        Ok(())
    }

    /// Sums the copies of `holders` (per GPU, the replica whose copy holds that GPU's sum)
    /// into each of them: an NCCL all-reduce whose end their readers wait for, or without NCCL
    /// through host memory, in `holders`' order.
    fn sum_across_gpus(
        &self,
        copies: &mut [&mut GpuTensor],
        holders: &[(usize, usize)],
        len: usize,
    ) -> Result<()> {
        if let Some(nccl) = &self.nccl {
            let buffers: Vec<(&Gpu, u64, Option<&Ready>)> = (holders.iter())
                .map(|&(g, r)| (&self.gpus[g], copies[r].ptr().addr, copies[r].ready()))
                .collect();
            let ends = nccl.all_reduce_sum(&buffers, len)?;
            for (&(_, r), end) in holders.iter().zip(ends) {
                copies[r].set_ready(end);
            }
            return Ok(());
        }
        let mut sum = vec![0f32; len];
        for (i, &(g, r)) in holders.iter().enumerate() {
            let values = copies[r].to_host::<f32>(&self.gpus[g])?;
            if i == 0 {
                sum = values;
            } else {
                sum.iter_mut().zip(&values).for_each(|(s, v)| *s += v);
            }
        }
        for &(g, r) in holders {
            copies[r].write_range(&self.gpus[g], 0..len, &sum)?;
        }
        Ok(())
    }
}

/// Every owner is a replica here and every range within the copies.
fn check_owned(copies: &[&mut GpuTensor], owned: &[(usize, Range<usize>)]) -> Result<()> {
    let len = copies.first().map_or(0, |c| c.len());
    match owned
        .iter()
        .find(|(o, r)| *o >= copies.len() || r.end > len)
    {
        Some((owner, range)) => Err(PipelineError::Reduction(format!(
            "replica {owner} of {} cannot own elements {range:?} of {len}",
            copies.len()
        ))),
        None => Ok(()),
    }
}

/// Two distinct elements of `items`, the first shared and the second mutable.
fn pair_mut<'a, T>(items: &'a mut [&mut T], a: usize, b: usize) -> (&'a T, &'a mut T) {
    if a < b {
        let (left, right) = items.split_at_mut(b);
        (&*left[a], &mut *right[0])
    } else {
        let (left, right) = items.split_at_mut(a);
        (&*right[0], &mut *left[b])
    }
}
