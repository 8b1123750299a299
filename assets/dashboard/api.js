// The /v1 client: every call carries the user's key; failures become ApiError with the
// problem+json body; a refused key (401) is announced so the page can ask again.

const KEY_ITEM = "chronospipe.api_key";

export const FINISHED = ["succeeded", "failed", "cancelled"];

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function setApiKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
}

export function forgetApiKey() {
  sessionStorage.removeItem(KEY_ITEM);
}

async function problemOf(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    return { detail: text || response.statusText, code: "http_" + response.status };
  }
}

// fetch with the key; resolves to the Response when it is 2xx, throws ApiError otherwise.
async function send(path, options = {}, key = apiKey()) {
  // A view's timer or request chain can outlive "Forget key": with no key there is nothing
  // to send, and no refusal to report (that would redraw the key form under the user).
  if (!key) throw new ApiError(401, { detail: "no API key entered", code: "no_key" });
  const headers = new Headers(options.headers || {});
  headers.set("Authorization", "Bearer " + key);
  const response = await fetch(path, { ...options, headers });
  if (response.ok) return response;
  const problem = await problemOf(response);
  if (response.status === 401 && key === apiKey()) {
    window.dispatchEvent(new CustomEvent("key-refused", { detail: problem }));
  }
  throw new ApiError(response.status, problem);
}

export async function getJson(path, key) {
  return (await send(path, {}, key)).json();
}

export async function postJson(path, body, headers = {}) {
  const response = await send(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body ?? {}),
  });
  return response.json();
}

export async function postForm(path, form) {
  return (await send(path, { method: "POST", body: form })).json();
}

export async function getBlob(path) {
  return (await send(path)).blob();
}

// Saves a download that needs the key: fetched as a blob, handed to the browser as a file.
export async function download(path, filename) {
  const url = URL.createObjectURL(await getBlob(path));
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

// Reads one Server-Sent Events response, calling onEvent({id, event, data}) per event.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { id: null, event: "message", data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (line === "") {
        if (event.data.length) onEvent({ ...event, data: event.data.join("\n") });
        event = { id: event.id, event: "message", data: [] };
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "id") event.id = text;
      else if (field === "event") event.event = text;
      else if (field === "data") event.data.push(text);
    }
  }
}

// Follows a job's event stream until the job finishes or `signal` aborts. EventSource cannot
// send the key, so this streams with fetch and resumes with Last-Event-ID after a drop;
// onConnect(n) tells each (re)connection.
export async function followJobEvents(jobId, onEvent, signal, onConnect = () => {}) {
  let connections = 0;
  let lastId = null;
  let finished = false;
  const seen = (e) => {
    lastId = e.id ?? lastId;
    let data = null;
    try {
      data = JSON.parse(e.data);
    } catch {
      data = { message: e.data };
    }
    if (e.event === "state" && FINISHED.includes(data.to)) finished = true;
    onEvent({ id: Number(e.id), kind: e.event, data });
  };
  while (!signal.aborted && !finished) {
    try {
      const headers = lastId === null ? {} : { "Last-Event-ID": lastId };
      const response = await send(`/v1/jobs/${encodeURIComponent(jobId)}/events/stream`, {
        headers,
        signal,
      });
      onConnect(++connections);
      await readEvents(response, seen);
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status !== 429 && error.status < 500) throw error;
    }
    if (!finished) await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}
