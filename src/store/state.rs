//! The job state machine. Every state change in the store goes through `JobState::check`, so
//! the allowed transitions live here and nowhere else.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Files resolved and the plan being computed.
    Validating,
    /// Waiting for a worker with enough free devices.
    Queued,
    /// A worker holds a lease on it and trains.
    Running,
    /// Asked to pause: the worker checkpoints and frees the devices.
    Pausing,
    /// Checkpointed and off the devices; `resume` queues it again.
    Paused,
    /// Asked to cancel: the worker stops at the next step boundary.
    Cancelling,
    Cancelled,
    Succeeded,
    Failed,
}

pub const ALL_STATES: [JobState; 9] = [
    JobState::Validating,
    JobState::Queued,
    JobState::Running,
    JobState::Pausing,
    JobState::Paused,
    JobState::Cancelling,
    JobState::Cancelled,
    JobState::Succeeded,
    JobState::Failed,
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a job cannot go from {from} to {to}")]
pub struct InvalidTransition {
    pub from: JobState,
    pub to: JobState,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown job state {0:?}; expected one of validating, queued, running, pausing, paused, cancelling, cancelled, succeeded, failed"
)]
pub struct UnknownState(pub String);

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Validating => "validating",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Pausing => "pausing",
            JobState::Paused => "paused",
            JobState::Cancelling => "cancelling",
            JobState::Cancelled => "cancelled",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Result<JobState, UnknownState> {
        ALL_STATES
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| UnknownState(text.to_owned()))
    }

    /// No further transitions: the job's files may be deleted.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Cancelled | JobState::Succeeded | JobState::Failed
        )
    }

    /// A worker holds the job (and its devices).
    pub fn is_on_worker(self) -> bool {
        matches!(
            self,
            JobState::Running | JobState::Pausing | JobState::Cancelling
        )
    }

    /// The one table of allowed transitions.
    pub fn allows(self, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            (Validating, Queued | Failed | Cancelled)
                | (Queued, Running | Cancelled | Paused)
                // Running -> Queued: the worker stopped (shutdown, lost lease) and will resume.
                // Running -> Paused: a checkpoint found the storage full and the job asked to wait.
                | (Running, Succeeded | Failed | Pausing | Cancelling | Queued | Paused)
                | (Pausing, Paused | Succeeded | Failed | Cancelling | Queued)
                | (Paused, Queued | Cancelled)
                | (Cancelling, Cancelled | Succeeded | Failed)
        )
    }

    pub fn check(self, to: JobState) -> Result<(), InvalidTransition> {
        if self.allows(to) {
            Ok(())
        } else {
            Err(InvalidTransition { from: self, to })
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in ALL_STATES {
            assert_eq!(JobState::parse(s.as_str()), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!(JobState::parse("done").is_err());
    }

    #[test]
    fn finished_states_are_final() {
        for from in ALL_STATES.into_iter().filter(|s| s.is_finished()) {
            for to in ALL_STATES {
                assert!(from.check(to).is_err(), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn the_usual_lives_are_allowed() {
        use JobState::*;
        let lives: [&[JobState]; 4] = [
            &[Validating, Queued, Running, Succeeded],
            &[
                Validating, Queued, Running, Pausing, Paused, Queued, Running, Failed,
            ],
            &[Validating, Queued, Running, Cancelling, Cancelled],
            &[Validating, Queued, Running, Queued, Running, Succeeded],
        ];
        for life in lives {
            for pair in life.windows(2) {
                pair[0].check(pair[1]).unwrap();
            }
        }
        assert!(Queued.check(Succeeded).is_err());
        assert!(Paused.check(Running).is_err());
    }
}
