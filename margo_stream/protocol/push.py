"""A desired-state push on its stream, both ends, sans-IO.

Theory of operation
-------------------
The controller opens a desired-state stream with one ``desired`` message (version, manifest
bytes, signature and the digests of the blobs it will send, which are the ones the device does
not hold), then sends each of those blobs as ``blob`` chunks in that order (``more`` is true on
every chunk but a blob's last), then ends the stream. ``plan_push`` and ``blob_chunks`` build
that sequence; the caller fetches the blob bytes and sends.

The device feeds every message after the opener to a ``PushAssembler``. It accepts only the
announced blobs, each once, in one run of chunks, and bounds the bytes it will buffer. When the
stream ends cleanly ``finish`` hands back the whole push; a push whose stream was torn is simply
dropped with the assembler. Nothing here checks signatures or digests: that is the trust
layer's job once the push is whole (``margo_stream.state.trust``).

Faults of the peer raise ``RemoteProtocolError`` (the stream is reset with that code); a push
that is well formed but more than the device will hold is not a protocol fault: ``receive``
returns ``PushRefused`` and the device answers with a result saying so.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from margo_stream.errors import RemoteProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode

BLOB_CHUNK = 256 * 1024
DEFAULT_MAX_PUSH_BYTES = 256 << 20


# --- controller side -----------------------------------------------------------------------


def plan_push(
    version: int,
    manifest: bytes,
    signature: bytes,
    digests: Iterable[str],
    held: Iterable[str],
    root: Iterable[bytes] = (),
) -> m.Desired:
    """The opener of a push of ``version``: only the blobs the device does not hold, sorted,
    and the tenant's root metadata versions it does not hold yet (``root``)."""
    have = set(held)
    needed = sorted(d for d in set(digests) if d not in have)
    return m.Desired(
        version=version, manifest=manifest, signature=signature, blobs=needed, root=list(root)
    )


def blob_chunks(digest: str, data: bytes, chunk: int = BLOB_CHUNK) -> Iterator[m.Blob]:
    """One blob as ``blob`` messages of at most ``chunk`` bytes (an empty blob is one chunk)."""
    for offset in range(0, max(len(data), 1), chunk):
        yield m.Blob(
            digest=digest, data=data[offset : offset + chunk], more=offset + chunk < len(data)
        )


# --- device side ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PushRefused:
    """The push is well formed but will not be taken; answer with this code and reason."""

    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class AssembledPush:
    """A whole push: its opener and the bytes of every blob it carried."""

    desired: m.Desired
    blobs: dict[str, bytes]


class PushAssembler:
    def __init__(self, desired: m.Desired, *, max_bytes: int = DEFAULT_MAX_PUSH_BYTES) -> None:
        if len(set(desired.blobs)) != len(desired.blobs):
            raise RemoteProtocolError(
                f"push of version {desired.version} announces a blob twice",
                ErrorCode.INVALID_MESSAGE,
            )
        self.desired = desired
        self.max_bytes = max_bytes
        self.total = len(desired.manifest) + len(desired.signature)
        self._pending = list(desired.blobs)  # announced and not yet started, in order
        self._current: str | None = None  # the blob whose chunks are arriving
        self._parts: dict[str, bytearray] = {}
        self._done: set[str] = set()

    def receive(self, message: object) -> PushRefused | None:
        if not isinstance(message, m.Blob):
            raise RemoteProtocolError(
                f"a {type(message).__name__} message inside a push", ErrorCode.UNEXPECTED_MESSAGE
            )
        digest = message.digest
        if digest != self._current:
            if digest in self._done or digest in self._parts:
                raise RemoteProtocolError(
                    f"blob {digest} arrived again or interleaved", ErrorCode.UNEXPECTED_MESSAGE
                )
            if self._current is not None:
                raise RemoteProtocolError(
                    f"blob {digest} started before blob {self._current} was finished",
                    ErrorCode.UNEXPECTED_MESSAGE,
                )
            if digest not in self._pending:
                raise RemoteProtocolError(
                    f"blob {digest} was not announced in the push", ErrorCode.UNEXPECTED_MESSAGE
                )
            self._pending.remove(digest)
            self._current = digest
            self._parts[digest] = bytearray()
        self.total += len(message.data)
        if self.total > self.max_bytes:
            return PushRefused("too-large", f"push exceeds {self.max_bytes} bytes")
        self._parts[digest].extend(message.data)
        if not message.more:
            self._done.add(digest)
            self._current = None
        return None

    def finish(self) -> AssembledPush:
        """The stream ended cleanly: the push as received. A blob cut short (its last chunk
        said more was coming) is a protocol fault; a blob announced but never sent is left to
        the trust layer, which refuses the manifest as missing a blob."""
        if self._current is not None:
            raise RemoteProtocolError(
                f"the push ended inside blob {self._current}", ErrorCode.TRUNCATED_STREAM
            )
        return AssembledPush(self.desired, {d: bytes(b) for d, b in self._parts.items()})
