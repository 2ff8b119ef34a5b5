"""How the channel maps onto HTTP/2: paths, headers, settings, and the checks on what a peer
sends. Pure functions and constants; the carrier (``margo_stream.transport.h2_carrier``) uses
them.

Theory of operation
-------------------
The TCP carrier is HTTP/2 over TLS 1.3 with ALPN ``h2``, so that HTTP proxies (a CONNECT
tunnel) and L7 load balancers carry it like any other HTTP/2 traffic. The agent is the HTTP/2
client, the controller the server. Every channel stream is one HTTP/2 stream; nothing else
multiplexes on it, so HTTP/2 flow control and stream resets act per channel stream exactly as
QUIC's do.

- *Streams the agent opens* (control, status, telemetry) are requests ``POST
  /margo-stream/v1/channel`` with ``content-type: application/vnd.margo-stream.frames`` and
  ``margo-stream-version: 1``. The request body carries the agent's frames, the response body
  the controller's. The controller answers the headers at once (``:status 200``, the same
  version header) and streams its side whenever it has something to say.
- *Streams the controller opens* (desired-state pushes, terminals) ride on requests the agent
  parks in advance: ``POST /margo-stream/v1/channel/reverse``, headers only, left open. The
  controller binds a new channel stream to the oldest parked request by answering it
  (``:status 200``); from then on that HTTP/2 stream is the channel stream: the response body
  carries the controller's frames (its first message opens the stream, as on QUIC), the request
  body the agent's answers. The agent keeps ``REVERSE_POOL`` requests parked and parks another
  each time one is bound. The controller's ``open_stream`` never blocks: a stream opened while
  no request is parked keeps its frames until one arrives; none arriving within
  ``BIND_TIMEOUT`` (or more than ``MAX_WAITING`` streams waiting) closes the connection, since
  an agent that parks nothing cannot take pushes. The controller holds at most ``MAX_PARKED``
  parked requests per connection and refuses more with RST_STREAM(REFUSED_STREAM).
- *Stream ids* are local to each side, as the channel core only needs them unique per
  connection: on the controller, a stream the agent opened has its HTTP/2 id (odd) and a
  stream the controller opened an even id of its own; on the agent, the streams it opened
  get odd ids of its own and the controller's get even ones (HTTP/2 ids may differ from both:
  a stream can wait for an HTTP/2 slot).
- *End of a direction* is END_STREAM; a *reset* is RST_STREAM with our error code (HTTP/2
  codes are 32-bit, ours fit); a *close* is GOAWAY with our code and the reason as its debug
  data, then the socket closes; a *keepalive ping* is an HTTP/2 PING.
- *Version.* ALPN ``margo-stream/1`` names the QUIC mapping; over HTTP/2 the ALPN must be
  ``h2``, so the channel version travels as the ``margo-stream-version`` header on every
  request and response. A request without it (or with another version), to another path or
  with another method is answered with a 4xx naming the problem (``margo-stream-error``), not
  parsed; a response without it (a proxy or a load balancer answering for the controller)
  fails that stream with the status and reason.

Bounds: at most ``MAX_CONCURRENT_STREAMS`` streams at once (128, as QUIC's), a header list of
at most ``MAX_HEADER_LIST_SIZE`` bytes (h2 refuses more with GOAWAY ENHANCE_YOUR_CALM),
``MAX_REFUSED`` refused requests per connection, flow-control windows of ``STREAM_WINDOW`` per
stream and ``CONNECTION_WINDOW`` per connection (reopened as the channel core takes the bytes,
whose own budgets bound what it keeps).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from h2.config import H2Configuration
from h2.settings import SettingCodes

from margo_stream.protocol.codes import PROTOCOL_VERSION

ALPN_H2 = "h2"
CHANNEL_PATH = "/margo-stream/v1/channel"
REVERSE_PATH = "/margo-stream/v1/channel/reverse"
MEDIA_TYPE = "application/vnd.margo-stream.frames"
VERSION_HEADER = "margo-stream-version"
ERROR_HEADER = "margo-stream-error"
VERSION = str(PROTOCOL_VERSION)

MAX_CONCURRENT_STREAMS = 128
MAX_HEADER_LIST_SIZE = 8 << 10
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 4 << 20
REVERSE_POOL = 4  # requests the agent keeps parked for the controller's streams
MAX_PARKED = 8  # parked requests the controller holds per connection
MAX_WAITING = 128  # controller streams waiting for a parked request
BIND_TIMEOUT = 10.0  # seconds a controller stream may wait for a parked request
MAX_REFUSED = 64  # requests refused on one connection before it is closed
MAX_REASON = 256  # bytes of a close reason or an error header
REFUSED_STREAM = 0x7  # HTTP/2's code for "not processed, retry elsewhere"

MAX_INBOUND_FRAME = 16384  # HTTP/2's default SETTINGS_MAX_FRAME_SIZE, which we keep
PREFACE_LENGTH = 24  # the client's connection preface, before its first frame

Headers = Iterable[tuple[bytes | str, bytes | str]]


class FrameGuard:
    """Walks the frame headers of an HTTP/2 byte stream and refuses a frame longer than
    ``max_frame`` the moment its header arrives. h2 checks the length only once the whole
    frame is buffered, so without this a peer announcing 16 MiB frames would make us hold
    16 MiB per connection before being refused."""

    __slots__ = ("max_frame", "_skip", "_header", "_left")

    def __init__(self, max_frame: int = MAX_INBOUND_FRAME, *, preface: bool = False) -> None:
        self.max_frame = max_frame
        self._skip = PREFACE_LENGTH if preface else 0
        self._header = bytearray()
        self._left = 0  # bytes of the current frame's body still to come

    def check(self, data: bytes) -> str | None:
        """``None`` while every frame header seen is within bounds, else why not."""
        i, n = 0, len(data)
        while i < n:
            if self._skip or self._left:
                take = min(self._skip or self._left, n - i)
                if self._skip:
                    self._skip -= take
                else:
                    self._left -= take
                i += take
                continue
            part = data[i : i + 9 - len(self._header)]
            self._header += part
            i += len(part)
            if len(self._header) == 9:
                length = int.from_bytes(self._header[:3], "big")
                self._header.clear()
                if length > self.max_frame:
                    return (
                        f"a frame of {length} bytes announced, over the {self.max_frame}-byte limit"
                    )
                self._left = length
        return None


class RequestKind(enum.Enum):
    CHANNEL = "channel"  # a stream the agent opens
    REVERSE = "reverse"  # a request parked for a stream the controller opens


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request we answer with ``status`` and do not parse."""

    status: int
    reason: str


def h2_configuration(*, client_side: bool) -> H2Configuration:
    # headers stay bytes: we decode (and bound) what we look at ourselves
    return H2Configuration(client_side=client_side, header_encoding=None)


def local_settings() -> dict[SettingCodes | int, int]:
    return {
        SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
        SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
        SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        SettingCodes.ENABLE_PUSH: 0,
    }


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def header_dict(headers: Headers) -> dict[str, str]:
    """The headers as text, the first value of each name (names are lower case in HTTP/2)."""
    out: dict[str, str] = {}
    for name, value in headers:
        out.setdefault(_text(name), _text(value))
    return out


def classify_request(headers: Headers) -> RequestKind | Refusal:
    """What a request on the controller is, or why it is refused."""
    h = header_dict(headers)
    path = h.get(":path", "")
    kind = {CHANNEL_PATH: RequestKind.CHANNEL, REVERSE_PATH: RequestKind.REVERSE}.get(path)
    if kind is None:
        return Refusal(404, f"no channel at {path[:64]!r}: the paths are {CHANNEL_PATH}[/reverse]")
    if h.get(":method") != "POST":
        return Refusal(405, f"{h.get(':method', '')[:16]!r}: the channel takes POST only")
    version = h.get(VERSION_HEADER)
    if version != VERSION:
        got = "none" if version is None else repr(version[:16])
        return Refusal(
            400, f"{VERSION_HEADER} {got}: this controller speaks margo-stream/{VERSION}"
        )
    media = h.get("content-type", "").split(";")[0].strip()
    if media != MEDIA_TYPE:
        return Refusal(415, f"content-type {media[:64]!r}: expected {MEDIA_TYPE}")
    return kind


def check_response(headers: Headers) -> str | None:
    """``None`` for the controller's answer to a channel request, else what is wrong."""
    h = header_dict(headers)
    status = h.get(":status", "")
    if status != "200":
        detail = h.get(ERROR_HEADER, "")[:MAX_REASON]
        return f"the controller answered {status or 'no status'}" + (
            f": {detail}" if detail else ""
        )
    version = h.get(VERSION_HEADER)
    if version != VERSION:
        got = "no version" if version is None else f"version {version[:16]!r}"
        return (
            f"the answer carries {got}, not margo-stream/{VERSION} (a proxy or load "
            "balancer answering for the controller?)"
        )
    return None


def request_headers(kind: RequestKind, authority: str) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", authority),
        (":path", CHANNEL_PATH if kind is RequestKind.CHANNEL else REVERSE_PATH),
        ("content-type", MEDIA_TYPE),
        (VERSION_HEADER, VERSION),
    ]


def response_headers() -> list[tuple[str, str]]:
    return [(":status", "200"), ("content-type", MEDIA_TYPE), (VERSION_HEADER, VERSION)]


def refusal_response(refusal: Refusal) -> tuple[list[tuple[str, str]], bytes]:
    body = (refusal.reason + "\n").encode()
    headers = [
        (":status", str(refusal.status)),
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        (VERSION_HEADER, VERSION),
        (ERROR_HEADER, _header_safe(refusal.reason)),
    ]
    return headers, body


def _header_safe(text: str) -> str:
    """A header value: printable ASCII, bounded."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:MAX_REASON]


def close_reason(reason: str) -> bytes:
    """GOAWAY debug data: the reason, bounded."""
    return reason.encode("utf-8", "replace")[:MAX_REASON]


class Lane:
    """One channel stream on the TCP carrier: its channel id, its HTTP/2 stream id once it
    has one, and the bytes we queued on it."""

    __slots__ = ("cid", "h2id", "out", "pending", "end_queued", "local_done", "remote_done", "at")

    def __init__(self, cid: int, h2id: int | None = None, at: float = 0.0) -> None:
        self.cid = cid
        self.h2id = h2id
        self.out: deque[memoryview] = deque()
        self.pending = 0  # bytes queued, not yet handed to h2
        self.end_queued = False
        self.local_done = False  # END_STREAM handed to h2
        self.remote_done = False
        self.at = at  # when it started waiting for an HTTP/2 stream

    def take(self, size: int) -> bytes:
        head = self.out[0]
        if len(head) <= size:
            self.out.popleft()
            chunk = bytes(head)
        else:
            chunk, self.out[0] = bytes(head[:size]), head[size:]
        self.pending -= len(chunk)
        return chunk


def describe_remote(remote: Any) -> str:
    if isinstance(remote, tuple) and len(remote) >= 2:
        host, port = remote[0], remote[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(remote)
