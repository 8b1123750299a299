// Builds DOM nodes from data without parsing HTML, so names and messages from the API are
// always text.

// h("td", {class: "num", dataset: {x: 1}}, "text", node, [more]) -> HTMLElement
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "dataset") Object.assign(el.dataset, value);
    else if (name === "style") Object.assign(el.style, value);
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "testid") el.setAttribute("data-testid", value);
    else el.setAttribute(name, value === true ? "" : value);
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

export function clear(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
}

export function statusBadge(status) {
  return h("span", { class: `status ${status}`, testid: "job-status" }, status);
}

export function progressBar(step, total) {
  const percent = total > 0 ? Math.min(100, (100 * step) / total) : 0;
  return h(
    "span",
    { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": total, "aria-valuenow": step },
    h("span", { style: { width: `${percent}%` } }),
  );
}
