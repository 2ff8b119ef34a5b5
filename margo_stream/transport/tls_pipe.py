"""TLS as a sans-IO pipe: ciphertext in, plaintext out, over ``ssl.MemoryBIO``.

The TCP carrier (``margo_stream.transport.h2_carrier``) runs TLS itself rather than through
asyncio's SSL transport, for three reasons: a failed handshake is seen (asyncio drops it
silently, so a flood of bad clients would leave no trace and no counter), the peer's identity
is checked at the exact moment the handshake completes, before a byte of application data is
parsed, and the same code serves a socket we dialled and one handed to us already connected
(an HTTP proxy's CONNECT tunnel).

What a TLS failure means is carried like QUIC carries it (aioquic's CRYPTO_ERROR): the code is
``0x100 + <TLS alert>``, so the agent treats a certificate alert the same on both carriers.
"""

from __future__ import annotations

import ssl

READ_CHUNK = 1 << 16
CRYPTO_ERROR = 0x100  # + the TLS alert number, as QUIC's CRYPTO_ERROR range

# OpenSSL's reason names for the alerts that matter to us, received or raised
_ALERTS = {
    "HANDSHAKE_FAILURE": 40,
    "BAD_CERTIFICATE": 42,
    "UNSUPPORTED_CERTIFICATE": 43,
    "CERTIFICATE_REVOKED": 44,
    "CERTIFICATE_EXPIRED": 45,
    "CERTIFICATE_UNKNOWN": 46,
    "UNKNOWN_CA": 48,
    "ACCESS_DENIED": 49,
    "DECODE_ERROR": 50,
    "PROTOCOL_VERSION": 70,
    "INTERNAL_ERROR": 80,
    "CERTIFICATE_REQUIRED": 116,
    "NO_APPLICATION_PROTOCOL": 120,
}


def tls_error_code(exc: ssl.SSLError) -> int:
    """``0x100 + alert`` for a TLS failure: the alert the peer sent or the one we would send."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return CRYPTO_ERROR + 42  # we could not verify the peer's certificate
    reason = str(getattr(exc, "reason", "") or "")
    for name, alert in _ALERTS.items():
        if reason.endswith(name):
            return CRYPTO_ERROR + alert
    return CRYPTO_ERROR + 50  # not TLS at all, or garbled: decode_error


def tls_error_text(exc: ssl.SSLError) -> str:
    """One line for a log or a ``ConnectionLost`` reason."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    reason = getattr(exc, "reason", None)
    return str(reason).lower().replace("_", " ") if reason else str(exc)


class TlsPipe:
    """One TLS connection without a socket: ``feed`` what arrived, ``handshake`` until it
    returns True, then ``read`` plaintext and ``write`` ours; ``output`` is what to send."""

    def __init__(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = context.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        self.established = False
        self.peer_closed = False  # the peer sent close_notify

    def feed(self, data: bytes) -> None:
        self._in.write(data)

    def handshake(self) -> bool:
        """Advance the handshake; True once it completed (``ssl.SSLError`` when it failed)."""
        if not self.established:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                return False
            self.established = True
        return True

    def read(self) -> bytes:
        """The plaintext that the fed records hold (``ssl.SSLError`` on a broken record)."""
        chunks: list[bytes] = []
        while not self.peer_closed:
            try:
                chunk = self.obj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            if not chunk:
                self.peer_closed = True
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def write(self, data: bytes) -> None:
        self.obj.write(data)  # a memory BIO takes everything at once

    def close(self) -> None:
        """Queue our close_notify (the peer's is not waited for)."""
        try:
            self.obj.unwrap()
        except (ssl.SSLError, ValueError):
            pass

    def output(self) -> bytes:
        return self._out.read()

    @property
    def alpn(self) -> str | None:
        return self.obj.selected_alpn_protocol()

    def peer_certificate_der(self) -> bytes | None:
        if not self.established:
            return None
        return self.obj.getpeercert(binary_form=True)
