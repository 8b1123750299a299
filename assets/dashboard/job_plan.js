// A job's plan: the schedule timeline the API draws (fetched with the key, shown as an image
// so its SVG runs nothing), and each device's predicted vs measured peak memory vs budget.

import { getBlob } from "./api.js";
import { clear, h } from "./dom.js";
import { bytes, number } from "./format.js";

export function planPanel(jobId) {
  const summary = h("p", { class: "muted" });
  const timeline = h("div", { class: "table-wrap" }, h("p", { class: "muted" }, "No plan yet."));
  const memory = h("div", { testid: "device-memory" });
  const memorySection = h("div", { hidden: true },
    h("h2", {}, "Peak memory by device"),
    h("p", { class: "mem-legend muted" }, "Wide bar: the planner's prediction; thin bar: measured in the latest step; the track: the device's budget."),
    memory);
  const element = h("section", { class: "card", "aria-label": "Plan" }, h("h2", {}, "Plan"), summary, timeline, memorySection);
  let loaded = false;

  async function loadTimeline() {
    loaded = true;
    try {
      const url = URL.createObjectURL(await getBlob(`/v1/jobs/${encodeURIComponent(jobId)}/plan.svg`));
      clear(timeline,
        h("a", { href: url, target: "_blank", rel: "noopener", title: "Open the timeline full size" },
          h("img", { src: url, alt: "The plan's schedule: each device's actions over time", class: "plan-timeline", testid: "plan-timeline" })));
    } catch (e) {
      loaded = false;
      clear(timeline, h("p", { class: "error" }, `Cannot load the plan: ${e.message}`));
    }
  }

  return {
    element,
    // `devices`: the ids the job runs (or last ran) on; `budgets` maps an id to its bytes.
    update(job, devices, budgets) {
      const plan = job.plan;
      if (!plan) {
        clear(timeline, h("p", { class: "muted" }, job.error ? "No plan: the job failed before one was made." : "No plan yet."));
        return;
      }
      memorySection.hidden = false;
      summary.textContent = `${plan.schedule}, ${plan.stages} stages on ${plan.devices} devices; predicted step ${number(plan.step_time_s)} s, bubble ${(100 * plan.bubble_ratio).toFixed(1)} %`;
      if (!loaded) loadTimeline();
      clear(memory, plan.peak_bytes.map((predicted, i) =>
        memoryRow(devices[i] ?? `device ${i}`, predicted, job.latest_metrics?.device_peak_bytes?.[i], budgets.get(devices[i]))));
    },
  };
}

function share(used, budget) {
  return `${((100 * used) / budget).toFixed(used < budget / 100 ? 2 : 1)} %`;
}

function memoryRow(device, predicted, measured, budget) {
  const scale = Math.max(budget ?? 0, predicted, measured ?? 0) || 1;
  const width = (v) => `${((100 * v) / scale).toFixed(2)}%`;
  const over = budget !== undefined && Math.max(predicted, measured ?? 0) > budget;
  return h(
    "div",
    { class: "mem-row", testid: "device-memory-row", dataset: { device, predicted, measured: measured ?? "", budget: budget ?? "" } },
    h("span", { class: "mono" }, device),
    h("div", {},
      h("div", { class: "mem-bar", style: { width: budget ? "100%" : width(Math.max(predicted, measured ?? 0)) } },
        h("span", { class: "predicted", style: { width: width(predicted) } }),
        measured === undefined ? null : h("span", { class: "measured", style: { width: width(measured) } })),
      h("span", { class: over ? "error" : "muted" },
        `predicted ${bytes(predicted)} · measured ${measured === undefined ? "—" : bytes(measured)} · budget ${budget === undefined ? "—" : `${bytes(budget)} (${share(Math.max(predicted, measured ?? 0), budget)} used)`}`)),
  );
}
