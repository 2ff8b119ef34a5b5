"""``/api/v1/rollouts``: staged rollouts of one operator-signed deployment document.

Creating a rollout checks the operator's signature exactly as ``apply`` does
(``apply_authority``), stores the document and its blobs without assigning them to anyone,
resolves the targets (``devices`` or a ``selector`` on operator labels) and stores the
rollout; the controller's rollout driver (``controller.rollouts.driver``) then assigns the
document step by step. The controller authors nothing: a rollout only decides when each device
gets the operator's document, and a rollback gives a device the document it had before.
``pause``, ``resume`` and ``abort`` change the stored state (compare-and-set), so they work
through any controller of a cluster, whichever one runs the rollout.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from controller.api.apply_authority import OperatorClaim, check_operator, check_signatures
from controller.api.document_intake import file_blobs, read_documents_off_loop
from controller.api.routes_common import ApiContext, context, json_body, rfc3339, tenant_of
from controller.document_cache import CachedDocument
from controller.labels import selector_matches
from controller.problems import Problem
from controller.rollouts.machine import Emit, RolloutMachine, RolloutStateError
from controller.rollouts.spec import (
    MAX_TARGETS,
    Amount,
    RolloutSpec,
    RolloutSpecError,
    check_name,
    parse_duration,
    parse_steps,
)
from controller.store.base import DeploymentDraft
from controller.store.rollouts import RolloutConflict, RolloutExists, RolloutRecord
from margo_stream.errors import DocumentError, MargoError, NotFound
from margo_stream.identity.authored import verify_signed_by
from margo_stream.identity.envelope import canonical
from margo_stream.state.digest import sha256_digest

COMMAND_ATTEMPTS = 5
MAX_ROLLBACK_VERSIONS = 64
LIST_LIMIT = 200


class RolloutWaker(Protocol):
    def wake(self) -> None: ...


def _waker(request: Request) -> RolloutWaker | None:
    return getattr(request.app.state, "rollouts", None)


def _wake(request: Request) -> None:
    waker = _waker(request)
    if waker is not None:
        waker.wake()


def rollout_view(record: RolloutRecord) -> dict[str, Any]:
    """The rollout as the API shows it (``margoctl get rollout NAME -o json``)."""
    spec = RolloutSpec.from_json(record.spec)
    machine = RolloutMachine.from_json(spec, record.state)
    steps = []
    for i, (amount, step) in enumerate(zip(spec.steps, machine.steps, strict=True)):
        steps.append(
            {
                "step": i + 1,
                "target": amount.text(),
                "devices": list(step.devices),
                "started_at": rfc3339(step.started_at),
                "finished_at": rfc3339(step.finished_at),
                "result": step.result,
                **machine.counts(step),
            }
        )
    return {
        "name": record.name,
        "state": str(machine.phase),
        "deploymentId": spec.deployment_id,
        "digest": spec.digest,
        "steps": steps,
        "current_step": machine.current + 1 if machine.current >= 0 else None,
        "targets": list(machine.targets),
        "selector": dict(spec.selector) or None,
        "maxFailures": spec.max_failures.text(),
        "healthyFor": spec.healthy_for,
        "stepTimeout": spec.step_timeout,
        "autoRollback": spec.auto_rollback,
        "failures": [
            {"device": d, "step": t.step + 1, "reason": t.failed}
            for d, t in machine.devices.items()
            if t.failed is not None
        ],
        "reason": machine.reason,
        "created_at": rfc3339(record.created),
        "updated_at": rfc3339(record.updated),
        "finished_at": rfc3339(machine.finished_at),
        "owner": record.owner,
        "version": record.version,
    }


def _spec_field(body: dict[str, Any], key: str, default: Any) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    return value


def _rollback_signatures(
    body: dict[str, Any], claim: OperatorClaim | None, deployment_id: str, new: str
) -> tuple[dict[str, str], str | None]:
    """The operator's signatures of the versions a rollback may bring back, checked like the
    document's own (digest -> canonical JSON), and the certificate digest they go with."""
    given = body.get("rollbackSignatures") or {}
    if not isinstance(given, dict) or len(given) > MAX_ROLLBACK_VERSIONS:
        raise Problem(
            400,
            f"'rollbackSignatures' must map at most {MAX_ROLLBACK_VERSIONS} document digests to"
            " signatures",
            kind="invalid-body",
        )
    if claim is None:
        return {}, None
    now = dt.datetime.now(dt.UTC)
    out: dict[str, str] = {}
    for digest, sig in given.items():
        if digest == new:
            continue
        try:
            verify_signed_by(
                sig, claim.verified, claim.root.tenant, deployment_id=deployment_id,
                digest=digest, now=now,
            )  # fmt: skip
        except MargoError as exc:
            raise Problem(
                422, f"rollback signature of {digest}: {exc}", kind="invalid-signature"
            ) from None
        out[digest] = canonical(sig).decode()
    return out, sha256_digest(canonical(claim.certificate))


async def _document(
    ctx: ApiContext, tenant: str, body: dict[str, Any]
) -> tuple[str, str, dict[str, str], str | None]:
    """Store the rollout's one document (signed, like ``apply``) without assigning it;
    returns its deployment id and digest, and the checked rollback signatures."""
    texts = body.get("documents")
    if not isinstance(texts, list) or len(texts) != 1 or not isinstance(texts[0], str):
        raise Problem(
            400,
            "'documents' must hold exactly one YAML text: a rollout rolls out one deployment",
            kind="invalid-body",
        )
    claim = None
    if ctx.roots is not None:
        claim = check_operator(body, ctx.roots.chain(tenant), dt.datetime.now(dt.UTC))
    docs = await read_documents_off_loop(texts, ctx.workers())
    if len(docs) != 1:
        raise DocumentError("a rollout's file must hold exactly one deployment document")
    decoded = await file_blobs(body, docs, ctx.store, tenant)
    data, dep = docs[0]
    sig = None
    certificate = None
    if claim is not None:
        authority = check_signatures(claim, docs, dt.datetime.now(dt.UTC))
        decoded.append(authority.certificate)
        sig = authority.signatures[sha256_digest(data)]
        certificate = authority.certificate_digest
    draft = DeploymentDraft(
        deployment_id=dep.deployment_id,
        document=data,
        name=dep.name,
        profile=str(dep.profile),
        signature=canonical(sig).decode() if sig else None,
        certificate=certificate,
    )
    rollback, cert_digest = _rollback_signatures(
        body, claim, dep.deployment_id, sha256_digest(data)
    )
    records = await ctx.store.apply(tenant, blobs=decoded, deployments=[draft], devices=[])
    record = records[0]
    kept = json.loads(record.signature) if record.signature else None
    ctx.documents.put(tenant, record.digest, CachedDocument(dep, kept, record.certificate))
    return record.deployment_id, record.digest, rollback, cert_digest


async def _targets(
    ctx: ApiContext, tenant: str, devices: list[str], selector: dict[str, str]
) -> list[str]:
    if devices:
        for device_id in devices:
            await ctx.store.get_device(tenant, device_id)  # NotFound before anything runs
        return list(dict.fromkeys(devices))
    return sorted(
        r.device_id
        for r in await ctx.store.list_devices(tenant)
        if selector_matches(selector, r.labels, r.reported_labels)
    )


def _request_spec(body: dict[str, Any], name: str) -> tuple[dict[str, Any], list[str]]:
    devices = body.get("devices") or []
    selector = body.get("selector") or {}
    if not isinstance(devices, list) or not all(isinstance(d, str) and d for d in devices):
        raise Problem(400, "'devices' must be a list of device ids", kind="invalid-body")
    if not isinstance(selector, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
    ):
        raise Problem(400, "'selector' must map label names to values", kind="invalid-body")
    if bool(devices) == bool(selector):
        raise Problem(
            400, "give the targets as 'devices' or as a 'selector', one of them", kind="no-targets"
        )
    if len(devices) > MAX_TARGETS:
        raise Problem(400, f"at most {MAX_TARGETS} devices per rollout", kind="invalid-body")
    steps = body.get("steps")
    if not isinstance(steps, str | list):
        raise Problem(400, "'steps' must be given, e.g. \"1,10%,100%\"", kind="invalid-body")
    auto = _spec_field(body, "autoRollback", True)
    if not isinstance(auto, bool):
        raise Problem(400, "'autoRollback' must be true or false", kind="invalid-body")
    fields = {
        "name": name,
        "steps": [s.text() for s in parse_steps(steps)],
        "maxFailures": Amount.parse(
            _spec_field(body, "maxFailures", "0"), what="max-failures"
        ).text(),
        "healthyFor": parse_duration(_spec_field(body, "healthyFor", "30s"), what="healthy-for"),
        "stepTimeout": parse_duration(_spec_field(body, "stepTimeout", "5m"), what="step-timeout"),
        "autoRollback": auto,
        "devices": devices,
        "selector": selector,
    }
    return fields, devices


async def create_rollout(request: Request) -> JSONResponse:
    tenant = tenant_of(request)
    ctx = context(request)
    body = await json_body(request)
    try:
        name = check_name(body.get("name", ""))
        fields, devices = _request_spec(body, name)
        # everything the request says is checked before the document is stored
        RolloutSpec.from_json({**fields, "deploymentId": "-", "digest": "-"})
    except RolloutSpecError as exc:
        raise Problem(400, str(exc), kind="invalid-rollout") from None
    try:
        await ctx.store.get_rollout(tenant, name)
    except NotFound:
        pass
    else:
        raise Problem(409, f"rollout {name!r} exists already: choose another name", kind="conflict")
    targets = await _targets(ctx, tenant, devices, dict(fields["selector"]))
    if not targets:
        raise Problem(400, "no device matches the selector", kind="no-targets")
    deployment_id, digest, rollback, cert_digest = await _document(ctx, tenant, body)
    spec = RolloutSpec.from_json(
        {
            **fields,
            "deploymentId": deployment_id,
            "digest": digest,
            "rollbackSignatures": rollback,
            "certificate": cert_digest,
        }
    )
    now = dt.datetime.now(dt.UTC).timestamp()
    try:
        machine = RolloutMachine(spec, targets, now)
    except RolloutSpecError as exc:
        raise Problem(400, str(exc), kind="invalid-rollout") from None
    try:
        record = await ctx.store.create_rollout(
            tenant,
            name,
            spec=spec.to_json(),
            state=machine.to_json(),
            phase=str(machine.phase),
            events=[
                (
                    "rollout.created",
                    None,
                    {
                        "rollout": name,
                        "deploymentId": deployment_id,
                        "digest": digest,
                        "targets": len(targets),
                        "steps": fields["steps"],
                    },
                )
            ],
            now=now,
        )
    except RolloutExists as exc:
        raise Problem(409, str(exc), kind="conflict") from None
    _wake(request)
    return JSONResponse(rollout_view(record), status_code=201)


async def list_rollouts(request: Request) -> JSONResponse:
    tenant = tenant_of(request)
    records = await context(request).store.list_rollouts(tenant, limit=LIST_LIMIT)
    return JSONResponse({"items": [rollout_view(r) for r in records]})


async def get_rollout(request: Request) -> JSONResponse:
    tenant = tenant_of(request)
    record = await context(request).store.get_rollout(tenant, request.path_params["name"])
    return JSONResponse(rollout_view(record))


async def command_rollout(request: Request) -> JSONResponse:
    tenant = tenant_of(request)
    store = context(request).store
    name = request.path_params["name"]
    command = request.path_params["command"]
    if command not in ("pause", "resume", "abort"):
        raise Problem(404, f"no rollout command {command!r}: pause, resume or abort")
    for _ in range(COMMAND_ATTEMPTS):
        record = await store.get_rollout(tenant, name)
        machine = RolloutMachine.from_json(RolloutSpec.from_json(record.spec), record.state)
        now = dt.datetime.now(dt.UTC).timestamp()
        try:
            actions = getattr(machine, command)(now)
        except RolloutStateError as exc:
            raise Problem(409, str(exc), kind="invalid-state") from None
        try:
            record = await store.save_rollout(
                tenant,
                name,
                version=record.version,
                state=machine.to_json(),
                phase=str(machine.phase),
                events=[(a.kind, a.device, a.payload) for a in actions if isinstance(a, Emit)],
                now=now,
            )
        except RolloutConflict:
            continue  # the driver saved a pass meanwhile: apply the command to that
        _wake(request)
        return JSONResponse(rollout_view(record))
    raise Problem(409, f"rollout {name!r} kept changing; try the command again", kind="conflict")


def routes() -> list[Route]:
    return [
        Route("/api/v1/rollouts", list_rollouts, methods=["GET"]),
        Route("/api/v1/rollouts", create_rollout, methods=["POST"]),
        Route("/api/v1/rollouts/{name}", get_rollout, methods=["GET"]),
        Route("/api/v1/rollouts/{name}/{command}", command_rollout, methods=["POST"]),
    ]


def _json_ok(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"type": "object"}}},
    }


_PROBLEMS = {
    code: {"description": "problem details", "content": {"application/problem+json": {}}}
    for code in ("400", "401", "403", "404", "409", "422", "503")
}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


def openapi_paths() -> dict[str, Any]:
    """The rollout routes in the operator API's OpenAPI document (``create_app`` adds them)."""
    return {
        "/api/v1/rollouts": {
            "get": {
                "summary": "The tenant's rollouts, newest first (deployer changes, viewer reads)",
                "responses": {"200": _json_ok("{items: [rollout]}"), **_PROBLEMS},
            },
            "post": {
                "summary": "Start a rollout: {name, documents: [one signed YAML], signatures,"
                " certificate, rollbackSignatures, devices | selector, steps, maxFailures,"
                " healthyFor, stepTimeout, autoRollback}",
                "responses": {"201": _json_ok("the rollout"), **_PROBLEMS},
            },
        },
        "/api/v1/rollouts/{name}": {
            "get": {
                "summary": "One rollout: state running|paused|rolling-back|succeeded|failed|"
                "rolled-back; per step devices, started_at, finished_at, installed, failed,"
                " pending",
                "parameters": [_NAME],
                "responses": {"200": _json_ok("the rollout"), **_PROBLEMS},
            },
        },
        "/api/v1/rollouts/{name}/{command}": {
            "post": {
                "summary": "pause, resume or abort (abort rolls back)",
                "parameters": [
                    _NAME,
                    {
                        "name": "command",
                        "in": "path",
                        "required": True,
                        "schema": {"enum": ["pause", "resume", "abort"]},
                    },
                ],
                "responses": {"200": _json_ok("the rollout"), **_PROBLEMS},
            },
        },
    }
