"""``margo-bench``: the benchmark scenarios, one subcommand each.

Each subcommand is a module with ``main(argv) -> int``, imported only when it is run, so a
scenario's dependencies (matplotlib, paho-mqtt, ...) cost nothing to the others.
"""

from __future__ import annotations

import importlib
import sys

PROG = "margo-bench"
OUR_PACKAGES = frozenset({"bench", "margo_stream", "controller", "agent"})

# subcommand -> ("module" or "module:function", one-line description); the function takes argv
SCENARIOS: dict[str, tuple[str, str]] = {
    "connect": (
        "bench.connect",
        "agents one controller holds: handshake rate vs bare aioquic, RSS and idle CPU",
    ),
    "handshake-rate": (
        "bench.handshake_rate",
        "QUIC handshakes/s with --quic-retry always against never, in the same run",
    ),
    "append": ("bench.append", "durable append rate of the agent's telemetry buffer"),
    "durable-hop": (
        "bench.durable_hop",
        "CPU and wall time a durable write's hop to a thread costs: the pool, an executor, inline",
    ),
    "quic-stacks": (
        "bench.quic_stacks",
        "a device's CPU for a push's packets, sans-IO: aioquic against qh3 (--quic-stack)",
    ),
    "delta": (
        "bench.delta",
        "bytes on the wire for a desired-state change (five files, one parameter)",
    ),
    "drain": (
        "bench.drain",
        "time to drain an offline telemetry backlog; push latency during it vs idle",
    ),
    "ingest": (
        "bench.ingest",
        "controller telemetry ingest rate with many agents replaying at once",
    ),
    "keystroke": (
        "bench.keystroke",
        "terminal keystroke round trip, idle and while telemetry drains",
    ),
    "run": (
        "bench.compare:run_main",
        "one transport scenario (connect, push, lossy, storm, drain) over one transport",
    ),
    "compare": (
        "bench.compare:compare_main",
        "one scenario over quic, rest-poll, h2-push, mqtt and tcp side by side, then the report",
    ),
    "store": (
        "bench.store_throughput",
        "status writes/s and telemetry records/s into PostgreSQL and SQLite, same run",
    ),
    "cluster": (
        "bench.cluster",
        "two controllers on one PostgreSQL: failover after kill -9, coordination CPU cost",
    ),
    "fallback": (
        "bench.fallback",
        "the real agent with UDP blocked: time to TCP, after a restart, and back to QUIC",
    ),
    "rollout": (
        "bench.rollout",
        "a staged rollout (1%,10%,100%, 1 s gates) over the fleet: total time against the gates",
    ),
    "report": ("bench.report", "markdown table and PNG plots from a run/compare directory"),
    "fuzz": (
        "bench.fuzz_channel",
        "mutation fuzzing of the frame decoder and ChannelCore (1,000,000 inputs by default)",
    ),
}


def usage() -> str:
    width = max(len(name) for name in SCENARIOS)
    lines = [
        f"usage: {PROG} <scenario> [options]   ({PROG} <scenario> --help for its options)",
        "",
        "scenarios:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SCENARIOS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SCENARIOS:
        print(f"{PROG}: unknown scenario {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, _, function = SCENARIOS[name][0].partition(":")
    try:
        module = importlib.import_module(module_name)
        return int(getattr(module, function or "main")(rest) or 0)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if not missing or missing in OUR_PACKAGES:
            raise
        print(
            f"{PROG}: {name} needs the Python package {missing!r}, which comes with the bench "
            "extra: pip install 'margo-stream[bench]' (or python3 dev.py test, which installs it)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
