//! The search: for a model, a cluster, a sequence length and a batch, every pipeline degree,
//! micro-batch size, schedule and recompute/offload option is planned with as many
//! data-parallel replicas as the devices and the global batch allow (each chunk's gradients
//! reduced across them by `AR` actions, or with sharded optimizer state by `RS` and `AG`, as
//! the plan will run), fitted by the policy pass and simulated; the fastest plan whose every
//! device fits wins. The answer keeps the
//! runners-up and says why each lost; when nothing fits, a typed error names the smallest
//! memory per device that would have fitted the closest configuration.

use serde::Serialize;

use super::cost;
use super::error::{PlanError, require_positive};
use super::inventory::{MicroShape, ModelDims};
use super::ir::Plan;
use super::policy::{Budget, Choices, Offload, Recompute, apply};
use super::presets::Cluster;
use super::reduction::{with_gradient_reduction, with_sharded_optimizer};
use super::schedule::{ScheduleKind, build, registry};
use super::simulate::{ChunkCost, Simulation, chunk_costs, simulate};
use super::tying::with_tied_embeddings;

/// What to plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Request {
    pub model: ModelDims,
    pub seq_len: u32,
    /// Sequences per optimizer step over all data-parallel replicas.
    pub global_batch: u32,
    /// Fixed micro-batch size; searched over 1, 2, 4, 8 when `None`.
    pub micro_batch_size: Option<u32>,
    /// Fixed micro-batches per replica: with a fixed micro-batch size the global batch
    /// follows from it, otherwise the micro-batch size does.
    pub microbatches: Option<u32>,
    /// Fixed pipeline degree; every divisor of devices / tensor parallel when `None`. Each
    /// degree `p` gets the most replicas `r` with `p x r` at most devices / tensor parallel
    /// whose share of the global batch is whole (so a cluster of `p x r` devices fixes both).
    pub pipeline: Option<u32>,
    /// Fixed schedule; 1f1b, interleaved:2 and chronos when `None`.
    pub schedule: Option<ScheduleKind>,
    pub recompute: Recompute,
    pub offload: Offload,
    /// Whether candidates with more than one replica shard each chunk's optimizer state over
    /// the replicas (ZeRO-1: `RS<c>` and `AG<c>` for `AR<c>`), so their memory and time are
    /// those of the sharded run.
    pub shard_optimizer: bool,
}

/// One configuration tried, and how it did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub pipeline: u32,
    pub data_parallel: u32,
    pub schedule: String,
    pub micro_batch_size: u32,
    pub microbatches: u32,
    pub recompute: Recompute,
    pub offload: Offload,
    /// Whether each replica keeps only its shard of the optimizer state.
    pub shard_optimizer: bool,
    pub choices: String,
    pub fits: bool,
    pub peak_bytes: u64,
    /// The highest device peak of an evaluation (validation loss) between steps; it fits too.
    pub eval_peak_bytes: u64,
    pub host_peak_bytes: u64,
    pub step_time_s: f64,
    pub tokens_per_s: f64,
    pub bubble_ratio: f64,
    pub prefetch_stall_s: f64,
    pub recomputed_chunks: usize,
}

impl Candidate {
    /// The device memory it needs: a step's peak or an evaluation's, whichever is higher.
    pub fn needs_bytes(&self) -> u64 {
        self.peak_bytes.max(self.eval_peak_bytes)
    }
}

/// A candidate that lost, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunnerUp {
    pub candidate: Candidate,
    pub why: String,
}

/// The winner, its plan and simulation, and the runners-up.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub best: Candidate,
    pub budget_bytes: u64,
    pub plan: Plan,
    #[serde(skip)]
    pub sim: Simulation,
    pub runners_up: Vec<RunnerUp>,
    pub candidates_tried: usize,
}

/// A planned, fitted, simulated configuration.
pub struct Evaluated {
    pub candidate: Candidate,
    pub plan: Plan,
    pub sim: Simulation,
    pub choices: Choices,
}

/// One configuration: everything that makes a plan besides the model and the devices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    pub pipeline: u32,
    /// Replicas of the pipeline, each on its own devices, gradients reduced across them.
    pub data_parallel: u32,
    pub micro_batch_size: u32,
    /// Micro-batches per replica.
    pub microbatches: u32,
    pub schedule: ScheduleKind,
    pub recompute: Recompute,
    pub offload: Offload,
    /// With more than one replica: each keeps 1/replicas of the optimizer state.
    pub shard_optimizer: bool,
}

/// A configuration built and simulated before fitting: its speed then bounds what fitting
/// (which only adds recomputes and copies) can reach.
struct Prepared {
    config: Config,
    plan: Plan,
    costs: Vec<ChunkCost>,
    tokens: f64,
    best_tokens_per_s: f64,
}

fn prepare(
    model: &ModelDims,
    cluster: &Cluster,
    seq: u32,
    config: Config,
) -> Result<Prepared, PlanError> {
    let Config {
        pipeline,
        data_parallel,
        micro_batch_size,
        microbatches,
        schedule,
        shard_optimizer,
        ..
    } = config;
    let profile = cluster.profile();
    let micro = MicroShape {
        batch: micro_batch_size as usize,
        seq: seq as usize,
    };
    cost::validate(profile, model, micro)?;
    let mut one = build(schedule, pipeline, microbatches, model.layers as u32)?;
    if model.tied_embeddings {
        one = with_tied_embeddings(one)?;
    }
    let mut plan = with_gradient_reduction(one, data_parallel)?;
    if shard_optimizer && data_parallel > 1 {
        plan = with_sharded_optimizer(plan)?;
    }
    let hw = cluster.hardware();
    let costs = chunk_costs(&plan, profile, model, micro, &hw);
    let tokens = data_parallel as f64 * microbatches as f64 * micro_batch_size as f64 * seq as f64;
    let base = simulate(&plan, &costs, &hw, false)?;
    Ok(Prepared {
        config,
        plan,
        costs,
        tokens,
        best_tokens_per_s: tokens / base.step_time_s.max(f64::MIN_POSITIVE),
    })
}

/// Fits a prepared configuration into the cluster's memory and simulates it.
fn fit(prepared: Prepared, cluster: &Cluster) -> Result<Evaluated, PlanError> {
    let hw = cluster.hardware();
    let budget = Budget {
        device_bytes: cluster.budget_bytes(),
        host_bytes: cluster.host_memory_bytes,
    };
    let p = prepared;
    let c = p.config;
    let applied = apply(&p.plan, &p.costs, &hw, budget, c.recompute, c.offload)?;
    let sim = applied.sim;
    let step = sim.step_time_s;
    let candidate = Candidate {
        pipeline: c.pipeline,
        data_parallel: c.data_parallel,
        schedule: c.schedule.to_string(),
        micro_batch_size: c.micro_batch_size,
        microbatches: c.microbatches,
        recompute: c.recompute,
        offload: c.offload,
        shard_optimizer: c.shard_optimizer && c.data_parallel > 1,
        choices: applied.choices.to_string(),
        fits: applied.fits,
        peak_bytes: sim.peak_bytes(),
        eval_peak_bytes: sim.eval_peak_bytes(),
        host_peak_bytes: sim
            .devices
            .iter()
            .map(|d| d.host_peak_bytes)
            .max()
            .unwrap_or(0),
        step_time_s: step,
        tokens_per_s: if step > 0.0 { p.tokens / step } else { 0.0 },
        bubble_ratio: sim.bubble_ratio,
        prefetch_stall_s: sim.prefetch_stall_s(),
        recomputed_chunks: applied.choices.recomputed_chunks.len(),
    };
    Ok(Evaluated {
        candidate,
        plan: applied.plan,
        sim,
        choices: applied.choices,
    })
}

/// Plans one configuration: build, fit, simulate.
pub fn evaluate(
    model: &ModelDims,
    cluster: &Cluster,
    seq: u32,
    config: Config,
) -> Result<Evaluated, PlanError> {
    fit(prepare(model, cluster, seq, config)?, cluster)
}

fn divisors(n: u32) -> Vec<u32> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}

/// Finds the fastest plan that fits.
pub fn search(req: &Request, cluster: &Cluster) -> Result<Answer, PlanError> {
    cluster.validate()?;
    require_positive("seq_len", req.seq_len as u64)?;
    let micro_probe = MicroShape {
        batch: 1,
        seq: req.seq_len as usize,
    };
    cost::validate(cluster.profile(), &req.model, micro_probe)?;
    let (prepared, first_error) = prepare_all(req, cluster)?;
    let (tried, pruned) = fit_fastest(prepared, cluster)?;
    if tried.is_empty() {
        return Err(first_error
            .unwrap_or_else(|| PlanError::invalid("pipeline", "no configuration could be built")));
    }
    rank(tried, pruned, cluster.budget_bytes())
}

/// Every configuration the request allows, built and simulated unfitted; and the first
/// error met, for when none could be built.
fn prepare_all(
    req: &Request,
    cluster: &Cluster,
) -> Result<(Vec<Prepared>, Option<PlanError>), PlanError> {
    let stages = cluster.devices / cluster.tensor_parallel;
    let pipelines = match req.pipeline {
        Some(p) => {
            if p == 0 || !stages.is_multiple_of(p) {
                return Err(PlanError::invalid(
                    "pipeline",
                    format!("must divide the {stages} devices per tensor-parallel rank"),
                ));
            }
            vec![p]
        }
        None => divisors(stages),
    };
    let mut prepared: Vec<Prepared> = Vec::new();
    let mut first_error = None;
    for &p in &pipelines {
        for (dp, b, m) in shapes(req, stages / p, &mut first_error) {
            if m == 0 {
                first_error.get_or_insert(PlanError::invalid(
                    "global_batch",
                    format!(
                        "{} sequences cannot give each of {dp} replicas a micro-batch of {b}",
                        req.global_batch
                    ),
                ));
                continue;
            }
            for config in configs(req, (p, dp), b, m) {
                match prepare(&req.model, cluster, req.seq_len, config) {
                    Ok(e) => prepared.push(e),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
    }
    Ok((prepared, first_error))
}

/// (replicas, micro-batch size, micro-batches per replica) for a pipeline degree that leaves
/// room for at most `most` replicas: the most replicas whose share of the request's global
/// batch is whole (0 micro-batches where it is too small); what cannot split is noted in
/// `first_error`. With both the micro-batch size and count fixed, the global batch follows
/// from them and every replica that fits runs.
fn shapes(req: &Request, most: u32, first_error: &mut Option<PlanError>) -> Vec<(u32, u32, u32)> {
    let global = req.global_batch;
    // The most replicas (up to `most`) that split the global batch into whole shares of `unit`.
    let replicas = |unit: u32| (1..=most).rev().find(|r| global.is_multiple_of(r * unit));
    match (req.micro_batch_size, req.microbatches) {
        (Some(b), Some(m)) => vec![(most, b, m)],
        // The global batch stays fixed; so the micro-batch size follows, when it can.
        (None, Some(m)) => match replicas(m).filter(|_| m > 0) {
            Some(r) => vec![(r, global / (r * m), m)],
            None => {
                first_error.get_or_insert(PlanError::invalid(
                    "microbatches",
                    format!(
                        "{m} micro-batches per replica do not divide a global batch of {global} over {most} replicas or fewer"
                    ),
                ));
                Vec::new()
            }
        },
        (Some(b), None) => match replicas(b).filter(|_| b > 0) {
            Some(r) => vec![(r, b, global / (r * b))],
            None => {
                first_error.get_or_insert(PlanError::invalid(
                    "global_batch",
                    format!(
                        "{global} sequences do not split into micro-batches of {b} over {most} replicas or fewer"
                    ),
                ));
                Vec::new()
            }
        },
        (None, None) => [1, 2, 4, 8]
            .into_iter()
            .filter_map(|b| replicas(b).map(|r| (r, b, global / (r * b))))
            .collect(),
    }
}

/// The schedules and recompute/offload options the request allows for a shape.
fn configs(
    req: &Request,
    (pipeline, data_parallel): (u32, u32),
    micro_batch_size: u32,
    microbatches: u32,
) -> Vec<Config> {
    let schedules = match req.schedule {
        Some(s) => vec![s],
        None => registry::searched(pipeline),
    };
    // Chronos recompute that is not needed recomputes nothing, so it covers `none`; `full`
    // is what it ends at when everything must go.
    let recomputes = match req.recompute {
        Recompute::Auto => vec![Recompute::Chronos],
        r => vec![r],
    };
    let offloads = match req.offload {
        Offload::Auto => vec![Offload::None, Offload::Chronos],
        o => vec![o],
    };
    let mut out = Vec::new();
    for &schedule in &schedules {
        for &recompute in &recomputes {
            for &offload in &offloads {
                out.push(Config {
                    pipeline,
                    data_parallel,
                    micro_batch_size,
                    microbatches,
                    schedule,
                    recompute,
                    offload,
                    shard_optimizer: req.shard_optimizer,
                });
            }
        }
    }
    out
}

/// Fits the fastest unfitted configurations first; once one fits, any configuration whose
/// unfitted speed is no better cannot win, since fitting only adds work. Returns what was
/// fitted and how many were pruned.
fn fit_fastest(
    mut prepared: Vec<Prepared>,
    cluster: &Cluster,
) -> Result<(Vec<Evaluated>, usize), PlanError> {
    prepared.sort_by(|a, b| b.best_tokens_per_s.total_cmp(&a.best_tokens_per_s));
    let mut tried: Vec<Evaluated> = Vec::new();
    let mut best_fit = 0.0f64;
    let mut pruned = 0;
    // Keep a few losers beyond the winner so the answer can say why they lost.
    const EXPLAINED: usize = 6;
    let mut beaten_after_fit = 0;
    for p in prepared {
        if p.best_tokens_per_s <= best_fit && beaten_after_fit >= EXPLAINED {
            pruned += 1;
            continue;
        }
        let e = fit(p, cluster)?;
        if e.candidate.fits {
            if e.candidate.tokens_per_s > best_fit {
                best_fit = e.candidate.tokens_per_s;
            } else {
                beaten_after_fit += 1;
            }
        }
        tried.push(e);
    }
    Ok((tried, pruned))
}

/// The answer from the fitted configurations (at least one): the fastest that fits and the
/// runners-up, or what would have fitted the closest.
fn rank(mut tried: Vec<Evaluated>, pruned: usize, budget: u64) -> Result<Answer, PlanError> {
    tried.sort_by(|a, b| {
        let (a, b) = (&a.candidate, &b.candidate);
        b.fits
            .cmp(&a.fits)
            .then(b.tokens_per_s.total_cmp(&a.tokens_per_s))
            .then(a.peak_bytes.cmp(&b.peak_bytes))
    });
    let candidates_tried = tried.len() + pruned;
    // Options that led to the same plan (say offload=chronos when nothing needed offloading)
    // are one configuration: keep the first.
    let mut seen = std::collections::HashSet::new();
    tried.retain(|e| {
        let c = &e.candidate;
        seen.insert((
            c.pipeline,
            c.data_parallel,
            c.schedule.clone(),
            c.micro_batch_size,
            c.microbatches,
            c.choices.clone(),
        ))
    });
    if !tried[0].candidate.fits {
        let closest = tried
            .iter()
            .min_by_key(|e| e.candidate.needs_bytes())
            .map(|e| &e.candidate)
            .expect("tried is not empty");
        return Err(PlanError::DoesNotFit {
            have_bytes: budget,
            need_bytes: closest.needs_bytes(),
            closest: describe(closest),
        });
    }
    let mut it = tried.into_iter();
    let best = it.next().expect("tried is not empty");
    let runners_up = it
        .take(6)
        .map(|e| RunnerUp {
            why: why_lost(&e.candidate, &best.candidate, budget),
            candidate: e.candidate,
        })
        .collect();
    Ok(Answer {
        best: best.candidate,
        budget_bytes: budget,
        plan: best.plan,
        sim: best.sim,
        runners_up,
        candidates_tried,
    })
}

/// One line naming a configuration.
pub fn describe(c: &Candidate) -> String {
    format!(
        "pp{} dp{}{} {} mbs{} x{} recompute={} offload={}",
        c.pipeline,
        c.data_parallel,
        if c.shard_optimizer { " sharded" } else { "" },
        c.schedule,
        c.micro_batch_size,
        c.microbatches,
        c.recompute,
        c.offload
    )
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

fn why_lost(c: &Candidate, best: &Candidate, budget: u64) -> String {
    if !c.fits {
        return format!(
            "does not fit: peak {} per device over the {} usable",
            gib(c.peak_bytes),
            gib(budget)
        );
    }
    let slower = 100.0 * (1.0 - c.tokens_per_s / best.tokens_per_s.max(f64::MIN_POSITIVE));
    let mut reasons = Vec::new();
    if c.bubble_ratio > best.bubble_ratio + 0.005 {
        reasons.push(format!(
            "bubble {:.1}% vs {:.1}%",
            100.0 * c.bubble_ratio,
            100.0 * best.bubble_ratio
        ));
    }
    if c.recomputed_chunks > best.recomputed_chunks {
        reasons.push(format!("recomputes {} chunks", c.recomputed_chunks));
    }
    if c.prefetch_stall_s > best.prefetch_stall_s + 1e-3 {
        reasons.push(format!("waits {:.3} s on prefetches", c.prefetch_stall_s));
    }
    let (devices, best_devices) = (
        c.pipeline * c.data_parallel,
        best.pipeline * best.data_parallel,
    );
    if devices < best_devices {
        reasons.push(format!("runs on {devices} of {best_devices} devices"));
    }
    if c.data_parallel > 1 && c.data_parallel != best.data_parallel {
        reasons.push(format!("{}-way gradient all-reduce", c.data_parallel));
    }
    if reasons.is_empty() {
        reasons.push("equal on every count; ranked by order".into());
    }
    format!("{slower:.1}% slower: {}", reasons.join(", "))
}

#[cfg(test)]
mod tests;
