// The operator API as the console uses it: every request carries the operator's token as a
// bearer token (kept in this tab's sessionStorage, never in a cookie: see controller/console/
// routes.py), so the API's tenant scoping and role checks decide everything.

const KEY = "margo.console.token";

export class ApiError extends Error {
  constructor(status, detail, type) {
    super(detail);
    this.status = status;
    this.type = type || "";
  }
}

export function token() {
  return sessionStorage.getItem(KEY);
}

export function setToken(value) {
  sessionStorage.setItem(KEY, value);
}

export function clearToken() {
  sessionStorage.removeItem(KEY);
}

let onUnauthorized = () => {};
export function whenUnauthorized(callback) {
  onUnauthorized = callback;
}

// "/api/v1/devices/" + devicePath(id): ids may contain '/', kept as path separators
export function devicePath(id) {
  return id.split("/").map(encodeURIComponent).join("/");
}

async function problemOf(resp) {
  let detail = `${resp.status} ${resp.statusText}`;
  let type = "";
  try {
    const body = await resp.json();
    if (body && typeof body.detail === "string") detail = body.detail;
    if (body && typeof body.type === "string") type = body.type;
  } catch (_) {
    // not a problem document
  }
  return new ApiError(resp.status, detail, type);
}

export async function request(path, { method = "GET", body, signal, accept, quiet } = {}) {
  const headers = { Authorization: `Bearer ${token() || ""}` };
  if (accept) headers.Accept = accept;
  const init = { method, headers, signal, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (!resp.ok) {
    const err = await problemOf(resp);
    if (resp.status === 401 && !quiet) onUnauthorized(err);
    throw err;
  }
  return resp;
}

export async function getJson(path, options) {
  return (await request(path, options)).json();
}

export async function getText(path, options) {
  return (await request(path, options)).text();
}

// Server-Sent Events over fetch (EventSource cannot send an Authorization header). Calls
// onEvent({id, event, data}) per event and onComment(text) per comment line; resolves when the
// stream ends, rejects when it fails or `signal` aborts it.
export async function readEvents(path, { signal, lastEventId, onEvent, onComment, onOpen }) {
  const headers = { Authorization: `Bearer ${token() || ""}`, Accept: "text/event-stream" };
  if (lastEventId) headers["Last-Event-ID"] = String(lastEventId);
  const resp = await fetch(path, { headers, signal, cache: "no-store", credentials: "omit" });
  if (!resp.ok) {
    const err = await problemOf(resp);
    if (resp.status === 401) onUnauthorized(err);
    throw err;
  }
  if (onOpen) onOpen();
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { id: null, event: "message", data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl).replace(/\r$/, "");
      buffer = buffer.slice(nl + 1);
      if (line === "") {
        if (event.data.length) onEvent({ id: event.id, event: event.event, data: event.data.join("\n") });
        event = { id: null, event: "message", data: [] };
      } else if (line.startsWith(":")) {
        if (onComment) onComment(line.slice(1).trim());
      } else {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") event.data.push(val);
        else if (field === "id") event.id = val;
        else if (field === "event") event.event = val;
      }
    }
  }
}
