// A job's events log (newest first) and its checkpoints with key-authorised downloads.

import { download, getJson } from "./api.js";
import { clear, h } from "./dom.js";
import { bytes, number } from "./format.js";

const MAX_EVENT_ROWS = 500;

function describe(kind, data) {
  switch (kind) {
    case "state":
      return `${data.from ?? "—"} → ${data.to}${data.message ? `: ${data.message}` : ""}${data.error ? ` (${data.error.code}: ${data.error.message})` : ""}`;
    case "metrics":
      return `step ${data.step}: loss ${number(data.loss)}, lr ${number(data.learning_rate)}`;
    case "checkpoint":
      return `checkpoint at step ${data.step} (${(data.files ?? []).length} files)`;
    case "plan":
      return `planned: ${data.schedule}, ${data.stages} stages`;
    default:
      return data.message ?? JSON.stringify(data);
  }
}

export function eventsPanel() {
  const body = h("tbody");
  const element = h("section", { class: "card", "aria-label": "Events", testid: "events" }, h("h2", {}, "Events"),
    h("div", { class: "events table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", { class: "num" }, "#"), h("th", {}, "Kind"), h("th", {}, "What"))),
      body)));
  return {
    element,
    add(event) {
      body.prepend(h("tr", { testid: "event-row", dataset: { kind: event.kind } },
        h("td", { class: "num" }, event.id), h("td", {}, event.kind), h("td", {}, describe(event.kind, event.data))));
      while (body.rows.length > MAX_EVENT_ROWS) body.lastElementChild.remove();
    },
  };
}

export function checkpointsPanel(jobId) {
  const list = h("ul");
  const error = h("p", { class: "error", role: "alert" });
  const element = h("section", { class: "card", "aria-label": "Checkpoints" }, h("h2", {}, "Checkpoints"), error, list);
  const base = `/v1/jobs/${encodeURIComponent(jobId)}/checkpoints`;

  function link(step, file) {
    const path = `${base}/${step}/files/${encodeURIComponent(file.name)}`;
    return h("a", {
      href: path,
      testid: "checkpoint-link",
      dataset: { step, name: file.name },
      onclick: async (event) => {
        event.preventDefault();
        try {
          error.textContent = "";
          await download(path, `${jobId}-step-${step}-${file.name}`);
        } catch (e) {
          error.textContent = `Cannot download ${file.name}: ${e.message}`;
        }
      },
    }, file.name, h("span", { class: "muted" }, ` (${bytes(file.bytes)})`));
  }

  return {
    element,
    async refresh() {
      try {
        const page = await getJson(base);
        clear(list, page.data.map((c) => h("li", {}, `step ${c.step}: `, c.files.flatMap((f, i) => [i ? " · " : "", link(c.step, f)]))));
        if (!page.data.length) list.append(h("li", { class: "muted" }, "None yet."));
      } catch (e) {
        error.textContent = `Cannot list checkpoints: ${e.message}`;
      }
    },
  };
}
