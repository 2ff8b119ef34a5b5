"""The channel end to end: a real controller process, real agents, real certificates."""

from __future__ import annotations

import struct

import anyio
import pytest

from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode
from margo_stream.transport.connection import ConnectionLost, StreamClosed
from tests.harness import Agent, Controller, free_udp_port, wait_for
from tests.integration.rawclient import configuration, craft, open_connection, say_hello

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def controller(pki, tmp_path):
    ctl = Controller(pki, tmp_path / "data")
    yield ctl
    ctl.stop()


def test_agent_connects_and_operator_sees_it(pki, controller, tmp_path):
    ident = pki.device("acme", "press-01")
    agent = Agent(ident, controller.quic, tmp_path / "agent1", extra=["--label", "line=3"])
    try:
        d = controller.wait_connected(pki.token("acme"), "press-01")
        assert d["tenant"] == "acme" and d["id"] == "press-01"
        assert d["capabilities"]["id"] == "press-01"
        assert d["capabilities"]["cpus"][0]["cores"] >= 1
        assert d["reported_labels"].get("line") == "3"  # what the device claims
        assert d["labels"] == {}  # operator labels: the device cannot set them
        assert d["last_seen"] is not None and d["connection_count"] == 1
        # cross-tenant isolation: another tenant's operator sees nothing, and a 404 exactly
        # like a device that does not exist
        other = controller.get(pki.token("globex"), "/devices/press-01")
        missing = controller.get(pki.token("globex"), "/devices/no-such-device")
        assert other.status_code == missing.status_code == 404
        assert other.json()["detail"].replace("press-01", "X") == missing.json()["detail"].replace(
            "no-such-device", "X"
        )
        assert controller.get(pki.token("globex"), "/devices").json()["items"] == []
        assert controller.get("not-a-token", "/devices").status_code == 401
    finally:
        assert agent.stop() == 0  # clean exit on SIGTERM
    controller.wait_connected(pki.token("acme"), "press-01", connected=False, timeout=5)


REFUSALS = {
    "unknown trust domain": dict(signer="acme", uris=["spiffe://initech/margo/client/x1"]),
    "another tenant's CA": dict(signer="globex", uris=["spiffe://acme/margo/client/press-01"]),
    "expired": dict(signer="acme", uris=["spiffe://acme/margo/client/old-01"], expired=True),
    "several URI SANs": dict(
        signer="acme", uris=["spiffe://acme/margo/client/a", "spiffe://acme/margo/client/b"]
    ),
    "no URI SAN": dict(signer="acme", uris=[]),
}


async def test_refusals_with_real_handshakes(pki, controller, tmp_path):
    expect = {
        "unknown trust domain": "unknown trust domain 'initech'",
        "another tenant's CA": "'acme' trust bundle",
        "expired": "expired",
        "several URI SANs": "2 URI SANs",
        "no URI SAN": "0 URI SANs",
    }
    for i, (case, spec) in enumerate(REFUSALS.items()):
        cert, key = craft(pki.dir, tmp_path / f"bad{i}", **spec)
        conn = await open_connection(controller.quic_port, configuration(pki.dir, cert, key))
        with pytest.raises(ConnectionLost) as info:
            await say_hello(conn, "press-01")
        assert info.value.code == ErrorCode.IDENTITY_REFUSED, case
        assert expect[case] in info.value.reason, (case, info.value.reason)
        conn._test_transport.close()
    # no certificate at all
    conn = await open_connection(controller.quic_port, configuration(pki.dir, None, None))
    with pytest.raises(ConnectionLost) as info:
        await say_hello(conn, "press-01")
    assert info.value.code == ErrorCode.IDENTITY_REFUSED
    assert "no client certificate" in info.value.reason
    conn._test_transport.close()
    log = controller.log()
    assert log.count("refused connection from") == len(REFUSALS) + 1
    # nothing was registered for any refused peer
    assert controller.get(pki.token("acme"), "/devices").json()["items"] == []


async def test_hello_for_another_device_closes_connection(pki, controller):
    ident = pki.device("acme", "press-01")
    conn = await open_connection(
        controller.quic_port, configuration(pki.dir, ident / "cert.pem", ident / "key.pem")
    )
    with pytest.raises(ConnectionLost) as info:
        await say_hello(conn, "press-02")
    assert info.value.code == ErrorCode.IDENTITY_MISMATCH
    conn._test_transport.close()


async def test_waiting_for_a_completed_handshake_returns_at_once(pki, controller):
    # a waiter that starts after HandshakeCompleted was processed must not wait forever
    ident = pki.device("acme", "press-01")
    conn = await open_connection(
        controller.quic_port, configuration(pki.dir, ident / "cert.pem", ident / "key.pem")
    )
    with anyio.fail_after(2):
        await conn.wait_handshake()
    conn._test_transport.close()


async def test_malformed_stream_is_reset_and_connection_survives(pki, controller):
    ident = pki.device("acme", "press-01")
    conn = await open_connection(
        controller.quic_port, configuration(pki.dir, ident / "cert.pem", ident / "key.pem")
    )
    ack = await say_hello(conn, "press-01")
    assert isinstance(ack, m.HelloAck) and ack.tenant == "acme"
    for garbage in (
        struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1",  # not msgpack
        struct.pack(">I", 64 << 20),  # announces a frame over the limit
        struct.pack(">I", 3) + b"\x93\x01\x02",
    ):  # not a map
        sid = conn.quic.get_next_available_stream_id()
        stream = conn.open_stream()
        assert stream.stream_id == sid
        conn.quic.send_stream_data(sid, garbage)
        conn.transmit()
        with anyio.fail_after(5), pytest.raises(StreamClosed):
            await stream.receive()
    # the connection and its control stream still work
    control = next(s for s in conn.streams.values() if s.kind and s.kind.value == "control")
    control.send(m.Ping(n=7))
    with anyio.fail_after(5):
        pong = await control.receive()
    assert pong == m.Pong(n=7)
    conn.close()
    conn._test_transport.close()


async def test_second_connection_replaces_first(pki, controller):
    ident = pki.device("acme", "press-01")
    conf = configuration(pki.dir, ident / "cert.pem", ident / "key.pem")
    first = await open_connection(controller.quic_port, conf)
    await say_hello(first, "press-01")
    second = await open_connection(controller.quic_port, conf)
    await say_hello(second, "press-01")
    with anyio.fail_after(5):
        lost = await first.wait_closed()
    assert lost.code == ErrorCode.REPLACED
    assert second.closed is None
    d = controller.device(pki.token("acme"), "press-01")
    assert d["connected"] is True and d["connection_count"] == 2
    for c in (first, second):
        c.close()
        c._test_transport.close()


def test_agent_reconnects_after_controller_restart(pki, tmp_path):
    port = free_udp_port()
    ctl = Controller(pki, tmp_path / "data", quic_port=port)
    ident = pki.device("acme", "press-01")
    agent = Agent(
        ident,
        f"127.0.0.1:{port}",
        tmp_path / "agent1",
        # probes 0.5 s apart: the agent is still probing (not yet giving up after three misses)
        # when the restarted controller listens, about a second after the kill
        extra=["--keepalive", "1.0", "--idle-timeout", "5"],
    )
    try:
        ctl.wait_connected(pki.token("acme"), "press-01")
        ctl.kill()  # SIGKILL: no goodbye to the agents
        ctl = Controller(pki, tmp_path / "data", quic_port=port)
        d = ctl.wait_connected(pki.token("acme"), "press-01", min_connections=2, timeout=20)
        assert d["connection_count"] >= 2
        assert agent.alive()
        # the restarted controller answered the old connection's next packet with a stateless
        # reset (its key is kept in the data directory), rather than the agent waiting out
        # unanswered keepalives
        assert "stateless reset" in agent.log()
        assert "controller unresponsive" not in agent.log()
    finally:
        agent.stop()
        ctl.stop()


async def test_agent_reconnects_after_blackhole(pki, tmp_path):
    from bench.relay import Impairment, UdpRelay

    ctl = Controller(pki, tmp_path / "data")
    ident = pki.device("acme", "press-01")
    token = pki.token("acme")
    try:
        async with UdpRelay(
            ("127.0.0.1", 0), ("127.0.0.1", ctl.quic_port), Impairment(seed=1)
        ) as relay:
            agent = Agent(
                ident,
                f"127.0.0.1:{relay.port}",
                tmp_path / "agent1",
                extra=["--keepalive", "0.3", "--idle-timeout", "3"],
            )
            try:
                await anyio.to_thread.run_sync(lambda: ctl.wait_connected(token, "press-01"))
                relay.blackhole(True)
                # the agent notices the dead link (3 silent keepalives) and retries;
                # the controller's idle timeout marks it disconnected
                await anyio.to_thread.run_sync(
                    lambda: ctl.wait_connected(token, "press-01", connected=False, timeout=15)
                )
                relay.blackhole(False)
                d = await anyio.to_thread.run_sync(
                    lambda: ctl.wait_connected(token, "press-01", min_connections=2, timeout=20)
                )
                assert d["connected"]
                assert "controller unresponsive" in agent.log() or "no answer" in agent.log()
            finally:
                agent.stop()
    finally:
        ctl.stop()


def test_bad_identity_files_give_one_line_errors(pki, tmp_path):
    import subprocess

    from tests.harness import BIN

    ident = pki.device("acme", "press-01")
    (ident / "key.pem").write_text("not a key")
    r = subprocess.run(
        [
            str(BIN / "margo-agent"),
            "--identity",
            str(ident),
            "--controller",
            "127.0.0.1:1",
            "--state",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "key.pem" in lines[0], r.stderr
    r = subprocess.run(
        [
            str(BIN / "margo-controller"),
            "--certs",
            str(tmp_path / "nope"),
            "--data",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_non_loopback_api_without_tls_is_refused(pki, tmp_path):
    import subprocess

    from tests.harness import BIN

    r = subprocess.run(
        [
            str(BIN / "margo-controller"),
            "--certs",
            str(pki.dir),
            "--data",
            str(tmp_path / "d"),
            "--api",
            "0.0.0.0:0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "plain HTTP is only allowed on loopback" in r.stderr


def test_wait_for_helper_times_out():
    with pytest.raises(AssertionError):
        wait_for(lambda: False, timeout=0.1)
