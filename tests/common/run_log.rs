//! An observer for whole runs in tests: keeps each step's loss; checkpoints go to
//! `out/step-K` and `out/final`. Included by path from the test files that drive runs.

use std::path::{Path, PathBuf};

use chronospipe::exec::run::{Observer, RunError, StepMetrics};

pub struct RunLog {
    pub out: PathBuf,
    pub losses: Vec<f64>,
}

impl RunLog {
    pub fn new(out: &Path) -> Self {
        RunLog {
            out: out.to_owned(),
            losses: Vec::new(),
        }
    }
}

impl Observer for RunLog {
    fn step(&mut self, m: &StepMetrics) -> Result<(), RunError> {
        self.losses.push(m.loss);
        Ok(())
    }
    fn checkpoint_dir(&self, step: u64, last: bool) -> PathBuf {
        self.out.join(if last {
            "final".into()
        } else {
            format!("step-{step}")
        })
    }
}
