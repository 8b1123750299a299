//! `chronospipe train JOB.json`: plans, trains with a progress line, writes checkpoints under
//! `--out` (`step-<k>/` and `final/`) and `summary.json` at the end.
//!
//! With `--rank R --peers A,B,...` the process is rank `R` of a run spread over processes:
//! every rank plans the same job on the same devices and runs its block of them, reaching the
//! others over TCP; every rank writes its shard of each checkpoint (Hugging Face's sharded
//! layout), rank 0 completes it and writes `summary.json`, rank `R` writes
//! `summary-rank-R.json` for its own devices.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use crate::exec::checkpoint::retention::{Kept, to_delete};
use crate::exec::run::{Evaluation, Observer, Outcome, Run, RunError, StepMetrics, drive};
use crate::exec::transport::RankSpec;
use crate::plan::render;
use crate::spec::{JobSpec, StoragePolicy};

/// Devices used when neither the job nor `--devices` names any.
pub const DEFAULT_DEVICES: &str = "cpu:1x4GiB";

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The job spec (JSON): model, data, training, parallelism, devices.
    pub job: PathBuf,
    /// Where checkpoints and summary.json go.
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// Devices, e.g. `cpu:4x256MiB`, `cuda` or `cuda:1@40GiB` (the whole model on GPU 1, at
    /// most 40 GiB of it), `cuda:0x4` (four pipeline stages sharing GPU 0) or `cuda:0,1` (a
    /// stage on each); overrides the job's `devices`.
    #[arg(long)]
    pub devices: Option<String>,
    /// Train this many steps instead of the job's `training.steps` or `training.epochs`.
    #[arg(long)]
    pub steps: Option<u64>,
    #[command(flatten)]
    pub ranks: RankArgs,
}

/// Running one rank of a run spread over processes.
#[derive(Debug, Clone, Default, Args)]
pub struct RankArgs {
    /// Run as rank R of a run spread over processes (needs --peers): rank R of K runs the
    /// R-th of K equal blocks of the plan's devices (replica by replica, stage by stage).
    #[arg(long, requires = "peers")]
    pub rank: Option<u32>,
    /// Every rank's address, HOST:PORT, comma-separated in rank order; this rank listens on
    /// its own.
    #[arg(long, requires = "rank")]
    pub peers: Option<String>,
    /// Seconds to keep trying to reach the other ranks [default: 60].
    #[arg(long)]
    pub connect_timeout: Option<u64>,
}

/// What `summary.json` holds.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub steps: u64,
    pub final_loss: Option<f64>,
    /// The last evaluation's validation loss (`data.validation`), and the best one's step.
    pub val_loss: Option<f64>,
    pub best_val_step: Option<u64>,
    /// `training.early_stopping` ended the run before its last step.
    pub stopped_early: bool,
    pub tokens_per_s: f64,
    pub plan: String,
    /// Data-parallel replicas (1: one pipeline).
    pub replicas: u32,
    pub devices: Vec<DeviceSummary>,
}

#[derive(Debug, Serialize)]
pub struct DeviceSummary {
    pub device: usize,
    /// The replica the device belongs to, and its place in that replica's pipeline.
    pub replica: usize,
    pub stage: usize,
    pub measured_peak_bytes: u64,
    pub predicted_peak_bytes: u64,
    /// Seconds in gradient reductions across replicas over the whole run.
    pub reduction_s: f64,
}

/// Prints the plan and a progress line per step to standard error.
struct Progress {
    out: PathBuf,
    total: u64,
    started: Instant,
    tokens: u64,
    last_loss: Option<f64>,
    /// Per device, seconds in gradient reductions so far.
    reduction_s: Vec<f64>,
    /// `training.keep_checkpoints`, and the checkpoints written so far with their
    /// directories.
    keep: Option<u64>,
    saved: Vec<(Kept, PathBuf)>,
    last_eval: Option<Evaluation>,
}

impl Observer for Progress {
    fn plan_chosen(&mut self, run: &Run) -> Result<(), RunError> {
        eprint!("{}", render::text(&run.answer));
        Ok(())
    }

    fn step(&mut self, m: &StepMetrics) -> Result<(), RunError> {
        self.tokens += m.tokens;
        self.last_loss = Some(m.loss);
        self.reduction_s.resize(m.device_reduction_s.len(), 0.0);
        for (total, s) in self.reduction_s.iter_mut().zip(&m.device_reduction_s) {
            *total += s;
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = elapsed / m.step as f64 * (self.total - m.step) as f64;
        let width = 30;
        let done = (width as u64 * m.step / self.total.max(1)) as usize;
        eprint!(
            "\r[{}{}] step {}/{} loss {:.4} {:.0} tok/s eta {:.0}s ",
            "#".repeat(done),
            ".".repeat(width - done),
            m.step,
            self.total,
            m.loss,
            self.tokens as f64 / elapsed.max(1e-9),
            eta
        );
        if m.step == self.total {
            eprintln!();
        }
        std::io::stderr()
            .flush()
            .map_err(|e| RunError::Observer(e.to_string()))
    }

    fn evaluated(&mut self, e: &Evaluation) -> Result<(), RunError> {
        eprintln!(
            "\rstep {}: validation loss {:.4} over {} windows ({:.1}s)",
            e.step, e.val_loss, e.val_windows, e.eval_time_s
        );
        self.last_eval = Some(e.clone());
        Ok(())
    }

    /// Applies `training.keep_checkpoints` to the directories written so far.
    fn checkpoint_saved(&mut self, step: u64, dir: &Path) -> Result<(), RunError> {
        let val_loss = (self.last_eval.as_ref())
            .filter(|e| e.step == step)
            .map(|e| e.val_loss);
        self.saved
            .push((Kept { step, val_loss }, dir.to_path_buf()));
        let Some(keep) = self.keep else {
            return Ok(());
        };
        let kept: Vec<Kept> = self.saved.iter().map(|(k, _)| *k).collect();
        let doomed = to_delete(&kept, keep as usize, &[]);
        for (k, dir) in self.saved.iter().filter(|(k, _)| doomed.contains(&k.step)) {
            std::fs::remove_dir_all(dir).map_err(|e| RunError::Io {
                path: dir.clone(),
                reason: format!("cannot delete the checkpoint of step {}: {e}", k.step),
            })?;
        }
        self.saved.retain(|(k, _)| !doomed.contains(&k.step));
        Ok(())
    }

    fn checkpoint_dir(&self, step: u64, last: bool) -> PathBuf {
        if last {
            self.out.join("final")
        } else {
            self.out.join(format!("step-{step}"))
        }
    }
}

/// Runs the command; returns the summary it wrote.
pub fn run(args: &TrainArgs) -> anyhow::Result<Summary> {
    let text = std::fs::read_to_string(&args.job)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.job.display()))?;
    let mut spec = JobSpec::from_json(&text)?;
    if spec.training.storage_policy() == Some(StoragePolicy::Pause) {
        anyhow::bail!(
            "training.on_storage_error: \"pause\" needs the service, where a paused job resumes; \
             the command line stops on a full disk (use \"fail\")"
        );
    }
    resolve_paths(&mut spec, args.job.parent().unwrap_or(Path::new(".")));
    if let Some(steps) = args.steps {
        spec.training.steps = Some(steps);
        spec.training.epochs = None;
    }
    if let Some(devices) = &args.devices {
        spec.devices = Some(devices.clone());
    }
    let mut run = match (args.ranks.rank, &args.ranks.peers) {
        (Some(rank), Some(peers)) => {
            let secs = args.ranks.connect_timeout.unwrap_or(60);
            let timeout = std::time::Duration::from_secs(secs);
            let rank = RankSpec::parse(rank, peers, timeout)?;
            Run::prepare_rank(spec, DEFAULT_DEVICES, rank, u64::MAX)?
        }
        _ => Run::prepare(spec, DEFAULT_DEVICES)?,
    };
    let mut progress = Progress {
        out: args.out.clone(),
        total: run.total_steps(),
        started: Instant::now(),
        tokens: 0,
        last_loss: None,
        reduction_s: Vec::new(),
        keep: run.spec.training.keep_checkpoints,
        saved: Vec::new(),
        last_eval: None,
    };
    let outcome = match drive(&mut run, &mut progress) {
        Ok(outcome) => outcome,
        Err(e) => {
            run.abort_ranks(&e.to_string());
            return Err(e.into());
        }
    };
    debug_assert!(matches!(
        outcome,
        Outcome::Completed { .. } | Outcome::StoppedEarly { .. }
    ));
    run.close_ranks()?;
    let validation = run.validation_progress();
    let elapsed = progress.started.elapsed().as_secs_f64();
    let predicted = run.predicted_peaks();
    let stages = run.answer.plan.devices().max(1);
    let local = run.local_devices();
    let summary = Summary {
        steps: run.step(),
        final_loss: progress.last_loss,
        val_loss: validation.last_val_loss,
        best_val_step: validation.best_step,
        stopped_early: matches!(outcome, Outcome::StoppedEarly { .. }),
        tokens_per_s: progress.tokens as f64 / elapsed.max(1e-9),
        plan: run.answer.best.choices.clone(),
        replicas: run.answer.plan.replicas,
        devices: run
            .measured_peaks()
            .into_iter()
            .zip(predicted)
            .enumerate()
            .filter(|(device, _)| local.contains(&(*device as u32)))
            .map(|(device, (measured, predicted))| DeviceSummary {
                device,
                replica: device / stages,
                stage: device % stages,
                measured_peak_bytes: measured,
                predicted_peak_bytes: predicted,
                reduction_s: (progress.reduction_s)
                    .get(device - local.start as usize)
                    .copied()
                    .unwrap_or(0.0),
            })
            .collect(),
    };
    let path = match args.ranks.rank {
        Some(r) if r > 0 => args.out.join(format!("summary-rank-{r}.json")),
        _ => args.out.join("summary.json"),
    };
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(summary)
}

/// Relative data, tokenizer and model paths are relative to the job file.
fn resolve_paths(spec: &mut JobSpec, base: &Path) {
    let fix = |p: &mut String| {
        let path = Path::new(p.as_str());
        if path.is_relative() && !base.as_os_str().is_empty() && base.join(path).exists() {
            *p = base.join(path).to_string_lossy().into_owned();
        }
    };
    fix(&mut spec.data.train);
    if let Some(v) = &mut spec.data.validation {
        fix(v);
    }
    if spec.data.tokenizer != "bytes" {
        fix(&mut spec.data.tokenizer);
    }
    if let crate::spec::ModelInit::From { from } = &mut spec.model.init {
        fix(from);
    }
}
