//! The real executor, paced for a watcher: a runner the dashboard test trains with.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chronospipe::jobs::{
    EventLevel, ExecRunner, JobRunner, RunControl, RunEnd, RunFailure, RunRequest, RunSink,
    SinkError, StepMetrics,
};

/// The real executor, slowed after each recorded step by the milliseconds the test sets,
/// and held after step `hold_from` until a stop is requested (or the hold is lifted), so the
/// job is still running when a slow browser gets to pause it.
#[derive(Clone)]
pub struct Paced {
    delay_ms: Arc<AtomicU64>,
    hold_from: Arc<AtomicU64>,
}

impl Paced {
    pub fn new(delay: Duration, hold_from: u64) -> Paced {
        Paced {
            delay_ms: Arc::new(AtomicU64::new(delay.as_millis() as u64)),
            hold_from: Arc::new(AtomicU64::new(hold_from)),
        }
    }

    pub fn set(&self, delay: Duration, hold_from: u64) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
        self.hold_from.store(hold_from, Ordering::Relaxed);
    }
}

struct PacedSink<'a> {
    inner: &'a mut dyn RunSink,
    pace: &'a Paced,
    control: &'a RunControl,
}

impl RunSink for PacedSink<'_> {
    fn step(&mut self, metrics: &StepMetrics) -> Result<(), SinkError> {
        self.inner.step(metrics)?;
        std::thread::sleep(Duration::from_millis(
            self.pace.delay_ms.load(Ordering::Relaxed),
        ));
        // The worker's heartbeat turns a pause into a stop request while this waits.
        while metrics.step >= self.pace.hold_from.load(Ordering::Relaxed)
            && self.control.requested().is_none()
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
    fn before_checkpoint(&mut self, step: u64) -> Result<(), SinkError> {
        self.inner.before_checkpoint(step)
    }
    fn checkpoint(&mut self, step: u64, dir: &std::path::Path) -> Result<(), SinkError> {
        self.inner.checkpoint(step, dir)
    }
    fn event(&mut self, level: EventLevel, message: &str) -> Result<(), SinkError> {
        self.inner.event(level, message)
    }
    fn evaluation(&mut self, evaluation: &chronospipe::jobs::Evaluation) -> Result<(), SinkError> {
        self.inner.evaluation(evaluation)
    }
    fn retain_checkpoints(&mut self, keep: u64) -> Result<(), SinkError> {
        self.inner.retain_checkpoints(keep)
    }
    fn stopped_early(&mut self, step: u64, best_step: Option<u64>) -> Result<(), SinkError> {
        self.inner.stopped_early(step, best_step)
    }
}

impl JobRunner for Paced {
    fn run(
        &self,
        request: RunRequest,
        sink: &mut dyn RunSink,
        control: &RunControl,
    ) -> Result<RunEnd, RunFailure> {
        let mut paced = PacedSink {
            inner: sink,
            pace: self,
            control,
        };
        ExecRunner.run(request, &mut paced, control)
    }
}
