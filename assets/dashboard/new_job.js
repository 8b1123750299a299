// The new-job form: a JSON editor whose problems show at their field, uploads that fill in the
// file ids, and a live plan preview from POST /v1/plans (the plan, or why none fits).

import { ApiError, postForm, postJson } from "./api.js";
import { clear, h } from "./dom.js";
import { bytes, number } from "./format.js";
import { lineOfParam, lineRange } from "./json_path.js";

const TEMPLATE = {
  model: { hidden_size: 64, num_layers: 4, num_heads: 4, intermediate_size: 176, vocab_size: 256, init: { seed: 1 } },
  data: { train: "upload a training file", tokenizer: "bytes" },
  training: { seq_len: 32, micro_batch_size: 1, microbatches: 4, steps: 100, checkpoint_every: 50 },
  parallelism: { stages: "auto", schedule: "auto" },
};
// Where an uploaded file's id goes in the body, by purpose.
const FIELD_OF_PURPOSE = { train: ["data", "train"], validation: ["data", "validation"], tokenizer: ["data", "tokenizer"] };
const PREVIEW_DELAY_MS = 400;

export function mountNewJob(container) {
  const editor = h("textarea", { class: "editor", testid: "job-editor", spellcheck: "false", "aria-label": "Job body (JSON)" },
    JSON.stringify(TEMPLATE, null, 2));
  const problems = h("ul", { class: "field-errors", testid: "field-errors", "aria-live": "polite" });
  const preview = h("div", { testid: "plan-preview", "aria-live": "polite" }, h("p", { class: "muted" }, "The plan appears here."));
  const purpose = h("select", { "aria-label": "Upload purpose" }, Object.keys(FIELD_OF_PURPOSE).map((p) => h("option", { value: p }, p)));
  const upload = h("input", { type: "file", "aria-label": "File to upload", testid: "upload-input" });
  const openBody = h("input", { type: "file", accept: ".json,application/json", "aria-label": "Open a job body", testid: "open-body-input" });
  const status = h("p", { class: "muted", role: "status" });
  const create = h("button", { type: "submit", testid: "create-button" }, "Create job");
  const form = h("form", { testid: "new-job-form", class: "grid" },
    h("section", { class: "card" }, h("h1", {}, "New job"),
      h("div", { class: "toolbar" }, h("label", {}, "Open a job body ", openBody)),
      editor, problems,
      h("div", { class: "toolbar" }, h("label", {}, "Upload ", purpose), upload),
      status,
      h("div", { class: "toolbar" }, create)),
    h("section", { class: "card" }, h("h2", {}, "Plan preview"), preview));
  container.append(form);

  let previewTimer = null;
  let previewSeq = 0;

  function showProblems(list) {
    const text = editor.value;
    clear(problems, list.map(({ param, message }) => {
      const line = lineOfParam(text, param);
      return h("li", { testid: "field-error", dataset: { param: param ?? "" } },
        line === null
          ? h("span", { class: "error" }, param ? `${param}: ${message}` : message)
          : h("button", { type: "button", title: "Go to the field", onclick: () => selectLine(line) },
            `line ${line + 1}, ${param}: ${message}`));
    }));
  }

  function selectLine(line) {
    const [start, end] = lineRange(editor.value, line);
    editor.focus();
    editor.setSelectionRange(start, end);
  }

  // The body as text, or null after showing why it is not JSON.
  function body() {
    try {
      JSON.parse(editor.value);
      return editor.value;
    } catch (e) {
      const at = /position (\d+)/.exec(e.message);
      const line = at ? editor.value.slice(0, Number(at[1])).split("\n").length : null;
      showProblems([{ param: null, message: `not JSON${line ? ` (line ${line})` : ""}: ${e.message}` }]);
      return null;
    }
  }

  function problemsOf(e) {
    if (!(e instanceof ApiError)) return [{ param: null, message: e.message }];
    return e.problem.errors ?? [{ param: e.problem.param, message: e.problem.detail }];
  }

  async function refreshPreview() {
    const text = body();
    if (text === null) return;
    const seq = ++previewSeq;
    try {
      const plan = await postJson("/v1/plans", text);
      if (seq !== previewSeq) return;
      showProblems([]);
      clear(preview, planView(plan));
      preview.dataset.fits = "true";
    } catch (e) {
      if (seq !== previewSeq) return;
      if (e instanceof ApiError && e.problem.code === "plan_does_not_fit") {
        showProblems([]);
        clear(preview, misfitView(e.problem));
        preview.dataset.fits = "false";
      } else {
        showProblems(problemsOf(e));
        clear(preview, h("p", { class: "muted" }, "Fix the body to see its plan."));
        delete preview.dataset.fits;
      }
    }
  }

  function setField([section, key], value) {
    const text = body();
    if (text === null) return;
    const spec = JSON.parse(text);
    spec[section] = { ...(spec[section] ?? {}), [key]: value };
    editor.value = JSON.stringify(spec, null, 2);
    refreshPreview();
  }

  editor.addEventListener("input", () => {
    clearTimeout(previewTimer);
    previewTimer = setTimeout(refreshPreview, PREVIEW_DELAY_MS);
  });
  openBody.addEventListener("change", async () => {
    if (!openBody.files.length) return;
    editor.value = await openBody.files[0].text();
    refreshPreview();
  });
  upload.addEventListener("change", async () => {
    if (!upload.files.length) return;
    const file = upload.files[0];
    const data = new FormData();
    data.append("purpose", purpose.value);
    data.append("file", file);
    status.textContent = `Uploading ${file.name} (${bytes(file.size)})…`;
    try {
      const uploaded = await postForm("/v1/files", data);
      status.textContent = `Uploaded ${file.name} as ${uploaded.id}.`;
      setField(FIELD_OF_PURPOSE[purpose.value], uploaded.id);
    } catch (e) {
      status.textContent = `Upload failed: ${e.message}`;
    }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = body();
    if (text === null) return;
    create.disabled = true;
    try {
      const job = await postJson("/v1/jobs", text, { "Idempotency-Key": crypto.randomUUID() });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (e) {
      showProblems(problemsOf(e));
      create.disabled = false;
    }
  });
  refreshPreview();
  return () => clearTimeout(previewTimer);
}

function planView(plan) {
  const s = plan.summary;
  return h("div", {},
    h("p", { class: "preview-fits" }, `Fits: ${s.schedule}, ${s.stages} stages on ${s.devices} devices.`),
    h("p", {}, `Predicted step ${number(s.step_time_s)} s, bubble ${(100 * s.bubble_ratio).toFixed(1)} %.`),
    h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Device"), h("th", { class: "num" }, "Actions"), h("th", { class: "num" }, "Predicted peak"))),
      h("tbody", {}, s.peak_bytes.map((peak, i) => h("tr", {}, h("td", {}, `device ${i}`),
        h("td", { class: "num" }, s.actions_per_device[i] ?? "—"), h("td", { class: "num" }, bytes(peak)))))),
    s.runners_up.length ? h("div", {}, h("h2", {}, "Also considered"), h("ul", {}, s.runners_up.map((c) =>
      h("li", {}, `${c.label}: peak ${bytes(c.max_peak_bytes)}, step ${number(c.step_time_s)} s, bubble ${(100 * c.bubble_ratio).toFixed(1)} %`)))) : null);
}

function misfitView(problem) {
  return h("div", {},
    h("p", { class: "preview-misfit" }, `Does not fit: ${problem.detail}`),
    problem.smallest_memory_bytes ? h("p", {}, `It would fit with ${bytes(problem.smallest_memory_bytes)} per device.`) : null,
    problem.closest ? h("div", {}, h("p", {}, "The closest configuration:"), h("pre", { class: "json" }, JSON.stringify(problem.closest, null, 2))) : null);
}
