// Building the page: every value from the API goes in as text (textContent), never as HTML.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = String(value);
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

// A table with a caption and column headers; rows are arrays of cells (strings or nodes).
export function table(caption, columns, rows, attrs = {}) {
  const thead = h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c))));
  const tbody = h("tbody", {}, rows);
  return h("table", attrs, h("caption", {}, caption), thead, tbody);
}

export function row(cells, attrs = {}) {
  return h("tr", attrs, cells.map((c, i) => (i === 0 ? h("th", { scope: "row" }, c) : h("td", {}, c))));
}

export function when(ts) {
  if (!ts) return "never";
  const d = new Date(ts);
  if (Number.isNaN(d.getTime())) return String(ts);
  const secs = Math.round((Date.now() - d.getTime()) / 1000);
  const ago = secs < 60 ? `${Math.max(secs, 0)} s ago` : secs < 3600 ? `${Math.round(secs / 60)} min ago` : `${Math.round(secs / 3600)} h ago`;
  return h("time", { datetime: d.toISOString(), title: d.toISOString() }, ago);
}

export function labels(map) {
  const entries = Object.entries(map || {});
  if (!entries.length) return "none";
  return h("ul", { class: "labels" }, entries.map(([k, v]) => h("li", {}, `${k}=${v}`)));
}

export function stateBadge(state) {
  return h("span", { class: `state state-${String(state || "unknown").replace(/[^a-z-]/g, "")}` }, state || "unknown");
}

export function message(text, kind = "note") {
  return h("p", { class: kind, role: kind === "error" ? "alert" : null }, text);
}

export function section(title, id, ...children) {
  return h("section", { "aria-labelledby": id }, h("h2", { id }, title), ...children);
}
