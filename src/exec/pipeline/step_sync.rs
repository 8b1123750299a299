//! The one point where devices meet in a step: each posts the sums of squares of its
//! gradients and the summed loss of the micro-batches whose head it ran; all then read the
//! same global gradient norm and loss, combined in a fixed order so the result does not depend
//! on how the model is split (or over how many processes).

use std::sync::{Condvar, Mutex};

use crate::exec::optim::clip::{PartSquares, global_norm};

use super::PipelineError;
use super::mailbox::Abort;

/// Every share posted so far: parts' squared gradient norms, (micro-batch, summed loss).
pub type Shares = (Vec<PartSquares>, Vec<(u32, f64)>);

#[derive(Debug, Default)]
struct Posted {
    devices: usize,
    shares: Shares,
    /// Set by the last device in: the totals, or why they could not be had.
    outcome: Option<Result<StepTotals, ()>>,
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
    /// A meeting of `devices` device threads of this process.
    pub fn new(devices: usize) -> Self {
        StepSync {
            expected: devices,
            posted: Mutex::new(Posted::default()),
            all_in: Condvar::new(),
        }
    }

    /// Posts this device's share and waits for everyone's. The last device in adds what
    /// `others` brings (the other processes' shares, given this process's) before the totals
    /// are taken. `Aborted` when the step was aborted (or `others` failed, for the devices
    /// that did not call it: the one that did gets its error).
    pub fn meet(
        &self,
        squares: Vec<PartSquares>,
        losses: Vec<(u32, f64)>,
        abort: &Abort,
        others: impl FnOnce(&Shares) -> Result<Shares, PipelineError>,
    ) -> Result<StepTotals, PipelineError> {
        let mut posted = self.posted.lock().unwrap_or_else(|e| e.into_inner());
        posted.devices += 1;
        posted.shares.0.extend(squares);
        posted.shares.1.extend(losses);
        if posted.devices == self.expected {
            let mine = std::mem::take(&mut posted.shares);
            drop(posted);
            let outcome = others(&mine).map(|(squares, losses)| {
                let mut all = mine;
                all.0.extend(squares);
                all.1.extend(losses);
                totals(all)
            });
            posted = self.posted.lock().unwrap_or_else(|e| e.into_inner());
            posted.outcome = Some(outcome.as_ref().map(|t| *t).map_err(|_| ()));
            self.all_in.notify_all();
            return outcome;
        }
        loop {
            match posted.outcome {
                Some(Ok(totals)) => return Ok(totals),
                Some(Err(())) => return Err(PipelineError::Aborted),
                None if abort.is_raised() => return Err(PipelineError::Aborted),
                None => {}
            }
            posted = self.all_in.wait(posted).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Wakes devices waiting in `meet` after an abort.
    pub fn wake(&self) {
        let _guard = self.posted.lock().unwrap_or_else(|e| e.into_inner());
        self.all_in.notify_all();
    }
}

/// The global norm (parts in model order) and the loss (micro-batches in order).
fn totals((squares, mut losses): Shares) -> StepTotals {
    losses.sort_by_key(|&(mb, _)| mb);
    StepTotals {
        grad_norm: global_norm(&squares),
        loss_sum: losses.iter().map(|&(_, l)| l).sum(),
    }
}
