//! Tensors between GPUs through NCCL: one communicator for a job's GPUs (a rank per GPU, made
//! by `ncclCommInitAll`), a transfer stream per GPU, and a grouped send and receive per tensor.
//!
//! The receiving stage's thread issues both halves of a transfer in one NCCL group when it
//! takes the message (one thread driving several GPUs is what NCCL's group calls are for):
//! - the send, on the sender's transfer stream, after the event the sender recorded when it
//!   posted the message, so kernels the sender queued since then are not waited for; the
//!   sender's buffer is freed on that stream once sent;
//! - the receive, on the receiver's transfer stream, into a buffer allocated on its compute
//!   stream; the new tensor carries the receive's event, which its first reader waits for.
//!
//! Data parallelism sums a gradient's copies on distinct GPUs with an all-reduce in a
//! communicator of its own per group of GPUs (the replicas of a stage), made when the run
//! knows its replicas (`add_group`); one thread issues every rank's all-reduce in one group,
//! on the same transfer streams as the sends. Sharded optimizer state uses the same groups:
//! per range a replica owns, a reduce into its GPU and, after the update, a broadcast from it
//! (`rooted`).
//!
//! One lock orders every transfer and all-reduce of the job, so each rank's stream holds its
//! operations in one global order and every send meets its receive (every all-reduce its
//! peers) at the same place in every order: pairs cannot cross, and no operation waits on one
//! queued after it. NCCL's communicators are not thread-safe; the lock covers that too.

use std::ffi::CStr;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr};
use cudarc::nccl::result::{self as nccl, NcclError};
use cudarc::nccl::sys;

use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::libs::Libraries;
use crate::exec::backend::cuda::ready::Ready;

/// NCCL's own words for an error code.
pub(super) fn nccl_error(e: NcclError) -> CudaError {
    // SAFETY: NCCL returns a static string for every code.
    let text = unsafe { CStr::from_ptr(sys::ncclGetErrorString(e.0)) };
    CudaError::Nccl(format!("{:?}: {}", e.0, text.to_string_lossy()))
}

/// The communicator's ranks: rank `r` is GPU `ordinals[r]`, sending and receiving on
/// `streams[r]`.
struct Ranks {
    ordinals: Vec<usize>,
    comms: Vec<sys::ncclComm_t>,
    streams: Vec<Arc<CudaStream>>,
    /// The all-reduce communicators: per group of GPUs (their ordinals, in replica order), a
    /// communicator per GPU of the group, in that order.
    groups: Vec<(Vec<usize>, Vec<sys::ncclComm_t>)>,
}

// SAFETY: the communicators are only used with the `Nccl` lock held.
unsafe impl Send for Ranks {}

impl Ranks {
    /// The replica group of `gpus` (made by `add_group`): per GPU, its communicator in the
    /// group and its transfer stream.
    fn group(&self, gpus: &[&Gpu]) -> Result<Vec<Member<'_>>, CudaError> {
        let ordinals: Vec<usize> = gpus.iter().map(|g| g.ordinal).collect();
        let Some((_, comms)) = self.groups.iter().find(|(g, _)| *g == ordinals) else {
            return Err(CudaError::Unsupported(format!(
                "no replica group of GPUs {ordinals:?} was made for this job"
            )));
        };
        (gpus.iter().zip(comms))
            .map(|(gpu, &comm)| {
                Ok(Member {
                    comm,
                    stream: &self.streams[self.rank(gpu)?],
                })
            })
            .collect()
    }

    fn rank(&self, gpu: &Gpu) -> Result<usize, CudaError> {
        (self.ordinals.iter().position(|&o| o == gpu.ordinal)).ok_or_else(|| {
            CudaError::Unsupported(format!(
                "cuda:{} is not in this job's NCCL communicator ({:?})",
                gpu.ordinal, self.ordinals
            ))
        })
    }
}

/// One GPU's place in a collective: its communicator (its NCCL rank within it) and the stream
/// the collective runs on.
pub(super) struct Member<'a> {
    pub comm: sys::ncclComm_t,
    pub stream: &'a CudaStream,
}

/// Sums `len` f32 elements at each of `buffers` (per GPU of `members`, in their order) into
/// every one of them, on the members' streams, after what each GPU's compute stream has
/// queued so far and after each buffer's prefetch, if any. Returns, per buffer, the
/// all-reduce's end, which its readers wait for.
pub(super) fn all_reduce_on(
    members: &[Member],
    buffers: &[(&Gpu, u64, Option<&Ready>)],
    len: usize,
) -> Result<Vec<Ready>, CudaError> {
    if members.len() != buffers.len() {
        return Err(CudaError::Unsupported(format!(
            "an all-reduce of {} buffers over {} GPUs",
            buffers.len(),
            members.len()
        )));
    }
    for (&(gpu, _, ready), m) in buffers.iter().zip(members) {
        m.stream.wait(&gpu.stream.record_event(None)?)?;
        if let Some(r) = ready {
            r.wait_on(m.stream)?;
        }
    }
    nccl::group_start().map_err(nccl_error)?;
    // SAFETY: each buffer holds at least `len` f32 values on its GPU and stays allocated
    // until its GPU's compute stream passes the returned event (its readers, and its
    // freeing, wait for it).
    let queued = buffers
        .iter()
        .zip(members)
        .try_for_each(|(&(_, ptr, _), m)| unsafe {
            nccl::all_reduce(
                ptr as *const _,
                ptr as *mut _,
                len,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                m.comm,
                m.stream.cu_stream() as _,
            )
            .map(|_| ())
        });
    let ended = nccl::group_end();
    queued.map_err(nccl_error)?;
    ended.map_err(nccl_error)?;
    (buffers.iter().zip(members))
        .map(|(&(gpu, _, _), m)| Ready::record(m.stream, gpu))
        .collect()
}

/// For each of `ops`, over `len` f32 elements at each member's address (per GPU of `gpus`,
/// the members' GPUs in order): a sum into the root's buffer (`ncclReduce`) or the root's
/// values copied into every other buffer (`ncclBroadcast`), the root named by its NCCL rank in
/// the members' communicators. All in one NCCL group on the members' streams, after what each
/// GPU's compute stream has queued so far; each compute stream then waits for their end.
pub(super) fn rooted_on(
    members: &[Member],
    gpus: &[&Gpu],
    kind: Rooted,
    ops: &[RootedOp],
) -> Result<(), CudaError> {
    if let Some(op) = ops.iter().find(|op| op.addrs.len() != members.len()) {
        return Err(CudaError::Unsupported(format!(
            "a collective rooted at {} with {} buffers over {} GPUs",
            op.root,
            op.addrs.len(),
            members.len()
        )));
    }
    for (gpu, m) in gpus.iter().zip(members) {
        m.stream.wait(&gpu.stream.record_event(None)?)?;
    }
    nccl::group_start().map_err(nccl_error)?;
    let f32s = sys::ncclDataType_t::ncclFloat32;
    let queued = ops.iter().try_for_each(|op| {
        (op.addrs.iter().zip(members)).try_for_each(|(&ptr, m)| {
            let (root, stream) = (op.root as i32, m.stream.cu_stream() as _);
            // SAFETY: each address holds at least `len` f32 values on its GPU, allocated
            // until its compute stream passes the end of this group, which it waits for below.
            let queued = unsafe {
                match kind {
                    Rooted::Sum => nccl::reduce(
                        ptr as *const _,
                        ptr as *mut _,
                        op.len,
                        f32s,
                        sys::ncclRedOp_t::ncclSum,
                        root,
                        m.comm,
                        stream,
                    ),
                    Rooted::Copy => nccl::broadcast(
                        ptr as *const _,
                        ptr as *mut _,
                        op.len,
                        f32s,
                        root,
                        m.comm,
                        stream,
                    ),
                }
            };
            queued.map(|_| ())
        })
    });
    let ended = nccl::group_end();
    queued.map_err(nccl_error)?;
    ended.map_err(nccl_error)?;
    for (gpu, m) in gpus.iter().zip(members) {
        Ready::record(m.stream, gpu)?.wait_on(&gpu.stream)?;
    }
    Ok(())
}

/// What a collective rooted at one GPU does (see [`Nccl::rooted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rooted {
    /// Every GPU's values summed into the root's.
    Sum,
    /// The root's values copied into every other GPU's.
    Copy,
}

/// One rooted collective: per GPU of the group (in its order) the address of its elements,
/// the root's NCCL rank in the group, and how many f32 elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootedOp {
    pub root: usize,
    pub addrs: Vec<u64>,
    pub len: usize,
}

/// The NCCL communicator of a job's GPUs.
pub struct Nccl {
    ranks: Mutex<Ranks>,
}

impl Nccl {
    /// A communicator over `gpus` (distinct devices, at least two).
    pub fn open(gpus: &[Gpu]) -> Result<Nccl, CudaError> {
        Libraries::probe().require_nccl()?;
        let ordinals: Vec<usize> = gpus.iter().map(|g| g.ordinal).collect();
        let distinct = ordinals
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        if ordinals.len() < 2 || distinct < ordinals.len() {
            return Err(CudaError::Unsupported(format!(
                "an NCCL communicator needs two or more distinct GPUs, not {ordinals:?} (stages \
                 on one GPU hand tensors over without it)"
            )));
        }
        let devices: Vec<i32> = ordinals.iter().map(|&o| o as i32).collect();
        let streams = (gpus.iter().map(|g| g.ctx.new_stream())).collect::<Result<Vec<_>, _>>()?;
        let mut comms = vec![std::ptr::null_mut(); gpus.len()];
        // SAFETY: `comms` has room for one communicator per device in `devices`.
        unsafe { nccl::comm_init_all(comms.as_mut_ptr(), devices.len() as i32, devices.as_ptr()) }
            .map_err(nccl_error)?;
        Ok(Nccl {
            ranks: Mutex::new(Ranks {
                ordinals,
                comms,
                streams,
                groups: Vec::new(),
            }),
        })
    }

    /// Moves the first `bytes` bytes of `src`, on `from`, into a new buffer on `to`, after
    /// `sent` (the sender's compute stream when it posted the tensor) and `src_ready` (the end
    /// of a prefetch into `src`, if any). Returns the buffer and the receive's end.
    pub fn transfer(
        &self,
        from: &Gpu,
        to: &Gpu,
        src: CudaSlice<u8>,
        bytes: usize,
        sent: Option<&CudaEvent>,
        src_ready: Option<&Ready>,
    ) -> Result<(CudaSlice<u8>, Ready), CudaError> {
        let ranks = self.ranks.lock().unwrap_or_else(|e| e.into_inner());
        let (r_from, r_to) = (ranks.rank(from)?, ranks.rank(to)?);
        let (s_from, s_to) = (&ranks.streams[r_from], &ranks.streams[r_to]);
        if let Some(e) = sent {
            s_from.wait(e)?;
        }
        if let Some(r) = src_ready {
            r.wait_on(s_from)?;
        }
        // SAFETY: the receive below writes every byte before any kernel reads the buffer
        // (they wait for its event).
        let dst = unsafe { to.stream.alloc::<u8>(bytes.max(1))? };
        s_to.wait(&to.stream.record_event(None)?)?;
        let src_ptr = src.device_ptr(s_from).0;
        let dst_ptr = dst.device_ptr(s_to).0;
        nccl::group_start().map_err(nccl_error)?;
        // SAFETY: both buffers hold at least `bytes` bytes and stay allocated until their
        // streams pass these operations (`src` is freed on `s_from` below, `dst` is returned
        // with the receive's event).
        let queued = unsafe {
            nccl::send(
                src_ptr as *const _,
                bytes,
                sys::ncclDataType_t::ncclUint8,
                r_to as i32,
                ranks.comms[r_from],
                s_from.cu_stream() as _,
            )
            .and_then(|_| {
                nccl::recv(
                    dst_ptr as *mut _,
                    bytes,
                    sys::ncclDataType_t::ncclUint8,
                    r_from as i32,
                    ranks.comms[r_to],
                    s_to.cu_stream() as _,
                )
            })
        };
        let ended = nccl::group_end();
        queued.map_err(nccl_error)?;
        ended.map_err(nccl_error)?;
        let allocated = src.len();
        let ptr = src.leak();
        // SAFETY: `ptr` came from `src`, which no longer exists; dropping the slice rebuilt on
        // the sender's transfer stream frees it there, after the send.
        drop(unsafe { s_from.upgrade_device_ptr::<u8>(ptr, allocated) });
        Ok((dst, Ready::record(s_to, to)?))
    }

    /// Makes the all-reduce communicator of `ordinals` (two or more distinct GPUs of this job,
    /// in replica order), unless it exists already.
    pub fn add_group(&self, ordinals: &[usize]) -> Result<(), CudaError> {
        let mut ranks = self.ranks.lock().unwrap_or_else(|e| e.into_inner());
        if ranks.groups.iter().any(|(g, _)| g == ordinals) {
            return Ok(());
        }
        let distinct = ordinals
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        if ordinals.len() < 2 || distinct < ordinals.len() {
            return Err(CudaError::Unsupported(format!(
                "an all-reduce group needs two or more distinct GPUs, not {ordinals:?}"
            )));
        }
        if let Some(o) = ordinals.iter().find(|o| !ranks.ordinals.contains(o)) {
            return Err(CudaError::Unsupported(format!(
                "cuda:{o} is not one of this job's GPUs ({:?})",
                ranks.ordinals
            )));
        }
        let devices: Vec<i32> = ordinals.iter().map(|&o| o as i32).collect();
        let mut comms = vec![std::ptr::null_mut(); devices.len()];
        // SAFETY: `comms` has room for one communicator per device in `devices`.
        unsafe { nccl::comm_init_all(comms.as_mut_ptr(), devices.len() as i32, devices.as_ptr()) }
            .map_err(nccl_error)?;
        ranks.groups.push((ordinals.to_vec(), comms));
        Ok(())
    }

    /// Sums `len` f32 elements at each of `buffers` (one per GPU of a group made by
    /// `add_group`, in its order) into every one of them (see [`all_reduce_on`]).
    pub fn all_reduce_sum(
        &self,
        buffers: &[(&Gpu, u64, Option<&Ready>)],
        len: usize,
    ) -> Result<Vec<Ready>, CudaError> {
        let ranks = self.ranks.lock().unwrap_or_else(|e| e.into_inner());
        let gpus: Vec<&Gpu> = buffers.iter().map(|(g, _, _)| *g).collect();
        let members = ranks.group(&gpus)?;
        all_reduce_on(&members, buffers, len)
    }

    /// For each of `ops`, one collective rooted at one GPU of the group of `gpus` (a group
    /// made by `add_group`, in its order; see [`rooted_on`]). This is the sharded
    /// reduction's reduce-scatter and the gathering's all-gather, range by range: a replica's
    /// shard need not be an equal slice of each tensor.
    pub fn rooted(&self, gpus: &[&Gpu], kind: Rooted, ops: &[RootedOp]) -> Result<(), CudaError> {
        let ranks = self.ranks.lock().unwrap_or_else(|e| e.into_inner());
        let members = ranks.group(gpus)?;
        if let Some(op) = ops.iter().find(|op| op.root >= gpus.len()) {
            return Err(CudaError::Unsupported(format!(
                "a collective rooted at {} over {} GPUs",
                op.root,
                gpus.len()
            )));
        }
        rooted_on(&members, gpus, kind, ops)
    }

    /// Waits for every transfer queued so far (sends included, which no reader waits for).
    pub fn synchronize(&self) -> Result<(), CudaError> {
        let ranks = self.ranks.lock().unwrap_or_else(|e| e.into_inner());
        for s in &ranks.streams {
            s.synchronize()?;
        }
        Ok(())
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        let ranks = self.ranks.get_mut().unwrap_or_else(|e| e.into_inner());
        // Errors here have nowhere to go: the job is over.
        for s in &ranks.streams {
            let _ = s.synchronize();
        }
        let every = || {
            (ranks.comms.iter())
                .chain(ranks.groups.iter().flat_map(|(_, comms)| comms))
                .copied()
        };
        // One thread finalizes every rank, so the finalizes go in one group (each may wait for
        // the others'); then each is destroyed.
        // SAFETY: each communicator (the job's and every group's) was made by
        // `comm_init_all`, is finalized and destroyed once, with nothing of it left on its
        // stream.
        unsafe {
            if nccl::group_start().is_ok() {
                for c in every() {
                    let _ = nccl::comm_finalize(c);
                }
                let _ = nccl::group_end();
            }
            for c in every() {
                let _ = nccl::comm_destroy(c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without NCCL a communicator is a typed error naming the library and how to provide it;
    /// with it, one that spans no GPUs is refused before NCCL is called.
    #[test]
    fn a_communicator_needs_nccl_and_two_gpus() {
        match (Nccl::open(&[]), Libraries::probe().nccl) {
            (Err(CudaError::Unavailable { library, hint }), false) => {
                assert!(library.contains("libnccl.so"), "{library}");
                assert!(hint.contains("libnccl.so.2"), "{hint}");
            }
            (Err(CudaError::Unsupported(msg)), true) => {
                assert!(msg.contains("two or more distinct GPUs"), "{msg}");
            }
            (Err(e), nccl) => panic!("NCCL present: {nccl}; unexpected error: {e}"),
            (Ok(_), _) => panic!("a communicator over no GPUs"),
        }
    }
}
