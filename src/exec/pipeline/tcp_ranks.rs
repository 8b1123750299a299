//! A pipeline spread over processes joined by TCP (`exec::transport::Mesh`), on any engine:
//! what leaves a process is staged through host memory (`Engine::wire_out`, `values`), so GPU
//! ranks meet as CPU ranks do, except where the engine links a stage's replicas across
//! processes itself (`Engine::links_ranks`: NCCL between GPUs), which then carries that
//! stage's reductions and gatherings.
//! Each call of the step's [`Transport`] goes to the devices of this process as in one
//! process, and to the others' as frames: a send is a tensor frame to the rank that runs the
//! receiver, a reduction sends this replica's gradients to every rank holding another replica
//! of the device and sums all copies in replica order (the in-process order, so the same
//! bits), and the meeting point exchanges every rank's share before the totals are taken.
//! A checkpoint is written by every rank, each its own shard, into the staging directory rank
//! 0 names; rank 0 completes it once every other rank says its shard is written.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::time::{Duration, Instant};

use crate::exec::checkpoint::sharded::Shard;
use crate::exec::device::PoolRef;
use crate::exec::optim::clip::PartSquares;
use crate::exec::transport::frame::{Frame, ReplicaGrads};
use crate::exec::transport::{Collective, Mesh, MessageKey, RankSpec};

use super::PipelineError;
use super::engine::Engine;
use super::reduce_point::{ChunkGrads, Shards, across_ranks};
use super::seat::Seat;
use super::step_sync::{Shares, StepTotals};
use super::tcp_shards::{
    Access, OnDevice, Payload, add_in_order, gather_with, owned_values, scatter_with,
};
use super::transport::{InProcess, Ranks, Transport};

type Result<T> = std::result::Result<T, PipelineError>;

/// How long the last rank to finish waits for the others' goodbyes.
const CLOSE_WITHIN: Duration = Duration::from_secs(60);

/// This process's rank of a plan of `replicas` x `stages` devices.
pub struct TcpRanks {
    mesh: Mesh,
    spec: RankSpec,
    replicas: u32,
    stages: u32,
}

impl TcpRanks {
    pub fn new(mesh: Mesh, spec: RankSpec, replicas: u32, stages: u32) -> Self {
        TcpRanks {
            mesh,
            spec,
            replicas,
            stages,
        }
    }

    /// Rank 0, which completes the checkpoints.
    fn is_first(&self) -> bool {
        self.spec.rank == 0
    }

    fn devices(&self) -> u32 {
        self.replicas * self.stages
    }

    fn rank_of(&self, device: u32) -> u32 {
        self.spec.rank_of(device, self.devices())
    }

    /// The other ranks that run a replica of `stage`, each with those replicas in order.
    fn others_of_stage(&self, stage: u32) -> BTreeMap<u32, Vec<u32>> {
        let mut others: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for replica in 0..self.replicas {
            let rank = self.rank_of(replica * self.stages + stage);
            if rank != self.spec.rank {
                others.entry(rank).or_default().push(replica);
            }
        }
        others
    }
}

impl<E: Engine + Send + 'static> Ranks<E> for TcpRanks {
    fn local(&self) -> Range<u32> {
        self.spec.devices_of(self.spec.rank, self.devices())
    }

    fn commits_checkpoints(&self) -> bool {
        self.is_first()
    }

    fn transport<'a>(&'a self, step: u64, local: InProcess<E>) -> Box<dyn Transport<E> + 'a> {
        Box::new(OverTcp {
            ranks: self,
            local,
            step,
        })
    }

    fn shard(&self) -> Shard {
        Shard {
            index: self.spec.rank,
            count: self.mesh.ranks(),
        }
    }

    fn staging(&self, step: u64, named: Option<&str>) -> Result<String> {
        if let Some(name) = named {
            let frame = Frame::Checkpoint {
                step,
                staging: name.to_string(),
            };
            self.mesh.send_to_others(&frame)?;
            return Ok(name.to_string());
        }
        self.mesh
            .wait(|inbox| inbox.checkpoints.remove(&step), &|| false)?
            .ok_or(PipelineError::Aborted)
    }

    fn send_state_shard(
        &self,
        step: u64,
        (stage, chunk, replica): (u32, u32, u32),
        devices: &[u32],
        values: ReplicaGrads,
    ) -> Result<()> {
        let ranks: BTreeSet<u32> = (devices.iter())
            .map(|&d| self.rank_of(d))
            .filter(|&r| r != self.spec.rank)
            .collect();
        let frame = Frame::Reduce {
            step,
            stage,
            chunk,
            replica,
            what: Collective::OptimizerState,
            grads: values,
        };
        for rank in ranks {
            self.mesh.send(rank, &frame)?;
        }
        Ok(())
    }

    fn take_state_shard(
        &self,
        step: u64,
        (stage, chunk, replica): (u32, u32, u32),
    ) -> Result<ReplicaGrads> {
        let key = (step, stage, chunk, replica, Collective::OptimizerState);
        self.mesh
            .wait(|inbox| inbox.reductions.remove(&key), &|| false)?
            .ok_or(PipelineError::Aborted)
    }

    fn written(&self, step: u64, within: Duration) -> Result<()> {
        if !self.is_first() {
            return Ok(self.mesh.send(0, &Frame::Written { step })?);
        }
        let deadline = Instant::now() + within;
        for peer in 1..self.mesh.ranks() {
            let late = || Instant::now() > deadline;
            if self
                .mesh
                .wait(
                    |inbox| inbox.written.remove(&(step, peer)).then_some(()),
                    &late,
                )?
                .is_none()
            {
                return Err(PipelineError::ShardLate {
                    rank: peer,
                    step,
                    secs: within.as_secs(),
                });
            }
        }
        Ok(())
    }

    fn close(&self) -> Result<()> {
        Ok(self.mesh.close(CLOSE_WITHIN)?)
    }

    fn abort(&self, reason: &str) {
        self.mesh.abort(reason);
    }
}

/// One step's transport over the mesh.
struct OverTcp<'a, E: Engine> {
    ranks: &'a TcpRanks,
    local: InProcess<E>,
    step: u64,
}

impl<E: Engine> OverTcp<'_, E> {
    /// Waits on the mesh for what `take` finds; stops when a device here failed.
    fn wait<T>(
        &self,
        take: impl FnMut(&mut crate::exec::transport::mesh::Inbox) -> Option<T>,
    ) -> Result<T> {
        self.ranks
            .mesh
            .wait(take, &|| self.local.aborted())?
            .ok_or(PipelineError::Aborted)
    }

    /// What every replica of (stage, chunk) that runs in another process sent for `what`,
    /// by replica.
    fn take_remote(
        &self,
        (stage, chunk): (u32, u32),
        local: &[u32],
        what: Collective,
    ) -> Result<BTreeMap<u32, ReplicaGrads>> {
        let mut remote = BTreeMap::new();
        for replica in (0..self.ranks.replicas).filter(|r| !local.contains(r)) {
            let key = (self.step, stage, chunk, replica, what);
            remote.insert(replica, self.wait(|inbox| inbox.reductions.remove(&key))?);
        }
        Ok(remote)
    }

    /// Sends `seat`'s values of `chunk` for `what` to every other rank running a replica of
    /// its stage: `values` of those replicas (in order).
    fn send_to_others(
        &self,
        seat: Seat,
        chunk: u32,
        what: Collective,
        values: impl Fn(&[u32]) -> Result<ReplicaGrads>,
    ) -> Result<()> {
        for (rank, replicas) in self.ranks.others_of_stage(seat.stage) {
            let frame = Frame::Reduce {
                step: self.step,
                stage: seat.stage,
                chunk,
                replica: seat.replica,
                what,
                grads: values(&replicas)?,
            };
            self.ranks.mesh.send(rank, &frame)?;
        }
        Ok(())
    }

    /// As `take_remote`, each ready to be read.
    fn payloads(
        &self,
        at: (u32, u32),
        local: &[u32],
        what: Collective,
    ) -> Result<BTreeMap<u32, Payload>> {
        let remote = self.take_remote(at, local, what)?;
        Ok((remote.into_iter())
            .map(|(r, values)| (r, Payload::new(r, values)))
            .collect())
    }

    /// How this process reads and writes replica `replica`'s copies of `stage`'s tensors.
    fn access<'e>(&self, engine: &'e E, stage: u32, replica: u32) -> OnDevice<'e, E> {
        OnDevice {
            engine,
            device: replica * self.ranks.stages + stage,
        }
    }

    /// As `access`, for each of `local`'s replicas.
    fn accesses<'e>(&self, engine: &'e E, stage: u32, local: &[u32]) -> Vec<OnDevice<'e, E>> {
        (local.iter())
            .map(|&r| self.access(engine, stage, r))
            .collect()
    }

    /// What this process's replicas of `seat`'s stage do once met, where the engine links
    /// them to the other ranks' (`Engine::links_ranks`): the collective on those links, tensor
    /// by tensor (`shards` and `gather` as in `reduce_point::across_ranks`).
    fn on_links<'s>(
        &self,
        engine: &'s E,
        seat: Seat,
        shards: Option<&'s Shards>,
        gather: bool,
    ) -> impl FnOnce(&mut [ChunkGrads<E::Tensor>]) -> Result<()> + 's {
        let (device, local) = (
            seat.device(seat.stage),
            self.local.local_replicas(seat.stage),
        );
        move |here| {
            across_ranks(&local, here, shards, gather, |op, copies| {
                engine.across_ranks(device, op, &local, copies)
            })
        }
    }

    /// Every replica's copies of each gradient tensor of (stage, chunk): this process's in
    /// `here` (replicas `local`), the others' from the mesh; sums them in replica order into
    /// `here`'s copies.
    fn sum_with_remote(
        &self,
        engine: &E,
        (stage, chunk): (u32, u32),
        local: &[u32],
        here: &mut [ChunkGrads<E::Tensor>],
    ) -> Result<()> {
        let remote = self.take_remote((stage, chunk), local, Collective::Sum)?;
        let Some(first) = here.first() else {
            return Ok(());
        };
        let shape: Vec<Vec<usize>> = (first.iter())
            .map(|part| part.iter().map(|t| engine.len(t)).collect())
            .collect();
        let differs = |r: &u32, sizes: Vec<Vec<usize>>| {
            PipelineError::Reduction(format!(
                "replica {r} of device {stage}, chunk {chunk} holds gradients of sizes \
                 {sizes:?} where this rank's are {shape:?}"
            ))
        };
        for (r, grads) in &remote {
            let sizes: Vec<Vec<usize>> = grads
                .iter()
                .map(|p| p.iter().map(Vec::len).collect())
                .collect();
            if sizes != shape {
                return Err(differs(r, sizes));
            }
        }
        let access = self.accesses(engine, stage, local);
        for (part, lens) in shape.iter().enumerate() {
            for (tensor, &len) in lens.iter().enumerate() {
                let mut sum: Vec<f32> = Vec::with_capacity(len);
                for replica in 0..self.ranks.replicas {
                    let copy = match local.iter().position(|&l| l == replica) {
                        Some(j) => access[j].read(&here[j][part][tensor], 0..len)?,
                        None => match remote.get(&replica) {
                            Some(grads) => Cow::Borrowed(&grads[part][tensor][..]),
                            None => {
                                return Err(PipelineError::Reduction(format!(
                                    "replica {replica} is missing"
                                )));
                            }
                        },
                    };
                    add_in_order(&mut sum, replica, &copy);
                }
                for (j, copies) in here.iter_mut().enumerate() {
                    access[j].write(&mut copies[part][tensor], 0..len, &sum)?;
                }
            }
        }
        Ok(())
    }
}

impl<E: Engine> Transport<E> for OverTcp<'_, E> {
    fn send(
        &self,
        engine: &E,
        from: u32,
        to: u32,
        key: MessageKey,
        tensor: E::Tensor,
    ) -> Result<()> {
        if self.local.is_local(to) {
            return self.local.send(engine, from, to, key, tensor);
        }
        let frame = Frame::Tensor {
            step: self.step,
            to,
            key,
            tensor: engine.wire_out(from, tensor)?,
        };
        Ok(self.ranks.mesh.send(self.ranks.rank_of(to), &frame)?)
    }

    fn receive(
        &self,
        engine: &E,
        from: u32,
        at: u32,
        key: MessageKey,
        pool: &PoolRef,
    ) -> Result<E::Tensor> {
        if self.local.is_local(from) {
            return self.local.receive(engine, from, at, key, pool);
        }
        let tensor = self.wait(|inbox| inbox.tensors.remove(&(self.step, at, key)))?;
        engine.wire_in(at, tensor, pool)
    }

    fn reduce(
        &self,
        engine: &E,
        seat: Seat,
        chunk: u32,
        grads: ChunkGrads<E::Tensor>,
    ) -> (ChunkGrads<E::Tensor>, Result<()>) {
        if engine.links_ranks(seat.stage) {
            let linked = self.on_links(engine, seat, None, false);
            return self.local.reduce_here(seat, chunk, grads, linked);
        }
        let local = self.local.local_replicas(seat.stage);
        let mine = self.access(engine, seat.stage, seat.replica);
        let whole = |_: &[u32]| {
            (grads.iter())
                .map(|p| {
                    (p.iter())
                        .map(|t| Ok(mine.read(t, 0..engine.len(t))?.into_owned()))
                        .collect()
                })
                .collect()
        };
        if let Err(e) = self.send_to_others(seat, chunk, Collective::Sum, whole) {
            return (grads, Err(e));
        }
        self.local.reduce_here(seat, chunk, grads, |here| {
            self.sum_with_remote(engine, (seat.stage, chunk), &local, here)
        })
    }

    fn reduce_scatter(
        &self,
        engine: &E,
        seat: Seat,
        chunk: u32,
        grads: ChunkGrads<E::Tensor>,
        shards: &Shards,
    ) -> (ChunkGrads<E::Tensor>, Result<()>) {
        if engine.links_ranks(seat.stage) {
            let linked = self.on_links(engine, seat, Some(shards), false);
            return self.local.scatter_here(seat, chunk, grads, linked);
        }
        // To each other rank, this replica's gradients over what its replicas own.
        let mine = self.access(engine, seat.stage, seat.replica);
        let theirs = |owners: &[u32]| owned_values(&mine, &grads, shards, owners);
        if let Err(e) = self.send_to_others(seat, chunk, Collective::Scatter, theirs) {
            return (grads, Err(e));
        }
        let local = self.local.local_replicas(seat.stage);
        self.local.scatter_here(seat, chunk, grads, |here| {
            let mut remote = self.payloads((seat.stage, chunk), &local, Collective::Scatter)?;
            let access = self.accesses(engine, seat.stage, &local);
            scatter_with(&access, here, &local, &mut remote, shards)
        })
    }

    fn all_gather(
        &self,
        engine: &E,
        seat: Seat,
        chunk: u32,
        weights: ChunkGrads<E::Tensor>,
        shards: &Shards,
    ) -> (ChunkGrads<E::Tensor>, Result<()>) {
        if engine.links_ranks(seat.stage) {
            let linked = self.on_links(engine, seat, Some(shards), true);
            return self.local.gather_here(seat, chunk, weights, linked);
        }
        // To each other rank, what this replica owns of its updated weights.
        let mine = self.access(engine, seat.stage, seat.replica);
        let owned = |_: &[u32]| owned_values(&mine, &weights, shards, &[seat.replica]);
        if let Err(e) = self.send_to_others(seat, chunk, Collective::Gather, owned) {
            return (weights, Err(e));
        }
        let local = self.local.local_replicas(seat.stage);
        self.local.gather_here(seat, chunk, weights, |here| {
            let mut remote = self.payloads((seat.stage, chunk), &local, Collective::Gather)?;
            let access = self.accesses(engine, seat.stage, &local);
            gather_with(&access, here, &local, &mut remote, shards)
        })
    }

    fn meet(&self, squares: Vec<PartSquares>, losses: Vec<(u32, f64)>) -> Result<StepTotals> {
        self.local.meet_here(squares, losses, |(squares, losses)| {
            let mesh = &self.ranks.mesh;
            let frame = Frame::Meet {
                step: self.step,
                squares: squares.iter().map(|s| (s.part, s.sum_of_squares)).collect(),
                losses: losses.clone(),
            };
            mesh.send_to_others(&frame)?;
            let mut theirs = Shares::default();
            for peer in (0..mesh.ranks()).filter(|&p| p != mesh.rank()) {
                let (squares, losses) =
                    self.wait(|inbox| inbox.meets.remove(&(self.step, peer)))?;
                theirs.0.extend(
                    squares
                        .into_iter()
                        .map(|(part, sum_of_squares)| PartSquares {
                            part,
                            sum_of_squares,
                        }),
                );
                theirs.1.extend(losses);
            }
            Ok(theirs)
        })
    }

    fn abort(&self, cause: &PipelineError) {
        Transport::abort(&self.local, cause);
        self.ranks.mesh.wake();
        // A peer's own failure (or the step being stopped) is not news to the other ranks.
        if !matches!(cause, PipelineError::Aborted | PipelineError::Transport(_)) {
            self.ranks.mesh.abort(&cause.to_string());
        }
    }
}
