"""``--api-max-body``: request bodies refused with a 413 problem before they are read
(``controller.api.body_limit``), alone and inside the operator API."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from controller.api.app import create_app
from controller.api.body_limit import BodyLimitMiddleware, declared_length
from controller.registry import SessionRegistry
from controller.store.sqlite import SqliteStore
from margo_stream.identity.operator_files import OperatorTable

pytestmark = pytest.mark.anyio
LIMIT = 64 << 10
TOKEN = "acme-token-0123456789"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Echo:
    """An app that reads the whole body and says how long it was."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})
            return
        body = await Request(scope, receive).body()
        await JSONResponse({"length": len(body)})(scope, receive, send)


def client_for(app) -> httpx.AsyncClient:  # type: ignore[no-untyped-def]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


def problem(resp: httpx.Response) -> dict:
    assert resp.status_code == 413, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.headers["connection"] == "close"
    doc = resp.json()
    assert doc["type"] == "urn:margo-stream:problem:body-too-large" and doc["status"] == 413
    assert "64 KiB" in doc["detail"] and "--api-max-body" in doc["detail"]
    return doc


async def chunks(n: int, size: int, sent: list[int]) -> AsyncIterator[bytes]:
    for _ in range(n):
        sent.append(size)
        yield b"x" * size


async def test_a_declared_length_past_the_limit_is_refused_unread() -> None:
    echo = Echo()
    async with client_for(BodyLimitMiddleware(echo, max_body=LIMIT)) as client:
        sent: list[int] = []
        resp = await client.post(
            "/x",
            content=chunks(2_400, 64 << 10, sent),  # 150 MiB, never held
            headers={"content-length": str(150 << 20)},
        )
        doc = problem(resp)
        assert f"declares {150 << 20} bytes" in doc["detail"]
        assert echo.calls == 0  # the application never saw the request
        ok = await client.post("/x", content=b"y" * LIMIT)
        assert ok.status_code == 200 and ok.json() == {"length": LIMIT}


async def test_a_body_a_little_too_long_is_read_to_its_end_before_the_close() -> None:
    """So a client that writes everything before it reads still finds its 413."""
    echo = Echo()
    async with client_for(BodyLimitMiddleware(echo, max_body=LIMIT)) as client:
        sent: list[int] = []
        resp = await client.post(
            "/x", content=chunks(24, 4096, sent), headers={"content-length": str(24 * 4096)}
        )
        problem(resp)
        assert sum(sent) == 24 * 4096 and echo.calls == 0


async def test_an_undeclared_body_is_cut_off_once_past_the_limit() -> None:
    echo = Echo()
    async with client_for(BodyLimitMiddleware(echo, max_body=LIMIT)) as client:
        sent: list[int] = []
        resp = await client.post("/x", content=chunks(10_000, 4096, sent))
        problem(resp)
        # what was read: the limit, then as much again (dropped) before the close
        assert sum(sent) <= 2 * LIMIT + 2 * 4096
        sent.clear()
        ok = await client.post("/x", content=chunks(16, 4096, sent))
        assert ok.status_code == 200 and ok.json() == {"length": LIMIT}


async def test_websockets_pass_untouched() -> None:
    echo = Echo()
    app = BodyLimitMiddleware(echo, max_body=0)
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "websocket.connect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "headers": [(b"content-length", b"9")]}
    await app(scope, receive, send)  # type: ignore[arg-type]
    assert echo.calls == 1 and sent == [{"type": "websocket.close", "code": 1000}]


def test_declared_length() -> None:
    assert declared_length({"headers": [(b"content-length", b"12")]}) == 12
    assert declared_length({"headers": [(b"content-length", b"x")]}) is None
    assert declared_length({"headers": []}) is None


async def test_the_operator_api_refuses_a_long_body_with_its_problem(tmp_path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    try:
        app = create_app(
            store=store,
            registry=SessionRegistry(),
            operators=OperatorTable.admins({TOKEN: "acme"}),
            max_body=LIMIT,
        )
        async with client_for(app) as client:
            client.headers["Authorization"] = f"Bearer {TOKEN}"
            big = {"documents": ["a: " + "x" * LIMIT]}
            problem(await client.post("/api/v1/deployments", json=big))
            sent: list[int] = []
            problem(await client.post("/api/v1/deployments", content=chunks(100, 4096, sent)))
            assert sum(sent) <= 2 * LIMIT + 2 * 4096
            small = await client.post("/api/v1/deployments", json={"documents": ["a: 1"]})
            assert small.status_code == 422  # read and judged: not a deployment
            nested = b"[" * 20_000 + b"]" * 20_000  # RecursionError in the JSON decoder
            deep = await client.post("/api/v1/deployments", content=nested)
            assert deep.status_code == 400 and "not valid JSON" in deep.json()["detail"]
    finally:
        await store.close()


async def test_recursion_and_memory_errors_are_a_4xx_in_one_log_line(tmp_path, caplog) -> None:
    """The last resort behind the input limits: never a 500 with a traceback flood."""
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    try:
        app = create_app(
            store=store, registry=SessionRegistry(), operators=OperatorTable.admins({})
        )

        def recurse(depth: int) -> int:
            return recurse(depth + 1) + 1

        async def deep(request: Request) -> JSONResponse:
            return JSONResponse(recurse(0))

        async def hungry(request: Request) -> JSONResponse:
            raise MemoryError

        app.router.routes.append(Route("/deep", deep))  # faults no real input reaches now
        app.router.routes.append(Route("/hungry", hungry))
        async with client_for(app) as client:
            for path, what in (("/deep", "RecursionError"), ("/hungry", "MemoryError")):
                caplog.clear()
                resp = await client.get(path)
                assert resp.status_code == 422, resp.text
                doc = resp.json()
                assert doc["type"] == "urn:margo-stream:problem:request-too-complex"
                assert what in doc["detail"]
                [record] = [r for r in caplog.records if r.name == "margo.controller.api"]
                assert record.exc_info is None and what in record.getMessage()
    finally:
        await store.close()
