// Telemetry charts drawn as plain SVG (no library): one chart per stream, one line per numeric
// field (at most MAX_SERIES), time on the x axis, with a text summary for screen readers.

import { h } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
const MAX_SERIES = 4;
const W = 560;
const H = 180;
const PAD = { left: 56, right: 12, top: 10, bottom: 26 };
const SKIP = new Set(["seq", "stream", "received_at", "ts", "time", "timestamp"]);

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function numericFields(items) {
  const counts = new Map();
  for (const item of items) {
    for (const [k, v] of Object.entries(item)) {
      if (!SKIP.has(k) && typeof v === "number" && Number.isFinite(v)) counts.set(k, (counts.get(k) || 0) + 1);
    }
  }
  return [...counts.entries()].sort((a, b) => b[1] - a[1]).slice(0, MAX_SERIES).map(([k]) => k);
}

function fmt(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(2);
  return String(Math.round(v * 1000) / 1000);
}

// items: the stream's records, oldest first (the telemetry route's items)
export function streamChart(stream, items) {
  const fields = numericFields(items);
  const caption = h("figcaption", {}, `Stream ${stream}: ${items.length} records`);
  if (!fields.length) {
    return h("figure", { class: "chart" }, caption, h("p", { class: "note" }, "no numeric fields to chart"));
  }
  const points = items
    .map((it) => ({ t: Date.parse(it.received_at), it }))
    .filter((p) => Number.isFinite(p.t));
  const t0 = Math.min(...points.map((p) => p.t));
  const t1 = Math.max(...points.map((p) => p.t));
  const values = points.flatMap((p) => fields.map((f) => p.it[f]).filter((v) => typeof v === "number"));
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (lo === hi) {
    lo -= 1;
    hi += 1;
  }
  const x = (t) => PAD.left + ((t - t0) / Math.max(t1 - t0, 1)) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - ((v - lo) / (hi - lo)) * (H - PAD.top - PAD.bottom);
  const latest = fields.map((f) => {
    const last = [...items].reverse().find((it) => typeof it[f] === "number");
    return `${f} ${last ? fmt(last[f]) : "none"}`;
  });
  const svg = s("svg", {
    viewBox: `0 0 ${W} ${H}`,
    role: "img",
    "aria-label": `${stream}: ${fields.join(", ")} over ${Math.round((t1 - t0) / 1000)} s; latest ${latest.join(", ")}`,
    class: "chart-svg",
  });
  svg.append(s("line", { x1: PAD.left, y1: H - PAD.bottom, x2: W - PAD.right, y2: H - PAD.bottom, class: "axis" }));
  svg.append(s("line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: H - PAD.bottom, class: "axis" }));
  svg.append(s("text", { x: PAD.left - 4, y: PAD.top + 8, "text-anchor": "end", class: "tick" }, fmt(hi)));
  svg.append(s("text", { x: PAD.left - 4, y: H - PAD.bottom, "text-anchor": "end", class: "tick" }, fmt(lo)));
  const clock = (t) => new Date(t).toISOString().slice(11, 19);
  svg.append(s("text", { x: PAD.left, y: H - 8, class: "tick" }, clock(t0)));
  svg.append(s("text", { x: W - PAD.right, y: H - 8, "text-anchor": "end", class: "tick" }, clock(t1)));
  fields.forEach((f, i) => {
    const pts = points
      .filter((p) => typeof p.it[f] === "number")
      .map((p) => `${x(p.t).toFixed(1)},${y(p.it[f]).toFixed(1)}`);
    svg.append(s("polyline", { points: pts.join(" "), class: `series series-${i}` }));
    if (pts.length === 1) {
      const [cx, cy] = pts[0].split(",");
      svg.append(s("circle", { cx, cy, r: 3, class: `dot series-${i}` }));
    }
  });
  const legend = h(
    "ul",
    { class: "legend" },
    fields.map((f, i) => h("li", {}, h("span", { class: `swatch series-${i}`, "aria-hidden": "true" }), latest[i])),
  );
  return h("figure", { class: "chart", "data-stream": stream }, caption, svg, legend);
}
