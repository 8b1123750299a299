//! The planner's one error type. Every variant says what was wrong and where: a field path
//! (`model.kv_heads`, `cluster.memory_bytes`), a plan line, or a marked action in the grid.

/// Errors from planning. Never a panic on user input: every check that can fail on what a user
/// sent returns one of these.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// A setting is out of range or inconsistent with another.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },

    /// The text form of a plan or an action could not be read.
    #[error("line {line}: cannot read `{token}`: {message}")]
    Parse {
        line: usize,
        token: String,
        message: String,
    },

    /// A plan breaks a rule of the IR; `grid` shows every device's program with the failing
    /// action marked `>>like this<<`.
    #[error("plan is invalid: device {device}, action {index}: {message}\n{grid}")]
    InvalidPlan {
        device: usize,
        index: usize,
        message: String,
        grid: String,
    },

    /// No configuration fits the devices' memory.
    #[error(
        "no plan fits in {have_bytes} bytes per device; the closest, {closest}, needs {need_bytes} bytes per device"
    )]
    DoesNotFit {
        /// Usable bytes per device (memory less the reserve).
        have_bytes: u64,
        /// The smallest usable memory per device that would fit the closest configuration.
        need_bytes: u64,
        /// The configuration that came closest, in words.
        closest: String,
    },
}

impl PlanError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        PlanError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The field path of an `Invalid` error.
    pub fn field(&self) -> Option<&str> {
        match self {
            PlanError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Fails with a field-path error when `value` is zero.
pub fn require_positive(field: &str, value: u64) -> Result<(), PlanError> {
    if value == 0 {
        return Err(PlanError::invalid(field, "must be at least 1"));
    }
    Ok(())
}
