//! How a step's devices hand each other tensors and meet: one trait, [`Transport`], that the
//! device threads call for every send, receive, replica reduction (`AR<c>`) and the step's
//! meeting point, whatever carries them. [`InProcess`] is the hand-over between device
//! threads of one process (a CPU tensor's buffer changes hands, a GPU engine's `send` and
//! `receive` make the device copy between stages); `tcp_ranks` carries the same calls to the
//! devices of other processes. A transport between GPUs of several processes (NCCL's
//! send/receive and all-reduce on the reduction's fixed order) would be one more
//! implementation of the same five calls.

use std::ops::Range;

use crate::exec::checkpoint::sharded::Shard;
use crate::exec::device::PoolRef;
use crate::exec::optim::clip::PartSquares;
use crate::exec::transport::MessageKey;
use crate::exec::transport::frame::ReplicaGrads;

use super::PipelineError;
use super::engine::Engine;
use super::mailbox::{Abort, Mailbox};
use super::reduce_point::{
    ChunkGrads, Place, ReducePoint, Shards, gather_shards, scatter_sums, sum_in_replica_order,
};
use super::seat::Seat;
use super::step_sync::{Shares, StepSync, StepTotals};

type Result<T> = std::result::Result<T, PipelineError>;

/// What a device thread asks of the links between devices during one step. Devices are
/// named by their run-wide index (replica by replica).
pub trait Transport<E: Engine>: Sync {
    /// Hands `tensor`, made on device `from`, to device `to` as the message `key`. Never
    /// waits for the receiver.
    fn send(
        &self,
        engine: &E,
        from: u32,
        to: u32,
        key: MessageKey,
        tensor: E::Tensor,
    ) -> Result<()>;

    /// Waits for message `key` from device `from` to device `at`, and makes it a tensor in
    /// `pool`.
    fn receive(
        &self,
        engine: &E,
        from: u32,
        at: u32,
        key: MessageKey,
        pool: &PoolRef,
    ) -> Result<E::Tensor>;

    /// Sums the gradients of `chunk` held by `seat`'s replica with every other replica's, in
    /// replica order, and gives them back summed (unsummed with the error when the step was
    /// stopped).
    fn reduce(
        &self,
        engine: &E,
        seat: Seat,
        chunk: u32,
        grads: ChunkGrads<E::Tensor>,
    ) -> (ChunkGrads<E::Tensor>, Result<()>);

    /// A sharded reduction (`RS<c>`): as `reduce`, but each replica's gradients come back
    /// holding the sum only over the elements it owns (`shards`, every replica's), zero
    /// elsewhere. Transports that cannot refuse it by name.
    fn reduce_scatter(
        &self,
        _engine: &E,
        _seat: Seat,
        _chunk: u32,
        grads: ChunkGrads<E::Tensor>,
        _shards: &Shards,
    ) -> (ChunkGrads<E::Tensor>, Result<()>) {
        (grads, Err(sharding_unsupported()))
    }

    /// `AG<c>`: each replica's `weights` of `chunk` come back with every other replica's
    /// owned elements (`shards`) copied in.
    fn all_gather(
        &self,
        _engine: &E,
        _seat: Seat,
        _chunk: u32,
        weights: ChunkGrads<E::Tensor>,
        _shards: &Shards,
    ) -> (ChunkGrads<E::Tensor>, Result<()>) {
        (weights, Err(sharding_unsupported()))
    }

    /// Posts a device's squared gradient norms and its heads' losses; every device gets the
    /// same totals.
    fn meet(&self, squares: Vec<PartSquares>, losses: Vec<(u32, f64)>) -> Result<StepTotals>;

    /// A device failed with `cause`: every device still waiting stops.
    fn abort(&self, cause: &PipelineError);
}

fn sharding_unsupported() -> PipelineError {
    PipelineError::Reduction(
        "parallelism.shard_optimizer: this transport reduces whole gradients only (run the \
         replicas in one process, or set shard_optimizer to false)"
            .into(),
    )
}

/// The devices of one process, as threads: mailboxes, the replicas' meeting points and the
/// step's meeting point, made new for each step.
pub struct InProcess<E: Engine> {
    mailboxes: Vec<Mailbox<E::Message>>,
    abort: Abort,
    sync: StepSync,
    reduce: ReducePoint<E::Tensor>,
    /// The meeting points of sharded reductions and of weight gatherings: their own, so a
    /// replica that moved on never meets another's earlier meeting of the same chunk.
    scatter: ReducePoint<E::Tensor>,
    gather: ReducePoint<E::Tensor>,
    /// Replicas and stages of the plan; `local` its devices that run in this process.
    replicas: u32,
    stages: u32,
    local: Range<u32>,
}

impl<E: Engine> InProcess<E> {
    /// For a plan of `replicas` x `stages` devices, of which `local` run here, each on its
    /// own thread.
    pub fn new(replicas: u32, stages: u32, local: Range<u32>) -> Self {
        let threads = local.len();
        Self::meeting(replicas, stages, local, threads)
    }

    /// As `new`, for one thread driving every device here (an evaluation): one meets.
    pub fn on_one_thread(replicas: u32, stages: u32, local: Range<u32>) -> Self {
        Self::meeting(replicas, stages, local, 1)
    }

    fn meeting(replicas: u32, stages: u32, local: Range<u32>, threads: usize) -> Self {
        InProcess {
            mailboxes: (0..replicas * stages).map(|_| Mailbox::default()).collect(),
            abort: Abort::default(),
            sync: StepSync::new(threads),
            reduce: ReducePoint::new(),
            scatter: ReducePoint::new(),
            gather: ReducePoint::new(),
            replicas,
            stages,
            local,
        }
    }

    pub fn is_local(&self, device: u32) -> bool {
        self.local.contains(&device)
    }

    pub fn aborted(&self) -> bool {
        self.abort.is_raised()
    }

    /// The replicas of `stage` that run here, in replica order.
    pub fn local_replicas(&self, stage: u32) -> Vec<u32> {
        (0..self.replicas)
            .filter(|r| self.is_local(r * self.stages + stage))
            .collect()
    }

    /// Reduces with the replicas of this process; `sum` gets their copies in replica order.
    pub fn reduce_here(
        &self,
        seat: Seat,
        chunk: u32,
        grads: ChunkGrads<E::Tensor>,
        sum: impl FnOnce(&mut [ChunkGrads<E::Tensor>]) -> Result<()>,
    ) -> (ChunkGrads<E::Tensor>, Result<()>) {
        self.meet_replicas(&self.reduce, seat, chunk, grads, sum)
    }

    /// As `reduce_here`, at the sharded reductions' meeting point (`RS<c>`).
    pub fn scatter_here(
        &self,
        seat: Seat,
        chunk: u32,
        grads: ChunkGrads<E::Tensor>,
        work: impl FnOnce(&mut [ChunkGrads<E::Tensor>]) -> Result<()>,
    ) -> (ChunkGrads<E::Tensor>, Result<()>) {
        self.meet_replicas(&self.scatter, seat, chunk, grads, work)
    }

    /// As `reduce_here`, at the weight gatherings' meeting point (`AG<c>`).
    pub fn gather_here(
        &self,
        seat: Seat,
        chunk: u32,
        weights: ChunkGrads<E::Tensor>,
        work: impl FnOnce(&mut [ChunkGrads<E::Tensor>]) -> Result<()>,
    ) -> (ChunkGrads<E::Tensor>, Result<()>) {
        self.meet_replicas(&self.gather, seat, chunk, weights, work)
    }

    /// Meets the replicas of this process at `point`; `work` gets their copies in replica
    /// order.
    fn meet_replicas(
        &self,
        point: &ReducePoint<E::Tensor>,
        seat: Seat,
        chunk: u32,
        tensors: ChunkGrads<E::Tensor>,
        work: impl FnOnce(&mut [ChunkGrads<E::Tensor>]) -> Result<()>,
    ) -> (ChunkGrads<E::Tensor>, Result<()>) {
        let here = self.local_replicas(seat.stage);
        let place = Place {
            replica: here.iter().position(|&r| r == seat.replica).unwrap_or(0),
            replicas: here.len(),
        };
        let key = (seat.stage, chunk);
        point.reduce(key, place, tensors, &self.abort, work)
    }

    /// Whether every replica of `stage` runs here (a sharded meeting needs them all).
    fn all_here(&self, stage: u32) -> bool {
        self.local_replicas(stage).len() == self.replicas as usize
    }

    /// Meets the devices of this process; the last in adds `others`' shares.
    pub fn meet_here(
        &self,
        squares: Vec<PartSquares>,
        losses: Vec<(u32, f64)>,
        others: impl FnOnce(&Shares) -> Result<Shares>,
    ) -> Result<StepTotals> {
        self.sync.meet(squares, losses, &self.abort, others)
    }
}

impl<E: Engine> Transport<E> for InProcess<E> {
    fn send(
        &self,
        engine: &E,
        from: u32,
        to: u32,
        key: MessageKey,
        tensor: E::Tensor,
    ) -> Result<()> {
        let mailbox = self
            .mailboxes
            .get(to as usize)
            .ok_or(PipelineError::NoSuchDevice { device: to })?;
        mailbox.post(key, engine.send(from, tensor)?);
        Ok(())
    }

    fn receive(
        &self,
        engine: &E,
        _from: u32,
        at: u32,
        key: MessageKey,
        pool: &PoolRef,
    ) -> Result<E::Tensor> {
        let mailbox = self
            .mailboxes
            .get(at as usize)
            .ok_or(PipelineError::NoSuchDevice { device: at })?;
        let message = mailbox
            .take(key, &self.abort)
            .ok_or(PipelineError::Aborted)?;
        engine.receive(at, message, pool)
    }

    fn reduce(
        &self,
        engine: &E,
        seat: Seat,
        chunk: u32,
        grads: ChunkGrads<E::Tensor>,
    ) -> (ChunkGrads<E::Tensor>, Result<()>) {
        let device = seat.device(seat.stage);
        self.reduce_here(seat, chunk, grads, |all| {
            sum_in_replica_order(engine, device, all)
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
        if !self.all_here(seat.stage) {
            return (grads, Err(sharding_unsupported()));
        }
        let device = seat.device(seat.stage);
        self.scatter_here(seat, chunk, grads, |all| {
            scatter_sums(engine, device, all, shards)
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
        if !self.all_here(seat.stage) {
            return (weights, Err(sharding_unsupported()));
        }
        let device = seat.device(seat.stage);
        self.gather_here(seat, chunk, weights, |all| {
            gather_shards(engine, device, all, shards)
        })
    }

    fn meet(&self, squares: Vec<PartSquares>, losses: Vec<(u32, f64)>) -> Result<StepTotals> {
        self.meet_here(squares, losses, |_| Ok(Shares::default()))
    }

    fn abort(&self, _cause: &PipelineError) {
        self.abort.raise(&self.mailboxes);
        self.sync.wake();
        self.reduce.wake();
        self.scatter.wake();
        self.gather.wake();
    }
}

/// A pipeline spread over processes ("ranks"): which of the plan's devices run here and how
/// the others are reached.
pub trait Ranks<E: Engine>: Send + Sync {
    /// The run-wide devices this process runs.
    fn local(&self) -> Range<u32>;

    /// Whether this process completes the run's checkpoints (rank 0 does); every rank writes
    /// its own shard of them.
    fn commits_checkpoints(&self) -> bool;

    /// This process's shard of a checkpoint: its rank of the ranks.
    fn shard(&self) -> Shard;

    /// Step `step`'s transport: `local` for this process's devices, links for the others.
    fn transport<'a>(&'a self, step: u64, local: InProcess<E>) -> Box<dyn Transport<E> + 'a>;

    /// The staging directory of the checkpoint after `step`: rank 0 names it (`named`) and
    /// tells every other rank, which wait for that name (`None`).
    fn staging(&self, step: u64, named: Option<&str>) -> Result<String>;

    /// Sends replica `replica`'s shard of the optimizer state of (stage, chunk), `values`, for
    /// the checkpoint after `step`, to the processes running `devices` (once to each).
    fn send_state_shard(
        &self,
        step: u64,
        at: (u32, u32, u32),
        devices: &[u32],
        values: ReplicaGrads,
    ) -> Result<()>;

    /// Waits for what `send_state_shard` sent of replica `replica`'s shard of (stage, chunk)
    /// for the checkpoint after `step`.
    fn take_state_shard(&self, step: u64, at: (u32, u32, u32)) -> Result<ReplicaGrads>;

    /// This rank's shard of the checkpoint after `step` is written: every other rank tells
    /// rank 0, which waits (up to `within`) until every one of them has.
    fn written(&self, step: u64, within: std::time::Duration) -> Result<()>;

    /// The run is over here: says so to the other ranks and waits for theirs.
    fn close(&self) -> Result<()>;

    /// This process stopped with `reason` outside a step: the other ranks stop too.
    fn abort(&self, reason: &str);
}
