//! Pins what the planner produces for a few configurations: the plan text of every schedule,
//! simulated times and peaks to the last bit, the policy's choices and the search's winners
//! and runners-up. Recorded from the planner before its modules were reorganised, so a
//! refactor that moves any of them fails here. After a deliberate change of the planner's
//! results, rewrite the record with `PIN_UPDATE=1 cargo nextest run --test plan_pinned` and
//! say in the commit what moved and why.

use std::fmt::Write;

use chronospipe::plan::inventory::{MicroShape, ModelDims};
use chronospipe::plan::ir::Plan;
use chronospipe::plan::policy::{Budget, Offload, Recompute, apply};
use chronospipe::plan::presets::{self, Cluster, ProfileName};
use chronospipe::plan::schedule::{ScheduleKind, build};
use chronospipe::plan::search::{Request, describe, search};
use chronospipe::plan::simulate::{Simulation, chunk_costs, simulate};

const RECORD: &str = "tests/fixtures/plan_pinned.txt";

/// FNV-1a of a plan's text: large plans are pinned by this, small ones in full.
fn fingerprint(plan: &Plan) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in plan.to_string().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn sim_lines(out: &mut String, sim: &Simulation) {
    let _ = writeln!(
        out,
        "  step {:?} bubble {:?}",
        sim.step_time_s, sim.bubble_ratio
    );
    for (d, dev) in sim.devices.iter().enumerate() {
        let _ = writeln!(
            out,
            "  device {d}: peak {} host {} busy {:?} stall {:?} at_peak {:?}",
            dev.peak_bytes, dev.host_peak_bytes, dev.busy_s, dev.prefetch_stall_s, dev.at_peak
        );
    }
}

fn tiny() -> ModelDims {
    presets::model("tiny").unwrap()
}

/// Every schedule on four CPU devices and on four GPU stages with finite links, in full.
fn schedules(out: &mut String) {
    let mut gpu = Cluster::cuda(4, 1 << 30, ProfileName::CudaF32);
    gpu.p2p_bytes_per_s = 1e9;
    gpu.p2p_latency_s = 1e-5;
    gpu.host_bytes_per_s = 2e9;
    let kinds = [
        ScheduleKind::Gpipe,
        ScheduleKind::OneFOneB,
        ScheduleKind::Interleaved {
            chunks_per_device: 2,
        },
        ScheduleKind::Chronos { in_flight: 0 },
        ScheduleKind::Chronos { in_flight: 3 },
    ];
    for kind in kinds {
        let plan = build(kind, 4, 8, 8).unwrap();
        let _ = writeln!(out, "schedule {kind}\n{plan}");
        for cluster in [Cluster::cpu(4, 1 << 30), gpu.clone()] {
            let micro = MicroShape { batch: 2, seq: 32 };
            let hw = cluster.hardware();
            let costs = chunk_costs(&plan, cluster.profile(), &tiny(), micro, &hw);
            let sim = simulate(&plan, &costs, &hw, false).unwrap();
            let _ = writeln!(out, " on {}", cluster.name);
            sim_lines(out, &sim);
        }
    }
}

/// The recompute/offload pass at budgets that force each of its moves.
fn policy(out: &mut String) {
    let mut gpu = Cluster::cuda(4, 1 << 30, ProfileName::CudaF32);
    gpu.p2p_bytes_per_s = 1e9;
    gpu.host_bytes_per_s = 4e9;
    let model = ModelDims {
        layers: 16,
        ..presets::model("tiny").unwrap()
    };
    let micro = MicroShape { batch: 4, seq: 64 };
    for kind in [
        ScheduleKind::OneFOneB,
        ScheduleKind::Chronos { in_flight: 0 },
    ] {
        let plan = build(kind, 4, 16, 16).unwrap();
        let hw = gpu.hardware();
        let costs = chunk_costs(&plan, gpu.profile(), &model, micro, &hw);
        let need = simulate(&plan, &costs, &hw, false).unwrap().peak_bytes();
        for (frac, r, o) in [
            (0.9, Recompute::Chronos, Offload::None),
            (0.8, Recompute::Chronos, Offload::Chronos),
            (0.6, Recompute::Full, Offload::Chronos),
            (0.5, Recompute::None, Offload::Chronos),
        ] {
            let budget = Budget {
                device_bytes: (need as f64 * frac) as u64,
                host_bytes: 1 << 32,
            };
            let a = apply(&plan, &costs, &hw, budget, r, o).unwrap();
            let _ = writeln!(
                out,
                "policy {kind} at {frac} of {need} ({r}, {o}): fits {} {}\n{}",
                a.fits, a.choices, a.plan
            );
            sim_lines(out, &a.sim);
        }
    }
}

fn answer(out: &mut String, label: &str, req: &Request, cluster: &Cluster) {
    let a = search(req, cluster).unwrap();
    let b = &a.best;
    let _ = writeln!(
        out,
        "search {label}: {} | {} | plan {} | tried {}",
        describe(b),
        b.choices,
        fingerprint(&a.plan),
        a.candidates_tried
    );
    let _ = writeln!(
        out,
        "  step {:?} tokens/s {:?} peak {} host {}",
        b.step_time_s, b.tokens_per_s, b.peak_bytes, b.host_peak_bytes
    );
    sim_lines(out, &a.sim);
    for r in &a.runners_up {
        let _ = writeln!(
            out,
            "  runner-up {} | {} | {:?} | {}",
            describe(&r.candidate),
            r.candidate.choices,
            r.candidate.tokens_per_s,
            r.why
        );
    }
}

fn searches(out: &mut String) {
    let request = |model: ModelDims, seq, global, mbs, pipeline| Request {
        model,
        seq_len: seq,
        global_batch: global,
        micro_batch_size: mbs,
        microbatches: None,
        pipeline,
        schedule: None,
        recompute: Recompute::Auto,
        offload: Offload::Auto,
        shard_optimizer: false,
    };
    let cpu = presets::cluster("cpu-4x1g").unwrap();
    answer(
        out,
        "tiny cpu-4x1g",
        &request(tiny(), 64, 8, None, None),
        &cpu,
    );
    let mut small = cpu.clone();
    small.memory_bytes = 3 << 20;
    answer(
        out,
        "tiny cpu-4x3MiB pp4",
        &request(tiny(), 64, 16, Some(2), Some(4)),
        &small,
    );
    let a100 = presets::cluster("a100-80g-pp8-tp8").unwrap();
    let l70 = presets::model("llama2-70b").unwrap();
    answer(
        out,
        "llama2-70b a100 pp8",
        &request(l70, 4096, 64, Some(1), Some(8)),
        &a100,
    );
    let mut tight = a100.clone();
    tight.memory_bytes = 20 << 30;
    answer(
        out,
        "llama2-70b a100@20GiB pp8",
        &request(l70, 4096, 64, Some(1), Some(8)),
        &tight,
    );
    let h100 = presets::cluster("h100-80g-pp8-tp8").unwrap();
    let l7 = presets::model("llama2-7b").unwrap();
    answer(
        out,
        "llama2-7b h100 pp8",
        &request(l7, 4096, 64, None, Some(8)),
        &h100,
    );
}

#[test]
fn the_planners_results_are_what_was_recorded() {
    let mut out = String::new();
    schedules(&mut out);
    policy(&mut out);
    searches(&mut out);
    if std::env::var_os("PIN_UPDATE").is_some() {
        std::fs::write(RECORD, &out).unwrap();
        return;
    }
    let recorded = std::fs::read_to_string(RECORD).unwrap();
    if recorded != out {
        let first = recorded
            .lines()
            .zip(out.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(recorded.lines().count().min(out.lines().count()));
        panic!(
            "the planner's results moved; first differing line {}:\n recorded: {}\n now:      {}",
            first + 1,
            recorded.lines().nth(first).unwrap_or("<end>"),
            out.lines().nth(first).unwrap_or("<end>")
        );
    }
}
