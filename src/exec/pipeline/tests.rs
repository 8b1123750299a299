//! The runtime against the single-device reference: every schedule, stage count, recompute
//! and offload choice must give bit-identical weights.

use super::*;
use crate::data::{BatchLayout, Batcher};
use crate::exec::backend::CpuBackend;
use crate::exec::backend::cpu::kernels::rope::Rope;
use crate::exec::device::Pool;
use crate::exec::train::SingleDevice;
use crate::plan::inventory::ModelDims;
use crate::plan::schedule::{ScheduleKind, build};
use crate::spec::Architecture;

pub(super) const STEPS: u64 = 3;
const MICROBATCHES: usize = 4;

pub(super) fn config() -> LlamaConfig {
    config_tied(false)
}

/// The test model, its embeddings `tied` or not.
pub(super) fn config_tied(tied: bool) -> LlamaConfig {
    LlamaConfig {
        dims: ModelDims {
            hidden: 32,
            layers: 8,
            heads: 4,
            kv_heads: 2,
            ffn: 48,
            vocab: 256,
            qkv_bias: false,
            tied_embeddings: tied,
        },
        rms_norm_eps: 1e-5,
        rope: Rope::plain(10000.0),
        architecture: Architecture::Llama,
        max_position_embeddings: 4096,
    }
}

pub(super) fn batcher() -> Batcher {
    let text = "pipelines keep every device busy while memory stays small. ".repeat(30);
    let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
    let layout = BatchLayout {
        seq_len: 16,
        micro_batch_size: 2,
        microbatches: MICROBATCHES,
        shuffle: false,
        seed: 0,
    };
    Batcher::new(&tokens, 256, layout).unwrap()
}

/// Weights after `STEPS` steps, in model order, as raw bits.
pub(super) fn reference_weights() -> Vec<Vec<u32>> {
    reference_weights_of(config())
}

pub(super) fn reference_weights_of(config: LlamaConfig) -> Vec<Vec<u32>> {
    let mut single = SingleDevice::from_seed(
        config,
        Pool::new("cpu:0", 256 << 20),
        CpuBackend::default(),
        7,
        OptimizerConfig::default(),
        LrSchedule::constant(1e-2),
        Some(1.0),
    )
    .unwrap();
    let mut data = batcher();
    for step in 0..STEPS {
        single.train_step(&data.step(step)).unwrap();
    }
    single
        .parts
        .iter()
        .flat_map(|p| p.weights.iter().map(bits))
        .collect()
}

pub(super) fn bits(t: &crate::exec::tensor::Tensor) -> Vec<u32> {
    t.data().iter().map(|x| x.to_bits()).collect()
}

pub(super) fn pipeline(plan: Plan, budget: usize) -> Result<Pipeline, PipelineError> {
    pipeline_of(config(), plan, budget)
}

pub(super) fn pipeline_of(
    config: LlamaConfig,
    plan: Plan,
    budget: usize,
) -> Result<Pipeline, PipelineError> {
    let devices = DeviceSet::parse(&format!("cpu:{}x{budget}", plan.total_devices())).unwrap();
    let parts = seeded_parts(&config, &devices.host, 7)?;
    Pipeline::new(
        config,
        plan,
        devices,
        CpuEngine {
            backend: CpuBackend::default(),
        },
        parts,
        OptimizerConfig::default(),
        LrSchedule::constant(1e-2),
        Some(1.0),
    )
}

pub(super) fn trained_weights(plan: Plan) -> Vec<Vec<u32>> {
    trained_weights_of(config(), plan)
}

pub(super) fn trained_weights_of(config: LlamaConfig, plan: Plan) -> Vec<Vec<u32>> {
    let mut p = pipeline_of(config, plan, 256 << 20).unwrap();
    let mut data = batcher();
    for step in 0..STEPS {
        p.train_step(&data.step(step)).unwrap();
    }
    p.parts()
        .iter()
        .flat_map(|part| part.weights.iter().map(bits))
        .collect()
}

/// Drops the stash of `chunks` after each forward and recomputes it just before the backward.
pub(super) fn with_recompute(mut plan: Plan, chunks: &[u32]) -> Plan {
    for program in &mut plan.programs {
        let mut out = Vec::new();
        for &a in program.iter() {
            match a {
                Action::Forward { mb, chunk, .. } if chunks.contains(&chunk) => {
                    out.push(Action::Forward {
                        mb,
                        chunk,
                        drop_stash: true,
                    })
                }
                Action::Backward { mb, chunk } if chunks.contains(&chunk) => {
                    out.push(Action::Recompute { mb, chunk });
                    out.push(a);
                }
                _ => out.push(a),
            }
        }
        *program = out;
    }
    plan
}

/// The plan with each chunk's optimizer state and step cut into `slices`.
pub(super) fn with_optimizer_slices(mut plan: Plan, slices: u32) -> Plan {
    for program in &mut plan.programs {
        program.retain(|a| !matches!(a, Action::Step { .. }));
    }
    plan.optimizer_slices = slices;
    crate::plan::schedule::with_steps(plan)
}

/// Sends every stash to the host after its forward and brings it back before it is needed;
/// keeps each chunk's optimizer state on the host between steps.
pub(super) fn with_offload(mut plan: Plan) -> Plan {
    for program in &mut plan.programs {
        let mut out = Vec::new();
        for &a in program.iter() {
            match a {
                Action::Forward { mb, chunk, .. } => {
                    out.push(a);
                    out.push(Action::Offload(Group::Stash { mb, chunk }));
                }
                Action::Recompute { mb, chunk } => {
                    out.push(Action::Prefetch(Group::Stash { mb, chunk }));
                    out.push(a);
                }
                Action::Backward { mb, chunk } => {
                    if !matches!(out.last(), Some(Action::Recompute { .. })) {
                        out.push(Action::Prefetch(Group::Stash { mb, chunk }));
                    }
                    out.push(a);
                }
                Action::Step { chunk, slice } => {
                    out.push(Action::Prefetch(Group::Optimizer { chunk, slice }));
                    out.push(a);
                    out.push(Action::Offload(Group::Optimizer { chunk, slice }));
                }
                _ => out.push(a),
            }
        }
        *program = out;
    }
    plan
}

/// Every schedule on 1, 2 and 4 devices (interleaved needs 2 or more), with its label.
pub(super) fn every_schedule() -> Vec<(String, Plan)> {
    let m = MICROBATCHES as u32;
    let layers = config().dims.layers as u32;
    let mut plans = Vec::new();
    for devices in [1, 2, 4] {
        for kind in ScheduleKind::EACH {
            if matches!(kind, ScheduleKind::Interleaved { .. }) && devices == 1 {
                continue;
            }
            let plan = build(kind, devices, m, layers).unwrap();
            plans.push((format!("{kind} on {devices} devices"), plan));
        }
    }
    plans
}

#[test]
fn every_schedule_trains_bit_identically_to_one_device() {
    let reference = reference_weights();
    for (label, plan) in every_schedule() {
        let chunks: Vec<u32> = (0..plan.chunks.len() as u32).collect();
        let variants = [
            ("plain", plan.clone()),
            ("recompute", with_recompute(plan.clone(), &chunks)),
            ("offload", with_offload(plan.clone())),
            (
                "recompute+offload",
                with_offload(with_recompute(plan.clone(), &chunks[..1])),
            ),
            (
                "offload, 3 optimizer slices",
                with_offload(with_optimizer_slices(plan.clone(), 3)),
            ),
        ];
        for (name, variant) in variants {
            let got = trained_weights(variant);
            assert!(got == reference, "{label} ({name}) differs from one device");
        }
    }
}

/// The planner's predicted peak (cpu-f32 inventory, simulated plan) against the pools'
/// measured peak, device by device.
pub(super) fn peaks(plan: &Plan) -> (Vec<u64>, Vec<u64>) {
    peaks_of(config(), plan)
}

pub(super) fn peaks_of(config: LlamaConfig, plan: &Plan) -> (Vec<u64>, Vec<u64>) {
    use crate::plan::inventory::{MicroShape, Profile};
    use crate::plan::simulate::{Hardware, chunk_costs, simulate};
    let hw = Hardware {
        peak_flops: 50e9,
        efficiency: 1.0,
        hbm_bytes_per_s: 20e9,
        p2p_bytes_per_s: 1e30,
        p2p_latency_s: 0.0,
        host_bytes_per_s: 1e30,
    };
    let micro = MicroShape { batch: 2, seq: 16 };
    let costs = chunk_costs(plan, Profile::CpuF32, &config.dims, micro, &hw);
    let sim = simulate(plan, &costs, &hw, false).unwrap();
    // Every replica's devices run the same programs: one replica is simulated.
    let one: Vec<u64> = sim.devices.iter().map(|d| d.peak_bytes).collect();
    let predicted = one.repeat(plan.replicas as usize);
    let mut p = pipeline_of(config, plan.clone(), 256 << 20).unwrap();
    let mut data = batcher();
    for step in 0..2 {
        p.train_step(&data.step(step)).unwrap();
    }
    let measured = p.measured_peaks().into_iter().map(|b| b as u64).collect();
    (predicted, measured)
}

#[test]
fn measured_peak_equals_the_planners_prediction() {
    for (label, plan) in every_schedule() {
        let chunks: Vec<u32> = (0..plan.chunks.len() as u32).collect();
        for (name, variant) in [
            ("plain", plan.clone()),
            ("recompute", with_recompute(plan.clone(), &chunks)),
            ("offload", with_offload(plan.clone())),
            (
                "offload, 3 optimizer slices",
                with_offload(with_optimizer_slices(plan.clone(), 3)),
            ),
        ] {
            let (predicted, measured) = peaks(&variant);
            // The issue asks for 1%; the shared inventory and rules give the exact bytes.
            assert_eq!(
                predicted, measured,
                "{label}, {name}: predicted vs measured peak bytes\n{variant}"
            );
        }
    }
}
