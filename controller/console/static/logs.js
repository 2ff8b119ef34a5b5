// A deployment's workload logs (GET /api/v1/devices/ID/logs/DEPLOYMENT[/COMPONENT]?tail=N as
// text; with &follow=1 as Server-Sent Events, one line per event). Until the controller serves
// them, or when the device has none, the panel says "logs unavailable" and why.

import { ApiError, devicePath, getText, readEvents } from "./api.js";
import { clear, h } from "./dom.js";

const TAIL = 200;
const MAX_LINES = 5000;

export function logsPanel(deviceId) {
  const status = h("p", { class: "note", role: "status" }, "Choose a deployment's logs above.");
  const pre = h("pre", { class: "logs", id: "logs", tabindex: "0", "aria-label": "workload log lines" });
  const controls = h("div", { class: "log-controls" });
  const node = h("div", {}, controls, status, pre);
  let following = null;
  let lines = 0;

  function url(dep, comp, extra) {
    const tail = `/api/v1/devices/${devicePath(deviceId)}/logs/${encodeURIComponent(dep)}`;
    return `${tail}${comp ? `/${encodeURIComponent(comp)}` : ""}?tail=${TAIL}${extra || ""}`;
  }

  function stop() {
    if (following) following.abort();
    following = null;
  }

  function add(text) {
    pre.append(document.createTextNode(text.endsWith("\n") ? text : `${text}\n`));
    lines += 1;
    while (lines > MAX_LINES && pre.firstChild) {
      pre.firstChild.remove();
      lines -= 1;
    }
    pre.scrollTop = pre.scrollHeight;
  }

  function unavailable(err) {
    const why = err instanceof ApiError && err.status === 404 ? "no logs for this deployment (or the controller does not serve logs)" : err.message;
    status.textContent = `logs unavailable: ${why}`;
  }

  async function load(dep, comp) {
    stop();
    clear(pre);
    lines = 0;
    status.textContent = `loading the last ${TAIL} lines of ${dep}${comp ? `/${comp}` : ""}…`;
    try {
      const text = await getText(url(dep, comp), { accept: "text/plain" });
      for (const line of text.split("\n").filter((l, i, a) => l !== "" || i < a.length - 1)) add(line);
      status.textContent = `${dep}${comp ? `/${comp}` : ""}: last ${lines} lines`;
    } catch (err) {
      unavailable(err);
    }
  }

  function follow(dep, comp) {
    stop();
    const controller = new AbortController();
    following = controller;
    status.textContent = `following ${dep}${comp ? `/${comp}` : ""}…`;
    clear(pre);
    lines = 0;
    readEvents(url(dep, comp, "&follow=1"), { signal: controller.signal, onEvent: (ev) => add(ev.data) })
      .then(() => {
        if (following === controller) status.textContent = "the log ended";
      })
      .catch((err) => {
        if (!controller.signal.aborted) unavailable(err);
      });
  }

  function open(dep, components) {
    stop();
    const names = (components || []).map((c) => c.name);
    const select = h("select", { id: "log-component" }, h("option", { value: "" }, "all components"), names.map((n) => h("option", { value: n }, n)));
    const box = h("input", { type: "checkbox", id: "log-follow" });
    const reload = () => (box.checked ? follow(dep, select.value) : load(dep, select.value));
    select.addEventListener("change", reload);
    box.addEventListener("change", reload);
    clear(controls).append(
      h("h3", {}, `Logs of ${dep}`),
      h("label", { for: "log-component" }, "Component "),
      select,
      " ",
      box,
      h("label", { for: "log-follow" }, " follow"),
    );
    load(dep, "");
  }

  return { node, open, close: stop };
}
