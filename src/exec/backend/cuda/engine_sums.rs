//! The GPU engine's gradient sums: replica copies in replica order (within a GPU by the
//! `replica_add` kernel, across GPUs by NCCL's all-reduce or through host memory), and copies
//! on one GPU (tied embeddings' `TIE`).

use super::engine::GpuEngine;
use super::gpu::Gpu;
use super::offload;
use super::tensor::GpuTensor;
use crate::exec::pipeline::PipelineError;

type Result<T> = std::result::Result<T, PipelineError>;

impl GpuEngine {
    /// `Engine::sum_replicas`: one gradient's replica copies summed in replica order, on
    /// each GPU by `replica_add`, across GPUs by NCCL (or through host memory).
    pub(super) fn sum_replica_copies(
        &self,
        device: u32,
        copies: &mut [&mut GpuTensor],
    ) -> Result<()> {
        let Some(first) = copies.first() else {
            return Ok(());
        };
        let (name, len) = (first.name().to_string(), first.len());
        let stage = device as usize % self.stages;
        let reduction = |m: String| PipelineError::Reduction(m);
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
        let gpu_of = |r: usize| self.stage_gpu[r * self.stages + stage];
        // Per GPU (in replica order of first appearance): the replica whose copy holds its sum.
        let mut holders: Vec<(usize, usize)> = Vec::new();
        for r in 0..copies.len() {
            let g = gpu_of(r);
            match holders.iter().find(|(h, _)| *h == g) {
                None => holders.push((g, r)),
                Some(&(_, holder)) => {
                    let gpu = &self.gpus[g];
                    copies[holder].await_ready(gpu)?;
                    copies[r].await_ready(gpu)?;
                    gpu.replica_add(copies[holder].ptr(), copies[r].ptr(), len)
                        .map_err(PipelineError::Cuda)?;
                }
            }
        }
        if holders.len() > 1 {
            self.sum_across_gpus(copies, &holders, len)?;
        }
        for r in 0..copies.len() {
            let g = gpu_of(r);
            let Some(&(_, holder)) = holders.iter().find(|(h, _)| *h == g) else {
                continue;
            };
            if holder != r {
                let (sum, copy) = pair_mut(copies, holder, r);
                copy.copy_from(&self.gpus[g], sum)?;
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
            let buffers: Vec<(&Gpu, u64, Option<&offload::Ready>)> = (holders.iter())
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
