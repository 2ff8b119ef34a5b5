// Apply deployment documents, through the same signed path margoctl uses: the console takes an
// apply request already signed on the operator's machine ({"documents": [YAML...],
// "signatures": {digest: envelope}, "certificate": {...}}, optionally "blobs"), adds the targets
// chosen here (which the controller orders, and nobody signs) and POSTs it to
// /api/v1/deployments, which checks every signature against the tenant's root. The page never
// asks for the operator's private key: a page served by the controller must not hold what a
// compromised controller could use to author deployments.

import { request } from "./api.js";
import { clear, h, message } from "./dom.js";
import { deviceLink } from "./fleet.js";

function words(text) {
  return text.split(/[\s,]+/).map((w) => w.trim()).filter(Boolean);
}

function selectorOf(text) {
  const out = {};
  for (const pair of words(text)) {
    const eq = pair.indexOf("=");
    if (eq <= 0) throw new Error(`selector ${JSON.stringify(pair)} is not key=value`);
    out[pair.slice(0, eq)] = pair.slice(eq + 1);
  }
  return out;
}

function signedRequest(text) {
  let body;
  try {
    body = JSON.parse(text);
  } catch (_) {
    throw new Error("the signed request is not JSON");
  }
  if (!body || typeof body !== "object" || Array.isArray(body)) throw new Error("the signed request must be a JSON object");
  if (!Array.isArray(body.documents) || !body.documents.length || !body.documents.every((d) => typeof d === "string"))
    throw new Error("'documents' must be a non-empty list of YAML texts");
  if (!body.signatures || typeof body.signatures !== "object") throw new Error("'signatures' is missing: sign the documents first");
  if (!body.certificate || typeof body.certificate !== "object") throw new Error("'certificate' (the operator's) is missing");
  const out = { documents: body.documents, signatures: body.signatures, certificate: body.certificate };
  if (Array.isArray(body.blobs)) out.blobs = body.blobs;
  return out;
}

export function applyView() {
  return {
    async render(root, _params, ctx) {
      root.append(h("h1", {}, "Apply deployments"));
      if (!ctx.me.may.apply) {
        root.append(
          message(`Applying needs the deployer role; ${ctx.me.name} has ${ctx.me.roles.join(", ")}.`),
        );
        return;
      }
      const result = h("div", { id: "apply-result", role: "status", "aria-live": "polite" });
      const preview = h("div", { id: "apply-preview" });
      const signed = h("textarea", { id: "signed", name: "signed", rows: 12, required: true, spellcheck: "false" });
      const file = h("input", { id: "signed-file", type: "file", accept: ".json,application/json" });
      const devices = h("input", { id: "devices", name: "devices", type: "text", spellcheck: "false" });
      const selector = h("input", { id: "selector", name: "selector", type: "text", spellcheck: "false" });
      const submit = h("button", { type: "submit" }, "Apply");

      function showPreview() {
        clear(preview);
        try {
          const body = signedRequest(signed.value);
          preview.append(
            h("p", {}, `${body.documents.length} document text(s), ${Object.keys(body.signatures).length} signature(s).`),
            ...body.documents.map((d, i) =>
              h("details", {}, h("summary", {}, `Document text ${i + 1}`), h("pre", { class: "yaml" }, d)),
            ),
          );
        } catch (err) {
          if (signed.value.trim()) preview.append(message(err.message, "note"));
        }
      }

      file.addEventListener("change", async () => {
        if (!file.files.length) return;
        signed.value = await file.files[0].text();
        showPreview();
      });
      signed.addEventListener("input", showPreview);

      const form = h(
        "form",
        { id: "apply-form", novalidate: true },
        h(
          "p",
          {},
          "The controller authors nothing: the documents must be signed on your machine with your operator key. ",
          "Paste or choose the signed apply request, a JSON object {\"documents\": [YAML text, …], \"signatures\": {…}, ",
          "\"certificate\": {…}} as margoctl apply sends it; the controller checks every signature against the tenant's root, ",
          "and each device checks them again.",
        ),
        h("label", { for: "signed-file" }, "Signed apply request file"),
        file,
        h("label", { for: "signed" }, "Signed apply request (JSON)"),
        signed,
        preview,
        h("label", { for: "devices" }, "Target devices (ids separated by spaces or commas)"),
        devices,
        h("label", { for: "selector" }, "Or a label selector (key=value, separated by commas)"),
        selector,
        h("p", { class: "note" }, "With neither, the documents' metadata.deviceId names the devices."),
        submit,
      );
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        clear(result);
        let body;
        try {
          body = signedRequest(signed.value);
          const ids = words(devices.value);
          const sel = selectorOf(selector.value);
          if (ids.length) body.devices = ids;
          if (Object.keys(sel).length) body.selector = sel;
        } catch (err) {
          result.append(message(err.message, "error"));
          return;
        }
        submit.disabled = true;
        try {
          const out = await (await request("/api/v1/deployments", { method: "POST", body })).json();
          result.append(
            h("p", {}, `Applied ${out.deployments.map((d) => `${d.deploymentId} (${d.digest.slice(0, 19)}…)`).join(", ")}.`),
            out.devices.length
              ? h("ul", { class: "labels" }, out.devices.map((d) => h("li", {}, deviceLink(d))))
              : message("No device matched: the deployments are stored only."),
          );
        } catch (err) {
          result.append(message(`apply refused: ${err.message}`, "error"));
        } finally {
          submit.disabled = false;
        }
      });
      root.append(form, result);
    },
  };
}
