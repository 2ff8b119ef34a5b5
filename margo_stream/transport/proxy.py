"""HTTP proxies for the TCP carrier: which proxy applies (``--proxy``, ``HTTPS_PROXY``,
``NO_PROXY``) and an HTTP ``CONNECT`` tunnel through it.

Theory of operation
-------------------
:func:`proxy_for` decides, for one controller ``host:port``, whether the TCP carrier goes
through a proxy. An explicit ``--proxy`` wins and applies to every controller. Otherwise the
environment is read as curl reads it: ``https_proxy`` then ``HTTPS_PROXY`` (the carrier is TLS),
and ``no_proxy`` then ``NO_PROXY`` lists the hosts reached directly: entries separated by commas
(or spaces), ``*`` for every host, a domain that also covers its subdomains (with or without a
leading dot), an IP address, a CIDR block (``10.0.0.0/8``, ``fd00::/8``) matched against IP
literals, ``[v6]`` in brackets, and ``host:port`` to exempt one port only.

:func:`open_tunnel` connects to the proxy, sends ``CONNECT host:port`` (with
``Proxy-Authorization: Basic`` when the proxy URL carries credentials) and reads the answer with
h11, which bounds the head it will buffer; a 2xx hands back the connected socket, ready for the
TLS handshake. Everything else is a :class:`ProxyError` naming the proxy and what it answered
(its status line, or what was wrong with the bytes), all within one deadline.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import anyio
import h11

from margo_stream.errors import ConfigError, MargoError

MAX_RESPONSE_HEAD = 16 << 10  # bytes of status line and headers we buffer from a proxy
MAX_INTERIM = 8  # 1xx answers tolerated before the real one
DEFAULT_PORT = 1080  # curl's default proxy port


class ProxyError(MargoError):
    """The proxy could not be reached or did not open the tunnel; ``status`` is its HTTP status
    when it answered one."""

    def __init__(self, proxy: ProxyConfig, message: str, *, status: int | None = None) -> None:
        super().__init__(f"proxy {proxy}: {message}")
        self.proxy = proxy
        self.status = status


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:  # never the credentials
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def authorization(self) -> str | None:
        """The ``Proxy-Authorization`` value, when the URL carried credentials."""
        if self.username is None:
            return None
        raw = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def parse_proxy_url(text: str, *, what: str = "--proxy") -> ProxyConfig:
    """``http://[user:pass@]HOST[:PORT]`` (or ``HOST:PORT``, taken as http) -> the proxy;
    ``ConfigError`` naming what is wrong."""
    raw = text.strip()
    if "://" not in raw:
        raw = "http://" + raw
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{what} {text!r}: {exc}") from None
    if parts.scheme.lower() != "http":
        raise ConfigError(
            f"{what} {text!r}: only http:// proxies are supported (HTTP CONNECT), "
            f"not {parts.scheme}://"
        )
    if not parts.hostname:
        raise ConfigError(f"{what} {text!r} names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{what} {text!r}: a proxy URL has no path, query or fragment")
    if port == 0:
        raise ConfigError(f"{what} {text!r}: port 0 is out of range (1-65535)")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return ProxyConfig(parts.hostname, port or DEFAULT_PORT, username, password)


def _env(environ: Mapping[str, str], name: str) -> str:
    """curl's order: the lower-case variable first, then the upper-case one."""
    return (environ.get(name.lower()) or environ.get(name.upper()) or "").strip()


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _split_entry(entry: str) -> tuple[str, int | None]:
    """A ``NO_PROXY`` entry -> (host pattern, port or None)."""
    if entry.startswith("["):  # [v6] or [v6]:port
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port.isdigit() else None
    if entry.count(":") == 1:  # host:port (a bare v6 address has more colons)
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


def no_proxy_matches(host: str, port: int, no_proxy: str) -> bool:
    """True when ``NO_PROXY``'s value ``no_proxy`` says ``host:port`` is reached directly."""
    name = host.strip("[]").lower().rstrip(".")
    address = _ip(name)
    for raw in no_proxy.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        pattern, only_port = _split_entry(entry)
        if only_port is not None and only_port != port:
            continue
        pattern = pattern.rstrip(".")
        if "/" in pattern:
            if address is None:
                continue
            try:
                network = ipaddress.ip_network(pattern, strict=False)
            except ValueError:
                continue
            if address.version == network.version and address in network:
                return True
            continue
        literal = _ip(pattern)
        if literal is not None or address is not None:
            if literal is not None and address is not None and literal == address:
                return True
            continue
        pattern = pattern.lstrip(".")
        if pattern and (name == pattern or name.endswith("." + pattern)):
            return True
    return False


def proxy_for(
    host: str, port: int, *, explicit: str | None, environ: Mapping[str, str]
) -> ProxyConfig | None:
    """The proxy the TCP carrier uses for ``host:port``: ``explicit`` (``--proxy``) when given;
    else ``https_proxy``/``HTTPS_PROXY`` unless ``no_proxy``/``NO_PROXY`` exempts the host."""
    if explicit:
        return parse_proxy_url(explicit)
    url = _env(environ, "https_proxy")
    if not url:
        return None
    if no_proxy_matches(host, port, _env(environ, "no_proxy")):
        return None
    return parse_proxy_url(url, what="HTTPS_PROXY")


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _connect(proxy: ProxyConfig) -> socket.socket:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ProxyError(proxy, f"cannot resolve {proxy.host!r}: {exc.strerror or exc}") from None
    last: OSError | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    why = (last.strerror or str(last)) if last is not None else "no address"
    raise ProxyError(proxy, f"cannot connect: {why}")


def _describe(response: h11.Response) -> str:
    version = response.http_version.decode("ascii", "replace")
    reason = response.reason.decode("latin-1", "replace")[:200]
    return f"HTTP/{version} {response.status_code} {reason}".rstrip()


async def _handshake(sock: socket.socket, proxy: ProxyConfig, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    authority = _authority(host, port)
    headers = [("Host", authority), ("User-Agent", "margo-agent")]
    if proxy.authorization is not None:
        headers.append(("Proxy-Authorization", proxy.authorization))
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
    out = conn.send(h11.Request(method="CONNECT", target=authority, headers=headers))
    out += conn.send(h11.EndOfMessage())
    await loop.sock_sendall(sock, out)
    interim = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProxyError(proxy, f"answered something that is not HTTP ({exc})") from None
        if event is h11.NEED_DATA:
            data = await loop.sock_recv(sock, 4096)
            if not data:
                raise ProxyError(
                    proxy, f"closed the connection before answering CONNECT {authority}"
                )
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse):
            interim += 1
            if interim > MAX_INTERIM:
                raise ProxyError(proxy, f"sent more than {MAX_INTERIM} interim (1xx) answers")
            continue
        if isinstance(event, h11.Response):
            line = _describe(event)
            if not 200 <= event.status_code < 300:
                hint = ""
                if event.status_code in (401, 407):  # some proxies say 401
                    hint = (
                        " (credentials are wrong)"
                        if proxy.username is not None
                        else " (it wants credentials: --proxy http://USER:PASS@HOST:PORT)"
                    )
                raise ProxyError(
                    proxy, f"refused CONNECT {authority}: {line}{hint}", status=event.status_code
                )
            trailing, _closed = conn.trailing_data
            if trailing:
                raise ProxyError(proxy, f"sent {len(trailing)} bytes ahead of the tunnel ({line})")
            return
        raise ProxyError(proxy, f"answered CONNECT {authority} with {type(event).__name__}")


async def open_tunnel(proxy: ProxyConfig, host: str, port: int, *, timeout: float) -> socket.socket:
    """A TCP socket to ``host:port`` through ``proxy``'s CONNECT tunnel (non-blocking, ready for
    TLS); ``ProxyError`` when the proxy cannot be reached, refuses, answers garbage or takes
    longer than ``timeout`` seconds for all of it."""
    sock: socket.socket | None = None
    try:
        with anyio.fail_after(timeout):
            sock = await _connect(proxy)
            await _handshake(sock, proxy, host, port)
    except TimeoutError:
        if sock is not None:
            sock.close()
        step = "connecting" if sock is None else f"answering CONNECT {_authority(host, port)}"
        raise ProxyError(proxy, f"no progress {step} within {timeout:g} s") from None
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise ProxyError(proxy, f"connection failed: {exc.strerror or exc}") from None
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    return sock


__all__ = [
    "ProxyConfig",
    "ProxyError",
    "no_proxy_matches",
    "open_tunnel",
    "parse_proxy_url",
    "proxy_for",
]
