//! Learning rate over steps: linear warm-up, then constant or cosine decay to zero.

pub use crate::spec::LrDecay;
use crate::spec::TrainingSpec;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f32,
    pub warmup_steps: u64,
    pub decay: LrDecay,
    /// The run's total steps: where cosine decay reaches zero.
    pub total_steps: u64,
}

impl LrSchedule {
    pub fn constant(lr: f32) -> Self {
        LrSchedule {
            base_lr: lr,
            warmup_steps: 0,
            decay: LrDecay::Constant,
            total_steps: 0,
        }
    }

    /// The schedule a job spec asks for, over a run of `total_steps`
    /// (`TrainingSpec::total_steps`).
    pub fn from_spec(t: &TrainingSpec, total_steps: u64) -> Self {
        LrSchedule {
            base_lr: t.optimizer.lr() as f32,
            warmup_steps: t.warmup_steps,
            decay: t.lr_decay,
            total_steps,
        }
    }

    /// The rate for step `step` (counted from 0).
    pub fn lr_at(&self, step: u64) -> f32 {
        let base = self.base_lr as f64;
        if step < self.warmup_steps {
            return (base * (step + 1) as f64 / self.warmup_steps as f64) as f32;
        }
        match self.decay {
            LrDecay::Constant => self.base_lr,
            LrDecay::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
                (base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_zero() {
        let s = LrSchedule {
            base_lr: 1.0,
            warmup_steps: 4,
            decay: LrDecay::Cosine,
            total_steps: 14,
        };
        assert_eq!(s.lr_at(0), 0.25);
        assert_eq!(s.lr_at(3), 1.0);
        assert_eq!(s.lr_at(4), 1.0);
        assert!((s.lr_at(9) - 0.5).abs() < 1e-6);
        assert!(s.lr_at(14).abs() < 1e-6);
        assert!(s.lr_at(100).abs() < 1e-6);
        assert_eq!(LrSchedule::constant(0.1).lr_at(7), 0.1);
    }
}
