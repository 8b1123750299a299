//! Rendering a planned step for people: a text table, and an SVG timeline with a row per
//! device (forward, backward, recompute, optimizer step and copies in their own colours), the
//! device's memory curve under its row and the usable-memory line drawn across it. JSON is the
//! serde form of the search answer and the simulation.

use std::fmt::Write;

use super::capacity::CapacityRow;
use super::ir::{Action, Plan};
use super::search::{Answer, describe};
use super::simulate::Simulation;

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// The default text output of `chronospipe plan`.
pub fn text(answer: &Answer) -> String {
    let b = &answer.best;
    let mut s = String::new();
    let _ = writeln!(s, "plan: {}", describe(b));
    let _ = writeln!(s, "      {}", b.choices);
    let plan = &answer.plan;
    if plan.replicas > 1 {
        let reduce_s: f64 = (plan.programs.iter().zip(&answer.sim.devices))
            .map(|(program, dev)| {
                (program.iter().zip(&dev.spans))
                    .filter(|(a, _)| matches!(a, Action::Reduce { .. } | Action::Gather { .. }))
                    .map(|(_, (t0, t1))| t1 - t0)
                    .sum::<f64>()
            })
            .fold(0.0, f64::max);
        let sharded = !plan.chunks.is_empty() && plan.sharded(0);
        let how = if sharded {
            "reduce-scattered (RS) after its last backward, each replica stepping its shard of \
             the optimizer state, the weights gathered (AG) after the step"
        } else {
            "summed across the replicas (AR) after its last backward"
        };
        let _ = writeln!(
            s,
            "      {} replicas x {} stages on {} devices; each chunk's gradients {how}: \
             {reduce_s:.3} s of the step on the busiest device",
            plan.replicas,
            plan.devices(),
            plan.total_devices()
        );
    }
    let _ = writeln!(
        s,
        "step {:.3} s, {:.0} tokens/s, bubble {:.1}%, prefetch stall {:.3} s, peak {:.2} GiB of {:.2} GiB usable",
        b.step_time_s,
        b.tokens_per_s,
        100.0 * b.bubble_ratio,
        b.prefetch_stall_s,
        gib(b.peak_bytes),
        gib(answer.budget_bytes)
    );
    let _ = writeln!(
        s,
        "\n{:>6} {:>9} {:>8} {:>8} {:>9} {:>11} {:>7} {:>9} {:>8} {:>8}",
        "device",
        "peak GiB",
        "weights",
        "grads",
        "optimizer",
        "activations",
        "comm",
        "host GiB",
        "busy s",
        "stall s"
    );
    for (d, dev) in answer.sim.devices.iter().enumerate() {
        let p = &dev.at_peak;
        let _ = writeln!(
            s,
            "{:>6} {:>9.2} {:>8.2} {:>8.2} {:>9.2} {:>11.2} {:>7.2} {:>9.2} {:>8.3} {:>8.3}",
            d,
            gib(dev.peak_bytes),
            gib(p.weights),
            gib(p.grads),
            gib(p.optimizer),
            gib(p.activations),
            gib(p.comm),
            gib(dev.host_peak_bytes),
            dev.busy_s,
            dev.prefetch_stall_s
        );
    }
    if !answer.runners_up.is_empty() {
        let _ = writeln!(
            s,
            "\nrunners-up ({} configurations tried):",
            answer.candidates_tried
        );
        for r in &answer.runners_up {
            let _ = writeln!(
                s,
                "  {:<58} {:>9.0} tokens/s  {}",
                describe(&r.candidate),
                r.candidate.tokens_per_s,
                r.why
            );
        }
    }
    s
}

/// The text table of `chronospipe plan capacity`, with each strategy's work rate (tokens/s x
/// layers) relative to the first row's.
pub fn capacity_text(rows: &[CapacityRow]) -> String {
    let base = rows
        .first()
        .map_or(1.0, |r| r.layer_tokens_per_s.max(f64::MIN_POSITIVE));
    let base_layers = rows.first().map_or(1, |r| r.max_layers.max(1));
    let mut s = format!(
        "{:<22} {:>10} {:>10} {:>12} {:>10} {:>11} {:>16}\n",
        "strategy",
        "max layers",
        "x 1f1b",
        "params (B)",
        "tokens/s",
        "peak GiB",
        "layer-rate x1f1b"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<22} {:>10} {:>10.2} {:>12.1} {:>10.0} {:>11.2} {:>16.3}",
            r.name,
            r.max_layers,
            r.max_layers as f64 / base_layers as f64,
            r.params as f64 / 1e9,
            r.tokens_per_s,
            gib(r.peak_bytes),
            r.layer_tokens_per_s / base
        );
    }
    s
}

fn colour(a: &Action) -> Option<&'static str> {
    Some(match a {
        Action::Forward { .. } => "#4c78a8",
        Action::Backward { .. } => "#54a24b",
        Action::Recompute { .. } => "#f58518",
        Action::Step { .. } => "#b279a2",
        Action::Offload(_) => "#e45756",
        Action::Prefetch(_) => "#72b7b2",
        Action::Reduce { .. } | Action::Gather { .. } | Action::Tie => "#9d755d",
        _ => return None,
    })
}

/// An SVG timeline of a simulated plan (the simulation must have its memory curve).
pub fn svg(plan: &Plan, sim: &Simulation, budget_bytes: u64, title: &str) -> String {
    const W: f64 = 1200.0;
    const LEFT: f64 = 70.0;
    const LANE: f64 = 22.0; // compute lane
    const COPY: f64 = 6.0; // copy-engine lane
    const CURVE: f64 = 40.0;
    const ROW: f64 = LANE + COPY + CURVE + 14.0;
    let end = sim.step_time_s.max(1e-12);
    let x = |t: f64| LEFT + (W - LEFT - 10.0) * (t / end);
    let top_mem = sim
        .devices
        .iter()
        .map(|d| d.peak_bytes)
        .max()
        .unwrap_or(1)
        .max(budget_bytes)
        .max(1) as f64;
    let h = 40.0 + ROW * plan.devices() as f64 + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="16" font-size="13">{}</text>"#,
        escape(title)
    );
    let legend = [
        ("forward", "#4c78a8"),
        ("backward", "#54a24b"),
        ("recompute", "#f58518"),
        ("optimizer step", "#b279a2"),
        ("offload", "#e45756"),
        ("prefetch", "#72b7b2"),
        ("reduction", "#9d755d"),
        ("memory", "#333"),
        ("usable HBM", "#d62728"),
    ];
    for (i, (name, c)) in legend.iter().enumerate() {
        let lx = LEFT + 120.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="24" width="10" height="10" fill="{c}"/><text x="{}" y="33">{name}</text>"#,
            lx + 14.0
        );
    }
    // One row per device of a replica: every replica runs the same programs.
    let replicas = match plan.replicas {
        1 => String::new(),
        r => format!(" x{r}"),
    };
    for (d, program) in plan.programs.iter().enumerate() {
        let y0 = 44.0 + ROW * d as f64;
        let dev = &sim.devices[d];
        let _ = writeln!(
            s,
            r##"<text x="4" y="{}">dev {d}{replicas}</text><text x="4" y="{}" fill="#666">{:.1} GiB</text>"##,
            y0 + 15.0,
            y0 + LANE + COPY + 20.0,
            gib(dev.peak_bytes)
        );
        for (a, &(t0, t1)) in program.iter().zip(&dev.spans) {
            let Some(c) = colour(a) else { continue };
            let (y, hh) = if a.is_compute() {
                (y0, LANE)
            } else {
                (y0 + LANE + 1.0, COPY - 1.0)
            };
            let w = (x(t1) - x(t0)).max(0.5);
            let _ = writeln!(
                s,
                r#"<rect x="{:.2}" y="{y:.1}" width="{w:.2}" height="{hh}" fill="{c}" stroke="white" stroke-width="0.3"><title>{a} {t0:.4}-{t1:.4} s</title></rect>"#,
                x(t0)
            );
        }
        // Memory curve: a step line, scaled so the tallest peak or the budget fills the band.
        let base = y0 + LANE + COPY + CURVE;
        let yv = |b: u64| base - CURVE * (b as f64 / top_mem);
        let mut pts = format!("{:.1},{:.1}", x(0.0), base);
        let mut last = base;
        for p in &dev.curve {
            let y = yv(p.device_total());
            let _ = write!(pts, " {:.1},{last:.1} {:.1},{y:.1}", x(p.t), x(p.t));
            last = y;
        }
        let _ = write!(pts, " {:.1},{last:.1}", x(end));
        let _ = writeln!(
            s,
            r##"<polyline points="{pts}" fill="none" stroke="#333" stroke-width="1"/>"##
        );
        let yb = yv(budget_bytes);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{yb:.1}" y2="{yb:.1}" stroke="#d62728" stroke-dasharray="4 3"/>"##,
            W - 10.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="{}">0 s</text><text x="{}" y="{}" text-anchor="end">{end:.3} s</text>"#,
        h - 10.0,
        W - 10.0,
        h - 10.0
    );
    s.push_str("</svg>\n");
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::inventory::{MicroShape, Profile};
    use crate::plan::presets;
    use crate::plan::schedule::{ScheduleKind, build};
    use crate::plan::simulate::{chunk_costs, simulate};

    #[test]
    fn svg_has_a_row_per_device_and_the_hbm_line() {
        let dims = presets::model("tiny").unwrap();
        let cluster = presets::cluster("cpu-4x1g").unwrap();
        let plan = build(ScheduleKind::Chronos { in_flight: 0 }, 4, 8, 8).unwrap();
        let micro = MicroShape { batch: 2, seq: 16 };
        let hw = cluster.hardware();
        let costs = chunk_costs(&plan, Profile::CpuF32, &dims, micro, &hw);
        let sim = simulate(&plan, &costs, &hw, true).unwrap();
        let svg = svg(&plan, &sim, cluster.budget_bytes(), "tiny <chronos>");
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert_eq!(svg.matches("stroke-dasharray").count(), 4);
        assert!(svg.contains("tiny &lt;chronos&gt;"));
        assert!(svg.contains("<title>B0.7"));
    }
}
