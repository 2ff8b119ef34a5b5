// Deployments across the fleet, rollouts and one rollout's steps, with progress. Each page
// re-reads itself when the feed reports a deployment or rollout change (and every few seconds
// while a rollout runs: a health gate passing is not an event).

import { request, getJson } from "./api.js";
import { componentList } from "./device.js";
import { clear, h, message, row, stateBadge, table, when } from "./dom.js";
import { deviceLink } from "./fleet.js";

const DEBOUNCE_MS = 200;
const RUNNING_REFRESH_MS = 3000;

function live(reload, wanted) {
  let pending = null;
  return {
    onEvent(ev) {
      if (!wanted(ev.kind || "")) return;
      clearTimeout(pending);
      pending = setTimeout(() => reload().catch(() => {}), DEBOUNCE_MS);
    },
    stop() {
      clearTimeout(pending);
    },
  };
}

export function deploymentsView() {
  let box = null;
  async function reload() {
    const items = (await getJson("/api/v1/deployments")).items;
    clear(box);
    if (!items.length) {
      box.append(message("Nothing is deployed yet."));
      return;
    }
    const states = {};
    for (const d of items) states[d.state] = (states[d.state] || 0) + 1;
    box.append(
      h("p", { role: "status" }, Object.entries(states).map(([s, n]) => `${n} ${s}`).join(", ")),
      table(
        "Deployments per device",
        ["Deployment", "Device", "State", "Components", "Manifest version", "Updated", "Error"],
        items.map((d) =>
          row(
            [
              d.deploymentId,
              deviceLink(d.device),
              stateBadge(d.state),
              componentList(d.components),
              d.manifestVersion === null ? "none" : String(d.manifestVersion),
              when(d.updated_at),
              d.error ? `${d.error.code}: ${d.error.message}` : "",
            ],
            { "data-deployment-id": d.deploymentId, "data-device-id": d.device, "data-state": d.state },
          ),
        ),
        { id: "all-deployments", class: "grid" },
      ),
    );
  }
  const feed = live(reload, (k) => k.startsWith("deployment.") || k.startsWith("manifest."));
  return {
    async render(root) {
      box = h("div", { "aria-live": "polite" });
      root.append(h("h1", {}, "Deployments"), box);
      await reload();
    },
    onEvent: feed.onEvent,
    dispose: feed.stop,
  };
}

function totals(r) {
  return r.steps.reduce(
    (t, s) => ({ installed: t.installed + s.installed, failed: t.failed + s.failed, pending: t.pending + s.pending }),
    { installed: 0, failed: 0, pending: 0 },
  );
}

function progress(r) {
  const done = r.steps.filter((s) => s.finished_at).length;
  const label = `${done} of ${r.steps.length} steps done`;
  return h("span", { class: "progress" }, h("progress", { max: r.steps.length, value: done, "aria-label": label }), ` ${label}`);
}

const RUNNING = new Set(["running", "paused", "rolling-back"]);

export function rolloutsView() {
  let box = null;
  let timer = null;
  async function reload() {
    const items = (await getJson("/api/v1/rollouts")).items;
    clear(box);
    if (!items.length) {
      box.append(message("No rollout yet (margoctl rollout create)."));
      return;
    }
    box.append(
      table(
        "Rollouts, newest first",
        ["Rollout", "State", "Deployment", "Progress", "Devices installed / failed / pending", "Updated"],
        items.map((r) => {
          const t = totals(r);
          return row(
            [
              h("a", { href: `#/rollouts/${encodeURIComponent(r.name)}` }, r.name),
              stateBadge(r.state),
              r.deploymentId,
              progress(r),
              `${t.installed} / ${t.failed} / ${t.pending}`,
              when(r.updated_at),
            ],
            { "data-rollout": r.name },
          );
        }),
        { id: "rollouts", class: "grid" },
      ),
    );
  }
  const feed = live(reload, (k) => k.startsWith("rollout.") || k === "deployment.status");
  return {
    async render(root) {
      box = h("div", { "aria-live": "polite" });
      root.append(h("h1", {}, "Rollouts"), box);
      await reload();
      timer = setInterval(() => reload().catch(() => {}), RUNNING_REFRESH_MS * 2);
    },
    onEvent: feed.onEvent,
    dispose() {
      feed.stop();
      clearInterval(timer);
    },
  };
}

export function rolloutView() {
  let box = null;
  let name = null;
  let timer = null;
  let me = null;
  const status = h("p", { role: "status", class: "note" });

  async function command(cmd) {
    try {
      await request(`/api/v1/rollouts/${encodeURIComponent(name)}/${cmd}`, { method: "POST", body: {} });
      status.textContent = `${cmd}: done`;
    } catch (err) {
      status.textContent = `${cmd} refused: ${err.message}`;
    }
    await reload();
  }

  async function reload() {
    const r = await getJson(`/api/v1/rollouts/${encodeURIComponent(name)}`);
    clear(box);
    const facts = [
      ["State", stateBadge(r.state)],
      ["Deployment", `${r.deploymentId} (${r.digest})`],
      ["Progress", progress(r)],
      ["Current step", r.current_step === null ? "none" : String(r.current_step)],
      ["Failure budget", r.maxFailures],
      ["Healthy for", `${r.healthyFor} s`],
      ["Automatic rollback", r.autoRollback ? "yes" : "no"],
      ["Reason", r.reason || "none"],
      ["Created", when(r.created_at)],
    ];
    box.append(h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
    if (me && me.may.rollout && RUNNING.has(r.state)) {
      const actions = r.state === "paused" ? ["resume", "abort"] : r.state === "running" ? ["pause", "abort"] : [];
      box.append(h("p", { class: "actions" }, actions.map((a) => h("button", { type: "button", onclick: () => command(a) }, a))));
    }
    box.append(
      table(
        "Steps",
        ["Step", "Target", "Devices", "Installed", "Failed", "Pending", "Started", "Finished", "Result"],
        r.steps.map((s) =>
          row([
            String(s.step),
            s.target,
            s.devices.length ? h("ul", { class: "labels" }, s.devices.map((d) => h("li", {}, deviceLink(d)))) : "none yet",
            h("span", {}, h("progress", { max: Math.max(s.devices.length, 1), value: s.installed, "aria-label": `step ${s.step}: ${s.installed} of ${s.devices.length} installed` }), ` ${s.installed}`),
            String(s.failed),
            String(s.pending),
            when(s.started_at),
            when(s.finished_at),
            s.result || "",
          ]),
        ),
        { id: "rollout-steps", class: "grid" },
      ),
    );
    if (r.failures.length) {
      box.append(
        table("Failures", ["Device", "Step", "Reason"], r.failures.map((f) => row([deviceLink(f.device), String(f.step), f.reason])), { class: "grid" }),
      );
    }
  }
  const feed = live(reload, (k) => k.startsWith("rollout.") || k === "deployment.status");
  return {
    async render(root, params, ctx) {
      name = decodeURIComponent(params[0]);
      me = ctx.me;
      box = h("div", { "aria-live": "polite" });
      root.append(h("p", { class: "crumbs" }, h("a", { href: "#/rollouts" }, "Rollouts"), " / rollout"), h("h1", {}, `Rollout ${name}`), status, box);
      await reload();
      timer = setInterval(() => reload().catch(() => {}), RUNNING_REFRESH_MS);
    },
    onEvent: feed.onEvent,
    dispose() {
      feed.stop();
      clearInterval(timer);
    },
  };
}
