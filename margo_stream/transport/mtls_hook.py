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
4. presents, per connection, the certificate of the tenant the client's ClientHello names as
   its server name (SNI), falling back to the configuration's (``DIR/controller/``): aioquic
   holds one certificate per configuration, so ``_choose_by_server_name`` peeks at the
   ClientHello just before aioquic's server handles it and sets the context's (public)
   certificate, chain and key, which aioquic reads only after that point;
5. derives the stateless reset token of every connection ID it issues from the ID and a
   kept key, and lets the agent read the tokens it was given, so a restarted controller can
   reset connections it no longer knows and the agent recognises the reset
   (``stateless_reset.py``; aioquic draws the tokens at random and ignores resets).

``check_aioquic()`` fails loudly, at controller start and in the test suite, if aioquic's
internals change under us.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from aioquic import __version__ as aioquic_version
from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509

from margo_stream.errors import MargoError
from margo_stream.identity.fleet_manager import ServerCertificate
from margo_stream.transport.stateless_reset import ResetTokens

TESTED_AIOQUIC = ("1.7.",)
HELLO_HANDLER_PARAMETERS = ["input_buf", "initial_buf", "handshake_buf"]

# server name from the ClientHello (None: none sent) -> the certificate to present, or None
CertificateChooser = Callable[[str | None], ServerCertificate | None]


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
    _check_server_name_hook(context)
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


def _check_server_name_hook(context: tls.Context) -> None:
    """What ``_choose_by_server_name`` relies on: the server's ClientHello handler and its
    arguments, the ClientHello parser and its server name, the context's certificate slots."""
    handler = getattr(context, "_server_handle_hello", None)
    try:
        parameters = list(inspect.signature(handler).parameters) if callable(handler) else None
    except (TypeError, ValueError):
        parameters = None
    if parameters != HELLO_HANDLER_PARAMETERS:
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version}: tls.Context._server_handle_hello is gone or takes "
            f"{parameters} instead of {HELLO_HANDLER_PARAMETERS}; the per-tenant server "
            "certificate cannot be chosen"
        )
    if not callable(getattr(tls, "pull_client_hello", None)) or "server_name" not in getattr(
        tls.ClientHello, "__dataclass_fields__", {}
    ):
        raise UnsupportedAioquic(
            f"aioquic {aioquic_version}: tls.pull_client_hello or ClientHello.server_name is "
            "gone; the per-tenant server certificate cannot be chosen"
        )
    for attribute in ("certificate", "certificate_chain", "certificate_private_key"):
        if not hasattr(context, attribute):
            raise UnsupportedAioquic(
                f"aioquic {aioquic_version}: tls.Context has no {attribute!r}; the per-tenant "
                "server certificate cannot be chosen"
            )


def _choose_by_server_name(context: tls.Context, choose: CertificateChooser) -> None:
    """Before aioquic's server handles the ClientHello (the only place it reads the server
    name), read the name from it and present the certificate ``choose`` picks for it.

    aioquic first uses the certificate's key later in that same handler (signature algorithm
    negotiation, Certificate, CertificateVerify), so setting it here is in time. A ClientHello
    that does not parse is left to aioquic, which refuses it with the proper alert.
    """
    handle_hello = context._server_handle_hello

    def choosing_handle_hello(
        input_buf: Buffer, initial_buf: Buffer, handshake_buf: Buffer
    ) -> None:
        start = input_buf.tell()
        try:
            server_name = tls.pull_client_hello(input_buf).server_name
        except Exception:  # noqa: BLE001 - aioquic parses it again and raises its alert
            server_name = None
        input_buf.seek(start)
        chosen = choose(server_name)
        if chosen is not None:
            context.certificate = chosen.certificate
            context.certificate_chain = list(chosen.chain)
            context.certificate_private_key = chosen.private_key
        handle_hello(input_buf, initial_buf, handshake_buf)

    setattr(context, "_server_handle_hello", choosing_handle_hello)  # noqa: B010 - an instance's


class MutualTlsServerConnection(QuicConnection):
    """A server connection whose TLS context requests a client certificate, presents the
    certificate ``choose_certificate`` picks for the client's server name, and whose
    connection IDs carry reset tokens derived from them (``stateless_reset.py``)."""

    def __init__(
        self,
        *args: Any,
        reset_tokens: ResetTokens | None = None,
        choose_certificate: CertificateChooser | None = None,
        **kwargs: Any,
    ) -> None:
        self._margo_choose_certificate = choose_certificate  # _initialize may run in __init__
        super().__init__(*args, **kwargs)
        self._margo_reset_tokens = reset_tokens
        self._derive_reset_tokens()  # before the transport parameters carry the first one

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        self.tls._request_client_certificate = True
        if self._margo_choose_certificate is not None:
            _choose_by_server_name(self.tls, self._margo_choose_certificate)

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
