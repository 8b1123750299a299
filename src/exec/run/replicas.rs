//! Data parallelism for a run: how many of the devices the planner may use and whether it
//! picks the pipeline degree. The planner gives each degree as many replicas as those devices
//! and the step's micro-batches allow, so a count of replicas is fixed by handing it exactly
//! stages x replicas devices, and `"auto"` by handing it every device. With more than one
//! replica the optimizer state is sharded over them unless the spec says not to: the search
//! plans every candidate with replicas that way (`search::Request::shard_optimizer`).

use crate::spec::{JobSpec, SpecError};

use super::RunError;

/// What the planner gets to choose from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The pipeline degree; `None`: the planner searches it.
    pub pipeline: Option<usize>,
    /// The devices the planner may use (the first of the set).
    pub devices: usize,
}

/// The layout `spec` asks for over `available` devices: refused by field when the devices
/// cannot hold it. (Zero replicas, and a count that does not divide the step's
/// micro-batches, are refused by the spec's own validation.)
pub fn layout(spec: &JobSpec, available: usize) -> Result<Layout, RunError> {
    let field = "parallelism.data_parallel";
    let stages = spec.parallelism.stages.count();
    let refuse =
        |field: &str, message: String| RunError::Spec(vec![SpecError::new(field, message)]);
    let Some(dp) = spec.parallelism.data_parallel.count() else {
        return match stages {
            None => Ok(Layout {
                pipeline: None,
                devices: available,
            }),
            Some(s) if s > available => Err(refuse(
                "parallelism.stages",
                format!("{s} stages need {s} devices but {available} are available"),
            )),
            Some(s) => Ok(Layout {
                pipeline: Some(s),
                devices: s * (available / s),
            }),
        };
    };
    let dp = dp.max(1);
    // Only "auto" stages share every device out, and need the replicas to divide them.
    if stages.is_none() && !available.is_multiple_of(dp) {
        let fits: Vec<String> = (1..=available)
            .filter(|n| available.is_multiple_of(*n))
            .map(|n| n.to_string())
            .collect();
        return Err(refuse(
            field,
            format!(
                "{dp} replicas do not divide the {available} devices equally; use one of {}, \
                 or {} devices",
                fits.join(", "),
                available.next_multiple_of(dp)
            ),
        ));
    }
    let per_replica = available / dp;
    let stages = stages.unwrap_or(per_replica);
    if stages > per_replica {
        let need = if dp == 1 {
            format!("{stages} stages need {stages} devices")
        } else {
            format!(
                "{stages} stages x {dp} replicas need {} devices",
                stages * dp
            )
        };
        return Err(refuse(
            "parallelism.stages",
            format!("{need} but {available} are available"),
        ));
    }
    Ok(Layout {
        pipeline: Some(stages),
        devices: stages * dp,
    })
}
