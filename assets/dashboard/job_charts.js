// A job's metrics by step, and the four charts that follow them: loss (training, and
// validation when the metrics carry it), learning rate, gradient norm, tokens/s.

import { lineChart } from "./charts.js";
import { h } from "./dom.js";

// Steps after a resumed checkpoint are reported again: the latest report of a step wins.
export class MetricSeries {
  constructor() {
    this.byStep = new Map();
  }

  add(metrics) {
    this.byStep.set(metrics.step, metrics);
  }

  columns() {
    const steps = [...this.byStep.keys()].sort((a, b) => a - b);
    const column = (pick) => steps.map((s) => pick(this.byStep.get(s)) ?? null);
    return {
      steps,
      loss: column((m) => m.loss),
      // `val_loss` is in the rows of the steps that evaluated (issue 21), absent elsewhere.
      validation: column((m) => m.val_loss),
      lr: column((m) => m.learning_rate),
      gradNorm: column((m) => m.grad_norm),
      tokensPerSecond: column((m) => m.tokens_per_second),
    };
  }
}

export function chartsPanel() {
  const lossBox = h("div", { class: "chart", testid: "loss-chart", dataset: { points: 0, valPoints: 0 } });
  const boxes = [lossBox, h("div", { class: "chart" }), h("div", { class: "chart" }), h("div", { class: "chart" })];
  const grid = h("div", { class: "grid", hidden: true }, boxes.map((b) => h("div", { class: "card" }, b)));
  const waiting = h("p", { class: "card muted" }, "No metrics yet: the charts start with the first step.");
  const element = h("section", { "aria-label": "Metrics" }, waiting, grid);
  let charts = null;
  let validationDrawn = false;
  let pending = null;

  // The loss chart gets a validation line once the metrics carry one.
  function lossChart(withValidation) {
    const lines = [{ label: "training", color: "--train" }];
    if (withValidation) lines.push({ label: "validation", color: "--val", points: true });
    return lineChart(boxes[0], "Loss", lines);
  }

  function draw(series) {
    waiting.hidden = true;
    grid.hidden = false;
    const c = series.columns();
    const withValidation = c.validation.some((v) => v !== null);
    if (charts && withValidation && !validationDrawn) {
      charts[0].destroy();
      charts[0] = lossChart(true);
    }
    charts ??= [
      lossChart(withValidation),
      lineChart(boxes[1], "Learning rate", [{ label: "lr", color: "--train" }]),
      lineChart(boxes[2], "Gradient norm", [{ label: "grad norm", color: "--train" }]),
      lineChart(boxes[3], "Tokens/s", [{ label: "tokens/s", color: "--train" }]),
    ];
    validationDrawn = withValidation;
    charts[0].update(c.steps, withValidation ? [c.loss, c.validation] : [c.loss]);
    charts[1].update(c.steps, [c.lr]);
    charts[2].update(c.steps, [c.gradNorm]);
    charts[3].update(c.steps, [c.tokensPerSecond]);
    lossBox.dataset.points = c.loss.filter((v) => v !== null).length;
    lossBox.dataset.valPoints = c.validation.filter((v) => v !== null).length;
  }

  return {
    element,
    // Redraws at most once a frame however many events arrive.
    update(series) {
      if (pending !== null) return;
      pending = requestAnimationFrame(() => {
        pending = null;
        draw(series);
      });
    },
    destroy() {
      if (pending !== null) cancelAnimationFrame(pending);
      charts?.forEach((c) => c.destroy());
    },
  };
}
