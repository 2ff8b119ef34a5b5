"""Userspace network impairment relays for tests and the transport bench.

The kernel here has no netem, so links are impaired in userspace: a client talks to the relay,
the relay talks to the real server, and in between it drops, delays, jitters, reorders or
blackholes traffic, with seeded randomness so a run can be repeated.

- :class:`~bench.relay_udp.UdpRelay`: datagrams (QUIC). NAT-like, one upstream socket per
  client address; loss, delay, jitter, reorder, blackhole.
- :class:`~bench.relay_tcp.TcpRelay`: connections (HTTP/2, REST, MQTT). Delay and jitter per
  chunk with order preserved; loss emulated as TCP experiences it (a retransmission timeout
  and head-of-line blocking, no dropped bytes); blackhole as a stall; ``reset_all()``.
- :class:`~bench.impairment.Impairment`: the validated settings both relays take.

Use inside an anyio task group or anywhere on asyncio::

    async with UdpRelay(target=("127.0.0.1", port), impairment=Impairment(loss=0.02)) as relay:
        connect_to(relay.address)
        relay.blackhole(True)
        ...
        print(relay.stats().to_dict())

Command line (stats are printed as JSON on exit, Ctrl-C or SIGTERM)::

    python -m bench.relay udp --listen 127.0.0.1:4433 --target 127.0.0.1:4434 \\
        --loss 0.02 --delay-ms 50 --seed 1
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence

import anyio

from .impairment import Direction, DirectionStats, Impairment, ImpairmentError, Link
from .relay_tcp import TcpRelay, TcpRelayStats
from .relay_udp import UdpRelay, UdpRelayStats

__all__ = [
    "Direction",
    "DirectionStats",
    "Impairment",
    "ImpairmentError",
    "Link",
    "TcpRelay",
    "TcpRelayStats",
    "UdpRelay",
    "UdpRelayStats",
    "main",
]


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65_535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.relay",
        description="Userspace UDP/TCP impairment relay (loss, delay, jitter, reorder).",
    )
    p.add_argument("protocol", choices=("udp", "tcp"))
    p.add_argument("--listen", type=_address, default=("127.0.0.1", 0), help="HOST:PORT")
    p.add_argument("--target", type=_address, required=True, help="HOST:PORT")
    p.add_argument("--loss", type=float, default=0.0, help="drop probability 0..1")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +- spread of the delay")
    p.add_argument("--reorder", type=float, default=0.0, help="hold-back probability (UDP)")
    p.add_argument("--rto-ms", type=float, default=None, help="TCP loss penalty")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--blackhole", action="store_true", help="start with the link dead")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    return p


async def _run(args: argparse.Namespace, impairment: Impairment) -> dict[str, object]:
    relay: UdpRelay | TcpRelay
    if args.protocol == "udp":
        relay = UdpRelay(args.listen, args.target, impairment)
    else:
        relay = TcpRelay(args.listen, args.target, impairment)
    async with relay, anyio.create_task_group() as tg:
        host, port = relay.address
        print(
            f"relay {args.protocol} {host}:{port} -> {args.target[0]}:{args.target[1]}"
            f" seed={relay.seed} {json.dumps(impairment.to_dict())}",
            flush=True,
        )

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(stop_on_signal)
        if args.duration is not None:
            await anyio.sleep(args.duration)
            tg.cancel_scope.cancel()
        stats: dict[str, object] = {}
        try:
            await anyio.sleep_forever()
        finally:
            stats.update(relay.stats().to_dict())
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """Run one relay until interrupted; print its stats as JSON on exit."""
    args = _parser().parse_args(argv)
    try:
        impairment = Impairment(
            loss=args.loss,
            delay_ms=args.delay_ms,
            jitter_ms=args.jitter_ms,
            reorder=args.reorder,
            seed=args.seed,
            blackhole=args.blackhole,
            rto_ms=args.rto_ms,
        )
    except ImpairmentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        stats = anyio.run(_run, args, impairment, backend="asyncio")
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
