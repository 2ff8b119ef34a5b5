"""The quarantined aioquic hook: fails loudly if aioquic's internals move, and really makes a
server request, receive and expose the client's certificate (sans-IO handshake, no sockets)."""

from __future__ import annotations

import re
from pathlib import Path

import aioquic
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from margo_stream.protocol.codes import ALPN
from margo_stream.transport.mtls_hook import (
    MutualTlsServerConnection,
    check_aioquic,
    peer_certificates,
)
from tests.harness import Pki


def _handshake(client: QuicConnection, server: QuicConnection) -> None:
    now = 1.0
    client.connect(("127.0.0.1", 4433), now=now)
    for _ in range(20):
        moved = False
        for data, _addr in client.datagrams_to_send(now=now):
            server.receive_datagram(data, ("127.0.0.1", 1234), now=now)
            moved = True
        for data, _addr in server.datagrams_to_send(now=now):
            client.receive_datagram(data, ("127.0.0.1", 4433), now=now)
            moved = True
        if not moved:
            break


def _pair(pki: Pki, with_cert: bool, tickets: list):
    server_conf = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    server_conf.load_cert_chain(
        str(pki.dir / "controller/cert.pem"), str(pki.dir / "controller/key.pem")
    )
    client_conf = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name="localhost")
    client_conf.load_verify_locations(cafile=str(pki.dir / "controller/ca.pem"))
    if with_cert:
        ident = pki.device("acme", "press-01")
        client_conf.load_cert_chain(str(ident / "cert.pem"), str(ident / "key.pem"))
    client = QuicConnection(configuration=client_conf, session_ticket_handler=tickets.append)
    # the server's original DCID is the client's initial destination id
    server = MutualTlsServerConnection(
        configuration=server_conf, original_destination_connection_id=client._peer_cid.cid
    )  # test-only peek
    return client, server


def test_check_aioquic_passes_on_the_pinned_version():
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    pinned = re.search(r'"aioquic==([0-9.]+)"', pyproject)
    assert pinned and pinned[1] == aioquic.__version__  # the test runs on the pinned version
    check_aioquic()  # raises UnsupportedAioquic on anything else


def test_server_receives_client_certificate(tmp_path):
    pki = Pki(tmp_path)
    tickets: list = []
    client, server = _pair(pki, True, tickets)
    _handshake(client, server)
    leaf, chain = peer_certificates(server)
    assert leaf is not None
    uris = [
        u.value
        for u in leaf.extensions.get_extension_for_oid(
            __import__("cryptography").x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME
        ).value
    ]
    assert uris == ["spiffe://acme/margo/client/press-01"]
    # no session tickets: a resumed session could skip the client certificate
    assert tickets == []


def test_client_without_certificate_leaves_none(tmp_path):
    pki = Pki(tmp_path)
    client, server = _pair(pki, False, [])
    _handshake(client, server)
    leaf, chain = peer_certificates(server)
    assert leaf is None and chain == []


def test_plain_server_connection_does_not_request_certificates(tmp_path):
    """Guards the premise: without the hook aioquic authenticates nobody."""
    pki = Pki(tmp_path)
    client, _ = _pair(pki, True, [])
    server_conf = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    server_conf.load_cert_chain(
        str(pki.dir / "controller/cert.pem"), str(pki.dir / "controller/key.pem")
    )
    server = QuicConnection(
        configuration=server_conf, original_destination_connection_id=client._peer_cid.cid
    )
    _handshake(client, server)
    assert peer_certificates(server)[0] is None


def _reset_pair(tmp_path):
    """A client and a server whose connection IDs carry tokens of a known key, connected."""
    from margo_stream.transport.stateless_reset import ResetTokens

    tokens = ResetTokens(b"k" * 32)
    client, plain = _pair(Pki(tmp_path), True, [])
    server = MutualTlsServerConnection(
        configuration=plain._configuration,  # test-only peek: the same server settings
        original_destination_connection_id=client._peer_cid.cid,
        reset_tokens=tokens,
    )
    _handshake(client, server)
    return client, server, tokens


def test_every_connection_id_the_server_issues_carries_the_derived_reset_token(tmp_path):
    from margo_stream.transport.mtls_hook import host_reset_tokens, peer_reset_tokens
    from margo_stream.transport.stateless_reset import is_reset

    client, server, tokens = _reset_pair(tmp_path)
    issued = host_reset_tokens(server)
    assert len(issued) > 1  # the first ID (transport parameter) and NEW_CONNECTION_ID ones
    assert all(token == tokens.token(cid) for cid, token in issued.items())
    given = peer_reset_tokens(client)
    # only the token of the ID the client uses: RFC 9000 10.3.1 forbids looking for those of
    # IDs not used yet (or retired)
    assert given == [tokens.token(client._peer_cid.cid)]  # test-only peek
    # a reset the restarted server would send for the ID the client uses is recognised
    reset = tokens.reset_for(client._peer_cid.cid, 60)  # test-only peek
    assert reset is not None and is_reset(reset, given)
    unused = client._peer_cid_available[0].cid  # test-only peek
    assert not is_reset(tokens.reset_for(unused, 60) or b"", given)


def test_the_receipt_mark_moves_when_a_packet_is_taken_and_not_for_a_reset(tmp_path):
    from margo_stream.transport.mtls_hook import receipt_mark

    client, server, tokens = _reset_pair(tmp_path)
    now = 10.0
    server.send_ping(1)
    for data, _addr in server.datagrams_to_send(now=now):
        mark = receipt_mark(client)
        client.receive_datagram(data, ("127.0.0.1", 4433), now=now + 1)
        assert receipt_mark(client) != mark  # taken
    reset = tokens.reset_for(client._peer_cid.cid, 60)  # test-only peek
    assert reset is not None
    mark = receipt_mark(client)
    client.receive_datagram(reset, ("127.0.0.1", 4433), now=now + 2)
    assert receipt_mark(client) == mark  # nothing of it taken: the reset check is due


def _sni_pair(pki: Pki, server_name: str, cafile: Path):
    from margo_stream.identity.fleet_manager import TenantCertificates

    client_conf = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name=server_name)
    client_conf.load_verify_locations(cafile=str(cafile))
    ident = pki.device("acme", "press-01")
    client_conf.load_cert_chain(str(ident / "cert.pem"), str(ident / "key.pem"))
    server_conf = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    server_conf.load_cert_chain(
        str(pki.dir / "controller/cert.pem"), str(pki.dir / "controller/key.pem")
    )
    client = QuicConnection(configuration=client_conf)
    server = MutualTlsServerConnection(
        configuration=server_conf,
        original_destination_connection_id=client._peer_cid.cid,  # test-only peek
        choose_certificate=TenantCertificates.from_dir(pki.dir).choose,
    )
    return client, server


def _uris(cert) -> list[str]:
    from margo_stream.identity.fleet_manager import uri_sans

    return uri_sans(cert)


def test_server_presents_the_certificate_the_server_name_chooses(tmp_path):
    pki = Pki(tmp_path)
    for tenant in ("acme", "globex"):
        client, server = _sni_pair(pki, tenant, pki.dir / tenant / "ca.pem")
        _handshake(client, server)
        leaf, _ = peer_certificates(client)  # what the client was shown, and verified
        assert leaf is not None and _uris(leaf) == [f"spiffe://{tenant}/margo/wfm/controller"]
        assert peer_certificates(server)[0] is not None  # the client certificate still came


def test_a_server_name_naming_no_tenant_gets_the_default_certificate(tmp_path):
    pki = Pki(tmp_path)
    client, server = _sni_pair(pki, "localhost", pki.dir / "controller" / "ca.pem")
    _handshake(client, server)
    leaf, _ = peer_certificates(client)
    assert leaf is not None and _uris(leaf) == []  # DIR/controller/cert.pem: no SPIFFE ID
    assert leaf.subject.rfc4514_string() == "CN=localhost"


def test_check_aioquic_fails_loudly_when_the_hello_handler_moves(monkeypatch):
    import pytest
    from aioquic import tls

    from margo_stream.transport.mtls_hook import UnsupportedAioquic

    monkeypatch.setattr(tls.Context, "_server_handle_hello", lambda self, buf: None)
    with pytest.raises(UnsupportedAioquic, match="_server_handle_hello"):
        check_aioquic()
    monkeypatch.delattr(tls.Context, "_server_handle_hello")
    with pytest.raises(UnsupportedAioquic, match="per-tenant server certificate"):
        check_aioquic()
