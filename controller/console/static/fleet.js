// The fleet: one row per device of the operator's tenant (GET /api/v1/devices), updated live:
// an event about a device re-reads that device; counters the feed does not announce (last
// seen, buffer fill) are re-read every REFRESH_MS while the page is shown.

import { ApiError, devicePath, getJson } from "./api.js";
import { h, labels, message, row, stateBadge, table, when } from "./dom.js";

const REFRESH_MS = 10000;
const DEBOUNCE_MS = 100;

export function deviceLink(id) {
  return h("a", { href: `#/devices/${encodeURIComponent(id)}`, class: "device-id" }, id);
}

function fill(stats) {
  const ratio = stats ? stats.telemetry_fill_ratio : undefined;
  if (typeof ratio !== "number") return "n/a";
  const pct = `${(ratio * 100).toFixed(ratio < 0.1 ? 1 : 0)}%`;
  return h("span", { class: "fill" }, h("meter", { min: 0, max: 1, low: 0.5, high: 0.8, value: ratio, "aria-hidden": "true" }), ` ${pct}`);
}

function deviceRow(d) {
  return row(
    [
      deviceLink(d.id),
      h("span", { class: d.connected ? "yes" : "no" }, d.connected ? "connected" : "disconnected"),
      d.transport || "none",
      when(d.last_seen),
      labels(d.labels),
      d.manifest_version === null || d.manifest_version === undefined ? "none" : String(d.manifest_version),
      fill(d.stats),
      stateBadge(d.state),
    ],
    { "data-device-id": d.id },
  );
}

const COLUMNS = ["Device", "Connection", "Transport", "Last seen", "Labels", "Manifest version", "Buffer fill", "State"];

export function fleetView() {
  let tbody = null;
  let summary = null;
  let timer = null;
  const pending = new Map();
  const rows = new Map();

  function count() {
    const all = [...rows.values()];
    const on = all.filter((tr) => tr.querySelector(".yes")).length;
    summary.textContent = `${all.length} devices, ${on} connected`;
  }

  function place(d) {
    const tr = deviceRow(d);
    const old = rows.get(d.id);
    if (old) old.replaceWith(tr);
    else {
      const after = [...rows.keys()].sort().find((k) => k > d.id);
      tbody.insertBefore(tr, after ? rows.get(after) : null);
    }
    rows.set(d.id, tr);
  }

  async function refreshOne(id) {
    try {
      place(await getJson(`/api/v1/devices/${devicePath(id)}`));
    } catch (err) {
      if (err instanceof ApiError && err.status === 404 && rows.has(id)) {
        rows.get(id).remove();
        rows.delete(id);
      }
    }
    count();
  }

  async function refreshAll() {
    const items = (await getJson("/api/v1/devices")).items;
    const seen = new Set(items.map((d) => d.id));
    for (const [id, tr] of rows) {
      if (!seen.has(id)) {
        tr.remove();
        rows.delete(id);
      }
    }
    for (const d of items) place(d);
    count();
  }

  return {
    async render(root) {
      summary = h("p", { id: "fleet-summary", role: "status" });
      const t = table("Devices of this tenant", COLUMNS, [], { id: "fleet", class: "grid" });
      tbody = t.querySelector("tbody");
      root.append(h("h1", {}, "Fleet"), summary, t);
      await refreshAll();
      if (!rows.size) root.append(message("No device has connected or been enrolled yet."));
      timer = setInterval(() => refreshAll().catch(() => {}), REFRESH_MS);
    },
    onEvent(ev) {
      if (!ev.device || !tbody) return;
      clearTimeout(pending.get(ev.device));
      pending.set(ev.device, setTimeout(() => refreshOne(ev.device), DEBOUNCE_MS));
    },
    dispose() {
      clearInterval(timer);
      for (const t of pending.values()) clearTimeout(t);
    },
  };
}
