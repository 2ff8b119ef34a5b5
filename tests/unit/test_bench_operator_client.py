"""The bench's lean operator client against a real socket: answers decoded, errors named, the
connection kept across requests and reopened when the server closed it."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench.operator_client import OperatorClient, OperatorHttpError


async def serve(answers: list[tuple[int, bytes]], close_after: int = 0) -> tuple[int, list[int]]:
    """A server answering each request in turn; returns (port, connections per request)."""
    seen: list[int] = []
    conns = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        served = 0
        while answers:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(
                next(
                    line.split(b":")[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
            )
            body = json.loads(await reader.readexactly(length))
            assert body == {"n": len(seen)}
            assert b"authorization: bearer tok" in head.lower()
            seen.append(conns)
            status, payload = answers.pop(0)
            writer.write(
                b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nContent-Type: application/json\r\n\r\n"
                % (status, len(payload))
                + payload
            )
            await writer.drain()
            served += 1
            if close_after and served == close_after:
                break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server.sockets[0].getsockname()[1], seen


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_answers_errors_and_one_kept_connection(anyio_backend: str) -> None:
    port, seen = await serve(
        [(200, b'{"a": 1}'), (200, b"[]"), (422, b'{"detail": "refused"}'), (200, b"{}")]
    )
    client = OperatorClient(f"http://127.0.0.1:{port}", "tok")
    assert await client.post_json("/x", {"n": 0}) == {"a": 1}
    assert await client.post_json("/x", {"n": 1}) == []
    with pytest.raises(OperatorHttpError, match="HTTP 422.*refused"):
        await client.post_json("/x", {"n": 2})
    assert await client.post_json("/x", {"n": 3}) == {}
    await client.close()
    assert seen == [1, 1, 1, 1]  # one connection for all of them


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_connection_the_server_closed_is_replaced(anyio_backend: str) -> None:
    port, seen = await serve([(200, b"{}"), (200, b"{}")], close_after=1)
    client = OperatorClient(f"http://127.0.0.1:{port}", "tok")
    assert await client.post_json("/x", {"n": 0}) == {}
    await asyncio.sleep(0.05)  # the server hung up after its answer (an idle timeout)
    assert await client.post_json("/x", {"n": 1}) == {}  # seen, and a new connection taken
    await client.close()
    assert seen == [1, 2]


def test_only_plain_http() -> None:
    with pytest.raises(ValueError, match="plain HTTP"):
        OperatorClient("https://127.0.0.1:1", "tok")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_requests_at_once_each_get_a_connection(anyio_backend: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            await asyncio.sleep(0.05)  # slow: the requests overlap
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    client = OperatorClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", "tok")
    got = await asyncio.gather(*(client.post_json("/x", {"n": i}) for i in range(5)))
    assert got == [{"n": i} for i in range(5)]
    assert len(client._idle) == 5  # kept for the next requests
    assert await client.post_json("/x", {"n": 9}) == {"n": 9}
    assert len(client._idle) == 5
    await client.close()
    server.close()
