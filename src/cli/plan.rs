//! `chronospipe plan` and `chronospipe plan capacity`: flags, reading presets or JSON files,
//! and printing the planner's answer. The planning itself is `plan::search`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, Subcommand};

use crate::plan::inventory::{MicroShape, ModelDims};
use crate::plan::policy::{Offload, Recompute};
use crate::plan::presets::{self, Cluster};
use crate::plan::schedule::ScheduleKind;
use crate::plan::search::{self, Request};
use crate::plan::simulate::{chunk_costs, simulate};
use crate::plan::{PlanError, render};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct PlanArgs {
    #[command(subcommand)]
    pub command: Option<PlanCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// For each strategy, the most layers that fit and their simulated throughput.
    Capacity(CapacityArgs),
}

/// The model and the devices.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// A preset (llama2-70b, llama2-7b, tiny) or a JSON file of model dimensions.
    #[arg(long, required = true)]
    pub model: Option<String>,
    /// A preset (a100-80g-pp8-tp8, h100-80g-pp8-tp8, h100-80g-x8, cpu-4x1g) or a JSON cluster
    /// file. Stages x replicas are searched: each pipeline degree gets as many replicas as the
    /// devices and the global batch allow.
    #[arg(long, required = true)]
    pub cluster: Option<String>,
    /// Decoder layers, overriding the model's.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 4096)]
    pub seq_len: u32,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub target: Target,
    /// Sequences per optimizer step, over all data-parallel replicas.
    #[arg(long, default_value_t = 64)]
    pub global_batch: u32,
    /// Sequences per micro-batch [default: searched].
    #[arg(long)]
    pub micro_batch_size: Option<u32>,
    /// Micro-batches per pipeline replica [default: from the global batch]; with
    /// --micro-batch-size too, it fixes the global batch instead.
    #[arg(long)]
    pub microbatches: Option<u32>,
    /// Pipeline stages [default: searched].
    #[arg(long)]
    pub pipeline: Option<u32>,
    /// Data-parallel replicas [default: searched]. Fixed, the search runs on --pipeline x
    /// replicas of the cluster's devices, or without --pipeline on all of them, each replica
    /// a pipeline of devices / replicas stages.
    #[arg(long)]
    pub data_parallel: Option<u32>,
    /// auto, gpipe, 1f1b, interleaved[:V], chronos[:IN_FLIGHT].
    #[arg(long, default_value = "auto")]
    pub schedule: String,
    /// none, full, chronos or auto.
    #[arg(long, default_value = "auto")]
    pub recompute: String,
    /// none, chronos or auto.
    #[arg(long, default_value = "auto")]
    pub offload: String,
    /// Whether replicas shard the optimizer state among them (ZeRO-1), as a job's
    /// `parallelism.shard_optimizer` does by default; false: each keeps the whole state.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub shard_optimizer: bool,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also print the plan's programs in the IR's text form.
    #[arg(long)]
    pub ir: bool,
    /// Write an SVG timeline of the plan to this file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CapacityArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long, default_value_t = 1)]
    pub micro_batch_size: u32,
    /// Micro-batches per step (one pipeline, no data parallelism).
    #[arg(long, default_value_t = 64)]
    pub microbatches: u32,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanCmdError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("--{flag}: `{name}` is neither a preset ({known}) nor a readable file: {source}")]
    Read {
        flag: &'static str,
        name: String,
        known: String,
        source: std::io::Error,
    },
    #[error("--{flag}: {path} is not a valid {what} JSON file: {message}")]
    Json {
        flag: &'static str,
        path: String,
        what: &'static str,
        message: String,
    },
    #[error("--{0} is required")]
    Missing(&'static str),
    #[error("--{flag}: {message}")]
    Invalid { flag: &'static str, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn load<T: serde::de::DeserializeOwned>(
    flag: &'static str,
    what: &'static str,
    name: &str,
    preset: Option<T>,
    known: &[&str],
) -> Result<T, PlanCmdError> {
    if let Some(p) = preset {
        return Ok(p);
    }
    let text = std::fs::read_to_string(Path::new(name)).map_err(|source| PlanCmdError::Read {
        flag,
        name: name.to_string(),
        known: known.join(", "),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| PlanCmdError::Json {
        flag,
        path: name.to_string(),
        what,
        message: e.to_string(),
    })
}

fn resolve(t: &Target) -> Result<(ModelDims, Cluster), PlanCmdError> {
    let m = t.model.as_deref().ok_or(PlanCmdError::Missing("model"))?;
    let c = t
        .cluster
        .as_deref()
        .ok_or(PlanCmdError::Missing("cluster"))?;
    let mut model: ModelDims = load("model", "model", m, presets::model(m), presets::MODEL_NAMES)?;
    if let Some(layers) = t.layers {
        model.layers = layers;
    }
    let cluster: Cluster = load(
        "cluster",
        "cluster",
        c,
        presets::cluster(c),
        presets::CLUSTER_NAMES,
    )?;
    Ok((model, cluster))
}

/// Runs the command; returns what to print.
pub fn run(args: &PlanArgs) -> Result<String, PlanCmdError> {
    match &args.command {
        Some(PlanCommand::Capacity(c)) => capacity(c),
        None => plan(&args.run),
    }
}

fn capacity(args: &CapacityArgs) -> Result<String, PlanCmdError> {
    let (model, cluster) = resolve(&args.target)?;
    let started = Instant::now();
    let rows = crate::plan::capacity::capacity(
        &model,
        &cluster,
        args.target.seq_len,
        args.micro_batch_size,
        args.microbatches,
    )?;
    if args.json {
        let body = serde_json::json!({ "strategies": rows });
        return Ok(format!("{body:#}\n"));
    }
    Ok(format!(
        "{} on {} (seq {}, micro-batch {}, {} micro-batches; pipeline {}, tensor parallel {})\n{}computed in {:.2} s\n",
        args.target.model.as_deref().unwrap_or(""),
        cluster.name,
        args.target.seq_len,
        args.micro_batch_size,
        args.microbatches,
        cluster.devices / cluster.tensor_parallel,
        cluster.tensor_parallel,
        render::capacity_text(&rows),
        started.elapsed().as_secs_f64()
    ))
}

/// Fixes the replicas at `--data-parallel`: the pipeline degree and the devices the search
/// may use become those of that many replicas. Returns the pipeline degree.
fn fix_replicas(args: &RunArgs, cluster: &mut Cluster) -> Result<Option<u32>, PlanCmdError> {
    let Some(dp) = args.data_parallel else {
        return Ok(args.pipeline);
    };
    let invalid = |message: String| PlanCmdError::Invalid {
        flag: "data-parallel",
        message,
    };
    let tp = cluster.tensor_parallel.max(1);
    let usable = cluster.devices / tp;
    if dp == 0 {
        return Err(invalid("must be at least 1".into()));
    }
    let pipeline = match args.pipeline {
        Some(p) if p.saturating_mul(dp) > usable => {
            return Err(invalid(format!(
                "{p} stages x {dp} replicas need {} pipeline devices; {} has {usable}",
                p.saturating_mul(dp),
                cluster.name
            )));
        }
        Some(p) => p,
        None if !usable.is_multiple_of(dp) || dp > usable => {
            let fits: Vec<String> = (1..=usable)
                .filter(|n| usable.is_multiple_of(*n))
                .map(|n| n.to_string())
                .collect();
            return Err(invalid(format!(
                "{dp} replicas do not divide the {usable} pipeline devices of {}; use one of {}",
                cluster.name,
                fits.join(", ")
            )));
        }
        None => usable / dp,
    };
    cluster.devices = pipeline * dp * tp;
    Ok(Some(pipeline))
}

fn plan(args: &RunArgs) -> Result<String, PlanCmdError> {
    let (model, mut cluster) = resolve(&args.target)?;
    let pipeline = fix_replicas(args, &mut cluster)?;
    let schedule = match args.schedule.as_str() {
        "auto" => None,
        s => Some(s.parse::<ScheduleKind>()?),
    };
    let req = Request {
        model,
        seq_len: args.target.seq_len,
        global_batch: args.global_batch,
        micro_batch_size: args.micro_batch_size,
        microbatches: args.microbatches,
        pipeline,
        schedule,
        recompute: args.recompute.parse::<Recompute>()?,
        offload: args.offload.parse::<Offload>()?,
        shard_optimizer: args.shard_optimizer,
    };
    let started = Instant::now();
    let answer = search::search(&req, &cluster)?;
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(dp) = args.data_parallel.filter(|&dp| dp != answer.plan.replicas) {
        return Err(PlanCmdError::Invalid {
            flag: "data-parallel",
            message: format!(
                "a global batch of {} sequences (micro-batches of {}) does not split over {dp} \
                 replicas; the search found {}",
                req.global_batch, answer.best.micro_batch_size, answer.plan.replicas
            ),
        });
    }
    if let Some(path) = &args.svg {
        // The search skips memory curves for speed; draw from a detailed re-run.
        let micro = MicroShape {
            batch: answer.best.micro_batch_size as usize,
            seq: req.seq_len as usize,
        };
        let hw = cluster.hardware();
        let costs = chunk_costs(&answer.plan, cluster.profile(), &req.model, micro, &hw);
        let sim = simulate(&answer.plan, &costs, &hw, true)?;
        let title = format!("{} on {}", search::describe(&answer.best), cluster.name);
        let svg = render::svg(&answer.plan, &sim, answer.budget_bytes, &title);
        std::fs::write(path, svg).map_err(|source| PlanCmdError::Write {
            path: path.clone(),
            source,
        })?;
    }
    if args.json {
        let body = serde_json::json!({
            "answer": answer,
            "devices": answer.sim.devices.iter().map(|d| serde_json::json!({
                "peak_bytes": d.peak_bytes,
                "at_peak": d.at_peak,
                "host_peak_bytes": d.host_peak_bytes,
                "busy_s": d.busy_s,
                "prefetch_stall_s": d.prefetch_stall_s,
            })).collect::<Vec<_>>(),
            "search_seconds": elapsed,
        });
        return Ok(format!("{body:#}\n"));
    }
    let mut out = render::text(&answer);
    if args.ir {
        out.push('\n');
        out.push_str(&answer.plan.to_string());
    }
    out.push_str(&format!(
        "\nsearched {} configurations in {:.3} s\n",
        answer.candidates_tried, elapsed
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> PlanArgs {
        let mut all = vec!["chronospipe", "plan"];
        all.extend(args);
        match Cli::try_parse_from(all).unwrap().command {
            Command::Plan(p) => p,
            _ => panic!("expected plan"),
        }
    }

    /// The tiny model on four CPU devices, 64-token sequences.
    const TINY_ON_CPU: [&str; 6] = [
        "--model",
        "tiny",
        "--cluster",
        "cpu-4x1g",
        "--seq-len",
        "64",
    ];

    /// `plan` of the tiny model on CPU devices with `extra` flags.
    fn tiny(extra: &[&str]) -> PlanArgs {
        parse(&[&TINY_ON_CPU[..], extra].concat())
    }

    #[test]
    fn plan_and_capacity_parse() {
        let p = tiny(&[]);
        assert!(p.command.is_none());
        assert_eq!(p.run.target.seq_len, 64);
        let p = parse(&[
            "capacity",
            "--model",
            "llama2-70b",
            "--cluster",
            "a100-80g-pp8-tp8",
        ]);
        assert!(matches!(p.command, Some(PlanCommand::Capacity(_))));
        assert!(Cli::try_parse_from(["chronospipe", "plan", "--cluster", "x"]).is_err());
    }

    #[test]
    fn tiny_model_plans_on_cpu_devices_with_an_svg() {
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("t.svg");
        let svg_arg = svg.to_str().unwrap();
        let p = tiny(&["--global-batch", "8", "--ir", "--svg", svg_arg]);
        let out = run(&p).unwrap();
        assert!(out.contains("plan: pp"), "{out}");
        assert!(out.contains("device 0:"), "{out}");
        assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    }

    /// `--data-parallel` fixes the replicas (with `--pipeline`, or the pipeline degree as the
    /// devices' share), and a count the devices or the batch cannot hold is refused by flag.
    #[test]
    fn data_parallel_fixes_the_replicas() {
        let fixed = |extra: &[&str]| {
            let args = [&["--global-batch", "8", "--json"][..], extra].concat();
            let out = run(&tiny(&args)).unwrap();
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let best = &v["answer"]["best"];
            (
                best["pipeline"].as_u64(),
                v["answer"]["plan"]["replicas"].as_u64(),
            )
        };
        assert_eq!(fixed(&["--data-parallel", "2"]), (Some(2), Some(2)));
        assert_eq!(fixed(&["--data-parallel", "4"]), (Some(1), Some(4)));
        let one_by_two = ["--data-parallel", "2", "--pipeline", "1"];
        assert_eq!(fixed(&one_by_two), (Some(1), Some(2)));
        // Replicas shard the optimizer state unless told not to, as a job's do.
        let sharded = |extra: &[&str]| {
            let args = [&["--global-batch", "8", "--json"][..], extra].concat();
            let out = run(&tiny(&args)).unwrap();
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            v["answer"]["best"]["shard_optimizer"].as_bool()
        };
        assert_eq!(sharded(&["--data-parallel", "2"]), Some(true));
        let whole = ["--data-parallel", "2", "--shard-optimizer", "false"];
        assert_eq!(sharded(&whole), Some(false));
        for (extra, says) in [
            (&["--data-parallel", "3"][..], "do not divide the 4"),
            (&["--data-parallel", "2", "--pipeline", "3"][..], "need 6"),
            (
                &["--data-parallel", "4", "--global-batch", "6"][..],
                "does not split",
            ),
        ] {
            let err = run(&tiny(extra)).unwrap_err().to_string();
            assert!(
                err.starts_with("--data-parallel") && err.contains(says),
                "{err}"
            );
        }
    }

    #[test]
    fn unknown_presets_and_bad_values_say_which_flag() {
        let p = parse(&["--model", "nope", "--cluster", "cpu-4x1g"]);
        let err = run(&p).unwrap_err().to_string();
        assert!(err.starts_with("--model"), "{err}");
        assert!(err.contains("llama2-70b"), "{err}");
        let p = tiny(&["--schedule", "zigzag"]);
        assert!(run(&p).unwrap_err().to_string().starts_with("schedule"));
        let p = tiny(&["--layers", "0"]);
        assert!(run(&p).unwrap_err().to_string().starts_with("model.layers"));
    }

    #[test]
    fn capacity_json_has_the_documented_fields() {
        let flags = ["--microbatches", "8", "--json"];
        let p = parse(&[&["capacity"][..], &TINY_ON_CPU, &flags].concat());
        let out = run(&p).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let rows = v["strategies"].as_array().unwrap();
        assert_eq!(rows.len(), 8);
        for key in ["name", "max_layers", "params", "tokens_per_s", "peak_bytes"] {
            assert!(rows[0].get(key).is_some(), "{key}");
        }
    }
}
