//! Where the replicas of one device that run in this process meet to reduce a chunk's
//! gradients (`AR<c>`): each hands its gradient tensors over (no copy, so no memory is
//! added), the last to arrive sums every tensor's copies in replica order (replica 0 + 1 + 2
//! ...) into each copy (with the other processes' copies, when the run is spread over ranks),
//! and each replica takes its own back. The order does not depend on which thread arrives
//! first, so a data-parallel run repeats bit for bit. Sharded optimizer state (ZeRO-1) meets
//! the same way twice: a reduce-scatter sums each replica's shard in the same replica order
//! into that replica's copy, and an all-gather copies each replica's updated shard of the
//! weights into the others'.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Condvar, Mutex};

use super::PipelineError;
use super::engine::{AcrossRanks, Engine};
use super::mailbox::Abort;

/// One replica's gradients of a chunk: per part, its gradient tensors.
pub type ChunkGrads<T> = Vec<Vec<T>>;

/// Per replica (in replica order), the elements of a chunk it owns: (part, tensor, range in
/// the tensor), from `plan::reduction::shard`.
pub type Shards = Vec<Vec<(usize, usize, Range<usize>)>>;

/// One tensor's owned elements: (owner replica, range in the tensor), in replica order.
type Owned = Vec<(usize, Range<usize>)>;

struct Slot<T> {
    posted: Vec<Option<ChunkGrads<T>>>,
    arrived: usize,
    /// Set by the summing replica: `Some(Ok)` once every copy holds the sum.
    outcome: Option<Result<(), String>>,
    taken: usize,
}

/// The step's meeting points, one per (device of a replica, chunk).
pub struct ReducePoint<T> {
    slots: Mutex<HashMap<(u32, u32), Slot<T>>>,
    changed: Condvar,
}

/// Which of the meeting's places a replica takes: `replica` of `replicas` that meet here.
#[derive(Debug, Clone, Copy)]
pub struct Place {
    pub replica: usize,
    pub replicas: usize,
}

impl<T> Default for ReducePoint<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> ReducePoint<T> {
    pub fn new() -> Self {
        ReducePoint {
            slots: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
        }
    }

    /// Reduces `grads` (those of the replica at `place`, of `chunk` on `device` of its
    /// replica) with the other replicas' and gives them back summed, with `Ok`. The last to
    /// arrive sums with `sum`, given every copy here in replica order. When another device
    /// failed before every replica arrived they come back unsummed, with `Err(Aborted)`.
    pub fn reduce(
        &self,
        (device, chunk): (u32, u32),
        place: Place,
        grads: ChunkGrads<T>,
        abort: &Abort,
        sum: impl FnOnce(&mut [ChunkGrads<T>]) -> Result<(), PipelineError>,
    ) -> (ChunkGrads<T>, Result<(), PipelineError>) {
        let Place { replica, replicas } = place;
        let key = (device, chunk);
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots.entry(key).or_insert_with(|| Slot {
            posted: (0..replicas).map(|_| None).collect(),
            arrived: 0,
            outcome: None,
            taken: 0,
        });
        slot.posted[replica] = Some(grads);
        slot.arrived += 1;
        if slot.arrived == replicas {
            let mut all: Vec<ChunkGrads<T>> =
                slot.posted.iter_mut().filter_map(Option::take).collect();
            drop(slots);
            let outcome = sum(&mut all);
            slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = slots.get_mut(&key) {
                for (place, grads) in slot.posted.iter_mut().zip(all) {
                    *place = Some(grads);
                }
                slot.outcome = Some(outcome.map_err(|e| e.to_string()));
            }
            self.changed.notify_all();
        }
        loop {
            let Some(slot) = slots.get_mut(&key) else {
                return (Vec::new(), Err(PipelineError::Aborted));
            };
            if let Some(outcome) = slot.outcome.clone() {
                let mine = slot.posted[replica].take().unwrap_or_default();
                slot.taken += 1;
                if slot.taken == replicas {
                    slots.remove(&key);
                }
                return (mine, outcome.map_err(PipelineError::Reduction));
            }
            // Until every replica is in, nobody sums: leaving takes our own gradients back.
            if abort.is_raised() && slot.arrived < replicas {
                let mine = slot.posted[replica].take().unwrap_or_default();
                slot.arrived -= 1;
                return (mine, Err(PipelineError::Aborted));
            }
            slots = self.changed.wait(slots).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Wakes replicas waiting in `reduce` after an abort.
    pub fn wake(&self) {
        let _guard = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        self.changed.notify_all();
    }
}

/// Sums each gradient tensor's copies in replica order into every copy.
pub fn sum_in_replica_order<E: Engine>(
    engine: &E,
    device: u32,
    all: &mut [ChunkGrads<E::Tensor>],
) -> Result<(), PipelineError> {
    let shape = common_shape(all)?;
    for (part, &tensors) in shape.iter().enumerate() {
        for tensor in 0..tensors {
            let mut copies: Vec<&mut E::Tensor> =
                all.iter_mut().map(|r| &mut r[part][tensor]).collect();
            engine.sum_replicas(device, &mut copies)?;
        }
    }
    Ok(())
}

/// `RS<c>`: sums each replica's owned elements over every copy in replica order (as
/// `sum_in_replica_order` does, so the same bits) into that replica's copy, and zeroes them in
/// the others' (their next step accumulates from zero), tensor by tensor on the engine.
pub fn scatter_sums<E: Engine>(
    engine: &E,
    device: u32,
    all: &mut [ChunkGrads<E::Tensor>],
    shards: &Shards,
) -> Result<(), PipelineError> {
    check_shards(all, shards)?;
    for ((part, tensor), owned) in by_tensor(shards) {
        let mut copies: Vec<&mut E::Tensor> =
            all.iter_mut().map(|r| &mut r[part][tensor]).collect();
        engine.scatter_ranges(device, &mut copies, &owned)?;
    }
    Ok(())
}

/// `AG<c>`: copies each replica's owned elements of the weights into every other copy.
pub fn gather_shards<E: Engine>(
    engine: &E,
    device: u32,
    all: &mut [ChunkGrads<E::Tensor>],
    shards: &Shards,
) -> Result<(), PipelineError> {
    check_shards(all, shards)?;
    for ((part, tensor), owned) in by_tensor(shards) {
        let mut copies: Vec<&mut E::Tensor> =
            all.iter_mut().map(|r| &mut r[part][tensor]).collect();
        engine.gather_ranges(device, &mut copies, &owned)?;
    }
    Ok(())
}

/// A replica collective over the engine's own links between processes
/// (`Engine::across_ranks`), tensor by tensor: `here` holds this process's replicas'
/// (`local`) copies of the chunk; `shards` (every replica's) for a sharded reduction
/// (`gather` false) or a gathering (`gather` true), none for a whole sum. `each` runs the
/// collective on one tensor's copies.
pub fn across_ranks<T>(
    local: &[u32],
    here: &mut [ChunkGrads<T>],
    shards: Option<&Shards>,
    gather: bool,
    mut each: impl FnMut(AcrossRanks, &mut [&mut T]) -> Result<(), PipelineError>,
) -> Result<(), PipelineError> {
    if here.len() != local.len() {
        return Err(PipelineError::Reduction(format!(
            "{} copies of the chunk met for replicas {local:?}",
            here.len()
        )));
    }
    let shape = common_shape(here)?;
    let tensors: Vec<((usize, usize), Owned)> = match shards {
        None => (shape.iter().enumerate())
            .flat_map(|(part, &n)| (0..n).map(move |t| ((part, t), Vec::new())))
            .collect(),
        Some(shards) => by_tensor(shards).into_iter().collect(),
    };
    for ((part, tensor), owned) in &tensors {
        if shape.get(*part).is_none_or(|&n| *tensor >= n) {
            return Err(PipelineError::Reduction(format!(
                "the shards name tensor {tensor} of part {part}, which the chunk does not hold"
            )));
        }
        let op = match (shards, gather) {
            (None, _) => AcrossRanks::Sum,
            (Some(_), false) => AcrossRanks::Scatter(owned),
            (Some(_), true) => AcrossRanks::Gather(owned),
        };
        let mut copies: Vec<&mut T> = here.iter_mut().map(|r| &mut r[*part][*tensor]).collect();
        each(op, &mut copies)?;
    }
    Ok(())
}

/// How many tensors each part of the chunk has, the same in every copy (or an error).
fn common_shape<T>(all: &[ChunkGrads<T>]) -> Result<Vec<usize>, PipelineError> {
    let shape: Vec<usize> = all
        .first()
        .map_or(vec![], |r| r.iter().map(Vec::len).collect());
    if all
        .iter()
        .any(|r| r.iter().map(Vec::len).ne(shape.iter().copied()))
    {
        return Err(PipelineError::Reduction(
            "the replicas hold different parts of the chunk".into(),
        ));
    }
    Ok(shape)
}

/// The shards per tensor: by (part, tensor), the (owner, range) in it, in replica order.
fn by_tensor(shards: &Shards) -> BTreeMap<(usize, usize), Owned> {
    let mut out: BTreeMap<(usize, usize), Owned> = BTreeMap::new();
    for (owner, owned) in shards.iter().enumerate() {
        for (part, tensor, range) in owned {
            let ranges = out.entry((*part, *tensor)).or_default();
            ranges.push((owner, range.clone()));
        }
    }
    out
}

/// Every replica met, and each owned place exists in every copy.
fn check_shards<T>(all: &[ChunkGrads<T>], shards: &Shards) -> Result<(), PipelineError> {
    if all.len() != shards.len() {
        return Err(PipelineError::Reduction(format!(
            "{} replicas met where the shards are {}'s",
            all.len(),
            shards.len()
        )));
    }
    let missing = shards.iter().flatten().any(|(part, tensor, _)| {
        all.iter()
            .any(|copy| copy.get(*part).is_none_or(|p| p.get(*tensor).is_none()))
    });
    if missing {
        return Err(PipelineError::Reduction(
            "the replicas hold different parts of the chunk".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::exec::backend::CpuBackend;
    use crate::exec::device::{MemGroup, Pool};
    use crate::exec::pipeline::engine::CpuEngine;
    use crate::exec::tensor::Tensor;

    /// Three replicas' copies of a chunk of two tensors (5 and 4 elements) whose values do
    /// not add exactly in f32, so any other order of the sum shows.
    pub(in crate::exec::pipeline) fn copies() -> Vec<ChunkGrads<Tensor>> {
        let pool = Pool::new("test", 1 << 20);
        (0..3)
            .map(|r| {
                let tensor = |len: usize, salt: f32| {
                    let data = (0..len)
                        .map(|i| (1.0 + 0.1 * i as f32 + salt) * 10f32.powi(r * 3 - 3))
                        .collect();
                    Tensor::from_data(&pool, "g", &[len], data, MemGroup::Gradients).unwrap()
                };
                vec![vec![tensor(5, 0.3), tensor(4, 0.7)]]
            })
            .collect()
    }

    #[test]
    fn scattered_sums_are_the_whole_sums_bits_and_gathering_copies_the_owned_ranges() {
        let engine = CpuEngine {
            backend: CpuBackend::default(),
        };
        let mut whole = copies();
        sum_in_replica_order(&engine, 0, &mut whole).unwrap();
        // 9 elements over 3 replicas: 0..3 of the first tensor, 3..5 and 0..1, 1..4.
        let shards: Shards = vec![
            vec![(0, 0, 0..3)],
            vec![(0, 0, 3..5), (0, 1, 0..1)],
            vec![(0, 1, 1..4)],
        ];
        let mut scattered = copies();
        scatter_sums(&engine, 0, &mut scattered, &shards).unwrap();
        for (owner, owned) in shards.iter().enumerate() {
            for (part, tensor, range) in owned {
                for (r, copy) in scattered.iter().enumerate() {
                    let got = &copy[*part][*tensor].data()[range.clone()];
                    if r == owner {
                        let want = &whole[0][*part][*tensor].data()[range.clone()];
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(got), bits(want), "replica {r} {range:?}");
                    } else {
                        assert!(got.iter().all(|&x| x == 0.0), "replica {r} {range:?}");
                    }
                }
            }
        }
        // Each replica's owned elements, gathered, are everybody's: the whole sums.
        gather_shards(&engine, 0, &mut scattered, &shards).unwrap();
        for copy in &scattered {
            for (got, want) in copy[0].iter().zip(&whole[0][0]) {
                assert_eq!(got.data(), want.data());
            }
        }
        let wrong: Shards = vec![vec![(0, 0, 0..6)], vec![], vec![]];
        let err = scatter_sums(&engine, 0, &mut scattered, &wrong).unwrap_err();
        assert!(
            err.to_string().contains("cannot own elements 0..6"),
            "{err}"
        );
    }

    /// What an engine linking processes is asked: this process's copies of each tensor
    /// (replicas 0 and 2 of 3 here), with every replica's owned ranges of that tensor.
    #[test]
    fn across_ranks_hands_each_tensors_local_copies_with_its_owners() {
        let mut here: Vec<ChunkGrads<Tensor>> = copies().into_iter().step_by(2).collect();
        let mut asked = Vec::new();
        let mut record = |op: AcrossRanks, copies: &mut [&mut Tensor]| {
            let lens: Vec<usize> = copies.iter().map(|c| c.data().len()).collect();
            asked.push(format!("{op:?} {lens:?}"));
            Ok(())
        };
        across_ranks(&[0, 2], &mut here, None, false, &mut record).unwrap();
        let shards: Shards = vec![
            vec![(0, 0, 0..3)],
            vec![(0, 0, 3..5), (0, 1, 0..1)],
            vec![(0, 1, 1..4)],
        ];
        across_ranks(&[0, 2], &mut here, Some(&shards), true, &mut record).unwrap();
        assert_eq!(
            asked,
            [
                "Sum [5, 5]",
                "Sum [4, 4]",
                "Gather([(0, 0..3), (1, 3..5)]) [5, 5]",
                "Gather([(1, 0..1), (2, 1..4)]) [4, 4]",
            ]
        );
        let none = |_: AcrossRanks, _: &mut [&mut Tensor]| Ok(());
        let err = across_ranks(&[0], &mut here, None, false, none).unwrap_err();
        assert!(
            err.to_string()
                .contains("2 copies of the chunk met for replicas [0]"),
            "{err}"
        );
        let beyond: Shards = vec![vec![(0, 2, 0..1)], vec![], vec![]];
        let err = across_ranks(&[0, 2], &mut here, Some(&beyond), false, none);
        assert!(err.unwrap_err().to_string().contains("tensor 2 of part 0"));
    }
}
