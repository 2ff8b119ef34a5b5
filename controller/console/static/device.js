// One device: summary, capabilities, deployments with per-component status (live), workload
// logs, recent events (live), telemetry charts per stream, and its terminal sessions audit.

import { ApiError, devicePath, getJson } from "./api.js";
import { streamChart } from "./chart.js";
import { append, clear, h, labels, message, row, section, stateBadge, table, when } from "./dom.js";
import { logsPanel } from "./logs.js";

const EVENTS_BACK = 5000; // event ids looked back for the recent events list
const EVENTS_SHOWN = 50;
const TELEMETRY_SINCE = "15m";
const TELEMETRY_LIMIT = 2000;
const DEBOUNCE_MS = 100;

export function componentList(components) {
  if (!components || !components.length) return "none reported";
  return h(
    "ul",
    { class: "components" },
    components.map((c) =>
      h("li", {}, `${c.name}: `, stateBadge(c.state), c.error ? ` (${c.error.code}: ${c.error.message})` : ""),
    ),
  );
}

function errorText(err) {
  return err ? `${err.code} from ${err.source}: ${err.message}` : "";
}

function summary(d) {
  const items = [
    ["Connection", d.connected ? `connected over ${d.transport || "?"}` : "disconnected"],
    ["Last seen", when(d.last_seen)],
    ["First seen", when(d.first_seen)],
    ["Connections", String(d.connection_count)],
    ["Manifest version", d.manifest_version === null ? "none" : String(d.manifest_version)],
    ["Identity", `${d.state}${d.not_after ? `, certificate until ${d.not_after}` : ""}`],
    ["Labels", labels(d.labels)],
    ["Reported labels", labels(d.reported_labels)],
    ["Buffer fill", typeof d.stats?.telemetry_fill_ratio === "number" ? `${(d.stats.telemetry_fill_ratio * 100).toFixed(1)}%` : "n/a"],
  ];
  if (d.controller) items.push(["Held by controller", d.controller]);
  return h("dl", { class: "facts", id: "device-summary" }, items.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function capabilities(caps) {
  if (!caps || !Object.keys(caps).length) return message("The device has not reported capabilities.");
  return h("pre", { class: "json", tabindex: "0", "aria-label": "capabilities document" }, JSON.stringify(caps, null, 2));
}

function eventLine(ev) {
  const p = ev.payload || {};
  const detail = p.deploymentId ? ` ${p.deploymentId}${p.state ? ` ${p.previous || "none"} → ${p.state}` : ""}` : "";
  return h("li", { "data-event-id": ev.id }, h("time", { datetime: ev.ts }, ev.ts), ` ${ev.kind}${detail}`);
}

export function deviceView() {
  let id = null;
  let deploymentsBox = null;
  let summaryBox = null;
  let eventsList = null;
  let logs = null;
  let timer = null;

  async function loadDeployments() {
    const items = (await getJson(`/api/v1/deployments?device=${encodeURIComponent(id)}`)).items;
    const rows = items.map((d) =>
      row(
        [
          d.deploymentId,
          stateBadge(d.state),
          componentList(d.components),
          d.manifestVersion === null ? "none" : String(d.manifestVersion),
          d.assigned ? "yes" : "no (being removed)",
          when(d.updated_at),
          errorText(d.error),
          h("button", { type: "button", onclick: () => logs.open(d.deploymentId, d.components) }, `Logs of ${d.deploymentId}`),
        ],
        { "data-deployment-id": d.deploymentId, "data-state": d.state },
      ),
    );
    clear(deploymentsBox);
    if (!rows.length) deploymentsBox.append(message("No deployment is assigned to this device."));
    else
      deploymentsBox.append(
        table(
          "Deployments and per-component status",
          ["Deployment", "State", "Components", "Manifest version", "Assigned", "Updated", "Error", "Logs"],
          rows,
          { id: "deployments", class: "grid" },
        ),
      );
  }

  async function loadSummary() {
    const d = await getJson(`/api/v1/devices/${devicePath(id)}`);
    clear(summaryBox).append(summary(d));
    return d;
  }

  async function loadEvents(ctx) {
    const after = Math.max(0, (ctx.latestEventId || 0) - EVENTS_BACK);
    const items = (await getJson(`/api/v1/events?after=${after}&limit=${EVENTS_BACK}`)).items;
    const mine = items.filter((e) => e.device === id).slice(-EVENTS_SHOWN).reverse();
    clear(eventsList).append(...mine.map(eventLine));
  }

  async function loadTelemetry() {
    const q = `since=${TELEMETRY_SINCE}&limit=${TELEMETRY_LIMIT}`;
    const items = (await getJson(`/api/v1/devices/${devicePath(id)}/telemetry?${q}`)).items;
    const byStream = new Map();
    for (const it of items) {
      const key = it.stream || "(default)";
      if (!byStream.has(key)) byStream.set(key, []);
      byStream.get(key).push(it);
    }
    if (!byStream.size) return message(`No telemetry in the last ${TELEMETRY_SINCE}.`);
    return h("div", { class: "charts" }, [...byStream.entries()].sort().map(([s, list]) => streamChart(s, list)));
  }

  async function loadSessions() {
    const items = (await getJson("/api/v1/sessions?limit=1000")).items.filter((s) => s.device === id);
    if (!items.length) return message("No terminal session has been opened on this device.");
    return table(
      "Terminal sessions, newest first",
      ["Session", "Operator", "Command", "Started", "Ended", "Bytes in / out", "Exit", "Reason"],
      items.map((s) =>
        row([
          String(s.id),
          s.operator,
          s.command ? (Array.isArray(s.command) ? s.command.join(" ") : String(s.command)) : "login shell",
          s.started_at || "",
          s.active ? "active" : s.ended_at || "",
          `${s.bytes_in} / ${s.bytes_out}`,
          s.exit_status === null ? "" : String(s.exit_status),
          s.reason || "",
        ]),
      ),
      { id: "sessions", class: "grid" },
    );
  }

  async function settle(box, promise) {
    try {
      append(clear(box), [await promise]);
    } catch (err) {
      clear(box).append(message(`unavailable: ${err.message}`, "error"));
    }
  }

  return {
    async render(root, params, ctx) {
      id = decodeURIComponent(params[0]);
      root.append(h("p", { class: "crumbs" }, h("a", { href: "#/devices" }, "Fleet"), " / device"));
      root.append(h("h1", {}, h("span", { class: "device-id", id: "device-title" }, id)));
      let device;
      try {
        summaryBox = h("div");
        device = await loadSummary();
      } catch (err) {
        if (err instanceof ApiError && err.status === 404) {
          root.append(message(`No device ${id} in this tenant.`, "error"));
          return;
        }
        throw err;
      }
      deploymentsBox = h("div", { "aria-live": "polite" });
      eventsList = h("ol", { class: "events", id: "device-events" });
      const telemetryBox = h("div", {}, message("loading…"));
      const sessionsBox = h("div", {}, message("loading…"));
      logs = logsPanel(id);
      root.append(
        section("Summary", "s-summary", summaryBox),
        section("Deployments", "s-deployments", deploymentsBox),
        section("Workload logs", "s-logs", logs.node),
        section("Recent events", "s-events", eventsList),
        section("Telemetry", "s-telemetry", telemetryBox),
        section("Capabilities", "s-capabilities", capabilities(device.capabilities)),
        section("Terminal sessions", "s-sessions", sessionsBox),
      );
      await Promise.all([
        loadDeployments().catch((err) => deploymentsBox.append(message(`unavailable: ${err.message}`, "error"))),
        loadEvents(ctx).catch(() => {}),
        settle(telemetryBox, loadTelemetry()),
        settle(sessionsBox, loadSessions()),
      ]);
      timer = setInterval(() => loadSummary().catch(() => {}), 10000);
    },
    onEvent(ev) {
      if (ev.device !== id || !eventsList) return;
      eventsList.prepend(eventLine(ev));
      while (eventsList.children.length > EVENTS_SHOWN) eventsList.lastChild.remove();
      clearTimeout(this._pending);
      this._pending = setTimeout(() => {
        loadDeployments().catch(() => {});
        loadSummary().catch(() => {});
      }, DEBOUNCE_MS);
    },
    dispose() {
      clearInterval(timer);
      clearTimeout(this._pending);
      if (logs) logs.close();
    },
  };
}
