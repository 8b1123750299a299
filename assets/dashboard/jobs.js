// The jobs table: newest first, paged by cursor, filtered by status, refreshed every 2 s; each
// row's loss sparkline comes from the job's recent metrics, fetched again only when it stepped.

import { getJson } from "./api.js";
import { sparkline } from "./charts.js";
import { clear, h, progressBar, statusBadge } from "./dom.js";
import { age, number, rate } from "./format.js";

const STATUSES = ["validating", "queued", "running", "pausing", "paused", "cancelling", "cancelled", "succeeded", "failed"];
const PAGE = 20;
const SPARK_POINTS = 50;
const REFRESH_MS = 2000;

export function mountJobs(container) {
  const state = { status: "", cursors: [], sparks: new Map(), timer: null, stopped: false, seq: 0 };
  const filter = h(
    "select",
    { "aria-label": "Status", testid: "status-filter" },
    h("option", { value: "" }, "all statuses"),
    STATUSES.map((s) => h("option", { value: s }, s)),
  );
  const older = h("button", { type: "button", class: "quiet", testid: "older-page" }, "Older");
  const newer = h("button", { type: "button", class: "quiet", testid: "newer-page" }, "Newer");
  const body = h("tbody");
  const error = h("p", { class: "error", role: "alert" });
  const empty = h("p", { class: "muted" });
  container.append(
    h(
      "section",
      { class: "card" },
      h("div", { class: "toolbar" }, h("h1", {}, "Jobs"), h("span", { class: "spacer" }), filter,
        h("a", { href: "#/new" }, "New job")),
      error,
      h("div", { class: "table-wrap" }, h("table", { class: "jobs-table" },
        h("thead", {}, h("tr", {}, ["Job", "Status", "Progress", "Loss", "Tokens/s", "Devices", "Age"].map((t) =>
          h("th", { class: ["Loss", "Tokens/s"].includes(t) ? "num" : null }, t)))),
        body)),
      empty,
      h("div", { class: "toolbar" }, newer, older),
    ),
  );

  async function refresh() {
    if (state.stopped) return;
    clearTimeout(state.timer);
    // A later refresh (a click while one is in flight) wins; the earlier one draws nothing.
    const seq = ++state.seq;
    const params = new URLSearchParams({ limit: PAGE });
    if (state.status) params.set("status", state.status);
    const after = state.cursors.at(-1);
    if (after) params.set("after", after);
    try {
      const list = await getJson(`/v1/jobs?${params}`);
      await sparks(list.data);
      if (state.stopped || seq !== state.seq) return;
      error.textContent = "";
      clear(body, list.data.map((job) => row(job, state.sparks.get(job.id))));
      empty.textContent = list.data.length ? "" : "No jobs here yet.";
      older.disabled = !list.has_more;
      older.dataset.cursor = list.data.at(-1)?.id ?? "";
      newer.disabled = state.cursors.length === 0;
    } catch (e) {
      if (seq !== state.seq) return;
      error.textContent = `Cannot list jobs: ${e.message}`;
    }
    if (!state.stopped) state.timer = setTimeout(refresh, REFRESH_MS);
  }

  // Fetches the last metrics of jobs whose step moved since their sparkline was drawn.
  async function sparks(jobs) {
    const stale = jobs.filter((j) => j.progress.step > 0 && state.sparks.get(j.id)?.step !== j.progress.step);
    await Promise.all(stale.map(async (job) => {
      const from = Math.max(0, job.progress.step - SPARK_POINTS);
      const page = await getJson(`/v1/jobs/${encodeURIComponent(job.id)}/metrics?after_step=${from}&limit=${SPARK_POINTS}`);
      state.sparks.set(job.id, { step: job.progress.step, losses: page.data.map((m) => m.loss) });
    }));
  }

  filter.addEventListener("change", () => {
    state.status = filter.value;
    state.cursors = [];
    refresh();
  });
  older.addEventListener("click", () => {
    state.cursors.push(older.dataset.cursor);
    refresh();
  });
  newer.addEventListener("click", () => {
    state.cursors.pop();
    refresh();
  });
  refresh();
  return () => {
    state.stopped = true;
    clearTimeout(state.timer);
  };
}

function row(job, spark) {
  const metrics = job.latest_metrics;
  return h(
    "tr",
    { testid: "job-row", dataset: { jobId: job.id } },
    h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "mono" }, job.id)),
    h("td", {}, statusBadge(job.status)),
    h("td", {}, progressBar(job.progress.step, job.progress.total_steps), ` ${job.progress.step}/${job.progress.total_steps}`),
    h("td", { class: "num", "data-label": "loss" }, metrics ? number(metrics.loss) : "—", spark ? sparkline(spark.losses) : null),
    h("td", { class: "num", "data-label": "tokens/s" }, metrics ? rate(metrics.tokens_per_second) : "—"),
    h("td", { "data-label": "devices" }, job.devices.length ? job.devices.join(", ") : job.plan ? `${job.plan.devices} needed` : "—"),
    h("td", { "data-label": "age", title: new Date(job.created_at * 1000).toLocaleString() }, age(job.created_at)),
  );
}
