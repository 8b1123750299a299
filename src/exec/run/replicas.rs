//! Data parallelism for a run: how many replicas the spec asks for on these devices, and the
//! planned pipeline made into their plan (each chunk's gradients reduced across them).

use crate::plan::inventory::MicroShape;
use crate::plan::presets::Cluster;
use crate::plan::reduction::with_gradient_reduction;
use crate::plan::search::{Answer, Request};
use crate::plan::simulate::{chunk_costs, simulate};
use crate::spec::{JobSpec, SpecError};

use super::{DeviceKind, RunError};

/// The replica count `spec` asks for over `available` devices of `kind`: refused by field
/// when the kind cannot run it, or when stages are "auto" and it does not divide the devices. (`"auto"`, zero, and a share of
/// micro-batches that does not divide are refused by the spec's own validation.)
pub fn replica_count(
    spec: &JobSpec,
    available: usize,
    kind: DeviceKind,
) -> Result<usize, RunError> {
    let field = "parallelism.data_parallel";
    let Some(dp) = spec.parallelism.data_parallel.count() else {
        return Err(RunError::Spec(vec![SpecError::new(
            field,
            "\"auto\" is not implemented yet; name a count",
        )]));
    };
    if dp <= 1 {
        return Ok(1);
    }
    if kind == DeviceKind::Cuda {
        return Err(RunError::Spec(vec![SpecError::new(
            field,
            format!(
                "{dp} replicas on CUDA devices: data parallelism on GPUs is not implemented \
                 yet; use 1, or CPU devices such as `cpu:{}x256MiB`",
                2 * dp
            ),
        )]));
    }
    // With a stage count given, `plan_job` checks that stages x replicas devices are there;
    // only "auto" stages share every device out, and need the replicas to divide them.
    if spec.parallelism.stages.count().is_none() && !available.is_multiple_of(dp) {
        let fits: Vec<String> = (1..=available)
            .filter(|n| available.is_multiple_of(*n))
            .map(|n| n.to_string())
            .collect();
        return Err(RunError::Spec(vec![SpecError::new(
            field,
            format!(
                "{dp} replicas do not divide the {available} devices equally; use one of {}, \
                 or {} devices",
                fits.join(", "),
                available.next_multiple_of(dp)
            ),
        )]));
    }
    Ok(dp)
}

/// `answer` (one replica's plan, searched on `cluster` for `request`) run by `replicas`
/// copies: the reductions added and the plan simulated again with them.
pub fn replicate(
    answer: Answer,
    replicas: usize,
    request: &Request,
    cluster: &Cluster,
) -> Result<Answer, RunError> {
    if replicas <= 1 {
        return Ok(answer);
    }
    let plan = with_gradient_reduction(answer.plan, replicas as u32)?;
    let micro = MicroShape {
        batch: answer.best.micro_batch_size as usize,
        seq: request.seq_len as usize,
    };
    let hw = cluster.hardware();
    let costs = chunk_costs(&plan, cluster.profile(), &request.model, micro, &hw);
    let sim = simulate(&plan, &costs, &hw, false)?;
    Ok(Answer {
        plan,
        sim,
        ..answer
    })
}
