"""A real controller under a flood of garbage QUIC Initials: address validation (Retry),
half-open caps and half-open state freed within the handshake timeout.

The flood comes from another process: 1,200-byte Initials that no key decrypts, with random
connection IDs, from 200 UDP source ports (what spoofed sources look like from the server: a
new address and connection ID every packet). Meanwhile the test connects a real device (the
in-test QUIC client with a real device certificate, or a real agent) and reads the
controller's resident memory from /proc.

Which flood connection IDs still have state in the controller is observed from outside: a
short-header packet to a connection ID the controller does not know is answered with a
stateless reset carrying that ID's token (derived from the key in the controller's data
directory, ``stateless_reset.py``); one it still routes to a half-open connection gets no
answer.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
from aioquic.buffer import Buffer
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from prometheus_client.parser import text_string_to_metric_families

from margo_stream.transport.stateless_reset import KEY_FILE, ResetTokens
from tests.harness import Agent, Controller, Pki, wait_for
from tests.integration.rawclient import configuration, open_connection, say_hello
from tests.integration.test_desired import margoctl, write_doc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
SLACK = 3.0  # seconds beyond the handshake timeout, for a loaded 2-core machine


# --------------------------------------------------------------------------- the flood process


def garbage_initial(dcid: bytes, token: bytes = b"") -> bytes:
    """A 1,200-byte QUIC v1 Initial to ``dcid`` whose payload no key decrypts."""
    assert len(token) < 64
    scid = os.urandom(8)
    head = bytes([0xC3]) + (1).to_bytes(4, "big") + bytes([len(dcid)]) + dcid
    head += bytes([len(scid)]) + scid + bytes([len(token)]) + token
    rest = 1200 - len(head) - 2
    return head + (0x4000 | rest).to_bytes(2, "big") + os.urandom(rest)


def flood_main(port: int, count: int, rate: float, dcid_file: str) -> None:
    """Send ``count`` garbage Initials at ``rate`` per second from 200 source ports; write
    their connection IDs to ``dcid_file`` (one hex per line, in order) first; print one JSON
    line: packets sent, Retry packets received back, seconds taken."""
    dcids = [os.urandom(8) for _ in range(count)]
    Path(dcid_file).write_text("".join(d.hex() + "\n" for d in dcids))
    socks = []
    for _ in range(200):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        socks.append(s)
    print(json.dumps({"started": True}), flush=True)
    retries = 0

    def drain() -> int:
        got = 0
        for s in socks:
            while True:
                try:
                    reply = s.recv(2048)
                except BlockingIOError:
                    break
                got += reply[0] & 0xF0 == 0xF0  # long header, Retry (type 3 in v1)
        return got

    t0 = time.monotonic()
    for i, dcid in enumerate(dcids):
        wait = t0 + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        try:
            socks[i % len(socks)].sendto(garbage_initial(dcid), ("127.0.0.1", port))
        except BlockingIOError:
            pass
        if i % 200 == 199:
            retries += drain()
    elapsed = time.monotonic() - t0
    time.sleep(0.3)
    retries += drain()
    print(json.dumps({"sent": count, "retries": retries, "seconds": elapsed}), flush=True)


class Flood:
    def __init__(self, tmp: Path, port: int, count: int, rate: float) -> None:
        self.dcid_file = tmp / f"flood-{port}-{time.monotonic_ns()}.txt"
        code = (
            "import sys; from tests.integration.test_quic_flood import flood_main; "
            "flood_main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(port), str(count), str(rate), str(self.dcid_file)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        assert json.loads(self.proc.stdout.readline()) == {"started": True}

    def dcids(self) -> list[bytes]:
        return [bytes.fromhex(line) for line in self.dcid_file.read_text().split()]

    def result(self, timeout: float = 60.0) -> dict[str, float]:
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0
        return json.loads(out.strip().splitlines()[-1])

    def running(self) -> bool:
        return self.proc.poll() is None


# --------------------------------------------------------------------------- observing the controller


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def held(ctl: Controller, dcids: list[bytes], wait: float = 3.0, quiet: float = 0.5) -> set[bytes]:
    """The connection IDs among ``dcids`` the controller still holds state for: those whose
    short-header probe gets no stateless reset back.

    A probe or its answer can be lost on a loaded machine (a burst overflows a socket buffer),
    which would look like state held; so probes go out paced, and the unanswered are probed
    again, round after round, until a round brings no answer (at most ``PROBE_ROUNDS``). The
    first round waits up to ``wait`` seconds for its first answer, and every round ends
    ``quiet`` seconds after its last probe or answer."""
    tokens = ResetTokens((ctl.data / KEY_FILE).read_bytes())
    by_token = {tokens.token(d): d for d in dcids}
    pending = set(dcids)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.05)
        for round_ in range(PROBE_ROUNDS):
            for i, d in enumerate(sorted(pending)):
                s.sendto(bytes([0x40]) + d + os.urandom(51), ("127.0.0.1", ctl.quic_port))
                if i % PROBE_BURST == PROBE_BURST - 1:
                    time.sleep(0.002)
            first = wait if round_ == 0 else quiet
            answered = _resets(s, by_token, pending, first, quiet)
            pending -= answered
            if not answered or not pending:
                break
    return pending


PROBE_BURST = 50  # probes sent back to back, then a pause
PROBE_ROUNDS = 4


def _resets(
    s: socket.socket, by_token: dict[bytes, bytes], pending: set[bytes], first: float, quiet: float
) -> set[bytes]:
    """The ``pending`` connection IDs whose stateless reset arrives on ``s``: the first within
    ``first`` seconds, each next within ``quiet`` seconds of the one before."""
    answered: set[bytes] = set()
    deadline = time.monotonic() + first
    while time.monotonic() < deadline and len(answered) < len(pending):
        try:
            reply = s.recv(2048)
        except TimeoutError:
            continue
        found = by_token.get(reply[-16:])
        if found in pending:
            answered.add(found)
            deadline = time.monotonic() + quiet
    return answered


def listener_figures(ctl: Controller) -> dict[str, float]:
    """The controller's QUIC listener from its ``/metrics`` (``--metrics``):
    ``half_open`` (handshakes in progress) and each event's count (``retries``, ...)."""
    address = json.loads((ctl.data / "controller.json").read_text())["metrics"]
    text = httpx.get(f"http://{address}/metrics", timeout=5).text
    figures: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("transport") != "quic":
                continue
            if sample.name == "margo_listener_half_open":
                figures["half_open"] = sample.value
            elif sample.name == "margo_listener_events_total":
                figures[sample.labels["event"]] = sample.value
    return figures


def device_handshake_seconds(pki: Pki, port: int, device: str, timeout: float = 10.0) -> float:
    """A real device (the in-test client, a real device certificate): seconds from its first
    Initial to the controller's answer to its hello."""
    ident = pki.device("acme", device)
    conf = configuration(pki.dir, ident / "cert.pem", ident / "key.pem")

    async def main() -> float:
        t0 = time.monotonic()
        with anyio.fail_after(timeout):
            conn = await open_connection(port, conf)
            reply = await say_hello(conn, device)
        took = time.monotonic() - t0
        assert type(reply).__name__ == "HelloAck", reply
        conn.close()
        conn._test_transport.close()  # type: ignore[attr-defined]
        return took

    return anyio.run(main)


def no_retry(*, per_address: int, timeout: float, total: int = 2048) -> list[str]:
    """Controller flags: ``--quic-retry never`` with these caps and handshake timeout."""
    return [
        "--metrics",
        "127.0.0.1:0",
        "--quic-retry",
        "never",
        "--max-half-open",
        str(total),
        "--max-half-open-per-address",
        str(per_address),
        "--handshake-timeout",
        str(timeout),
    ]


# --------------------------------------------------------------------------- the tests


def test_flood_costs_little_memory_and_a_device_gets_in_during_it(pki: Pki, tmp_path: Path) -> None:
    """The default (``auto``): 6,000 garbage Initials at 1,500/s. Controller memory grows by
    less than 50 MiB, a real device completes its connection within 3 s while the flood goes
    on, and every half-open connection the flood made is gone within the handshake timeout."""
    ctl = Controller(pki, tmp_path / "data")
    try:
        pid = ctl.proc.pid
        time.sleep(1.0)  # the controller's first collector ticks
        before = rss(pid)
        flood = Flood(tmp_path, ctl.quic_port, 6000, 1500.0)
        peak = before
        time.sleep(0.8)
        dcids = flood.dcids()
        probed = time.monotonic()  # the flood's connections were all made before this
        half_open = held(ctl, dcids[:400], quiet=0.3)  # the first ones met no load yet
        took = device_handshake_seconds(pki, ctl.quic_port, "press-01")
        while flood.running():
            peak = max(peak, rss(pid))
            time.sleep(0.05)
        result = flood.result()
        peak = max(peak, rss(pid))
        assert took < 3.0, f"the device took {took:.2f}s to connect during the flood"
        assert 0 < len(half_open) <= 2048 // 16, len(half_open)  # auto: Retry from 128
        assert result["retries"] > 1000, result  # the rest were answered with Retry
        assert peak - before < 50 * MIB, f"RSS grew {(peak - before) / MIB:.1f} MiB"
        left = probed + 5.0 + SLACK - time.monotonic()  # the default handshake timeout: 5 s
        wait_for(lambda: not held(ctl, sorted(half_open), wait=0.5), max(left, 0.5))
        assert ctl.alive()
    finally:
        ctl.stop()


def test_a_small_half_open_cap_still_lets_a_device_in_through_retry(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``--max-half-open 64``: the flood holds at most 4 unproven handshakes; the device
    answers the Retry and its proven handshake fits in the rest of the cap."""
    ctl = Controller(pki, tmp_path / "data", extra=["--max-half-open", "64"])
    try:
        flood = Flood(tmp_path, ctl.quic_port, 4000, 1500.0)
        time.sleep(0.5)
        half_open = held(ctl, flood.dcids()[:200], quiet=0.3)
        with caplog.at_level(logging.INFO, logger="quic"):
            took = device_handshake_seconds(pki, ctl.quic_port, "press-02")
        assert took < 3.0, f"the device took {took:.2f}s"
        assert "Retrying with token" in caplog.text  # aioquic's client followed our Retry
        assert 0 < len(half_open) <= 4
        flood.result()
    finally:
        ctl.stop()


def test_never_retry_drops_what_is_over_the_caps_until_the_timeout_frees_them(
    pki: Pki, tmp_path: Path
) -> None:
    """``--quic-retry never``: 16 unproven handshakes per address, the rest dropped, no Retry;
    a device at the same address is dropped too until the handshake timeout (3 s here) frees
    the slots, then connects. The counts come from the controller's own metrics; the probes
    confirm it is the first 16 Initials that hold state."""
    ctl = Controller(pki, tmp_path / "data", extra=no_retry(per_address=16, timeout=3))
    try:
        flood = Flood(tmp_path, ctl.quic_port, 300, 3000.0)
        result = flood.result()
        figures = listener_figures(ctl)
        assert figures["half_open"] == 16, figures
        # the rest dropped by the cap (a few may not have got past the kernel's buffer)
        assert 250 <= figures["half_open_dropped"] <= 300 - 16, figures
        assert figures["retries"] == 0 and result["retries"] == 0, (figures, result)
        dcids = flood.dcids()
        assert held(ctl, dcids[:16], wait=0.3) == set(dcids[:16])  # the first to come
        with pytest.raises(TimeoutError):  # the address is at its cap: its Initials dropped
            device_handshake_seconds(pki, ctl.quic_port, "press-03", timeout=0.7)
        assert held(ctl, dcids[16:40], quiet=0.3) == set()  # dropped: nothing kept
        wait_for(lambda: listener_figures(ctl)["half_open"] == 0, 3.0 + SLACK, interval=0.1)
        figures = listener_figures(ctl)
        assert figures["half_open_expired"] == 16, figures
        assert held(ctl, dcids[:16], wait=0.5) == set()  # forgotten
        assert device_handshake_seconds(pki, ctl.quic_port, "press-04") < 3.0
    finally:
        ctl.stop()


def test_memory_is_given_back_once_the_half_open_state_is_freed(pki: Pki, tmp_path: Path) -> None:
    """With Retry off and caps wide open, 3,000 garbage Initials make 3,000 half-open
    connections (about 200 MiB). Their deadline frees them; the collector policy sees the mass
    release, sweeps (their reference cycles) and trims the heap: resident memory goes back to
    within 50 MiB of where it was, long before the 600 s a growth-triggered sweep waits."""
    ctl = Controller(
        pki, tmp_path / "data", extra=no_retry(per_address=4000, timeout=2, total=4000)
    )
    try:
        pid = ctl.proc.pid
        time.sleep(1.0)
        before = rss(pid)
        flood = Flood(tmp_path, ctl.quic_port, 3000, 3000.0)
        flood.result()
        peak = wait_for(lambda: (r := rss(pid)) - before > 100 * MIB and r, 5.0, what="growth")
        # a sweep only after the 3,000 are freed (2 s), 10 s after the collector's first tick
        wait_for(
            lambda: rss(pid) - before < 50 * MIB,
            10.0 + 2.0 + 3 * SLACK,
            interval=0.25,
            what=f"memory given back (peak +{(peak - before) / MIB:.0f} MiB)\n{ctl.log_tail()}",
        )
        wait_for(lambda: "gc sweep" in ctl.log(), 5.0, what="the sweep's log line")
    finally:
        ctl.stop()


def retry_for(sock: socket.socket, port: int) -> tuple[bytes, bytes]:
    """Send a garbage Initial from ``sock``; the Retry's new connection ID and token."""
    sock.sendto(garbage_initial(os.urandom(8)), ("127.0.0.1", port))
    header = pull_quic_header(Buffer(data=sock.recv(2048)), host_cid_length=8)
    assert header.packet_type == QuicPacketType.RETRY and header.token
    return header.source_cid, header.token


def test_a_token_is_worth_nothing_from_another_address_or_altered(pki: Pki, tmp_path: Path) -> None:
    """``always``: a token taken from one client's Retry, used from another address, or
    altered, is dropped (no connection, no second Retry); from its own address it opens."""
    ctl = Controller(pki, tmp_path / "data", extra=["--quic-retry", "always"])
    target = ("127.0.0.1", ctl.quic_port)
    try:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mine,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other,
        ):
            for s in (mine, other):
                s.bind(("127.0.0.1", 0))
                s.settimeout(2.0)
            cid, token = retry_for(mine, ctl.quic_port)
            altered = token[:-1] + bytes([token[-1] ^ 1])
            other.sendto(garbage_initial(cid, token), target)  # someone else's token
            mine.sendto(garbage_initial(cid, altered), target)
            mine.sendto(garbage_initial(os.urandom(8), os.urandom(40)), target)  # garbage
            for s in (mine, other):
                s.settimeout(0.5)
                with pytest.raises(TimeoutError):  # dropped: no Retry, nothing
                    s.recv(2048)
            assert held(ctl, [cid]) == set()  # and no state
            mine.sendto(garbage_initial(cid, token), target)  # the token's own address
            assert held(ctl, [cid]) == {cid}  # taken up: a (half-open) connection
    finally:
        ctl.stop()


def test_retry_always_with_a_real_agent(pki: Pki, tmp_path: Path) -> None:
    """``--quic-retry always``: every handshake goes through a Retry; a real agent connects
    and gets its desired state; a garbage Initial gets a Retry and leaves no state."""
    ctl = Controller(pki, tmp_path / "data", extra=["--quic-retry", "always"])
    agent = Agent(pki.device("acme", "press-05"), ctl.quic, tmp_path / "agent")
    try:
        token = pki.token("acme")
        ctl.wait_connected(token, "press-05")
        margoctl(
            ctl,
            pki.token_file("acme"),
            "apply",
            "-f",
            str(write_doc(tmp_path, "SITE-R")),
            "--device",
            "press-05",
        )
        wait_for(lambda: "applied manifest version 1" in agent.log(), what="desired state")
        flood = Flood(tmp_path, ctl.quic_port, 50, 500.0)
        assert flood.result()["retries"] == 50
        assert held(ctl, flood.dcids()) == set()
    finally:
        agent.stop()
        ctl.stop()
