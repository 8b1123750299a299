//! Before the first step, GPU ranks agree over their TCP mesh which stages' replicas meet GPU
//! to GPU: each rank says its devices' GPU ids and whether it has NCCL (and has not turned it
//! off with `CHRONOSPIPE_NCCL_RANKS=0`); every rank then computes the same stages, those whose
//! replicas all run on distinct GPUs (NCCL refuses two ranks of one communicator on one GPU,
//! so ranks sharing a GPU keep to host memory). For each, the rank of its first replica draws
//! the communicator's id and sends it to the others running that stage; each rank joins with
//! its replicas of it. The remaining stages meet through host memory, as CPU ranks do. When
//! the mesh fails (a rank lost, or one stopped), the links are aborted, so nothing waits in
//! NCCL for a rank that will not come.

use std::collections::BTreeSet;

use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::engine::GpuEngine;
use crate::exec::backend::cuda::nccl_ranks::{self, GpuId, LinkId, linked_stages};
use crate::exec::pipeline::PipelineError;
use crate::exec::transport::frame::Frame;
use crate::exec::transport::{Mesh, RankSpec};
use crate::plan::search::Answer;
use crate::spec::SpecError;

use super::RunError;

/// Set to `0` on any rank: every rank's GPUs meet the others' through host memory only.
const NCCL_RANKS_ENV: &str = "CHRONOSPIPE_NCCL_RANKS";

/// The setup key of a rank's GPU ids.
const GPUS: &str = "gpus";

/// The setup key of stage `stage`'s communicator id.
fn id_key(stage: u32) -> String {
    format!("nccl/{stage}")
}

/// Links this rank's replicas of every stage the ranks can link through NCCL (see the module
/// documentation).
pub(super) fn link_gpu_ranks(
    mesh: &Mesh,
    rank: &RankSpec,
    answer: &Answer,
    engine: &mut GpuEngine,
) -> Result<(), RunError> {
    let wanted = nccl_wanted(std::env::var(NCCL_RANKS_ENV).ok().as_deref())?;
    let plan = &answer.plan;
    let (replicas, stages) = (plan.replicas, plan.devices() as u32);
    if replicas < 2 {
        return Ok(());
    }
    let willing = wanted && nccl_ranks::available();
    let mine = engine.gpu_ids()?;
    let Some(gpus) = every_rank_gpus(mesh, rank, replicas * stages, willing, &mine)? else {
        tracing::info!(
            "a rank has no NCCL (or {NCCL_RANKS_ENV}=0): replicas meet through host memory"
        );
        return Ok(());
    };
    let linked = linked_stages(&gpus, replicas, stages);
    let ids = share_ids(mesh, rank, (replicas, stages), &linked, nccl_ranks::new_id)?;
    if !ids.is_empty() {
        let links = engine.link_ranks(replicas, &ids)?;
        // A rank that fails leaves this one's collectives waiting in NCCL for it, where no
        // failed wait reaches: aborting the links ends them with an error.
        mesh.on_failure(move || {
            if let Some(links) = links.upgrade() {
                links.abort();
            }
        });
    }
    tracing::info!(
        "the replicas of stages {linked:?} meet GPU to GPU through NCCL; the other stages' \
         through host memory"
    );
    Ok(())
}

/// Whether `CHRONOSPIPE_NCCL_RANKS` (`value`, if set) lets the ranks link through NCCL:
/// unset or `1` yes, `0` no, anything else refused by name.
fn nccl_wanted(value: Option<&str>) -> Result<bool, RunError> {
    match value {
        None | Some("1") => Ok(true),
        Some("0") => Ok(false),
        Some(other) => Err(RunError::Spec(vec![SpecError::new(
            NCCL_RANKS_ENV,
            format!("`{other}` is neither 0 (host memory only) nor 1 (NCCL where it can)"),
        )])),
    }
}

/// Says this rank's GPU ids (`mine`, its devices' in order) and whether it will link
/// (`willing`) to every other rank and hears theirs: every run-wide device's GPU id (of
/// `devices`), or `None` when any rank will not link.
fn every_rank_gpus(
    mesh: &Mesh,
    rank: &RankSpec,
    devices: u32,
    willing: bool,
    mine: &[GpuId],
) -> Result<Option<Vec<GpuId>>, PipelineError> {
    let said: Vec<u8> = std::iter::once(u8::from(willing))
        .chain(mine.iter().flatten().copied())
        .collect();
    mesh.send_to_others(&Frame::Setup {
        key: GPUS.into(),
        bytes: said.clone(),
    })?;
    let (mut gpus, mut all_willing) = (Vec::with_capacity(devices as usize), true);
    for r in 0..mesh.ranks() {
        let bytes = match r == rank.rank {
            true => said.clone(),
            false => heard(mesh, r, GPUS)?,
        };
        let expected = rank.devices_of(r, devices).len();
        let ids = bytes.get(1..).unwrap_or_default();
        if ids.len() != expected * 16 {
            return Err(PipelineError::Reduction(format!(
                "rank {r} said the GPU ids of {} devices; it runs {expected}",
                ids.len() / 16
            )));
        }
        all_willing &= bytes.first() == Some(&1);
        gpus.extend(ids.chunks_exact(16).map(|c| {
            let mut id = [0u8; 16];
            id.copy_from_slice(c);
            id
        }));
    }
    Ok(all_willing.then_some(gpus))
}

/// For each stage of `linked` that this rank runs a replica of (of `replicas` x `stages`),
/// its communicator's id: drawn (`draw`) by the rank of its replica 0, which sends it to the
/// other ranks running the stage; heard from it by those.
fn share_ids(
    mesh: &Mesh,
    rank: &RankSpec,
    (replicas, stages): (u32, u32),
    linked: &[u32],
    draw: impl Fn() -> Result<LinkId, CudaError>,
) -> Result<Vec<(u32, LinkId)>, RunError> {
    let devices = replicas * stages;
    let mut ids = Vec::new();
    for &stage in linked {
        let holders: BTreeSet<u32> = (0..replicas)
            .map(|r| rank.rank_of(r * stages + stage, devices))
            .collect();
        if !holders.contains(&rank.rank) {
            continue;
        }
        let first = rank.rank_of(stage, devices);
        let id = if first == rank.rank {
            let id = draw()?;
            for &peer in holders.iter().filter(|&&p| p != rank.rank) {
                let frame = Frame::Setup {
                    key: id_key(stage),
                    bytes: id.to_vec(),
                };
                mesh.send(peer, &frame).map_err(PipelineError::from)?;
            }
            id
        } else {
            let bytes = heard(mesh, first, &id_key(stage))?;
            LinkId::try_from(bytes.as_slice()).map_err(|_| {
                PipelineError::Reduction(format!(
                    "rank {first} sent an NCCL id of {} bytes for stage {stage}",
                    bytes.len()
                ))
            })?
        };
        ids.push((stage, id));
    }
    Ok(ids)
}

/// What rank `from` said under `key`, once it has (or the mesh's failure).
fn heard(mesh: &Mesh, from: u32, key: &str) -> Result<Vec<u8>, PipelineError> {
    mesh.wait(
        |inbox| inbox.setup.remove(&(from, key.to_string())),
        &|| false,
    )?
    .ok_or(PipelineError::Aborted)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// `n` ranks of one run on loopback, connected.
    fn meshes(n: u32) -> Vec<(Mesh, RankSpec)> {
        let listeners: Vec<_> = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let peers: Vec<String> = (listeners.iter())
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        drop(listeners);
        let handles: Vec<_> = (0..n)
            .map(|r| {
                let spec = RankSpec::parse(r, &peers.join(","), Duration::from_secs(10)).unwrap();
                std::thread::spawn(move || (Mesh::connect(&spec, 7).unwrap(), spec))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Runs `f` on every rank at once; their answers in rank order.
    fn on_every_rank<T: Send>(
        ranks: &[(Mesh, RankSpec)],
        f: impl Fn(&Mesh, &RankSpec) -> T + Sync,
    ) -> Vec<T> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (ranks.iter())
                .map(|(mesh, spec)| s.spawn(|| f(mesh, spec)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn the_switch_is_0_or_1_or_unset_and_anything_else_is_refused_by_name() {
        assert!(nccl_wanted(None).unwrap());
        assert!(nccl_wanted(Some("1")).unwrap());
        assert!(!nccl_wanted(Some("0")).unwrap());
        let err = nccl_wanted(Some("false")).unwrap_err().to_string();
        assert!(
            err.contains("CHRONOSPIPE_NCCL_RANKS") && err.contains("`false`"),
            "{err}"
        );
    }

    #[test]
    fn every_rank_hears_every_gpu_id_in_device_order() {
        let ranks = meshes(2);
        // Two devices per rank: rank 0 on GPUs 1, 2 and rank 1 on GPUs 3, 4.
        let got = on_every_rank(&ranks, |mesh, spec| {
            let base = spec.rank as u8 * 2 + 1;
            every_rank_gpus(mesh, spec, 4, true, &[[base; 16], [base + 1; 16]]).unwrap()
        });
        let all: Vec<GpuId> = (1..=4).map(|g| [g; 16]).collect();
        assert_eq!(got, vec![Some(all.clone()), Some(all)]);
        // One rank unwilling: nobody links.
        let got = on_every_rank(&ranks, |mesh, spec| {
            let ids = [[spec.rank as u8; 16], [9; 16]];
            every_rank_gpus(mesh, spec, 4, spec.rank == 0, &ids).unwrap()
        });
        assert_eq!(got, vec![None, None]);
    }

    #[test]
    fn a_rank_that_says_the_wrong_number_of_gpus_is_refused_by_the_others() {
        let ranks = meshes(2);
        let got = on_every_rank(&ranks, |mesh, spec| {
            let ids: Vec<GpuId> = vec![[1; 16]; 1 + spec.rank as usize];
            every_rank_gpus(mesh, spec, 2, true, &ids).map_err(|e| e.to_string())
        });
        let refusal = got[0].as_ref().unwrap_err();
        assert!(
            refusal.contains("rank 1 said the GPU ids of 2 devices; it runs 1"),
            "{refusal}"
        );
    }

    /// 2 replicas x 2 stages over 4 ranks (rank = device): stage 0's id is drawn by rank 0
    /// and heard by rank 2, stage 1's by rank 1 and rank 3; an unlinked stage has none.
    #[test]
    fn each_linked_stage_gets_one_id_from_the_rank_of_its_first_replica() {
        let ranks = meshes(4);
        let got = on_every_rank(&ranks, |mesh, spec| {
            let draw = || Ok([spec.rank as u8 + 10; 128]);
            share_ids(mesh, spec, (2, 2), &[0, 1], draw).unwrap()
        });
        assert_eq!(got[0], vec![(0, [10; 128])]);
        assert_eq!(got[1], vec![(1, [11; 128])]);
        assert_eq!(got[2], vec![(0, [10; 128])]);
        assert_eq!(got[3], vec![(1, [11; 128])]);
        let got = on_every_rank(&ranks, |mesh, spec| {
            share_ids(mesh, spec, (2, 2), &[1], || Ok([spec.rank as u8; 128])).unwrap()
        });
        assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), [0, 1, 0, 1]);
    }
}
