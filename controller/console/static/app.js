// The console's shell: sign-in, the hash router (#/devices, #/devices/ID, #/deployments,
// #/rollouts, #/rollouts/NAME, #/apply) and the live event feed every view listens to.

import { clearToken, getJson, readEvents, setToken, token, whenUnauthorized } from "./api.js";
import { applyView } from "./apply.js";
import { deviceView } from "./device.js";
import { clear, h, message } from "./dom.js";
import { fleetView } from "./fleet.js";
import { deploymentsView, rolloutView, rolloutsView } from "./rollouts.js";

const ROUTES = [
  [/^\/devices$/, fleetView],
  [/^\/devices\/(.+)$/, deviceView],
  [/^\/deployments$/, deploymentsView],
  [/^\/rollouts$/, rolloutsView],
  [/^\/rollouts\/(.+)$/, rolloutView],
  [/^\/apply$/, applyView],
];

const $ = (id) => document.getElementById(id);
const ctx = { me: null, latestEventId: 0 };
let current = null; // the view on the page
let feed = null; // AbortController of the live feed
let generation = 0; // bumps on every navigation: a slow render of an old view is dropped

function setLive(text, ok) {
  const el = $("live");
  el.textContent = text;
  el.classList.toggle("on", ok);
}

function showSignIn(error) {
  ctx.me = null;
  if (feed) feed.abort();
  feed = null;
  if (current && current.dispose) current.dispose();
  current = null;
  clear($("view"));
  $("nav").hidden = true;
  $("who").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = error || "";
  document.title = "Sign in · margo-stream console";
  $("token").focus();
}

async function signedIn() {
  ctx.me = await getJson("/api/v1/me", { quiet: true });
  $("signin").hidden = true;
  $("nav").hidden = false;
  $("who").hidden = false;
  $("who-name").textContent = `${ctx.me.name} (${ctx.me.roles.join(", ")}) · tenant ${ctx.me.tenant}`;
  $("nav-apply").hidden = !ctx.me.may.apply;
  startFeed();
  if (!location.hash || location.hash === "#" || location.hash === "#/") location.hash = "#/devices";
  else await route();
}

async function route() {
  if (!ctx.me) return;
  const path = location.hash.replace(/^#/, "") || "/devices"; // params stay encoded
  let view = null;
  let params = [];
  for (const [pattern, make] of ROUTES) {
    const m = path.match(pattern);
    if (m) {
      view = make();
      params = m.slice(1);
      break;
    }
  }
  if (current && current.dispose) current.dispose();
  current = view;
  const mine = ++generation;
  const root = clear($("view"));
  for (const a of document.querySelectorAll("#nav a")) {
    const active = path.startsWith(`/${a.dataset.view}`);
    if (active) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (!view) {
    root.append(h("h1", { tabindex: "-1" }, "Not found"), message(`no console page ${path}`));
    return;
  }
  const body = h("div", { "aria-busy": "true" });
  root.append(body);
  try {
    await view.render(body, params, ctx);
  } catch (err) {
    if (mine !== generation) return;
    body.append(message(`could not load this page: ${err.message}`, "error"));
  }
  if (mine !== generation) return;
  body.removeAttribute("aria-busy");
  const title = body.querySelector("h1");
  document.title = `${title ? title.textContent : "Console"} · margo-stream console`;
  if (title) {
    title.setAttribute("tabindex", "-1");
    title.focus({ preventScroll: true });
  }
}

// One feed per signed-in tab: /api/v1/events/stream, resumed after the last event seen.
function startFeed() {
  if (feed) feed.abort();
  const controller = new AbortController();
  feed = controller;
  let last = null;
  (async () => {
    while (!controller.signal.aborted) {
      try {
        await readEvents("/api/v1/events/stream", {
          signal: controller.signal,
          lastEventId: last,
          onOpen: () => setLive("live", true),
          onComment: (text) => {
            const m = text.match(/after (\d+)$/);
            if (m) ctx.latestEventId = Math.max(ctx.latestEventId, Number(m[1]));
          },
          onEvent: (ev) => {
            last = ev.id || last;
            let item;
            try {
              item = JSON.parse(ev.data);
            } catch (_) {
              return;
            }
            ctx.latestEventId = Math.max(ctx.latestEventId, Number(item.id) || 0);
            if (current && current.onEvent) current.onEvent(item);
          },
        });
      } catch (err) {
        if (controller.signal.aborted || (err && err.status === 401)) return;
      }
      if (controller.signal.aborted) return;
      setLive("reconnecting", false);
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  })();
}

function signOut() {
  clearToken();
  history.replaceState(null, "", "#/");
  showSignIn("");
}

async function submitSignIn(event) {
  event.preventDefault();
  const value = $("token").value.trim();
  if (!value) return;
  setToken(value);
  $("token").value = "";
  try {
    await signedIn();
  } catch (err) {
    clearToken();
    showSignIn(err.status === 401 ? `sign-in refused: ${err.message}` : `sign-in failed: ${err.message}`);
  }
}

function start() {
  whenUnauthorized((err) => {
    clearToken();
    showSignIn(`signed out: ${err.message}`);
  });
  $("signin-form").addEventListener("submit", submitSignIn);
  $("sign-out").addEventListener("click", signOut);
  window.addEventListener("hashchange", () => route());
  if (token()) {
    signedIn().catch((err) => {
      clearToken();
      showSignIn(err.status === 401 ? `signed out: ${err.message}` : `sign-in failed: ${err.message}`);
    });
  } else {
    showSignIn("");
  }
}

start();
