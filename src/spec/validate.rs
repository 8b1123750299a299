//! Validation errors that point at the field at fault.

use serde::Serialize;
use utoipa::ToSchema;

/// One problem with a job spec: the JSON path of the field (`model.num_kv_heads`) and what
/// is wrong with it, including what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema, thiserror::Error)]
#[error("{param}: {message}")]
pub struct SpecError {
    pub param: String,
    pub message: String,
}

impl SpecError {
    pub fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            param: param.into(),
            message: message.into(),
        }
    }
}

/// Every problem found in one spec (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid job spec: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct InvalidSpec(pub Vec<SpecError>);

impl InvalidSpec {
    /// The first problem, for APIs that report one field.
    pub fn first(&self) -> &SpecError {
        &self.0[0]
    }
}

pub(super) fn positive(param: &str, value: usize, errors: &mut Vec<SpecError>) {
    if value == 0 {
        errors.push(SpecError::new(param, "must be at least 1"));
    }
}
