//! Where the replicas of one device meet to reduce a chunk's gradients (`AR<c>`): each hands
//! its gradient tensors over (no copy, so no memory is added), the last to arrive sums every
//! tensor's copies in replica order (replica 0 + 1 + 2 ...) into each copy, and each replica
//! takes its own back. The order does not depend on which thread arrives first, so a
//! data-parallel run repeats bit for bit.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};

use super::PipelineError;
use super::engine::Engine;
use super::mailbox::Abort;

/// One replica's gradients of a chunk: per part, its gradient tensors.
pub type ChunkGrads<T> = Vec<Vec<T>>;

struct Slot<T> {
    posted: Vec<Option<ChunkGrads<T>>>,
    arrived: usize,
    /// Set by the summing replica: `Some(Ok)` once every copy holds the sum.
    outcome: Option<Result<(), String>>,
    taken: usize,
}

/// The step's meeting points, one per (device of a replica, chunk).
pub struct ReducePoint<T> {
    replicas: usize,
    slots: Mutex<HashMap<(u32, u32), Slot<T>>>,
    changed: Condvar,
}

impl<T> ReducePoint<T> {
    pub fn new(replicas: usize) -> Self {
        ReducePoint {
            replicas,
            slots: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
        }
    }

    /// Reduces `grads` (replica `replica`'s, of `chunk` on `device` of its replica) with the
    /// other replicas' and gives them back summed, with `Ok`. When another device failed
    /// before every replica arrived they come back unsummed, with `Err(Aborted)`.
    pub fn reduce<E: Engine<Tensor = T>>(
        &self,
        engine: &E,
        (device, chunk): (u32, u32),
        replica: usize,
        grads: ChunkGrads<T>,
        abort: &Abort,
    ) -> (ChunkGrads<T>, Result<(), PipelineError>) {
        let key = (device, chunk);
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots.entry(key).or_insert_with(|| Slot {
            posted: (0..self.replicas).map(|_| None).collect(),
            arrived: 0,
            outcome: None,
            taken: 0,
        });
        slot.posted[replica] = Some(grads);
        slot.arrived += 1;
        if slot.arrived == self.replicas {
            let mut all: Vec<ChunkGrads<T>> =
                slot.posted.iter_mut().filter_map(Option::take).collect();
            drop(slots);
            let outcome = sum_in_replica_order(engine, device, &mut all);
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
                if slot.taken == self.replicas {
                    slots.remove(&key);
                }
                return (mine, outcome.map_err(PipelineError::Reduction));
            }
            // Until every replica is in, nobody sums: leaving takes our own gradients back.
            if abort.is_raised() && slot.arrived < self.replicas {
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
fn sum_in_replica_order<E: Engine>(
    engine: &E,
    device: u32,
    all: &mut [ChunkGrads<E::Tensor>],
) -> Result<(), PipelineError> {
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
    for (part, &tensors) in shape.iter().enumerate() {
        for tensor in 0..tensors {
            let mut copies: Vec<&mut E::Tensor> =
                all.iter_mut().map(|r| &mut r[part][tensor]).collect();
            engine.sum_replicas(device, &mut copies)?;
        }
    }
    Ok(())
}
