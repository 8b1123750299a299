// One job: header (status, progress, ETA, restarts, error at its field), actions, charts, plan,
// events and checkpoints, all following the job's event stream.

import { followJobEvents, getJson, postJson } from "./api.js";
import { clear, h, progressBar, statusBadge } from "./dom.js";
import { duration, number, rate, time } from "./format.js";
import { MetricSeries, chartsPanel } from "./job_charts.js";
import { planPanel } from "./job_plan.js";
import { checkpointsPanel, eventsPanel } from "./job_records.js";
import { lineOfParam } from "./json_path.js";

// What each button may do from each state (the API's own transition table).
const ALLOWED = {
  cancel: ["validating", "queued", "running", "pausing", "paused"],
  pause: ["queued", "running"],
  resume: ["paused"],
};
const HEADER_REFRESH_MS = 500;

export function mountJob(container, jobId) {
  const path = `/v1/jobs/${encodeURIComponent(jobId)}`;
  const abort = new AbortController();
  const series = new MetricSeries();
  const charts = chartsPanel();
  const plan = planPanel(jobId);
  const events = eventsPanel();
  const checkpoints = checkpointsPanel(jobId);
  const header = h("div", { class: "job-head" });
  const failure = h("div");
  const error = h("p", { class: "error", role: "alert" });
  const buttons = Object.fromEntries(Object.keys(ALLOWED).map((action) => [action,
    h("button", { type: "button", class: action === "cancel" ? "quiet" : null, testid: `${action}-button`, disabled: true,
      onclick: () => act(action) }, action[0].toUpperCase() + action.slice(1))]));
  container.append(
    h("section", { class: "card" },
      h("div", { class: "toolbar" }, h("h1", { class: "mono" }, jobId), h("span", { class: "spacer" }), Object.values(buttons)),
      error, header, failure),
    charts.element,
    plan.element,
    h("div", { class: "grid" }, checkpoints.element, events.element),
  );

  let budgets = new Map();
  // A job leaves its devices when it pauses or ends; its memory rows keep their names.
  let lastDevices = [];
  let headerTimer = null;

  async function refreshJob() {
    headerTimer = null;
    // An event read as the view closed can still ask for a refresh: a closed view asks
    // nothing (the key may be another tenant's by then).
    if (abort.signal.aborted) return;
    try {
      const job = await getJson(path);
      if (abort.signal.aborted) return;
      if (job.devices.some((d) => !budgets.has(d))) {
        const devices = await getJson("/v1/devices");
        budgets = new Map(devices.data.map((d) => [d.id, d.memory_bytes]));
      }
      renderHeader(job);
      if (job.devices.length) lastDevices = job.devices;
      plan.update(job, lastDevices, budgets);
    } catch (e) {
      error.textContent = `Cannot read the job: ${e.message}`;
    }
  }

  function scheduleRefresh() {
    if (abort.signal.aborted) return;
    headerTimer ??= setTimeout(refreshJob, HEADER_REFRESH_MS);
  }

  function renderHeader(job) {
    const { step, total_steps: total } = job.progress;
    const m = job.latest_metrics;
    const secondsPerStep = m ? m.step_time_ms / 1000 : job.plan?.step_time_s;
    const eta = job.status === "running" && secondsPerStep ? (total - step) * secondsPerStep : null;
    const item = (label, ...value) => [h("dt", {}, label), h("dd", {}, ...value)];
    clear(header, statusBadge(job.status), h("dl", {},
      item("Progress", progressBar(step, total), ` ${step}/${total}`),
      item("ETA", eta === null ? "—" : duration(eta)),
      item("Loss", m ? number(m.loss) : "—"),
      item("Tokens/s", m ? rate(m.tokens_per_second) : "—"),
      item("Restarts", String(job.restart_count)),
      item("Devices", job.devices.join(", ") || "—"),
      item("Created", time(job.created_at)),
      job.queue_position ? item("Queue position", String(job.queue_position)) : null));
    for (const [action, button] of Object.entries(buttons)) button.disabled = !ALLOWED[action].includes(job.status);
    clear(failure, job.error ? failureAtField(job) : null);
  }

  async function act(action) {
    error.textContent = "";
    try {
      renderHeader(await postJson(`${path}/${action}`));
    } catch (e) {
      error.textContent = `Cannot ${action}: ${e.message}`;
      // The request may have landed before its answer was lost: show the state it left.
      refreshJob();
    }
  }

  function onEvent(event) {
    events.add(event);
    if (event.kind === "metrics") {
      series.add(event.data);
      charts.update(series);
    }
    if (event.kind === "checkpoint") checkpoints.refresh();
    if (["state", "metrics", "plan", "checkpoint"].includes(event.kind)) scheduleRefresh();
  }

  refreshJob();
  checkpoints.refresh();
  const connected = (n) => (events.element.dataset.connections = n);
  followJobEvents(jobId, onEvent, abort.signal, connected)
    .then(() => refreshJob())
    .catch((e) => {
      if (!abort.signal.aborted) error.textContent = `The event stream stopped: ${e.message}`;
    });
  return () => {
    abort.abort();
    clearTimeout(headerTimer);
    charts.destroy();
  };
}

const CONTEXT_LINES = 3;

// The failure's message, and the lines of the job body around its `param`, that one marked.
function failureAtField(job) {
  const e = job.error;
  const lines = JSON.stringify(job.spec, null, 2).split("\n");
  const line = lineOfParam(lines.join("\n"), e.param);
  const excerpt = () => {
    const first = Math.max(0, line - CONTEXT_LINES);
    const last = Math.min(lines.length, line + CONTEXT_LINES + 1);
    return h("pre", { class: "json" }, first > 0 ? "…\n" : "",
      lines.slice(first, last).map((text, i) => first + i === line
        ? h("mark", { testid: "error-field" }, text, `   ← ${e.message}\n`)
        : text + "\n"),
      last < lines.length ? "…" : "");
  };
  return h("div", { class: "job-error", testid: "job-error", dataset: { code: e.code, param: e.param ?? "" } },
    h("p", {}, h("strong", {}, e.code), ` (${e.fault}'s side): ${e.message}`),
    e.param ? h("p", {}, "Field: ", h("code", {}, e.param), line === null ? " (not in the body: its default applies)" : "") : null,
    line === null ? null : excerpt());
}
