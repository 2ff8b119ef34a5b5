"""``margo-bench``: the benchmark scenarios, one subcommand each.

Each subcommand is a module with ``main(argv) -> int``, imported only when it is run, so a
scenario's dependencies (matplotlib, paho-mqtt, ...) cost nothing to the others.
"""

from __future__ import annotations

import importlib
import sys

PROG = "margo-bench"

# subcommand -> (module, one-line description)
SCENARIOS: dict[str, tuple[str, str]] = {
    "connect": ("bench.connect",
                "agents one controller holds: handshake rate vs bare aioquic, RSS and idle CPU"),
    "append": ("bench.append", "durable append rate of the agent's telemetry buffer"),
}


def usage() -> str:
    width = max(len(name) for name in SCENARIOS)
    lines = [f"usage: {PROG} <scenario> [options]   ({PROG} <scenario> --help for its options)",
             "", "scenarios:"]
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
    module = importlib.import_module(SCENARIOS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
