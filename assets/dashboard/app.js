// The page's frame: asks for the key once per tab, then routes #/jobs, #/jobs/ID, #/new and
// #/cluster to their views. A view is mount(container, params) returning its unmount.

import { ApiError, apiKey, forgetApiKey, getJson, setApiKey } from "./api.js";
import { mountCluster } from "./cluster.js";
import { clear, h } from "./dom.js";
import { mountJob } from "./job.js";
import { mountJobs } from "./jobs.js";
import { mountNewJob } from "./new_job.js";

const view = document.getElementById("view");
const forget = document.getElementById("forget-key");
let unmount = null;

const ROUTES = [
  [/^#\/jobs\/([^/]+)$/, "jobs", (el, m) => mountJob(el, decodeURIComponent(m[1]))],
  [/^#\/new$/, "new", (el) => mountNewJob(el)],
  [/^#\/cluster$/, "cluster", (el) => mountCluster(el)],
  [/^(#\/jobs)?$/, "jobs", (el) => mountJobs(el)],
];

function route() {
  if (unmount) unmount();
  unmount = null;
  if (!apiKey()) return askForKey("");
  forget.hidden = false;
  const hash = location.hash === "#/" ? "" : location.hash;
  const found = ROUTES.find(([pattern]) => pattern.test(hash));
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (found && link.dataset.nav === found[1]) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (!found) {
    clear(view, h("p", { class: "card" }, "No such page. ", h("a", { href: "#/jobs" }, "Jobs")));
    return;
  }
  clear(view);
  unmount = found[2](view, hash.match(found[0]));
}

function askForKey(message) {
  if (unmount) unmount();
  unmount = null;
  forget.hidden = true;
  const form = document.getElementById("key-form").content.firstElementChild.cloneNode(true);
  const input = form.querySelector("input");
  const error = form.querySelector(".error");
  error.textContent = message;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    error.textContent = "";
    try {
      await getJson("/v1/jobs?limit=1", key);
      setApiKey(key);
      route();
    } catch (e) {
      error.textContent =
        e instanceof ApiError && e.status === 401
          ? `This key was refused: ${e.problem.detail}`
          : `Cannot reach the service: ${e.message}`;
      input.select();
    }
  });
  clear(view, form);
  input.focus();
}

window.addEventListener("key-refused", (event) => {
  forgetApiKey();
  askForKey(`The service refused the key: ${event.detail.detail}. Enter a valid key.`);
});
forget.addEventListener("click", () => {
  forgetApiKey();
  askForKey("");
});
window.addEventListener("hashchange", () => {
  route();
  view.focus();
});
route();
