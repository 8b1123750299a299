//! Data-parallel replicas against the single-device reference: the same global batch gives
//! the same weights to within rounding (the replicas' sums are added in another order),
//! bit-identical from run to run, with the predicted peak measured on every device.

use super::tests::{
    STEPS, batcher, config, peaks, pipeline, reference_weights, trained_weights, with_offload,
    with_recompute,
};
use super::*;
use crate::plan::reduction::with_gradient_reduction;
use crate::plan::schedule::{ScheduleKind, build};

/// Every schedule on 1 and 2 stages for `replicas` replicas sharing the 4 micro-batches of
/// a step (interleaved needs 2 stages, and a multiple of them in micro-batches).
fn replicated(replicas: u32) -> Vec<(String, Plan)> {
    let layers = config().dims.layers as u32;
    let mut plans = Vec::new();
    for stages in [1, 2] {
        for kind in ScheduleKind::EACH {
            let m = 4 / replicas;
            if matches!(kind, ScheduleKind::Interleaved { .. })
                && (stages == 1 || !m.is_multiple_of(stages))
            {
                continue;
            }
            let plan = build(kind, stages, m, layers).unwrap();
            let plan = with_gradient_reduction(plan, replicas).unwrap();
            plans.push((
                format!("{kind}, {stages} stages x {replicas} replicas"),
                plan,
            ));
        }
    }
    plans
}

/// The largest relative difference of any tensor (its distance over its norm, in f64).
fn max_relative(got: &[Vec<u32>], want: &[Vec<u32>]) -> f64 {
    let value = |b: &u32| f32::from_bits(*b) as f64;
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            let diff: f64 = g
                .iter()
                .zip(w)
                .map(|(a, b)| (value(a) - value(b)).powi(2))
                .sum();
            let norm: f64 = w.iter().map(|b| value(b).powi(2)).sum();
            (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
        })
        .fold(0.0, f64::max)
}

#[test]
fn replicas_train_to_the_single_device_weights_and_repeat_bit_for_bit() {
    let reference = reference_weights();
    for replicas in [2, 4] {
        for (label, plan) in replicated(replicas) {
            let chunks: Vec<u32> = (0..plan.chunks.len() as u32).collect();
            for (name, variant) in [
                ("plain", plan.clone()),
                (
                    "recompute+offload",
                    with_offload(with_recompute(plan, &chunks[..1])),
                ),
            ] {
                let got = trained_weights(variant.clone());
                // The whole model within 1e-6; a small tensor (a norm's weights, near 1) may
                // be a few more ulps off.
                let whole = max_relative(&[got.concat()], &[reference.concat()]);
                assert!(whole <= 1e-6, "{label} ({name}): {whole:e} from one device");
                let tensor = max_relative(&got, &reference);
                assert!(tensor <= 1e-5, "{label} ({name}): a tensor {tensor:e} off");
                // Another order of the same sums moves some bits; none would mean no reduction.
                assert!(
                    got != reference,
                    "{label} ({name}): replicas did not reduce"
                );
                assert!(
                    trained_weights(variant) == got,
                    "{label} ({name}): not repeatable"
                );
            }
        }
    }
}

/// Each replica's weights, as raw bits, replica by replica.
fn replica_weights(p: &Pipeline) -> Vec<Vec<Vec<u32>>> {
    let stages = p.plan.devices();
    p.chunks
        .chunks(stages)
        .map(|replica| {
            let mut parts: Vec<&PartParams> =
                replica.iter().flatten().flat_map(|c| &c.parts).collect();
            parts.sort_by_key(|part| part.id);
            parts
                .iter()
                .flat_map(|part| part.weights.iter().map(super::tests::bits))
                .collect()
        })
        .collect()
}

#[test]
fn the_reduction_is_what_keeps_the_replicas_equal() {
    for (label, plan) in replicated(2) {
        let mut with = pipeline(plan.clone(), 256 << 20).unwrap();
        // The same programs with the reductions taken out after validation: each replica
        // steps on the gradients of its own half of the batch.
        let mut without = pipeline(plan, 256 << 20).unwrap();
        for program in &mut without.plan.programs {
            program.retain(|a| !matches!(a, Action::Reduce { .. }));
        }
        let mut data = batcher();
        for step in 0..STEPS {
            with.train_step(&data.step(step)).unwrap();
            without.train_step(&data.step(step)).unwrap();
        }
        let [a, b] = <[_; 2]>::try_from(replica_weights(&with)).unwrap();
        assert!(a == b, "{label}: replicas differ after reducing");
        let [a, b] = <[_; 2]>::try_from(replica_weights(&without)).unwrap();
        assert!(a != b, "{label}: replicas agree without reducing");
    }
}

#[test]
fn measured_peak_equals_the_prediction_on_every_replica() {
    for (label, plan) in replicated(2) {
        let chunks: Vec<u32> = (0..plan.chunks.len() as u32).collect();
        for (name, variant) in [
            ("plain", plan.clone()),
            ("recompute", with_recompute(plan.clone(), &chunks)),
            ("offload", with_offload(plan)),
        ] {
            let (predicted, measured) = peaks(&variant);
            assert_eq!(predicted.len(), variant.total_devices());
            assert_eq!(predicted, measured, "{label}, {name}\n{variant}");
        }
    }
}

#[test]
fn a_step_takes_every_replicas_share_of_the_batch() {
    let (_, plan) = replicated(2).remove(0);
    let mut p = pipeline(plan, 256 << 20).unwrap();
    let mut data = batcher();
    let half = &data.step(0)[..2];
    let err = p.train_step(half).map(|_| ()).unwrap_err();
    assert!(
        matches!(err, PipelineError::MicrobatchCount { plan: 4, given: 2 }),
        "{err}"
    );
}

/// A device thread that panics fails the step with an error naming the device. Replica 1
/// panics (it reads micro-batch 2 + 2 of a 4-micro-batch step) while replica 0 waits for it
/// at the gradient reduction; the waiting thread is joined first, so before the panic stopped
/// the step itself this call never returned.
#[test]
fn a_panicking_device_thread_fails_the_step_instead_of_hanging_it() {
    let layers = config().dims.layers as u32;
    let plan = build(ScheduleKind::OneFOneB, 1, 2, layers).unwrap();
    let mut p = pipeline(with_gradient_reduction(plan, 2).unwrap(), 256 << 20).unwrap();
    let extra = Action::Forward {
        mb: 2,
        chunk: 0,
        drop_stash: false,
    };
    p.plan.programs[0].insert(0, extra);
    let (done, answer) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = p.train_step(&batcher().step(0)).map(|_| ());
        let _ = done.send(result);
    });
    match answer.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(Err(PipelineError::Panicked { device: 1 })) => {}
        other => panic!("the step should fail naming device 1: {other:?}"),
    }
}
