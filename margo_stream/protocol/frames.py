"""Length-prefixed msgpack frames.

A frame is a 4-byte big-endian payload length followed by that many bytes of msgpack, whose
top level must be a map with a string ``t`` (the message type). ``FrameDecoder`` is fed bytes
as they arrive and yields decoded maps; it never holds more than one frame's worth of bytes
beyond what it was fed, and refuses a frame longer than its limit as soon as the length prefix
is seen, before buffering the body.

A compressed frame sets the top bit of the length (no frame comes near 2 GiB) and carries raw
DEFLATE (RFC 1951) of the msgpack. Only a decoder made to take them does (the agent's: the
controller compresses what it sends to agents that said so in their hello), and it inflates
at most the frame limit: a frame that would inflate past it is refused, so a compressed frame
costs the memory and time of an uncompressed one at the limit, no more. Frames shorter than
``COMPRESS_MIN`` or longer than ``COMPRESS_MAX`` are sent as they are: compression is for the
control messages that would spill into one more packet (a push's manifest and document
compress by about 40 %, which lets a small push leave in one datagram), not for files.

The frames of one stream in one direction that are eligible for compression (``COMPRESS_MIN``
to ``COMPRESS_MAX`` bytes of msgpack, compressed or not) share a window (``SharedWindow``):
a compressed frame may refer back to the last ``WINDOW`` bytes of them, DEFLATE's preset
dictionary. A push names the digests of its files in its manifest and again in each file's
frame, so its frames compress together far better than apart (a first push with the operator's
certificate: 1,260 bytes against 1,476, one datagram instead of two). The sender refers back
only to a peer whose hello says it keeps the window (``PROTO_SHARED_WINDOW``); a decoder that
takes compressed frames always keeps it, which costs a frame compressed without one nothing
(the dictionary only fills the window no back reference of it reaches). Small frames (a status
acknowledgement, a keystroke) never enter a window, so a long-lived stream keeps none.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import msgpack

from margo_stream.errors import LocalProtocolError, RemoteProtocolError
from margo_stream.protocol.codes import DEFAULT_MAX_FRAME, ErrorCode

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
COMPRESSED = 0x8000_0000  # the length's top bit: the payload is raw DEFLATE of the msgpack
COMPRESS_MIN = 512  # payloads shorter are not worth a compressor's setup (about 20 us)
COMPRESS_MAX = 16 * 1024  # nor longer ones, mostly files' chunks: the CPU, not the packets
COMPRESS_LEVEL = 6
_RAW_DEFLATE = -15  # zlib's wbits for raw DEFLATE with a 32 KiB window, no zlib header
WINDOW = 8 * 1024  # bytes of a stream's earlier eligible frames a compressed frame may refer to


class SharedWindow:
    """The last ``WINDOW`` bytes of msgpack of the eligible frames on one stream in one
    direction: both ends add the same payloads in the same order, so they hold the same."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""

    def add(self, payload: bytes) -> None:
        if COMPRESS_MIN <= len(payload) <= COMPRESS_MAX:
            self.data = (self.data + payload)[-WINDOW:]


def _deflate(payload: bytes, window: bytes) -> bytes:
    if not window:
        return zlib.compress(payload, COMPRESS_LEVEL, wbits=_RAW_DEFLATE)
    packer = zlib.compressobj(
        COMPRESS_LEVEL, zlib.DEFLATED, _RAW_DEFLATE, 8, zlib.Z_DEFAULT_STRATEGY, window
    )
    return packer.compress(payload) + packer.flush()


def encode_frame(
    message: dict[str, Any],
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    compress: bool = False,
    window: SharedWindow | None = None,
) -> bytes:
    """The frame of ``message``; with ``compress``, DEFLATEd when that makes it shorter,
    referring back to ``window`` (its stream's, which takes the payload) when given."""
    payload = msgpack.packb(message, use_bin_type=True)
    if len(payload) > max_frame:
        raise LocalProtocolError(
            f"message of type {message.get('t')!r} is {len(payload)} bytes, over the "
            f"{max_frame}-byte frame limit",
            ErrorCode.FRAME_TOO_LARGE,
        )
    if compress and COMPRESS_MIN <= len(payload) <= COMPRESS_MAX:
        packed = _deflate(payload, window.data if window is not None else b"")
        if window is not None:
            window.add(payload)
        if len(packed) < len(payload):
            return _HEADER.pack(len(packed) | COMPRESSED) + packed
    return _HEADER.pack(len(payload)) + payload


def inflate_payload(body: bytes, max_frame: int, window: bytes = b"") -> bytes:
    """The msgpack a compressed frame's body inflates to, at most ``max_frame`` bytes, with
    its stream's shared ``window`` as the preset dictionary."""
    inflater = (
        zlib.decompressobj(_RAW_DEFLATE, window) if window else zlib.decompressobj(_RAW_DEFLATE)
    )
    problem: str | None = None
    try:
        payload = inflater.decompress(body, max_frame)
    except zlib.error as exc:
        problem = str(exc)[:200]
    if problem is not None:
        raise RemoteProtocolError(
            f"compressed frame does not inflate: {problem}", ErrorCode.MALFORMED_FRAME
        )
    if inflater.unconsumed_tail:
        raise RemoteProtocolError(
            f"compressed frame of {len(body)} bytes inflates past the {max_frame}-byte limit",
            ErrorCode.FRAME_TOO_LARGE,
        )
    if not inflater.eof or inflater.unused_data:
        raise RemoteProtocolError(
            "compressed frame is cut short or has bytes after its end",
            ErrorCode.MALFORMED_FRAME,
        )
    return payload


def decode_payload(payload: bytes) -> dict[str, Any]:
    problem: str | None = None
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        problem = (str(exc) or type(exc).__name__)[:200]
    if problem is not None:
        # raised outside the handler: the msgpack error (and its traceback) stays no one's
        # __context__
        raise RemoteProtocolError(
            f"frame is not valid msgpack: {problem}", ErrorCode.MALFORMED_FRAME
        )
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise RemoteProtocolError(
            "frame is not a msgpack map with a string 't' (message type)",
            ErrorCode.MALFORMED_FRAME,
        )
    return message


class FrameDecoder:
    """Incremental decoder. Errors are sticky: after one, every call raises it again (a fresh
    exception each time: the decoder keeps the code and text, never an exception object, whose
    traceback would pin the frames and the bytes of the call that raised it)."""

    __slots__ = ("_buf", "_max_frame", "_error", "_inflate", "_window")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, *, inflate: bool = False) -> None:
        self._buf = bytearray()
        self._max_frame = max_frame
        self._error: tuple[ErrorCode, str] | None = None
        self._inflate = inflate  # compressed frames are taken
        # ... and may refer back to the stream's earlier frames
        self._window = SharedWindow() if inflate else None

    @property
    def buffered(self) -> int:
        """Bytes held: the start of one unfinished frame (at most its header and body)."""
        return len(self._buf)

    @property
    def failed(self) -> bool:
        return self._error is not None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add ``data``; return every complete message it finishes, in order."""
        if self._error is not None:
            raise RemoteProtocolError(self._error[1], self._error[0])
        buf = self._buf
        buf += data
        out: list[dict[str, Any]] = []
        offset = 0
        available = len(buf)
        try:
            while available - offset >= HEADER_SIZE:
                (length,) = _HEADER.unpack_from(buf, offset)
                compressed = length & COMPRESSED
                if compressed:
                    if not self._inflate:
                        raise RemoteProtocolError(
                            "a compressed frame, which this side did not offer to take",
                            ErrorCode.MALFORMED_FRAME,
                        )
                    length ^= COMPRESSED
                if length > self._max_frame:
                    raise RemoteProtocolError(
                        f"frame of {length} bytes is over the {self._max_frame}-byte limit",
                        ErrorCode.FRAME_TOO_LARGE,
                    )
                end = offset + HEADER_SIZE + length
                if available < end:
                    break
                body = bytes(buf[offset + HEADER_SIZE : end])
                window = self._window
                if compressed:
                    assert window is not None
                    body = inflate_payload(body, self._max_frame, window.data)
                if window is not None:
                    window.add(body)
                out.append(decode_payload(body))
                offset = end
        except RemoteProtocolError as exc:
            self._error = (exc.code, str(exc))
            self._buf = bytearray()
            raise
        if offset == available:
            self._buf = bytearray()  # give the memory of a finished big frame back at once
        elif offset:
            del buf[:offset]
        return out

    def finish(self) -> None:
        """The stream ended: leftover bytes mean a truncated frame."""
        if self._error is None and self._buf:
            self._error = (
                ErrorCode.TRUNCATED_STREAM,
                f"stream ended inside a frame ({len(self._buf)} bytes left over)",
            )
            self._buf = bytearray()
        if self._error is not None:
            raise RemoteProtocolError(self._error[1], self._error[0])
