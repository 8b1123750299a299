//! Sharded optimizer state (ZeRO-1) between ranks: what one replica sends of
//! a chunk (the elements some replicas own, owner by owner, each owner's ranges in shard
//! order) and how a process combines the other processes' payloads with its own replicas'
//! copies, read and written through an [`Access`] (the engine's, so GPU tensors are staged
//! through host memory). Sums run in replica order and copies are exact, so a sharded run over ranks keeps
//! the bits of one process (`reduce_point::scatter_sums`, `gather_shards`).
//!
//! The same payloads carry a replica's shard of a chunk's optimizer state to the rank that
//! writes the chunk's parts into a checkpoint: per part, the first moments' tensors, then
//! the second moments'.

use std::borrow::{Borrow, Cow};
use std::collections::BTreeMap;
use std::ops::Range;

use crate::exec::optim::PartOptimState;
use crate::exec::tensor::Tensor;
use crate::exec::transport::frame::ReplicaGrads;

use super::PipelineError;
use super::engine::{Engine, host_range, host_write};
use super::reduce_point::{ChunkGrads, Shards};

type Result<T> = std::result::Result<T, PipelineError>;

fn malformed(what: String) -> PipelineError {
    PipelineError::Reduction(what)
}

/// How a chunk's tensors are read and written: host tensors ([`Host`]), or an engine's on
/// one of its devices ([`OnDevice`]).
pub trait Access {
    type Tensor;
    /// Elements `range` of `t` (checked).
    fn read<'t>(&self, t: &'t Self::Tensor, range: Range<usize>) -> Result<Cow<'t, [f32]>>;
    /// Overwrites elements `range` of `t` (checked) with `src`.
    fn write(&self, t: &mut Self::Tensor, range: Range<usize>, src: &[f32]) -> Result<()>;
}

/// Host tensors (a checkpoint's optimizer state).
#[derive(Debug, Clone, Copy)]
pub struct Host;

/// The engine's tensors on one device.
pub struct OnDevice<'a, E> {
    pub engine: &'a E,
    pub device: u32,
}

impl Access for Host {
    type Tensor = Tensor;

    fn read<'t>(&self, t: &'t Tensor, range: Range<usize>) -> Result<Cow<'t, [f32]>> {
        host_range(t, range).map(Cow::Borrowed)
    }

    fn write(&self, t: &mut Tensor, range: Range<usize>, src: &[f32]) -> Result<()> {
        host_write(t, range, src)
    }
}

impl<E: Engine> Access for OnDevice<'_, E> {
    type Tensor = E::Tensor;

    fn read<'t>(&self, t: &'t E::Tensor, range: Range<usize>) -> Result<Cow<'t, [f32]>> {
        self.engine.values(self.device, t, range)
    }

    fn write(&self, t: &mut E::Tensor, range: Range<usize>, src: &[f32]) -> Result<()> {
        self.engine.write(self.device, t, range, src)
    }
}

/// Elements `range` of tensor `(part, tensor)` of a chunk's `values`.
fn elements<'a, A: Access, T: Borrow<A::Tensor>>(
    access: &A,
    values: &'a ChunkGrads<T>,
    (part, tensor): (usize, usize),
    range: &Range<usize>,
) -> Result<Cow<'a, [f32]>>
where
    A::Tensor: 'a,
{
    let t = (values.get(part).and_then(|p| p.get(tensor)))
        .ok_or_else(|| malformed(format!("part {part} has no tensor {tensor}")))?;
    access.read(t.borrow(), range.clone())
}

/// Overwrites elements `range` of tensor `(part, tensor)` of a chunk's `values` with `src`.
fn write_elements<A: Access>(
    access: &A,
    values: &mut ChunkGrads<A::Tensor>,
    (part, tensor): (usize, usize),
    range: &Range<usize>,
    src: &[f32],
) -> Result<()> {
    let t = (values.get_mut(part).and_then(|p| p.get_mut(tensor)))
        .ok_or_else(|| malformed(format!("part {part} has no tensor {tensor}")))?;
    access.write(t, range.clone(), src)
}

/// `values`' elements that `owners` own (in the order given), per part and tensor.
pub fn owned_values<A: Access>(
    access: &A,
    values: &ChunkGrads<A::Tensor>,
    shards: &Shards,
    owners: &[u32],
) -> Result<ReplicaGrads> {
    let mut out = nothing_of(values);
    for &owner in owners {
        let owned = shards.get(owner as usize).map_or(&[][..], Vec::as_slice);
        take_owned(access, &mut out, values, owned)?;
    }
    Ok(out)
}

/// A payload of no elements, shaped as `values`.
fn nothing_of<T>(values: &ChunkGrads<T>) -> ReplicaGrads {
    values.iter().map(|p| vec![Vec::new(); p.len()]).collect()
}

/// Appends `values`' elements at `owned` to `out`, tensor by tensor, in `owned`'s order.
fn take_owned<A: Access, T: Borrow<A::Tensor>>(
    access: &A,
    out: &mut ReplicaGrads,
    values: &ChunkGrads<T>,
    owned: &[(usize, usize, Range<usize>)],
) -> Result<()> {
    for (part, tensor, range) in owned {
        let taken = elements(access, values, (*part, *tensor), range)?;
        out[*part][*tensor].extend_from_slice(&taken);
    }
    Ok(())
}

/// One replica's payload from another process, read in the order it was written.
pub struct Payload {
    replica: u32,
    values: ReplicaGrads,
    read: Vec<Vec<usize>>,
}

impl Payload {
    pub fn new(replica: u32, values: ReplicaGrads) -> Payload {
        let read = values.iter().map(|p| vec![0; p.len()]).collect();
        Payload {
            replica,
            values,
            read,
        }
    }

    /// The next `len` elements of tensor `(part, tensor)`.
    fn next(&mut self, (part, tensor): (usize, usize), len: usize) -> Result<&[f32]> {
        let replica = self.replica;
        let short = || {
            malformed(format!(
                "replica {replica}'s payload holds too few elements of part {part}, tensor \
                 {tensor}"
            ))
        };
        let at = (self.read.get_mut(part).and_then(|p| p.get_mut(tensor))).ok_or_else(short)?;
        let start = *at;
        *at += len;
        (self.values[part][tensor].get(start..start + len)).ok_or_else(short)
    }

    /// Every element was read: a longer payload is another plan's.
    fn finished(&self) -> Result<()> {
        let all_read =
            (self.values.iter().flatten().map(Vec::len)).eq(self.read.iter().flatten().copied());
        match all_read {
            true => Ok(()),
            false => Err(malformed(format!(
                "replica {}'s payload holds more elements than this process's shards",
                self.replica
            ))),
        }
    }
}

/// Adds replica `replica`'s copy to `sum`, the sum of the copies before it: replica 0's copy
/// starts it, the others add in replica order (the one-process order, so the same bits).
pub fn add_in_order(sum: &mut Vec<f32>, replica: u32, copy: &[f32]) {
    match replica {
        0 => sum.extend_from_slice(copy),
        _ => sum.iter_mut().zip(copy).for_each(|(s, c)| *s += *c),
    }
}

/// The payload of `replica`, from `remote`.
fn payload(remote: &mut BTreeMap<u32, Payload>, replica: u32) -> Result<&mut Payload> {
    (remote.get_mut(&replica)).ok_or_else(|| malformed(format!("replica {replica} is missing")))
}

/// `RS<c>` for this process's replicas `local` (their copies `here`, in replica order, each
/// read and written through `access[j]`), with the other replicas' payloads `remote` (each
/// the elements `local` own): each local owner's elements summed over every replica in
/// replica order into its copy, zero in the others.
pub fn scatter_with<A: Access>(
    access: &[A],
    here: &mut [ChunkGrads<A::Tensor>],
    local: &[u32],
    remote: &mut BTreeMap<u32, Payload>,
    shards: &Shards,
) -> Result<()> {
    let index = |r: u32| local.iter().position(|&l| l == r);
    let replicas = shards.len() as u32;
    for owner in 0..replicas {
        for (part, tensor, range) in &shards[owner as usize] {
            let at = (*part, *tensor);
            let mut sum: Vec<f32> = Vec::with_capacity(range.len());
            if index(owner).is_some() {
                for r in 0..replicas {
                    let copy = match index(r) {
                        Some(j) => elements(&access[j], &here[j], at, range)?,
                        None => Cow::Borrowed(payload(remote, r)?.next(at, range.len())?),
                    };
                    add_in_order(&mut sum, r, &copy);
                }
            }
            let zeros = vec![0.0; range.len()];
            for (j, copy) in here.iter_mut().enumerate() {
                let values = match index(owner) == Some(j) {
                    true => &sum,
                    false => &zeros,
                };
                write_elements(&access[j], copy, at, range, values)?;
            }
        }
    }
    remote.values().try_for_each(Payload::finished)
}

/// `AG<c>`: every owner's elements (its copy's here, or its payload's) into every other
/// copy `here` (each read and written through `access[j]`).
pub fn gather_with<A: Access>(
    access: &[A],
    here: &mut [ChunkGrads<A::Tensor>],
    local: &[u32],
    remote: &mut BTreeMap<u32, Payload>,
    shards: &Shards,
) -> Result<()> {
    let index = |r: u32| local.iter().position(|&l| l == r);
    for (owner, owned) in (0..).zip(shards) {
        for (part, tensor, range) in owned {
            let at = (*part, *tensor);
            let values = match index(owner) {
                Some(i) => elements(&access[i], &here[i], at, range)?.into_owned(),
                None => payload(remote, owner)?.next(at, range.len())?.to_vec(),
            };
            for (j, copy) in here.iter_mut().enumerate() {
                if index(owner) != Some(j) {
                    write_elements(&access[j], copy, at, range, &values)?;
                }
            }
        }
    }
    remote.values().try_for_each(Payload::finished)
}

/// A chunk's optimizer state (per part) as the two moments' tensors side by side.
fn moments(states: &[PartOptimState]) -> ChunkGrads<&Tensor> {
    (states.iter())
        .map(|s| s.exp_avg.iter().chain(&s.exp_avg_sq).collect())
        .collect()
}

/// `shards` of the parameters, as shards of `moments`' tensors: tensor `t` of a part with
/// `n` parameters is owned where `t` and `n + t` are.
fn moment_shards(
    shards: &[(usize, usize, Range<usize>)],
    states: &[PartOptimState],
) -> Vec<(usize, usize, Range<usize>)> {
    let second = (shards.iter()).map(|(part, tensor, range)| {
        let n = states.get(*part).map_or(0, |s| s.exp_avg.len());
        (*part, n + tensor, range.clone())
    });
    shards.iter().cloned().chain(second).collect()
}

/// The elements of `states` (a chunk's, of which this replica keeps `owned`) that travel to
/// the rank writing them into a checkpoint.
pub fn owned_state(
    states: &[PartOptimState],
    owned: &[(usize, usize, Range<usize>)],
) -> Result<ReplicaGrads> {
    let tensors = moments(states);
    let mut out = nothing_of(&tensors);
    take_owned(&Host, &mut out, &tensors, &moment_shards(owned, states))?;
    Ok(out)
}

/// Copies another replica's shard (`owned`, sent as `owned_state` wrote it) into `states`.
pub fn fill_state(
    states: &mut [PartOptimState],
    owned: &[(usize, usize, Range<usize>)],
    mut payload: Payload,
) -> Result<()> {
    for (part, tensor, range) in moment_shards(owned, states) {
        let values = payload.next((part, tensor), range.len())?;
        let state = states
            .get_mut(part)
            .ok_or_else(|| malformed(format!("no part {part}")))?;
        let n = state.exp_avg.len();
        let t = match tensor < n {
            true => state.exp_avg.get_mut(tensor),
            false => state.exp_avg_sq.get_mut(tensor - n),
        };
        let t =
            t.ok_or_else(|| malformed(format!("part {part} has no optimizer state {tensor}")))?;
        Host.write(t, range, values)?;
    }
    payload.finished()
}

#[cfg(test)]
mod tests;
