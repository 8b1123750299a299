//! A GPU engine as one rank of a run spread over processes: it opens only its own block of
//! the run's devices, and where a stage's replicas run on distinct GPUs across the ranks it
//! joins that stage's NCCL communicator (`nccl_ranks`), so the stage's reductions and
//! gatherings go GPU to GPU; the other stages' meet through host memory (`TcpRanks`).

use std::ops::Range;
use std::sync::{Arc, Weak};

use crate::exec::backend::cuda::nccl::{Rooted, RootedOp};
use crate::exec::backend::cuda::nccl_ranks::{GpuId, Join, LinkId, RankLinks};
use crate::exec::backend::cuda::ready::Ready;
use crate::exec::backend::cuda::tensor::GpuTensor;
use crate::exec::backend::cuda::{CudaError, Precision};
use crate::exec::pipeline::PipelineError;
use crate::exec::pipeline::engine::AcrossRanks;

use super::GpuEngine;

type Result<T> = std::result::Result<T, PipelineError>;

impl GpuEngine {
    /// The GPUs of one rank of a run of `stages`-device replicas spread over processes:
    /// run-wide devices `local` on GPUs `ordinals` (one per device, repeats allowed), each
    /// GPU opened once. The run's other devices are other processes' and never asked of this
    /// engine. No replica groups in the process: a rank's replicas meet the others' through
    /// `link_ranks`' communicators or through host memory (`TcpRanks`), never through
    /// `sum_replicas`.
    pub fn open_rank(
        ordinals: &[usize],
        local: Range<u32>,
        stages: usize,
        precision: Precision,
    ) -> std::result::Result<Self, CudaError> {
        if ordinals.len() != local.len() || stages == 0 {
            return Err(CudaError::Unsupported(format!(
                "devices {local:?} of a rank of {stages}-stage replicas need {} GPUs; {} were \
                 named",
                local.len(),
                ordinals.len()
            )));
        }
        let mut engine = GpuEngine::open(ordinals, precision)?;
        engine.first = local.start as usize;
        engine.stages = stages;
        Ok(engine)
    }

    /// The identity of each of this rank's devices' GPUs, in device order.
    pub fn gpu_ids(&self) -> std::result::Result<Vec<GpuId>, CudaError> {
        (self.stage_gpu.iter())
            .map(|&g| Ok(self.gpus[g].ctx.uuid()?.bytes.map(|b| b as u8)))
            .collect()
    }

    /// Joins, for each of `stages` (with its id), the communicator of its `replicas`
    /// replicas across the ranks, with this rank's replicas of it. Returns the links, to
    /// abort when a rank fails (the engine keeps them; the handle does not).
    pub fn link_ranks(
        &mut self,
        replicas: u32,
        stages: &[(u32, LinkId)],
    ) -> std::result::Result<Weak<RankLinks>, CudaError> {
        let last = (self.first + self.stage_gpu.len()) as u32;
        let joins = (stages.iter())
            .map(|&(stage, id)| Join {
                stage,
                id,
                members: (0..replicas)
                    .filter_map(|r| {
                        let device = r * self.stages as u32 + stage;
                        (self.first as u32..last)
                            .contains(&device)
                            .then(|| (r, self.gpu(device)))
                    })
                    .collect(),
            })
            .filter(|join| !join.members.is_empty())
            .collect();
        let links = Arc::new(RankLinks::join(replicas, joins)?);
        let handle = Arc::downgrade(&links);
        self.rank_links = Some(links);
        Ok(handle)
    }

    /// `Engine::across_ranks`: this rank's copies (replicas `replicas` of `device`'s stage,
    /// each on its own GPU) meet the other ranks' through the stage's communicator.
    pub(super) fn meet_ranks(
        &self,
        device: u32,
        op: AcrossRanks,
        replicas: &[u32],
        copies: &mut [&mut GpuTensor],
    ) -> Result<()> {
        let stage = device % self.stages as u32;
        let Some(links) = &self.rank_links else {
            return Err(PipelineError::Reduction(format!(
                "stage {stage} has no links to the other ranks"
            )));
        };
        let len = copies.first().map_or(0, |c| c.len());
        if copies.len() != replicas.len() || copies.iter().any(|c| c.len() != len || c.is_on_host())
        {
            return Err(PipelineError::Reduction(format!(
                "{} copies for replicas {replicas:?} of stage {stage}, of different lengths or \
                 one in host memory",
                copies.len()
            )));
        }
        let gpus: Vec<_> = (replicas.iter())
            .map(|&r| self.gpu(r * self.stages as u32 + stage))
            .collect();
        for (copy, gpu) in copies.iter().zip(&gpus) {
            copy.await_ready(gpu)?;
        }
        let rooted = |owned: &[(usize, Range<usize>)], copies: &[&mut GpuTensor]| {
            (owned.iter())
                .filter(|(_, range)| !range.is_empty())
                .map(|(owner, range)| RootedOp {
                    root: *owner,
                    addrs: copies.iter().map(|c| c.at(range.start).addr).collect(),
                    len: range.len(),
                })
                .collect::<Vec<_>>()
        };
        match op {
            AcrossRanks::Sum => {
                let buffers: Vec<(_, u64, Option<&Ready>)> = (gpus.iter().zip(copies.iter()))
                    .map(|(&gpu, c)| (gpu, c.ptr().addr, c.ready()))
                    .collect();
                let ends = links.all_reduce_sum(stage, replicas, &buffers, len)?;
                for (copy, end) in copies.iter_mut().zip(ends) {
                    copy.set_ready(end);
                }
            }
            AcrossRanks::Scatter(owned) => {
                let ops = rooted(owned, copies);
                links.rooted(stage, replicas, &gpus, Rooted::Sum, &ops)?;
                for (owner, range) in owned {
                    for ((copy, gpu), &r) in copies.iter_mut().zip(&gpus).zip(replicas) {
                        if r as usize != *owner {
                            copy.zero_range(gpu, range.clone())?;
                        }
                    }
                }
            }
            AcrossRanks::Gather(owned) => {
                let ops = rooted(owned, copies);
                links.rooted(stage, replicas, &gpus, Rooted::Copy, &ops)?;
                // The broadcasts wrote the weights: their bf16 copies are stale.
                for copy in copies.iter_mut() {
                    copy.mark_written();
                }
            }
        }
        Ok(())
    }
}
