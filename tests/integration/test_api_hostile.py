"""The operator API under hostile input, against a real controller with a real agent connected:
the YAML that froze the controller (nested 50,000 deep, 3.8 MiB flat, an alias bomb) and
bodies past ``--api-max-body`` are refused with a 4xx problem within 2 s each, while
``/healthz`` keeps answering within 200 ms, the device's session stays up and the controller
logs no traceback."""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from margo_stream.identity.authored import sign_deployment
from margo_stream.identity.operator_files import load_operator_credentials
from margo_stream.state.digest import sha256_digest
from tests.harness import Agent, Controller

pytestmark = [pytest.mark.integration]

NESTED = "- " * 50_000 + "x\n"  # 97 KiB: took 107 s and ended in a RecursionError
NESTED_MAP = "".join(" " * i + "a:\n" for i in range(400)) + " " * 400 + "a: 1\n"
FLAT = "".join(f"key{i}: value {i}\n" for i in range(180_000))  # 3.9 MiB: took 20 s
BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{k}: &{k} [{', '.join(['*' + p] * 10)}]\n" for p, k in zip("abcd", "bcde", strict=True)
    )
    + "f: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
)
# 60 documents, 2 MiB: a second of parsing, in a worker thread, before the first is judged
MANY = "".join(f"---\nk{j}:\n" + "".join(f"  k{i}: v\n" for i in range(3000)) for j in range(60))
MAX_BODY = 8 << 20  # the controller's default --api-max-body


def signed(token_file: Path, text: str) -> dict[str, Any]:
    """An apply body signed by the tenant's operator over the text's exact bytes, as margoctl
    would send it if it did not refuse to parse the text itself."""
    creds = load_operator_credentials(operator_dir=None, token_file=token_file)
    assert creds.key is not None and creds.tenant is not None
    digest = sha256_digest(text.encode())
    signature = sign_deployment(
        creds.tenant, "hostile", digest, creds.key, now=dt.datetime.now(dt.UTC)
    )
    return {
        "documents": [text],
        "devices": ["press-01"],
        "signatures": {digest: signature},
        "certificate": creds.certificate,
    }


class HealthPoller:
    """GET /healthz in a loop on its own thread, recording each answer's latency."""

    def __init__(self, api: str) -> None:
        self.api = api
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.api, timeout=5) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    resp = client.get("/healthz")
                    if resp.status_code != 200:
                        self.failures.append(f"status {resp.status_code}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.latencies.append(time.perf_counter() - start)
                self._stop.wait(0.02)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def fleet(pki, tmp_path) -> Iterator[tuple[Controller, Agent, str]]:
    ctl = Controller(pki, tmp_path / "data")
    agent = Agent(
        pki.device("acme", "press-01"), ctl.quic, tmp_path / "agent", extra=["--keepalive", "1"]
    )
    token = pki.token("acme")
    try:
        ctl.wait_connected(token, "press-01")
        yield ctl, agent, token
    finally:
        agent.stop()
        ctl.stop()


def post(ctl: Controller, token: str, **kw: Any) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    resp = httpx.post(
        f"{ctl.api}/api/v1/deployments",
        headers={"Authorization": f"Bearer {token}", **kw.pop("headers", {})},
        timeout=30,
        **kw,
    )
    return resp, time.perf_counter() - start


def is_problem(resp: httpx.Response, status: int, kind: str) -> str:
    assert resp.status_code == status, resp.text[:500]
    assert resp.headers["content-type"] == "application/problem+json"
    doc = resp.json()
    assert doc["type"] == f"urn:margo-stream:problem:{kind}", doc
    return str(doc["detail"])


def test_hostile_yaml_and_bodies_are_refused_while_everything_else_keeps_going(fleet, pki) -> None:
    ctl, agent, token = fleet
    before = ctl.device(token, "press-01")
    assert before is not None and before["connected"]
    token_file = pki.token_file("acme")
    cases = [
        (NESTED, 422, "document-too-complex", "nested deeper than 64 levels (the limit)"),
        (NESTED_MAP, 422, "document-too-complex", "nested deeper than 64 levels (the limit)"),
        (FLAT, 422, "document-too-complex", "larger than 1048576 bytes (the limit)"),
        (BOMB, 422, "document-too-complex", "more than 100000 YAML nodes (the limit"),
        (MANY, 422, "invalid-document", "metadata: required field is missing"),
    ]
    with HealthPoller(ctl.api) as poller:
        time.sleep(0.3)  # a few answers before
        for text, status, kind, words in cases:
            resp, took = post(ctl, token, json=signed(token_file, text))
            detail = is_problem(resp, status, kind)
            assert words in detail and detail.startswith("documents[0]:")
            assert took < 2.0, f"{words}: {took:.2f} s"

        # 150 MiB declared, streamed from a generator: refused before it is read
        sent = [0]

        def body() -> Iterator[bytes]:
            chunk = b"x" * (1 << 20)
            for _ in range(150):
                sent[0] += len(chunk)
                yield chunk

        resp, took = post(ctl, token, content=body(), headers={"Content-Length": str(150 << 20)})
        detail = is_problem(resp, 413, "body-too-large")
        assert "--api-max-body" in detail and "8 MiB" in detail
        assert took < 2.0 and sent[0] < 150 << 20

        # chunked, no length declared: cut off once past the limit
        sent[0] = 0
        resp, took = post(ctl, token, content=body())
        is_problem(resp, 413, "body-too-large")
        assert took < 2.0 and sent[0] < 150 << 20
        time.sleep(0.3)  # a few answers after

    assert not poller.failures, poller.failures[:5]
    assert len(poller.latencies) > 20
    worst = max(poller.latencies)
    assert worst < 0.2, f"/healthz took {worst * 1000:.0f} ms"

    # the device's session never dropped: same connection, no reconnect on either side
    after = ctl.device(token, "press-01")
    assert after is not None and after["connected"]
    assert after["connection_count"] == before["connection_count"]
    assert "reconnecting in" not in agent.log()
    assert "Traceback" not in ctl.log(), ctl.log_tail()

    # and the API still serves a sane apply of a small body on a fresh connection
    resp, _ = post(ctl, token, json={"documents": ["a: 1\n"], "devices": ["press-01"]})
    assert resp.status_code == 422


def test_the_413_reaches_a_client_that_reads_first_and_one_that_writes_first(fleet) -> None:
    """A raw client sends headers only and waits: the answer comes without a byte of the
    body. httpx's asyncio client writes its whole body before reading and drops what it
    received once a write fails: for a body up to twice the limit the controller reads and
    drops the rest before it closes, so that client gets its 413 too."""
    ctl, _, token = fleet

    async def write_first() -> list[int]:
        statuses = []
        async with httpx.AsyncClient(timeout=30) as client:
            for size in (MAX_BODY + 1, 2 * MAX_BODY - 4096):
                resp = await client.post(
                    f"{ctl.api}/api/v1/deployments",
                    content=b"x" * size,
                    headers={"Authorization": f"Bearer {token}"},
                )
                statuses.append(resp.status_code)
        return statuses

    assert anyio.run(write_first) == [413, 413]
    host, port = ctl.api.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /api/v1/deployments HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {token}\r\n".encode()
            + f"Content-Length: {MAX_BODY + 1}\r\nContent-Type: application/json\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert b"connection: close" in head.lower()
    assert b"body-too-large" in payload and b"--api-max-body" in payload


def test_the_limit_is_the_api_max_body_flag(pki, tmp_path) -> None:
    ctl = Controller(pki, tmp_path / "data", extra=["--api-max-body", "1MiB"])
    try:
        token = pki.token("acme")
        resp, took = post(ctl, token, content=b"x" * ((1 << 20) + 1))
        detail = is_problem(resp, 413, "body-too-large")
        assert "the limit is 1 MiB (1048576 bytes" in detail and took < 2.0
        resp, _ = post(ctl, token, json={"documents": ["a: " + "x" * 900_000]})
        assert resp.status_code == 422  # under the limit: read, and judged as a document
    finally:
        ctl.stop()
