"""Push latency as an operator sees it: from the ``POST /deployments`` that changes one
parameter to the device's ``installed`` status arriving on the event stream (SSE). Both ends
are timed in this process, so the figure includes the API, the store, signing, the QUIC push,
verification, the agent's atomic apply, a real process restart and the status path back."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench.signing import Signer
from margo_stream.identity.pki import init_pki, issue_device

DOC = """\
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata:
  annotations: {{applicationId: bench-probe, id: {dep}}}
  name: bench-probe
  namespace: bench
spec:
  deploymentProfile:
    type: {profile}
    components:
      - name: probe
        properties:
          command: ["sleep", "3600"]
          restart: on-failure
  parameters:
    value:
      value: "{value}"
      targets: [{{pointer: ENV.VALUE, components: [probe]}}]
"""


def document(value: Any, *, dep: str = "bench-probe", profile: str = "process") -> str:
    return DOC.format(dep=dep, value=value, profile=profile)


class EventWatch:
    """Follows ``/api/v1/events/stream`` and wakes waiters on matching events."""

    def __init__(self) -> None:
        self._waiters: list[tuple[Any, anyio.Event, list[float]]] = []

    def expect(self, predicate: Any) -> tuple[anyio.Event, list[float]]:
        event = anyio.Event()
        stamp: list[float] = []
        self._waiters.append((predicate, event, stamp))
        return event, stamp

    async def run(
        self, client: httpx.AsyncClient, *, task_status: Any = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with client.stream("GET", "/api/v1/events/stream", timeout=None) as response:
            response.raise_for_status()
            task_status.started()
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                now = time.perf_counter()
                item = json.loads(line[5:])
                for entry in list(self._waiters):
                    predicate, event, stamp = entry
                    if predicate(item):
                        stamp.append(now)
                        event.set()
                        self._waiters.remove(entry)


@asynccontextmanager
async def watching(api: str, token: str) -> AsyncIterator[tuple[httpx.AsyncClient, EventWatch]]:
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=api, headers=headers, limits=limits, timeout=60
    ) as client:
        watch = EventWatch()
        async with anyio.create_task_group() as tg:
            await tg.start(watch.run, client)
            yield client, watch
            tg.cancel_scope.cancel()


def installed(device: str, dep: str = "bench-probe") -> Any:
    def match(item: dict[str, Any]) -> bool:
        payload = item.get("payload") or {}
        return (
            item.get("kind") == "deployment.status"
            and item.get("device") == device
            and payload.get("deploymentId") == dep
            and payload.get("state") == "installed"
        )

    return match


async def apply(
    client: httpx.AsyncClient, signer: Signer, devices: list[str], value: Any, **kw: Any
) -> None:
    body = signer.body([document(value, **kw)], devices=devices)
    r = await client.post("/api/v1/deployments", json=body)
    r.raise_for_status()


async def one_push(
    client: httpx.AsyncClient,
    signer: Signer,
    watch: EventWatch,
    device: str,
    value: Any,
    timeout: float = 30.0,
) -> float:
    """Seconds from the apply to that device's ``installed`` event."""
    event, stamp = watch.expect(installed(device))
    t0 = time.perf_counter()
    await apply(client, signer, [device], value)
    with anyio.fail_after(timeout):
        await event.wait()
    return stamp[0] - t0


def one_device_pki(root: Path, device: str) -> tuple[Path, Path, str]:
    """A fresh PKI under ``root/certs`` for tenant ``bench`` and one device: the certificate
    directory, the device's identity directory and the operator token."""
    certs = root / "certs"
    init_pki(certs, ["bench"], ["localhost", "127.0.0.1"])
    ident = issue_device(certs, "bench", device)
    return certs, ident, (certs / "bench" / "operator.token").read_text().strip()
