// The cluster: the service's devices (memory, the job on each) and the queue, every 3 s.

import { getJson } from "./api.js";
import { clear, h } from "./dom.js";
import { bytes } from "./format.js";

const REFRESH_MS = 3000;

function jobLink(id) {
  return id ? h("a", { href: `#/jobs/${encodeURIComponent(id)}`, class: "mono" }, id) : null;
}

export function mountCluster(container) {
  const devices = h("tbody");
  const queue = h("tbody");
  const queueLength = h("span", { class: "muted" });
  const error = h("p", { class: "error", role: "alert" });
  container.append(
    error,
    h("section", { class: "card" }, h("h1", {}, "Devices"),
      h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, h("th", {}, "Device"), h("th", {}, "Kind"), h("th", { class: "num" }, "Memory"), h("th", {}, "Job"))),
        devices))),
    h("section", { class: "card" }, h("h1", {}, "Queue ", queueLength),
      h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, h("th", { class: "num" }, "Position"), h("th", {}, "Job"), h("th", { class: "num" }, "Devices needed"))),
        queue))),
  );
  let timer = null;
  let stopped = false;
  async function refresh() {
    try {
      const [deviceList, queueView] = await Promise.all([getJson("/v1/devices"), getJson("/v1/queue")]);
      if (stopped) return;
      error.textContent = "";
      clear(devices, deviceList.data.map((d) => h("tr", { testid: "device-row" },
        h("td", { class: "mono" }, d.id), h("td", {}, d.kind), h("td", { class: "num" }, bytes(d.memory_bytes)),
        h("td", {}, d.in_use ? jobLink(d.job) ?? "another tenant's job" : h("span", { class: "muted" }, "free")))));
      queueLength.textContent = `(${queueView.length})`;
      clear(queue, queueView.data.map((q) => h("tr", {},
        h("td", { class: "num" }, q.position), h("td", {}, jobLink(q.job) ?? "another tenant's job"),
        h("td", { class: "num" }, q.devices_needed))));
      if (!queueView.data.length) queue.append(h("tr", {}, h("td", { colspan: 3, class: "muted" }, "Nothing is waiting.")));
    } catch (e) {
      error.textContent = `Cannot read the cluster: ${e.message}`;
    }
    if (!stopped) timer = setTimeout(refresh, REFRESH_MS);
  }
  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
