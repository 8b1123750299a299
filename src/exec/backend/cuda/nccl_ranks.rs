//! Replica collectives between processes through NCCL: for each stage whose replicas all run on
//! distinct GPUs (`linked_stages`, which every rank computes alike from every rank's GPU ids),
//! one communicator spanning the ranks, NCCL rank = replica. This process holds a member per
//! replica of that stage it runs, each with a stream of its own, so collectives of different
//! stages never queue behind each other on a stream in an order another process does not share.
//!
//! The members are made by `ncclCommInitRank` from an id the rank of the stage's first replica
//! draws (`new_id`) and the others receive over the ranks' TCP mesh; sums, reduces and
//! broadcasts then go GPU to GPU (through NCCL's own network transports between machines:
//! `NCCL_SOCKET_IFNAME` and NCCL's other settings apply), and nothing of the gradients passes
//! through host memory. Within a stage the collectives come in the plan's order, the same on
//! every replica, so every member meets its peers' calls in one order.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::CudaStream;
use cudarc::nccl::result as nccl;
use cudarc::nccl::sys;

use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::libs::Libraries;
use crate::exec::backend::cuda::nccl::{
    Member, Rooted, RootedOp, all_reduce_on, nccl_error, rooted_on,
};
use crate::exec::backend::cuda::ready::Ready;

/// An NCCL unique id, as it travels between ranks.
pub type LinkId = [u8; 128];

/// A GPU's identity (its UUID), the same whichever process or machine reads it.
pub type GpuId = [u8; 16];

/// The stages of a `replicas` x `stages` plan whose replicas all run on distinct GPUs, given
/// each run-wide device's GPU (`gpus`, replica by replica): those NCCL can link (it refuses two
/// ranks of one communicator on one GPU). None with fewer than two replicas.
pub fn linked_stages(gpus: &[GpuId], replicas: u32, stages: u32) -> Vec<u32> {
    if replicas < 2 || gpus.len() != (replicas * stages) as usize {
        return Vec::new();
    }
    (0..stages)
        .filter(|&s| {
            let on: BTreeSet<&GpuId> = (0..replicas)
                .map(|r| &gpus[(r * stages + s) as usize])
                .collect();
            on.len() == replicas as usize
        })
        .collect()
}

/// Whether NCCL can be loaded here.
pub fn available() -> bool {
    Libraries::probe().nccl
}

/// A fresh id for one stage's communicator.
pub fn new_id() -> Result<LinkId, CudaError> {
    Libraries::probe().require_nccl()?;
    let id = nccl::get_uniqueid().map_err(nccl_error)?;
    Ok(id.internal.map(|c| c as u8))
}

/// One replica of a linked stage that runs here.
struct Linked {
    replica: u32,
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
}

/// This process's members of the stages' communicators across ranks.
pub struct RankLinks {
    replicas: u32,
    /// Per linked stage, this process's replicas of it, in replica order. A lock per stage:
    /// a collective may wait in NCCL for the other ranks (their first use of a communicator
    /// connects them), and one lock for every stage could then wait on a stage whose peers
    /// wait on this one.
    stages: BTreeMap<u32, Mutex<Vec<Linked>>>,
    /// Every communicator here, for `abort`, which takes no lock.
    comms: Vec<sys::ncclComm_t>,
    /// Set by `abort`: the communicators are gone.
    aborted: AtomicBool,
}

// SAFETY: each stage's communicators are only used with that stage's lock held and while not
// aborted, except by `abort`, which NCCL allows while operations are in flight.
unsafe impl Send for RankLinks {}
unsafe impl Sync for RankLinks {}

/// One stage to join: its id and this process's replicas of it, each with its GPU.
pub struct Join<'a> {
    pub stage: u32,
    pub id: LinkId,
    pub members: Vec<(u32, &'a Gpu)>,
}

impl RankLinks {
    /// Joins each stage's communicator of `replicas` ranks, in stage order (every process
    /// joins in that order, so no two wait on each other's later stage). Blocks until every
    /// rank of each stage has joined.
    pub fn join(replicas: u32, joins: Vec<Join>) -> Result<RankLinks, CudaError> {
        let mut links = RankLinks {
            replicas,
            stages: BTreeMap::new(),
            comms: Vec::new(),
            aborted: AtomicBool::new(false),
        };
        let mut joins = joins;
        joins.sort_by_key(|j| j.stage);
        for join in joins {
            let mut members = Vec::with_capacity(join.members.len());
            let id = sys::ncclUniqueId {
                internal: join.id.map(|b| b as _),
            };
            nccl::group_start().map_err(nccl_error)?;
            let queued = join.members.iter().try_for_each(|&(replica, gpu)| {
                gpu.ctx.bind_to_thread()?;
                let stream = gpu.ctx.new_stream()?;
                let mut comm = std::ptr::null_mut();
                // SAFETY: `comm` receives the communicator; the id is the stage's, and
                // `replica` is below `replicas`, the communicator's size.
                unsafe { nccl::comm_init_rank(&mut comm, replicas as i32, id, replica as i32) }
                    .map_err(nccl_error)?;
                members.push(Linked {
                    replica,
                    comm,
                    stream,
                });
                Ok::<(), CudaError>(())
            });
            let ended = nccl::group_end();
            // Kept before the errors are looked at, so dropping `links` frees what was made.
            links.comms.extend(members.iter().map(|m| m.comm));
            links.stages.insert(join.stage, Mutex::new(members));
            queued?;
            ended.map_err(nccl_error)?;
        }
        Ok(links)
    }

    /// This process's members of `stage`, locked, unless the links were aborted.
    fn lock(&self, stage: u32) -> Result<MutexGuard<'_, Vec<Linked>>, CudaError> {
        let linked = self.stages.get(&stage).ok_or_else(|| {
            CudaError::Unsupported(format!("stage {stage} has no links to the other ranks"))
        })?;
        let linked = linked.lock().unwrap_or_else(|e| e.into_inner());
        if self.aborted.load(Ordering::SeqCst) {
            return Err(CudaError::Nccl(
                "the links to the other ranks were aborted (a rank failed)".into(),
            ));
        }
        Ok(linked)
    }

    /// Aborts every communicator, from any thread, also while collectives are queued or
    /// running on them: what waits on the other ranks (a collective whose peers stopped) ends
    /// with an error instead of waiting forever. Later collectives are refused.
    pub fn abort(&self) {
        if self.aborted.swap(true, Ordering::SeqCst) {
            return;
        }
        for &comm in &self.comms {
            // SAFETY: each communicator was made by `join` and is aborted once (the flag);
            // nothing uses it afterwards (`lock` refuses, `Drop` skips it).
            let _ = unsafe { nccl::comm_abort(comm) };
        }
    }

    /// Whether `stage`'s replicas meet here.
    pub fn links(&self, stage: u32) -> bool {
        self.stages.contains_key(&stage)
    }

    /// Sums `len` f32 elements at each of `buffers` (this process's replicas `replicas` of
    /// `stage`, in order) with every other rank's replicas into all of them. Returns each
    /// buffer's end, which its readers wait for.
    pub fn all_reduce_sum(
        &self,
        stage: u32,
        replicas: &[u32],
        buffers: &[(&Gpu, u64, Option<&Ready>)],
        len: usize,
    ) -> Result<Vec<Ready>, CudaError> {
        let linked = self.lock(stage)?;
        all_reduce_on(&members(&linked, stage, replicas)?, buffers, len)
    }

    /// Per op, a reduce into (`Sum`) or a broadcast from (`Copy`) replica `op.root` of
    /// `stage`, over this process's replicas `replicas` (on `gpus`) and every other rank's.
    pub fn rooted(
        &self,
        stage: u32,
        replicas: &[u32],
        gpus: &[&Gpu],
        kind: Rooted,
        ops: &[RootedOp],
    ) -> Result<(), CudaError> {
        if let Some(op) = ops.iter().find(|op| op.root >= self.replicas as usize) {
            return Err(CudaError::Unsupported(format!(
                "a collective rooted at replica {} of {}",
                op.root, self.replicas
            )));
        }
        let linked = self.lock(stage)?;
        rooted_on(&members(&linked, stage, replicas)?, gpus, kind, ops)
    }
}

/// The members of `stage` (`linked`) for `replicas`, which must be exactly this process's
/// replicas of it, in order.
fn members<'a>(
    linked: &'a [Linked],
    stage: u32,
    replicas: &[u32],
) -> Result<Vec<Member<'a>>, CudaError> {
    if !linked
        .iter()
        .map(|l| l.replica)
        .eq(replicas.iter().copied())
    {
        return Err(CudaError::Unsupported(format!(
            "replicas {replicas:?} of stage {stage} meet across ranks here, but this process \
             joined {:?} of it",
            linked.iter().map(|l| l.replica).collect::<Vec<_>>()
        )));
    }
    Ok((linked.iter())
        .map(|l| Member {
            comm: l.comm,
            stream: &l.stream,
        })
        .collect())
}

impl Drop for RankLinks {
    fn drop(&mut self) {
        if *self.aborted.get_mut() {
            return; // `abort` freed the communicators
        }
        let linked: Vec<&Linked> = (self.stages.values_mut())
            .flat_map(|m| m.get_mut().unwrap_or_else(|e| e.into_inner()).iter())
            .collect();
        // Errors here have nowhere to go: the run is over.
        for l in &linked {
            let _ = l.stream.synchronize();
        }
        // SAFETY: each communicator was made by `comm_init_rank`, is finalized and destroyed
        // once, with nothing of it left on its stream. Finalizing may wait for the peers',
        // so this process's are finalized in one group.
        unsafe {
            if nccl::group_start().is_ok() {
                for l in &linked {
                    let _ = nccl::comm_finalize(l.comm);
                }
                let _ = nccl::group_end();
            }
            for l in &linked {
                let _ = nccl::comm_destroy(l.comm);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(of: &[u8]) -> Vec<GpuId> {
        of.iter().map(|&g| [g; 16]).collect()
    }

    #[test]
    fn a_stage_is_linked_only_when_its_replicas_are_on_distinct_gpus() {
        // 2 replicas x 2 stages, replica by replica: stage 0 on GPUs 1 and 3, stage 1 on 2, 2.
        assert_eq!(linked_stages(&ids(&[1, 2, 3, 2]), 2, 2), vec![0]);
        assert_eq!(linked_stages(&ids(&[1, 2, 3, 4]), 2, 2), vec![0, 1]);
        // Two ranks sharing one GPU (as scripts/gpu-check runs them): nothing to link.
        assert_eq!(linked_stages(&ids(&[0, 0]), 2, 1), Vec::<u32>::new());
        // One replica has nobody to meet; a list of the wrong length links nothing.
        assert_eq!(linked_stages(&ids(&[1, 2]), 1, 2), Vec::<u32>::new());
        assert_eq!(linked_stages(&ids(&[1, 2, 3]), 2, 2), Vec::<u32>::new());
        // 3 replicas of one stage: distinct only if all three are.
        assert_eq!(linked_stages(&ids(&[1, 2, 1]), 3, 1), Vec::<u32>::new());
        assert_eq!(linked_stages(&ids(&[1, 2, 3]), 3, 1), vec![0]);
    }

    /// Without NCCL an id is a typed error naming the library; with it, 128 bytes.
    #[test]
    fn an_id_needs_nccl() {
        match (new_id(), available()) {
            (Err(CudaError::Unavailable { library, .. }), false) => {
                assert!(library.contains("libnccl.so"), "{library}")
            }
            (Ok(id), true) => assert!(id.iter().any(|&b| b != 0)),
            (other, nccl) => panic!("NCCL present: {nccl}; got {:?}", other.err()),
        }
    }
}
