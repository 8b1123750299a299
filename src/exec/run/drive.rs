//! The training loop: step, evaluate the validation data when due, report, checkpoint; until
//! the last step, a stop request, or early stopping.

use std::path::PathBuf;

use super::{Observer, Outcome, Run, RunError, Stop};

/// Steps `run` to the end of its training, checkpointing every `training.checkpoint_every`
/// steps and at the end, unless the observer stops it first. With validation data, each
/// step `training.evaluates_at` is evaluated before its metrics are reported; with
/// `training.early_stopping`, an evaluation that sets a new lowest validation loss also saves
/// a checkpoint (so the best model is kept), and `patience` evaluations in a row without
/// improvement end the run with a checkpoint of where it stopped.
pub fn drive(run: &mut Run, observer: &mut dyn Observer) -> Result<Outcome, RunError> {
    observer.plan_chosen(run)?;
    let total = run.total_steps();
    let every = run.spec.training.checkpoint_every;
    let early_stopping = run.spec.training.early_stopping;
    let mut last_loss = None;
    while run.step() < total {
        match observer.stop_requested() {
            Some(Stop::Now) => return Ok(Outcome::Stopped { step: run.step() }),
            Some(Stop::Checkpoint) => {
                let step = run.step();
                save(run, observer, step, false, last_loss)?;
                return Ok(Outcome::Stopped { step });
            }
            None => {}
        }
        let mut metrics = run.train_step()?;
        last_loss = Some(metrics.loss);
        let step = metrics.step;
        let evaluation = if run.spec.training.evaluates_at(step, total) {
            run.evaluate()?
        } else {
            None
        };
        if let Some(evaluation) = &evaluation {
            metrics.val_loss = Some(evaluation.val_loss);
            observer.evaluated(evaluation)?;
        }
        observer.step(&metrics)?;
        let progress = run.validation_progress();
        let out_of_patience = early_stopping.is_some_and(|e| {
            evaluation.is_some() && progress.evaluations_without_improvement >= e.patience
        });
        if out_of_patience && step < total {
            let dir = save(run, observer, step, true, last_loss)?;
            return Ok(Outcome::StoppedEarly {
                step,
                final_dir: dir,
                best_step: progress.best_step,
            });
        }
        let new_best = early_stopping.is_some() && progress.best_step == Some(step);
        let scheduled = every.is_some_and(|k| step.is_multiple_of(k));
        if step < total && (scheduled || (evaluation.is_some() && new_best)) {
            save(run, observer, step, false, last_loss)?;
        }
    }
    let step = run.step();
    let dir = save(run, observer, step, true, last_loss)?;
    Ok(Outcome::Completed { final_dir: dir })
}

/// Writes the checkpoint after `step` (`last`: the run's final one) where the observer says,
/// once it agrees; returns where. In a run over ranks only the rank that completes the
/// checkpoint reports it saved (the others wrote their shards of it).
fn save(
    run: &Run,
    observer: &mut dyn Observer,
    step: u64,
    last: bool,
    last_loss: Option<f64>,
) -> Result<PathBuf, RunError> {
    observer.before_checkpoint(step)?;
    let dir = observer.checkpoint_dir(step, last);
    run.save_checkpoint(&dir, last_loss)?;
    if run.commits_checkpoints() {
        observer.checkpoint_saved(step, &dir)?;
    }
    Ok(dir)
}
