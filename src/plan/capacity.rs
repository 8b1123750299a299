//! `plan capacity`: for each strategy, the deepest model that fits the devices as one
//! pipeline, and its simulated throughput.

use serde::Serialize;

use super::cost;
use super::error::{PlanError, require_positive};
use super::inventory::ModelDims;
use super::policy::{Offload, Recompute};
use super::presets::Cluster;
use super::schedule::ScheduleKind;
use super::search::{Config, Evaluated, evaluate};

/// One row of `plan capacity`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CapacityRow {
    pub name: String,
    pub max_layers: u32,
    pub params: u64,
    pub tokens_per_s: f64,
    pub peak_bytes: u64,
    /// tokens/s x layers: the work rate, comparable across model depths.
    pub layer_tokens_per_s: f64,
}

/// The strategies `plan capacity` compares.
pub fn capacity_strategies() -> Vec<(&'static str, ScheduleKind, Recompute, Offload)> {
    let chronos = ScheduleKind::Chronos { in_flight: 0 };
    vec![
        (
            "1f1b",
            ScheduleKind::OneFOneB,
            Recompute::None,
            Offload::None,
        ),
        (
            "1f1b+recompute",
            ScheduleKind::OneFOneB,
            Recompute::Full,
            Offload::None,
        ),
        // Not one of the paper's strategies: what optimizer and stash offload alone give
        // 1F1B, to show how much of Chronos' depth is the offload and how much the schedule.
        (
            "1f1b+offload",
            ScheduleKind::OneFOneB,
            Recompute::None,
            Offload::Chronos,
        ),
        (
            "interleaved",
            ScheduleKind::Interleaved {
                chunks_per_device: 2,
            },
            Recompute::None,
            Offload::None,
        ),
        ("chronos-pipe", chronos, Recompute::None, Offload::None),
        (
            "chronos-pipe+recomp",
            chronos,
            Recompute::Chronos,
            Offload::None,
        ),
        ("chronos", chronos, Recompute::Chronos, Offload::Chronos),
    ]
}

/// The work rate `plan capacity` holds Chronos to in its extra row, relative to 1F1B's.
pub const CAPACITY_RATE_FLOOR: f64 = 0.9;

/// For each strategy, the most decoder layers that fit (all devices in one pipeline, the
/// model's other dimensions fixed) and the simulated throughput there. A last row gives the
/// most layers `chronos` fits while its work rate (tokens/s x layers) stays at least
/// `CAPACITY_RATE_FLOOR` of 1F1B's (scanned, since the rate is not monotone in depth): toward
/// the plain maximum, recomputing trades speed for depth.
pub fn capacity(
    model: &ModelDims,
    cluster: &Cluster,
    seq: u32,
    micro_batch_size: u32,
    microbatches: u32,
) -> Result<Vec<CapacityRow>, PlanError> {
    cluster.validate()?;
    require_positive("microbatches", microbatches as u64)?;
    let p = cluster.devices / cluster.tensor_parallel;
    let strategies = capacity_strategies();
    let shape = (micro_batch_size, microbatches);
    let mut rows = Vec::new();
    for &strategy in &strategies {
        let least = p * strategy.1.chunks_per_device();
        rows.push(deepest(
            model, cluster, seq, p, shape, strategy, least, 0.0,
        )?);
    }
    let floor = CAPACITY_RATE_FLOOR * rows[0].layer_tokens_per_s;
    let (_, schedule, r, o) = strategies[strategies.len() - 1];
    // Shallow models pay relatively more for the embedding, head and optimizer step, so the
    // rate is searched upward from the depth plain chronos-pipe reaches.
    let pipe_only = rows.iter().find(|r| r.name == "chronos-pipe");
    let start = pipe_only
        .map_or(0, |r| r.max_layers)
        .max(p * schedule.chunks_per_device());
    let strategy = ("chronos@0.9x-rate", schedule, r, o);
    // The rate falls with depth but not strictly (recompute decisions come in whole chunks),
    // so scan every depth from chronos-pipe's up to plain chronos', in steps of one layer per
    // chunk, then every depth just above the deepest that qualified.
    let most = rows[rows.len() - 1].max_layers;
    let step = p * schedule.chunks_per_device();
    let qualifies = |depth: u32| -> Result<Option<Evaluated>, PlanError> {
        let m = ModelDims {
            layers: depth as usize,
            ..*model
        };
        let config = Config {
            pipeline: p,
            data_parallel: 1,
            micro_batch_size: shape.0,
            microbatches: shape.1,
            schedule,
            recompute: r,
            offload: o,
            shard_optimizer: false,
        };
        let e = evaluate(&m, cluster, seq, config)?;
        let ok = e.candidate.fits && e.candidate.tokens_per_s * depth as f64 >= floor;
        Ok(ok.then_some(e))
    };
    let mut best: Option<(u32, Evaluated)> = None;
    let mut depth = start;
    while depth <= most {
        if let Some(e) = qualifies(depth)? {
            best = Some((depth, e));
        }
        depth += step;
    }
    if let Some((found, _)) = &best {
        let found = *found;
        for depth in (found + 1..found + step).rev() {
            if let Some(e) = qualifies(depth)? {
                best = Some((depth, e));
                break;
            }
        }
    }
    rows.push(match best {
        Some((depth, e)) => {
            let m = ModelDims {
                layers: depth as usize,
                ..*model
            };
            CapacityRow {
                name: strategy.0.to_string(),
                max_layers: depth,
                params: cost::model_params(&m),
                tokens_per_s: e.candidate.tokens_per_s,
                peak_bytes: e.candidate.peak_bytes,
                layer_tokens_per_s: e.candidate.tokens_per_s * depth as f64,
            }
        }
        None => CapacityRow {
            name: strategy.0.to_string(),
            max_layers: 0,
            params: 0,
            tokens_per_s: 0.0,
            peak_bytes: 0,
            layer_tokens_per_s: 0.0,
        },
    });
    Ok(rows)
}

/// The most layers that fit with a work rate of at least `min_rate`, found by doubling and
/// bisecting (fitting, and the rate, fall with depth).
#[allow(clippy::too_many_arguments)]
fn deepest(
    model: &ModelDims,
    cluster: &Cluster,
    seq: u32,
    p: u32,
    (micro_batch_size, microbatches): (u32, u32),
    (name, schedule, r, o): (&str, ScheduleKind, Recompute, Offload),
    least: u32,
    min_rate: f64,
) -> Result<CapacityRow, PlanError> {
    let at = |layers: u32| -> Result<Option<Evaluated>, PlanError> {
        let m = ModelDims {
            layers: layers as usize,
            ..*model
        };
        let config = Config {
            pipeline: p,
            data_parallel: 1,
            micro_batch_size,
            microbatches,
            schedule,
            recompute: r,
            offload: o,
            shard_optimizer: false,
        };
        let e = evaluate(&m, cluster, seq, config)?;
        let ok = e.candidate.fits && e.candidate.tokens_per_s * layers as f64 >= min_rate;
        Ok(ok.then_some(e))
    };
    let Some(mut best) = at(least)? else {
        return Ok(CapacityRow {
            name: name.to_string(),
            max_layers: 0,
            params: 0,
            tokens_per_s: 0.0,
            peak_bytes: 0,
            layer_tokens_per_s: 0.0,
        });
    };
    let (mut lo, mut hi) = (least, least * 2);
    while hi < 1 << 16 {
        match at(hi)? {
            Some(e) => {
                best = e;
                lo = hi;
                hi *= 2;
            }
            None => break,
        }
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        match at(mid)? {
            Some(e) => {
                best = e;
                lo = mid;
            }
            None => hi = mid,
        }
    }
    let m = ModelDims {
        layers: lo as usize,
        ..*model
    };
    Ok(CapacityRow {
        name: name.to_string(),
        max_layers: lo,
        params: cost::model_params(&m),
        tokens_per_s: best.candidate.tokens_per_s,
        peak_bytes: best.candidate.peak_bytes,
        layer_tokens_per_s: best.candidate.tokens_per_s * lo as f64,
    })
}
