"""The TCP carrier's proxy support: which proxy applies (``--proxy``, ``HTTPS_PROXY``, curl's
``NO_PROXY`` rules) and the HTTP CONNECT tunnel, against a real tinyproxy (basic credentials,
CONNECT port rules) and against real loopback servers that answer garbage, too much, or
nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from margo_stream.errors import ConfigError
from margo_stream.transport.proxy import (
    ProxyConfig,
    ProxyError,
    no_proxy_matches,
    open_tunnel,
    parse_proxy_url,
    proxy_for,
)
from tests.tinyproxy import Tinyproxy

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- configuration ------------------------------------------------------------------------------
def test_proxy_urls() -> None:
    assert parse_proxy_url("http://127.0.0.1:3128") == ProxyConfig("127.0.0.1", 3128)
    assert parse_proxy_url("proxy.example:8080") == ProxyConfig("proxy.example", 8080)
    assert parse_proxy_url("http://proxy") == ProxyConfig("proxy", 1080)  # curl's default
    creds = parse_proxy_url("http://us%40er:p%3Ass@[::1]:3128/")
    assert creds == ProxyConfig("::1", 3128, "us@er", "p:ss")
    assert str(creds) == "http://[::1]:3128"  # no credentials in logs or errors
    assert creds.authorization == "Basic dXNAZXI6cDpzcw=="
    for bad, says in [
        ("https://proxy:443", "only http://"),
        ("socks5://proxy:1080", "only http://"),
        ("http://:3128", "names no host"),
        ("http://proxy:99999", "out of range"),
        ("http://proxy:3128/path", "no path"),
    ]:
        with pytest.raises(ConfigError, match=says):
            parse_proxy_url(bad)


def test_explicit_proxy_wins_over_the_environment() -> None:
    env = {"HTTPS_PROXY": "http://env:1", "NO_PROXY": "*"}
    assert proxy_for("ctl", 443, explicit="http://flag:2", environ=env) == ProxyConfig("flag", 2)
    assert proxy_for("ctl", 443, explicit=None, environ=env) is None  # NO_PROXY=* for the env
    assert proxy_for("ctl", 443, explicit=None, environ={}) is None
    assert proxy_for("ctl", 443, explicit=None, environ={"HTTPS_PROXY": ""}) is None


def test_environment_proxy_lower_case_first() -> None:
    env = {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"}
    assert proxy_for("ctl", 443, explicit=None, environ=env) == ProxyConfig("lower", 1)
    env = {"HTTPS_PROXY": "http://upper:2", "no_proxy": "ctl", "NO_PROXY": "other"}
    assert proxy_for("ctl", 443, explicit=None, environ=env) is None
    assert proxy_for("other", 443, explicit=None, environ=env) == ProxyConfig("upper", 2)
    with pytest.raises(ConfigError, match="HTTPS_PROXY"):
        proxy_for("ctl", 443, explicit=None, environ={"HTTPS_PROXY": "socks5://x:1"})


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "direct"),
    [
        ("ctl.example.com", 443, "*", True),
        ("ctl.example.com", 443, "example.com", True),
        ("ctl.example.com", 443, ".example.com", True),
        ("example.com", 443, ".example.com", True),
        ("badexample.com", 443, "example.com", False),
        ("example.com.", 443, "EXAMPLE.com", True),
        ("ctl.example.com", 443, "other.org, example.com", True),
        ("ctl.example.com", 443, "other.org example.com", True),
        ("ctl.example.com", 443, "ctl.example.com:8443", False),
        ("ctl.example.com", 8443, "ctl.example.com:8443", True),
        ("10.1.2.3", 443, "10.0.0.0/8", True),
        ("11.1.2.3", 443, "10.0.0.0/8", False),
        ("10.1.2.3", 443, "10.1.2.3", True),
        ("10.1.2.3", 443, "10.1.2.4", False),
        ("10.1.2.3", 443, "1.2.3", False),  # no suffix matching for addresses
        ("::1", 443, "[::1]", True),
        ("::1", 443, "::1", True),
        ("[::1]", 8443, "[::1]:8443", True),
        ("fd00::5", 443, "fd00::/8", True),
        ("fd00::5", 443, "10.0.0.0/8", False),
        ("ctl.example.com", 443, "10.0.0.0/8", False),  # CIDR against names: no
        ("ctl.example.com", 443, "", False),
        ("ctl.example.com", 443, " , ,", False),
    ],
)
def test_no_proxy_follows_curl(host: str, port: int, no_proxy: str, direct: bool) -> None:
    assert no_proxy_matches(host, port, no_proxy) is direct


# --- tunnels through a real tinyproxy -------------------------------------------------------------
@asynccontextmanager
async def tcp_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A real loopback TCP server running ``handle`` per connection; yields its port."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(4096):
        writer.write(data)
        await writer.drain()
    writer.close()


async def roundtrip(sock_proxy: ProxyConfig, port: int) -> bytes:
    sock = await open_tunnel(sock_proxy, "127.0.0.1", port, timeout=5)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, b"through the tunnel")
        return await asyncio.wait_for(loop.sock_recv(sock, 100), 5)
    finally:
        sock.close()


async def test_a_tunnel_through_tinyproxy_carries_bytes_both_ways(tmp_path: Path) -> None:
    with Tinyproxy(tmp_path / "proxy") as proxy:
        async with tcp_server(echo) as port:
            assert await roundtrip(parse_proxy_url(proxy.url), port) == b"through the tunnel"
        assert f"127.0.0.1:{port}" in proxy.log()  # it really went through the proxy


async def test_basic_credentials_and_refusals_name_the_proxy_and_status(tmp_path: Path) -> None:
    with Tinyproxy(tmp_path / "proxy", auth=("plant", "s3cret")) as proxy:
        async with tcp_server(echo) as port:
            with_creds = parse_proxy_url(f"http://plant:s3cret@127.0.0.1:{proxy.port}")
            assert await roundtrip(with_creds, port) == b"through the tunnel"

            without = parse_proxy_url(proxy.url)
            with pytest.raises(ProxyError) as exc:
                await roundtrip(without, port)
            assert exc.value.status == 407
            text = str(exc.value)
            assert text.startswith(f"proxy {proxy.url}: refused CONNECT 127.0.0.1:{port}: ")
            assert "407" in text and "it wants credentials" in text

            wrong = parse_proxy_url(f"http://plant:nope@127.0.0.1:{proxy.port}")
            with pytest.raises(ProxyError, match="credentials are wrong") as exc:
                await roundtrip(wrong, port)
            assert exc.value.status in (401, 407)  # tinyproxy says 401 to wrong credentials
            assert "nope" not in str(exc.value)


async def test_a_forbidden_connect_port_is_a_403(tmp_path: Path) -> None:
    with Tinyproxy(tmp_path / "proxy", connect_ports=(443,)) as proxy:
        async with tcp_server(echo) as port:
            with pytest.raises(ProxyError, match="refused CONNECT") as exc:
                await roundtrip(parse_proxy_url(proxy.url), port)
            assert exc.value.status == 403


async def test_an_unreachable_target_is_the_proxys_error(tmp_path: Path) -> None:
    async with tcp_server(echo) as port:
        pass  # closed again: nothing listens there now
    with Tinyproxy(tmp_path / "proxy") as proxy:
        with pytest.raises(ProxyError, match="refused CONNECT") as exc:
            await roundtrip(parse_proxy_url(proxy.url), port)
        assert exc.value.status is not None and exc.value.status >= 500


# --- hostile or broken proxies --------------------------------------------------------------------
def answering(data: bytes, *, then_close: bool = True) -> Callable[..., Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(data)
        await writer.drain()
        if then_close:
            writer.close()
        else:
            await reader.read()

    return handle


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not HTTP"),
        (b"\x16\x03\x01\x00\x05hello", "not HTTP"),
        (b"", "closed the connection before answering"),
        (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n", "HTTP/1.1 502 Bad Gateway"),
        (b"HTTP/1.1 200 OK\r\n\r\nearly bytes", "sent 11 bytes ahead of the tunnel"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 20, "interim"),
    ],
)
async def test_garbage_from_a_proxy_is_a_clear_error(answer: bytes, says: str) -> None:
    async with tcp_server(answering(answer)) as port:
        proxy = ProxyConfig("127.0.0.1", port)
        with pytest.raises(ProxyError, match=says) as exc:
            await open_tunnel(proxy, "ctl.example", 443, timeout=5)
        assert str(exc.value).startswith(f"proxy http://127.0.0.1:{port}: ")


async def test_an_endless_answer_costs_a_bounded_read() -> None:
    """Header lines without end: refused once the head passes the bound (h11's
    ``max_incomplete_event_size``), long before the deadline, while the proxy would go on."""

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        line = b"X-Padding: " + b"a" * 1000 + b"\r\n"
        try:
            while not writer.is_closing():
                writer.write(line)
                await writer.drain()
        except ConnectionError:
            pass  # the client gave up: what we want
        writer.close()

    async with tcp_server(flood) as port:
        started = time.monotonic()
        with pytest.raises(ProxyError, match="not HTTP"):
            await open_tunnel(ProxyConfig("127.0.0.1", port), "ctl.example", 443, timeout=10)
        assert time.monotonic() - started < 5


async def test_a_silent_proxy_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with tcp_server(silent) as port:
        started = time.monotonic()
        with pytest.raises(ProxyError, match="no progress answering CONNECT ctl.example:443"):
            await open_tunnel(ProxyConfig("127.0.0.1", port), "ctl.example", 443, timeout=0.5)
        assert time.monotonic() - started < 3


async def test_no_proxy_listening_is_a_clear_error() -> None:
    async with tcp_server(echo) as port:
        pass
    with pytest.raises(ProxyError, match="cannot connect"):
        await open_tunnel(ProxyConfig("127.0.0.1", port), "ctl.example", 443, timeout=5)
