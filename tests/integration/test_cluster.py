"""Several controllers on one PostgreSQL store, as real processes with real agents: a change
applied through one reaches devices held by another; a killed instance's devices come back on
the survivor with every acknowledged telemetry record stored once; a device that connects to
another instance while its old session lingers ends with one session; ``--workers 2``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import anyio
import pytest

from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode
from margo_stream.telemetry_client import TelemetryClient
from margo_stream.transport.connection import ConnectionLost
from margo_stream.transport.stateless_reset import ResetTokens, load_reset_key
from tests.harness import BIN, Agent, Controller, Proc, traversable_to, wait_for
from tests.integration import rawclient
from tests.integration.test_desired import margoctl, state_of, write_doc
from tests.integration.test_telemetry_e2e import fetch_all

pytestmark = pytest.mark.integration

# quick to notice a dead peer: agents ping every second, connections idle out after 4 s
FAST = ["--keepalive", "1", "--idle-timeout", "4"]


def instance_of(ctl: Controller) -> str:
    return json.loads((ctl.data / "controller.json").read_text())["instance"]


def start_controller(pki, tmp_path: Path, name: str, dsn: str, *extra: str) -> Controller:
    ctl = Controller(pki, tmp_path / name, extra=["--store", dsn, *FAST, *extra])
    ctl.instance = instance_of(ctl)  # type: ignore[attr-defined]
    return ctl


def on(ctl: Controller, token: str, device: str, holder: Controller, timeout: float = 20) -> dict:
    """Wait until ``ctl``'s API shows ``device`` connected to ``holder``."""
    return wait_for(
        lambda: (
            (d := ctl.device(token, device))
            and d["connected"]
            and d["controller"] == holder.instance  # type: ignore[attr-defined]
            and d
        ),
        timeout,
        what=f"{device} on {holder.instance} as {ctl.api} sees it\n{ctl.log_tail()}",  # type: ignore[attr-defined]
    )


@pytest.fixture
def two(pki, tmp_path, pg_dsn):
    started: list[Controller] = []
    agents: list[Agent] = []

    def controller(name: str, *extra: str) -> Controller:
        ctl = start_controller(pki, tmp_path, name, pg_dsn, *extra)
        started.append(ctl)
        return ctl

    def agent(device: str, address: str, *extra: str) -> Agent:
        ident = pki.dir / "acme" / "devices" / device
        if not ident.exists():
            pki.device("acme", device)
        a = Agent(
            ident, address, traversable_to(tmp_path / device), extra=["--keepalive", "1", *extra]
        )
        agents.append(a)
        return a

    yield controller, agent
    for a in agents:
        a.stop()
    for ctl in started:
        ctl.stop()


def test_a_change_applied_through_one_controller_reaches_devices_held_by_the_other(
    two, pki, tmp_path
):
    controller, agent = two
    a, b = controller("a"), controller("b")
    token, tok = pki.token("acme"), pki.token_file("acme")
    agent("on-a", a.quic)
    agent("on-b", b.quic)
    on(a, token, "on-a", a)
    on(a, token, "on-b", b)  # the whole fleet, from either API
    on(b, token, "on-a", a)
    doc = write_doc(tmp_path, "SITE-A")
    started = time.monotonic()
    margoctl(a, tok, "apply", "-f", str(doc), "--device", "on-a", "--device", "on-b")
    for device in ("on-a", "on-b"):
        wait_for(
            lambda d=device: (state_of(b, tok, d, "probe-1") or {}).get("manifestVersion") == 1,
            what=f"{device} adopted version 1",
        )
    reached = time.monotonic() - started
    # B pushed to its own device: it heard of A's change through PostgreSQL
    assert re.search(r"on-b adopted manifest version 1", b.log()), b.log_tail()
    assert not re.search(r"on-b adopted manifest version", a.log())
    # and the other way round
    margoctl(b, tok, "apply", "-f", str(write_doc(tmp_path, "SITE-B")), "--device", "on-a")
    wait_for(
        lambda: (state_of(a, tok, "on-a", "probe-1") or {}).get("manifestVersion") == 2,
        what="on-a adopted version 2 applied through B",
    )
    assert re.search(r"on-a adopted manifest version 2", a.log())
    assert reached < 15, f"the push took {reached:.1f}s"


def test_a_terminal_opened_through_one_instance_reaches_a_device_held_by_the_other(two, pki):
    controller, agent = two
    a, b = controller("a"), controller("b")
    token, tok = pki.token("acme"), pki.token_file("acme")
    agent("term-a", a.quic)
    on(b, token, "term-a", a)
    r = margoctl(b, tok, "exec", "term-a", "--", "sh", "-c", "echo via-the-holder", check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "via-the-holder"
    assert f"connected to controller {a.instance}" in r.stderr  # type: ignore[attr-defined]
    # the session ran on the holder, and is audited there
    assert re.search(r"terminal|session", a.log()), a.log_tail()


def test_every_instance_shows_the_carrier_of_a_device_held_by_another(two, pki):
    controller, agent = two
    a = controller("a", "--tcp-listen", "127.0.0.1:0")
    b = controller("b")
    token = pki.token("acme")
    tcp = json.loads((a.data / "controller.json").read_text())["tcp"]
    # no QUIC listens on A's TCP port number: the agent falls back to TCP there
    agent("over-tcp", tcp, "--quic-timeout", "1")
    agent("over-quic", a.quic)
    seen = on(b, token, "over-tcp", a)
    assert seen["transport"] == "tcp"
    assert on(b, token, "over-quic", a)["transport"] == "quic"
    assert a.device(token, "over-tcp")["transport"] == "tcp"


def test_a_device_connecting_to_another_instance_ends_with_one_session(two, pki):
    controller, _ = two
    a, b = controller("a"), controller("b")
    token = pki.token("acme")
    ident = pki.device("acme", "dual")
    conf = rawclient.configuration(pki.dir, ident / "cert.pem", ident / "key.pem")

    async def scenario() -> tuple[object, object, float]:
        first = await rawclient.open_connection(a.quic_port, conf)
        assert isinstance(await rawclient.say_hello(first, "dual"), m.HelloAck)
        # the old session lingers on A (its connection is fine) when the device shows up at B
        second = await rawclient.open_connection(b.quic_port, conf)
        assert isinstance(await rawclient.say_hello(second, "dual"), m.HelloAck)
        took = anyio.current_time()
        with anyio.fail_after(10):
            while first.closed is None:
                await anyio.sleep(0.05)
        closed_after = anyio.current_time() - took
        await anyio.sleep(1.0)
        for ctl in (a, b):  # both APIs: one session, on B
            on(ctl, token, "dual", b, timeout=5)
        still = second.closed
        second.close(0, "done")
        return first.closed, still, closed_after

    old, still, closed_after = anyio.run(scenario)
    assert still is None, f"the new session was closed: {still}"
    assert old.code == ErrorCode.REPLACED, old  # type: ignore[attr-defined]
    assert b.instance in old.reason, old  # type: ignore[attr-defined]
    # told through PostgreSQL at once, not at A's next lease renewal (every 5 s)
    assert closed_after < 4, closed_after
    assert "replaced by a newer connection on instance" in a.log()


def test_a_revocation_through_one_instance_closes_the_session_on_the_other(two, pki):
    from tests.integration.test_identity_lifecycle import post, refused

    controller, _ = two
    a, b = controller("a"), controller("b")
    token = pki.token("acme")
    ident = pki.device("acme", "rev")

    async def scenario() -> None:
        conf = rawclient.configuration(pki.dir, ident / "cert.pem", ident / "key.pem")
        conn = await rawclient.open_connection(b.quic_port, conf)
        assert isinstance(await rawclient.say_hello(conn, "rev"), m.HelloAck)
        r = await anyio.to_thread.run_sync(post, a, token, "/devices/rev/revoke")
        assert r.status_code == 200, r.text
        with anyio.fail_after(5.0):  # B heard through PostgreSQL
            lost = await conn.wait_closed()
        assert lost.code == ErrorCode.IDENTITY_REFUSED and lost.reason == "revoked"
        # and B refuses the identity from now on
        assert (await refused(b, pki, ident, "rev")).startswith("revoked: ")

    anyio.run(scenario)


def test_a_device_enrolled_through_one_instance_is_admitted_by_the_other(pki, tmp_path, pg_dsn):
    from margo_stream.identity.allowed_files import allowed_path
    from tests.integration.test_enrollment import bootstrap, enroll

    a = start_controller(pki, tmp_path, "a", pg_dsn, "--enroll", "127.0.0.1:0")
    b = start_controller(pki, tmp_path, "b", pg_dsn)
    try:
        info = json.loads((a.data / "controller.json").read_text())
        out = tmp_path / "enrolled"
        token = bootstrap(pki, "acme", "enr-1")
        r = enroll(info["enroll"], "acme", "enr-1", token, pki.dir / "controller" / "ca.pem", out)
        assert r.returncode == 0, r.stderr
        # no allow file: only the store (and what A told B) knows the new key
        assert not allowed_path(pki.dir, "acme", "enr-1").exists()

        async def hello_b() -> object:
            conf = rawclient.configuration(pki.dir, out / "cert.pem", out / "key.pem")
            conn = await rawclient.open_connection(b.quic_port, conf)
            try:
                return await rawclient.say_hello(conn, "enr-1")
            except ConnectionLost as exc:
                return exc
            finally:
                conn.close(0, "done")

        # B hears of the new key within moments (a handshake may beat the notification)
        answer = wait_for(
            lambda: isinstance(a := anyio.run(hello_b), m.HelloAck) and a,
            timeout=5,
            interval=0.5,
            what=f"B admits the enrolled device\n{b.log_tail()}",
        )
        assert isinstance(answer, m.HelloAck)
    finally:
        a.stop()
        b.stop()


def holder_of(ctl: Controller, token: str, device: str) -> str:
    """The instance ``ctl``'s API says holds ``device``, once it is connected somewhere."""
    return wait_for(
        lambda: (d := ctl.device(token, device)) and d["connected"] and d["controller"],
        what=f"{device} connected\n{ctl.log_tail()}",
    )


def test_kill_9_devices_back_on_the_survivor_telemetry_once(two, pki):
    controller, agent = two
    a, b = controller("a"), controller("b")
    token = pki.token("acme")
    devices = [f"fo-{n}" for n in range(4)]
    agents = {d: agent(d, f"{a.quic},{b.quic}", "--commit-window-ms", "1") for d in devices}
    holders = {d: holder_of(a, token, d) for d in devices}
    # the instance holding fo-0 (the producers' device) dies
    victim, survivor = (a, b) if holders["fo-0"] == a.instance else (b, a)  # type: ignore[attr-defined]
    moved = [d for d in devices if holders[d] == victim.instance]  # type: ignore[attr-defined]
    agent("stranded", victim.quic)  # knows no other controller
    on(survivor, token, "stranded", victim)
    acked: dict[int, int] = {}
    stop = threading.Event()
    lock = threading.Lock()
    counter = iter(range(10**9))
    sock = agents["fo-0"].state / "telemetry.sock"

    def producer() -> None:
        client = TelemetryClient(sock)
        while not stop.is_set():
            n = next(counter)
            try:
                seq = client.emit("failover", {"n": n})
            except Exception:  # noqa: BLE001 - the agent is busy reconnecting: retried
                time.sleep(0.02)
                client = TelemetryClient(sock)
                continue
            with lock:
                acked[seq] = n
            time.sleep(0.002)

    wait_for(sock.exists, what="telemetry socket")
    threads = [threading.Thread(target=producer, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        victim.stop(signal.SIGKILL)
        killed = time.monotonic()
        for d in moved:
            on(survivor, token, d, survivor, timeout=30)
        back = time.monotonic() - killed
        assert back < 30, back
        # a device with nowhere to go shows disconnected once the dead instance's lease ends
        wait_for(
            lambda: survivor.device(token, "stranded")["connected"] is False,
            timeout=25,
            what="the stranded device disconnected",
        )
        stranded = time.monotonic() - killed
        time.sleep(1.0)  # producing on the survivor too
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    print(
        f"failover: {len(moved)} devices back after {back:.1f}s, stranded one shown"
        f" disconnected after {stranded:.1f}s, {len(acked)} records acknowledged"
    )
    assert survivor.device(token, "stranded")["controller"] is None
    assert stranded < 25, stranded
    assert len(acked) > 50
    items = wait_for(
        lambda: (
            (got := fetch_all(survivor, token, "fo-0"))
            and set(acked) <= {i["seq"] for i in got}
            and got
        ),
        timeout=30,
        what="every acknowledged record stored",
    )
    seqs = [i["seq"] for i in items]
    assert len(seqs) == len(set(seqs)), "a record stored twice"
    for item in items:
        if item["seq"] in acked:
            assert item["n"] == acked[item["seq"]]


class Workers(Proc):
    def __init__(self, pki, data: Path, dsn: str | None, workers: int = 2) -> None:
        data.mkdir(parents=True, exist_ok=True)
        store = ["--store", dsn] if dsn else []
        super().__init__(
            [
                str(BIN / "margo-controller"),
                "--certs",
                str(pki.dir),
                "--data",
                str(data),
                "--listen",
                "127.0.0.1:0",
                "--api",
                "127.0.0.1:0",
                "--log-format",
                "text",
                "--workers",
                str(workers),
                *store,
                *FAST,
            ],
            data / "controller.log",
        )
        self.data = data

    def wait_ready(self) -> dict:
        ready = self.data / "controller.json"
        info = wait_for(
            lambda: self.alive() and ready.exists() and json.loads(ready.read_text()),
            timeout=60,
            what=f"workers ready\n{self.log()[-3000:]}",
        )
        self.quic, self.api = info["quic"], info["api"]
        self.quic_port = int(self.quic.rsplit(":", 1)[1])
        return info


def stray_answers(port: int, cid: bytes, tries: int = 16) -> list[bytes]:
    """Send a short-header datagram for ``cid`` from ``tries`` fresh source ports; what came
    back (the worker holding the connection drops it: it does not decrypt)."""
    socks = []
    for _ in range(tries):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.sendto(b"\x40" + cid + os.urandom(60), ("127.0.0.1", port))
        socks.append(sock)
    answers = []
    deadline = time.monotonic() + 2.0
    for sock in socks:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            answers.append(sock.recv(2048))
        except TimeoutError:
            pass
        sock.close()
    return answers


def test_workers_refused_on_sqlite(pki, tmp_path):
    proc = Workers(pki, tmp_path / "data", None)
    assert proc.proc.wait(30) != 0
    proc.stop()
    assert "--workers 2 needs a store several processes can share" in proc.log()
    assert not (tmp_path / "data" / "controller.json").exists()


def test_two_workers_share_the_ports_and_a_push_reaches_devices_on_both(pki, tmp_path, pg_dsn):
    sup = Workers(pki, tmp_path / "data", pg_dsn)
    agents: list[Agent] = []
    try:
        info = sup.wait_ready()
        instances = set(info["instances"])
        assert len(instances) == 2 and len(info["workers"]) == 2
        assert len({w["pid"] for w in info["workers"]}) == 2
        token, tok = pki.token("acme"), pki.token_file("acme")
        api = Controller.__new__(Controller)  # the API of whichever worker the kernel picks
        api.api = sup.api
        api.log_tail = lambda: sup.log()[-3000:]  # type: ignore[method-assign]

        # many raw devices from distinct source ports: the kernel spreads them over both
        async def connect_many(n: int) -> list[str]:
            conns = []
            for k in range(n):
                ident = pki.device("acme", f"raw-{k}")
                conf = rawclient.configuration(pki.dir, ident / "cert.pem", ident / "key.pem")
                conn = await rawclient.open_connection(sup.quic_port, conf)
                assert isinstance(await rawclient.say_hello(conn, f"raw-{k}"), m.HelloAck)
                conns.append(conn)
            await anyio.sleep(0.5)
            holders = [holder_of(api, token, f"raw-{k}") for k in range(n)]
            # a datagram of conns[0] from other source ports: those the kernel hashes to the
            # other worker are answered with a stateless reset for that connection
            cid = conns[0].quic._peer_cid.cid  # the connection ID its worker issued
            token_ = ResetTokens(load_reset_key(sup.data)).token(cid)
            answers = stray_answers(sup.quic_port, cid)
            assert answers and all(a[-16:] == token_ for a in answers), answers
            for conn in conns:
                assert conn.closed is None, conn.closed  # nothing went astray otherwise
                conn.close(0, "done")
            return holders

        holders = anyio.run(connect_many, 16)
        assert set(holders) == instances, holders  # 2 / 2**16 to fail by chance
        # real agents until each worker holds one; then one apply reaches them all
        placed: dict[str, str] = {}
        for k in range(12):
            ident = pki.device("acme", f"w-{k}")
            agents.append(
                Agent(
                    ident, sup.quic, traversable_to(tmp_path / f"w-{k}"), extra=["--keepalive", "1"]
                )
            )
            placed[f"w-{k}"] = holder_of(api, token, f"w-{k}")
            if set(placed.values()) == instances:
                break
        assert set(placed.values()) == instances
        doc = write_doc(tmp_path, "SITE-W")
        targets = [a for d in placed for a in ("--device", d)]
        margoctl(api, tok, "apply", "-f", str(doc), *targets)
        for device in placed:
            wait_for(
                lambda d=device: (
                    (state_of(api, tok, d, "probe-1") or {}).get("manifestVersion") == 1
                ),
                what=f"{device} adopted version 1\n{sup.log()[-3000:]}",
            )
        # SIGHUP reaches every worker
        sup.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: sup.log().count("reloaded: tenants") == 2,
            what=f"both workers reloaded\n{sup.log()[-3000:]}",
        )
        # a worker killed is restarted; its devices come back
        victim = info["workers"][1]
        os.kill(victim["pid"], signal.SIGKILL)
        again = wait_for(
            lambda: (
                (i := json.loads((sup.data / "controller.json").read_text()))
                and len(i["workers"]) == 2
                and victim["pid"] not in {w["pid"] for w in i["workers"]}
                and i
            ),
            timeout=60,
            what=f"the worker restarted\n{sup.log()[-3000:]}",
        )
        assert len(set(again["instances"])) == 2
        for device in placed:
            wait_for(
                lambda d=device: (x := api.device(token, d)) and x["connected"],
                timeout=30,
                what=f"{device} connected again",
            )
    finally:
        for a in agents:
            a.stop()
        assert sup.stop() == 0, sup.log()[-3000:]
    assert not (tmp_path / "data" / "controller.json").exists()
