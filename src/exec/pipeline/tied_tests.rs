//! Tied embeddings through the runtime: the head's copy of the table and the embedding's stay
//! equal to the bit, every schedule on 1, 2 and 4 devices trains bit-identically to one device
//! (whose copies are summed the same way), replicas (whole or sharded optimizer state) agree
//! with it to rounding, and every device's predicted peak is measured to the byte.

use super::tests::{
    STEPS, batcher, config_tied, every_schedule, peaks_of, pipeline_of, reference_weights_of,
    trained_weights_of, with_offload, with_optimizer_slices, with_recompute,
};
use super::*;
use crate::exec::model::params::TIED_TABLE;
use crate::plan::reduction::{with_gradient_reduction, with_sharded_optimizer};
use crate::plan::schedule::{ScheduleKind, build};
use crate::plan::tying::with_tied_embeddings;

fn tied(plan: Plan) -> Plan {
    with_tied_embeddings(plan).unwrap()
}

/// The embedding's table and the head's copy of it, as raw bits.
fn tables(p: &Pipeline) -> Vec<Vec<u32>> {
    let parts = p.parts();
    (parts.iter())
        .flat_map(|part| part.names.iter().zip(&part.weights))
        .filter(|(name, _)| *name == TIED_TABLE)
        .map(|(_, w)| super::tests::bits(w))
        .collect()
}

#[test]
fn every_schedule_trains_a_tied_model_bit_identically_to_one_device() {
    let config = config_tied(true);
    let reference = reference_weights_of(config);
    let untied = reference_weights_of(config_tied(false));
    assert!(reference != untied, "tying changes what is trained");
    for (label, plan) in every_schedule() {
        let plan = tied(plan);
        let chunks: Vec<u32> = (0..plan.chunks.len() as u32).collect();
        let variants = [
            ("plain", plan.clone()),
            ("recompute", with_recompute(plan.clone(), &chunks)),
            (
                "offload, 3 optimizer slices",
                with_offload(with_optimizer_slices(plan.clone(), 3)),
            ),
        ];
        for (name, variant) in variants {
            let got = trained_weights_of(config, variant);
            assert!(got == reference, "{label} ({name}) differs from one device");
        }
    }
}

#[test]
fn the_two_copies_stay_equal_and_tie_is_what_keeps_them() {
    let config = config_tied(true);
    let layers = config.dims.layers as u32;
    let plan = tied(build(ScheduleKind::OneFOneB, 2, 4, layers).unwrap());
    let mut with = pipeline_of(config, plan.clone(), 256 << 20).unwrap();
    let mut without = pipeline_of(config, plan, 256 << 20).unwrap();
    for program in &mut without.plan.programs {
        program.retain(|a| *a != Action::Tie);
    }
    let mut data = batcher();
    for step in 0..STEPS {
        with.train_step(&data.step(step)).unwrap();
        without.train_step(&data.step(step)).unwrap();
    }
    let [a, b] = <[_; 2]>::try_from(tables(&with)).unwrap();
    assert!(a == b, "the copies differ after summing");
    let [a, b] = <[_; 2]>::try_from(tables(&without)).unwrap();
    assert!(a != b, "the copies agree without summing");
}

#[test]
fn a_tied_model_needs_a_tied_plan_and_the_reverse() {
    let layers = config_tied(true).dims.layers as u32;
    let plan = build(ScheduleKind::OneFOneB, 2, 4, layers).unwrap();
    let err = pipeline_of(config_tied(true), plan.clone(), 256 << 20).err();
    assert!(
        matches!(err, Some(PipelineError::TiedPlan { tied: true })),
        "{err:?}"
    );
    let err = pipeline_of(config_tied(false), tied(plan), 256 << 20).err();
    assert!(
        matches!(err, Some(PipelineError::TiedPlan { tied: false })),
        "{err:?}"
    );
}

#[test]
fn measured_peak_equals_the_prediction_with_tied_embeddings() {
    let config = config_tied(true);
    for (label, plan) in every_schedule() {
        let plan = tied(plan);
        let chunks: Vec<u32> = (0..plan.chunks.len() as u32).collect();
        for (name, variant) in [
            ("plain", plan.clone()),
            ("recompute", with_recompute(plan.clone(), &chunks)),
            ("offload", with_offload(plan)),
        ] {
            let (predicted, measured) = peaks_of(config, &variant);
            assert_eq!(
                predicted, measured,
                "{label}, {name}: predicted vs measured peak bytes\n{variant}"
            );
        }
    }
}

/// Replicas of a tied plan, optimizer state whole or sharded: within rounding of one device
/// (the replicas' sums add in another order), repeatable to the bit, predicted == measured.
#[test]
fn tied_replicas_whole_or_sharded_match_one_device() {
    let config = config_tied(true);
    let reference = reference_weights_of(config);
    let layers = config.dims.layers as u32;
    for stages in [1, 2] {
        let plan = tied(build(ScheduleKind::OneFOneB, stages, 2, layers).unwrap());
        let two = with_gradient_reduction(plan, 2).unwrap();
        for (name, variant) in [
            ("whole", two.clone()),
            ("sharded", with_sharded_optimizer(two).unwrap()),
        ] {
            let got = trained_weights_of(config, variant.clone());
            let diff = (got.concat().iter().zip(reference.concat()))
                .map(|(a, b)| (f32::from_bits(*a) - f32::from_bits(b)).abs())
                .fold(0.0f32, f32::max);
            assert!(
                diff < 1e-5,
                "{stages} stages, {name}: {diff:e} from one device"
            );
            assert!(
                trained_weights_of(config, variant.clone()) == got,
                "{name}: repeat"
            );
            let (predicted, measured) = peaks_of(config, &variant);
            assert_eq!(predicted, measured, "{stages} stages, {name}\n{variant}");
        }
    }
}
