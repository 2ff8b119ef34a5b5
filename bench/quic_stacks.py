"""``margo-bench quic-stacks``: the CPU a device's QUIC stack spends on a push's packets,
aioquic against qh3 (the agent's ``--quic-stack``), sans-IO, in one process.

Each round is a push's exchange as the bench's fan-out sees it: the controller's side
(aioquic, as the controller runs) opens a stream and sends 1,200 bytes with its end; the
device answers 250 bytes on it with its end and 150 bytes of status on its own stream; the
controller answers 20 bytes (the status ack). Between steps a fake clock advances in 1 ms
ticks (30 of them) with every timer served, so delayed ACKs leave as they would. Only the
device side's calls are timed (``time.process_time`` around every call into its stack: what
a device's packets cost it, not the bench loop nor the controller's side). The handshake
(server authentication only: neither stack is given a client certificate here) is not timed.

Reported per stack, medians of ``--runs``: device CPU per round, datagrams the device sent
and received per round, and CPU per datagram.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.report_util import machine_info, machine_line, markdown_table, median, write_report
from margo_stream.transport.qh3_connection import Qh3Configuration, Qh3QuicConnection

SCENARIO = "quic-stacks"
STACKS = ("aioquic", "qh3")
T = TypeVar("T")


def _certificates(where: Path) -> tuple[Path, Path, Path]:
    """A P-256 CA and a leaf it issued for ``localhost`` (the controller side's); returns the
    CA's, the leaf's and the leaf key's paths."""
    now = dt.datetime.now(dt.UTC)

    def build(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
        )
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        return b.sign(signer, hashes.SHA256())

    ca_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = build("bench CA", ca_key, "bench CA", ca_key, True)
    leaf = build("localhost", leaf_key, "bench CA", ca_key, False)
    paths = where / "ca.pem", where / "cert.pem", where / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class _Pair:
    """The controller's side (aioquic) and a device's side (``stack``), wired sans-IO."""

    CTL, DEV = ("127.0.0.1", 4433), ("127.0.0.1", 50000)

    def __init__(self, stack: str, ca: Path, cert: Path, key: Path) -> None:
        self.now = 1000.0
        self.cpu = 0.0  # the device side's CPU seconds (timed calls only)
        self.sent = self.received = 0  # the device side's datagrams
        if stack == "qh3":
            qconf = Qh3Configuration(
                is_client=True, alpn_protocols=["bench"], server_name="localhost"
            )
            qconf.load_verify_locations(cafile=str(ca))
            self.dev: Any = Qh3QuicConnection(configuration=qconf)
        else:
            aconf = QuicConfiguration(
                is_client=True, alpn_protocols=["bench"], server_name="localhost"
            )
            aconf.load_verify_locations(cafile=str(ca))
            self.dev = QuicConnection(configuration=aconf)
        self.dev.connect(self.CTL, now=self.now)
        first = self.dev.datagrams_to_send(now=self.now)
        sconf = QuicConfiguration(is_client=False, alpn_protocols=["bench"])
        sconf.load_cert_chain(str(cert), str(key))
        header_dcid = first[0][0][6 : 6 + first[0][0][5]]  # long header: DCID length, DCID
        self.ctl = QuicConnection(
            configuration=sconf, original_destination_connection_id=header_dcid
        )
        for data, _ in first:
            self.ctl.receive_datagram(data, self.DEV, now=self.now)
        done = False
        for _ in range(100):
            self.pump()
            self.tick()
            while (event := self.dev.next_event()) is not None:
                done = done or type(event).__name__ == "HandshakeCompleted"
        if not done:
            raise RuntimeError(f"{stack}: no handshake with the controller's side")
        self.drain(self.ctl)
        self.status_stream = self.dev.get_next_available_stream_id()

    def timed(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        t0 = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            self.cpu += time.process_time() - t0

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for data, _ in self.timed(self.dev.datagrams_to_send, now=self.now):
                self.sent += 1
                self.ctl.receive_datagram(data, self.DEV, now=self.now)
                moved = True
            for data, _ in self.ctl.datagrams_to_send(now=self.now):
                self.received += 1
                self.timed(self.dev.receive_datagram, data, self.CTL, now=self.now)
                moved = True

    def tick(self, seconds: float = 0.001) -> None:
        self.now += seconds
        due = self.timed(self.dev.get_timer)
        if due is not None and due <= self.now:
            self.timed(self.dev.handle_timer, now=self.now)
        due = self.ctl.get_timer()
        if due is not None and due <= self.now:
            self.ctl.handle_timer(now=self.now)
        self.pump()

    def drain(self, side: Any) -> int:
        got = 0
        call = self.timed if side is self.dev else (lambda fn: fn())
        while (event := call(side.next_event)) is not None:
            got += len(getattr(event, "data", b""))
        return got

    def round(self) -> None:
        sid = self.ctl.get_next_available_stream_id()
        self.ctl.send_stream_data(sid, b"p" * 1200, end_stream=True)  # the push
        self.pump()
        self.drain(self.dev)
        self.timed(self.dev.send_stream_data, sid, b"a" * 250, end_stream=True)  # its answer
        self.timed(self.dev.send_stream_data, self.status_stream, b"s" * 150)  # the status
        self.pump()
        self.drain(self.ctl)
        self.ctl.send_stream_data(self.status_stream, b"k" * 20)  # the status ack
        self.pump()
        self.drain(self.dev)
        for _ in range(30):
            self.tick()


def measure(stack: str, rounds: int, certs: tuple[Path, Path, Path]) -> dict[str, Any]:
    pair = _Pair(stack, *certs)
    for _ in range(20):  # warm up
        pair.round()
    pair.cpu, pair.sent, pair.received = 0.0, 0, 0
    for _ in range(rounds):
        pair.round()
    datagrams = pair.sent + pair.received
    return {
        "stack": stack,
        "cpu_us_per_round": 1e6 * pair.cpu / rounds,
        "sent_per_round": pair.sent / rounds,
        "received_per_round": pair.received / rounds,
        "cpu_us_per_datagram": 1e6 * pair.cpu / max(datagrams, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"margo-bench {SCENARIO}", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3000, help="push exchanges per stack and run")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench-results") / SCENARIO)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.runs < 1:
        p.error("--rounds and --runs must be at least 1")
    runs: list[list[dict[str, float | str]]] = []
    with tempfile.TemporaryDirectory(prefix="margo-quic-stacks-") as tmp:
        certs = _certificates(Path(tmp))
        for r in range(args.runs):
            order = STACKS if r % 2 == 0 else tuple(reversed(STACKS))
            runs.append([measure(stack, args.rounds, certs) for stack in order])
            line = ", ".join(f"{x['stack']} {x['cpu_us_per_round']:.1f} us" for x in runs[-1])
            print(f"run {r + 1}/{args.runs}: device CPU per round: {line}", file=sys.stderr)
    summary = {
        stack: {
            k: median(float(x[k]) for run in runs for x in run if x["stack"] == stack) or 0.0
            for k in ("cpu_us_per_round", "sent_per_round", "received_per_round")
        }
        for stack in STACKS
    }
    for s in summary.values():
        s["cpu_us_per_datagram"] = s["cpu_us_per_round"] / (
            s["sent_per_round"] + s["received_per_round"]
        )
    base = summary["aioquic"]["cpu_us_per_round"]
    machine = machine_info(("aioquic", "qh3", "cryptography"))
    command = "margo-bench " + " ".join([SCENARIO, *(argv if argv is not None else sys.argv[1:])])
    table = markdown_table(
        [
            "device stack",
            "CPU us per push round",
            "datagrams sent",
            "datagrams received",
            "CPU us per datagram",
            "against aioquic",
        ],
        [
            (
                stack,
                s["cpu_us_per_round"],
                f"{s['sent_per_round']:.2f}",
                f"{s['received_per_round']:.2f}",
                s["cpu_us_per_datagram"],
                f"{s['cpu_us_per_round'] / base:.2f}x",
            )
            for stack, s in summary.items()
        ],
    )
    blocks = [
        f"Machine: {machine_line(machine)}; {machine['date']}.",
        f"```\n{command}\n```",
        f"{args.rounds} push rounds per stack and run, medians of {args.runs} runs:",
        table,
    ]
    data = {"machine": machine, "command": command, "runs": runs, "summary": summary}
    json_path, md_path = write_report(
        args.out, SCENARIO, data, "QUIC stacks: a push's packets", blocks
    )
    print(table, end="")
    print(f"wrote {json_path}\nwrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
