//! The one point where devices meet in a step: each posts the sums of squares of its
//! gradients and the summed loss of the micro-batches whose head it ran; all then read the
//! same global gradient norm and loss, combined in a fixed order so the result does not depend
//! on how the model is split.

use std::sync::{Condvar, Mutex};

use crate::exec::optim::clip::{PartSquares, global_norm};

use super::mailbox::Abort;

#[derive(Debug, Default)]
struct Posted {
    devices: usize,
    squares: Vec<PartSquares>,
    /// (micro-batch, summed loss).
    losses: Vec<(u32, f64)>,
}

/// What every device learns at the meeting point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTotals {
    pub grad_norm: f64,
    /// Summed cross-entropy of the step's tokens, added in micro-batch order.
    pub loss_sum: f64,
}

#[derive(Debug)]
pub struct StepSync {
    expected: usize,
    posted: Mutex<Posted>,
    all_in: Condvar,
}

impl StepSync {
    pub fn new(devices: usize) -> Self {
        StepSync {
            expected: devices,
            posted: Mutex::new(Posted::default()),
            all_in: Condvar::new(),
        }
    }

    /// Posts this device's share and waits for everyone's; `None` when the step was aborted.
    pub fn meet(
        &self,
        squares: Vec<PartSquares>,
        losses: Vec<(u32, f64)>,
        abort: &Abort,
    ) -> Option<StepTotals> {
        let mut posted = self.posted.lock().unwrap_or_else(|e| e.into_inner());
        posted.devices += 1;
        posted.squares.extend(squares);
        posted.losses.extend(losses);
        self.all_in.notify_all();
        while posted.devices < self.expected {
            if abort.is_raised() {
                return None;
            }
            posted = self.all_in.wait(posted).unwrap_or_else(|e| e.into_inner());
        }
        let mut losses = posted.losses.clone();
        losses.sort_by_key(|&(mb, _)| mb);
        Some(StepTotals {
            grad_norm: global_norm(&posted.squares),
            loss_sum: losses.iter().map(|&(_, l)| l).sum(),
        })
    }

    /// Wakes devices waiting in `meet` after an abort.
    pub fn wake(&self) {
        let _guard = self.posted.lock().unwrap_or_else(|e| e.into_inner());
        self.all_in.notify_all();
    }
}
