"""The one module that touches aioquic's private attributes (aioquic is pinned in pyproject.toml).

aioquic 1.7 has no public server-side client authentication: ``tls.Context`` only sends a
CertificateRequest when its private ``_request_client_certificate`` flag is set ("for test
purposes only"), and even then it never verifies the client's chain and accepts an empty
Certificate. So the controller:

1. sets that flag on every server connection (``MutualTlsServerConnection``), so the client
   must present a certificate and prove its key (aioquic checks CertificateVerify);
2. reads the presented chain here (``peer_certificates``) once the handshake completes, and
   verifies it itself against the tenant's bundle before it accepts any stream;
3. issues no session tickets and accepts no PSK (the server is built without ticket
   callbacks), so a resumed session can never skip the client certificate;
4. derives the stateless reset token of every connection ID it issues from the ID and a
   kept key, and lets the agent read the tokens it was given, so a restarted controller can
   reset connections it no longer knows and the agent recognises the reset
   (``stateless_reset.py``; aioquic draws the tokens at random and ignores resets).

``check_aioquic()`` fails loudly, at controller start and in the test suite, if aioquic's
internals change under us.
"""

from __future__ import annotations

from typing import Any

from aioquic import __version__ as aioquic_version
from aioquic import tls
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509

from margo_stream.errors import MargoError
from margo_stream.transport.stateless_reset import ResetTokens

TESTED_AIOQUIC = ("1.7.",)


class UnsupportedAioquic(MargoError):
    """The installed aioquic lacks the internals client authentication depends on."""


def check_aioquic() -> None:
    if not aioquic_version.startswith(TESTED_AIOQUIC):
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version} is not a version margo-stream's client-certificate "
            f"hook was tested with ({', '.join(v + 'x' for v in TESTED_AIOQUIC)}); "
            "install the version pinned in pyproject.toml"
        )
    context = tls.Context(is_client=False)
    for attribute in (
        "_request_client_certificate",
        "_peer_certificate",
        "_peer_certificate_chain",
    ):
        if not hasattr(context, attribute):
            raise UnsupportedAioquic(
                f"aioquic {aioquic_version}: tls.Context has no {attribute!r}; "
                "the client-certificate hook cannot work"
            )
    client = QuicConnection(configuration=QuicConfiguration(is_client=True))
    for attribute in ("_host_cids", "_peer_cid", "_peer_cid_available"):
        if not hasattr(client, attribute):
            raise UnsupportedAioquic(
                f"aioquic {aioquic_version}: QuicConnection has no {attribute!r}; "
                "stateless resets cannot work"
            )
    if not hasattr(client._host_cids[0], "stateless_reset_token") or not callable(
        getattr(QuicConnection, "_replenish_connection_ids", None)
    ):
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version}: connection IDs are issued differently; "
            "stateless resets cannot work"
        )
    if not callable(getattr(QuicConnection, "_initialize", None)):
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version}: QuicConnection._initialize is gone; "
            "the client-certificate hook cannot work"
        )


class MutualTlsServerConnection(QuicConnection):
    """A server connection whose TLS context requests a client certificate and whose
    connection IDs carry reset tokens derived from them (``stateless_reset.py``)."""

    def __init__(self, *args: Any, reset_tokens: ResetTokens | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._margo_reset_tokens = reset_tokens
        self._derive_reset_tokens()  # before the transport parameters carry the first one

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        self.tls._request_client_certificate = True

    def _replenish_connection_ids(self) -> None:
        super()._replenish_connection_ids()
        self._derive_reset_tokens()  # before NEW_CONNECTION_ID frames carry them

    def _derive_reset_tokens(self) -> None:
        if self._margo_reset_tokens is not None:
            for cid in self._host_cids:
                cid.stateless_reset_token = self._margo_reset_tokens.token(cid.cid)


def host_reset_tokens(connection: QuicConnection) -> dict[bytes, bytes]:
    """Our connection IDs and the reset tokens they were issued with."""
    return {c.cid: c.stateless_reset_token for c in connection._host_cids}


def peer_reset_tokens(connection: QuicConnection) -> list[bytes]:
    """The reset tokens the peer gave us, for every connection ID of its we may use."""
    cids = [connection._peer_cid, *connection._peer_cid_available]
    return [c.stateless_reset_token for c in cids if c.stateless_reset_token]


def peer_certificates(
    connection: QuicConnection,
) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
    """The leaf and chain the peer presented (``None`` when it sent an empty Certificate)."""
    context = getattr(connection, "tls", None)
    if context is None:
        return None, []
    return context._peer_certificate, list(context._peer_certificate_chain)
