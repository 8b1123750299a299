//! Data parallelism for a run: how many of the devices the planner may use and whether it
//! picks the pipeline degree. The planner gives each degree as many replicas as those devices
//! and the step's micro-batches allow, so a count of replicas is fixed by handing it exactly
//! stages x replicas devices, and `"auto"` by handing it every device. With more than one
//! replica the optimizer state is sharded over them unless the spec says not to.

use crate::plan::presets::Cluster;
use crate::plan::reduction::with_sharded_optimizer;
use crate::plan::search::Answer;
use crate::plan::simulate::{chunk_costs, simulate};
use crate::plan::tensors::{MicroShape, ModelDims};
use crate::spec::{JobSpec, SpecError};

use super::{DeviceKind, RunError};

/// What the planner gets to choose from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The pipeline degree; `None`: the planner searches it.
    pub pipeline: Option<usize>,
    /// The devices the planner may use (the first of the set).
    pub devices: usize,
}

/// The layout `spec` asks for over `available` devices of `kind`: refused by field when the
/// kind cannot run it or the devices cannot hold it. (Zero replicas, and a count that does
/// not divide the step's micro-batches, are refused by the spec's own validation.)
pub fn layout(spec: &JobSpec, available: usize, kind: DeviceKind) -> Result<Layout, RunError> {
    let field = "parallelism.data_parallel";
    let stages = spec.parallelism.stages.count();
    let refuse =
        |field: &str, message: String| RunError::Spec(vec![SpecError::new(field, message)]);
    if kind == DeviceKind::Cuda && spec.parallelism.shard_optimizer == Some(true) {
        return Err(refuse(
            "parallelism.shard_optimizer",
            "sharded optimizer state on CUDA devices is not implemented yet: each GPU replica \
             keeps the whole optimizer state; use false or leave it out"
                .into(),
        ));
    }
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

/// `answer` with each replica keeping its shard of the optimizer state when `spec` asks for
/// it (`parallelism.shard_optimizer`, on by default with more than one replica): the plan's
/// reductions become `RS<c>` and `AG<c>`, and it is simulated again with each device's
/// shard of the state. The search chose the plan with whole state on every replica, which
/// needs more memory, so the sharded plan fits wherever that one did.
pub fn shard_optimizer(
    spec: &JobSpec,
    answer: Answer,
    dims: &ModelDims,
    cluster: &Cluster,
) -> Result<Answer, RunError> {
    if !spec.parallelism.shards_optimizer(answer.plan.replicas) {
        return Ok(answer);
    }
    let Answer {
        mut best,
        budget_bytes,
        plan,
        runners_up,
        candidates_tried,
        ..
    } = answer;
    let plan = with_sharded_optimizer(plan)?;
    let hw = cluster.hardware();
    let micro = MicroShape {
        batch: best.micro_batch_size as usize,
        seq: spec.training.seq_len,
    };
    let costs = chunk_costs(&plan, cluster.profile(), dims, micro, &hw);
    let sim = simulate(&plan, &costs, &hw, false)?;
    let tokens = best.tokens_per_s * best.step_time_s;
    best.step_time_s = sim.step_time_s;
    best.tokens_per_s = tokens / sim.step_time_s.max(f64::MIN_POSITIVE);
    best.peak_bytes = sim.peak_bytes();
    best.host_peak_bytes = (sim.devices.iter())
        .map(|d| d.host_peak_bytes)
        .max()
        .unwrap_or(0);
    best.bubble_ratio = sim.bubble_ratio;
    Ok(Answer {
        best,
        budget_bytes,
        plan,
        sim,
        runners_up,
        candidates_tried,
    })
}
