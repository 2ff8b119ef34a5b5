"""The one module that touches aioquic's private attributes (GUIDE section 2).

aioquic 1.7 has no public server-side client authentication: ``tls.Context`` only sends a
CertificateRequest when its private ``_request_client_certificate`` flag is set ("for test
purposes only"), and even then it never verifies the client's chain and accepts an empty
Certificate. So the controller:

1. sets that flag on every server connection (``MutualTlsServerConnection``), so the client
   must present a certificate and prove its key (aioquic checks CertificateVerify);
2. reads the presented chain here (``peer_certificates``) once the handshake completes, and
   verifies it itself against the tenant's bundle before it accepts any stream;
3. issues no session tickets and accepts no PSK (the server is built without ticket
   callbacks), so a resumed session can never skip the client certificate.

``check_aioquic()`` fails loudly, at controller start and in the test suite, if aioquic's
internals change under us.
"""

from __future__ import annotations

from aioquic import __version__ as aioquic_version
from aioquic import tls
from aioquic.quic.connection import QuicConnection
from cryptography import x509

from margo_stream.errors import MargoError

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
    for attribute in ("_request_client_certificate", "_peer_certificate", "_peer_certificate_chain"):
        if not hasattr(context, attribute):
            raise UnsupportedAioquic(
                f"aioquic {aioquic_version}: tls.Context has no {attribute!r}; "
                "the client-certificate hook cannot work"
            )
    if not callable(getattr(QuicConnection, "_initialize", None)):
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version}: QuicConnection._initialize is gone; "
            "the client-certificate hook cannot work"
        )


class MutualTlsServerConnection(QuicConnection):
    """A server connection whose TLS context requests a client certificate."""

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        self.tls._request_client_certificate = True


def peer_certificates(connection: QuicConnection) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
    """The leaf and chain the peer presented (``None`` when it sent an empty Certificate)."""
    context = getattr(connection, "tls", None)
    if context is None:
        return None, []
    return context._peer_certificate, list(context._peer_certificate_chain)
