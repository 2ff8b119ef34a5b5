"""The main job in one command: a controller and three agents on the embedded SQLite store,
the sample deployment applied, telemetry flowing. ``python3 dev.py demo`` runs it; it keeps
running (Ctrl-C stops everything cleanly) unless ``--once`` is given.

Everything lives under ``run/demo/``: the PKI, the controller's store, each agent's state.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from bench.report_util import poll_until
from margo_stream.identity.pki import init_pki, issue_device

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEVICES = [
    ("acme", "press-01", "line=1"),
    ("acme", "press-02", "line=2"),
    ("globex", "mixer-01", "line=7"),
]


def _free(kind: int, port: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dev.py demo", description=__doc__)
    p.add_argument("--dir", type=Path, default=ROOT / "run" / "demo")
    p.add_argument("--once", action="store_true", help="show everything, then stop")
    p.add_argument("--fresh", action="store_true", help="start from an empty run directory")
    args = p.parse_args(argv)
    base: Path = args.dir
    if args.fresh and base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True, exist_ok=True)
    certs = base / "certs"
    _say(f"PKI for tenants acme and globex in {certs}")
    init_pki(certs, ["acme", "globex"], ["localhost", "127.0.0.1"])
    for tenant, device, _ in DEVICES:
        # a fresh identity every start: an older demo directory's identities may predate what
        # the controller now requires of them (the root key, the allow-list)
        issue_device(certs, tenant, device)

    quic, api = _free(socket.SOCK_DGRAM, 4433), _free(socket.SOCK_STREAM, 8080)
    logs = base / "logs"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen] = []

    def spawn(name: str, argv: list[str]) -> subprocess.Popen:
        # this process blocks SIGINT/SIGTERM (it waits for them with sigwait); its children
        # must not inherit that mask, or they would ignore the SIGTERM that stops them
        proc = subprocess.Popen(
            argv,
            stdout=open(logs / f"{name}.log", "ab"),
            stderr=subprocess.STDOUT,
            preexec_fn=_unblock_signals,
        )
        procs.append(proc)
        return proc

    env = {**os.environ, "MARGO_API": f"http://127.0.0.1:{api}"}
    try:
        _say(f"controller: QUIC on 127.0.0.1:{quic}, operator API on http://127.0.0.1:{api}")
        (base / "data" / "controller.json").unlink(missing_ok=True)  # a killed run's
        spawn(
            "controller",
            [
                str(BIN / "margo-controller"),
                "--certs",
                str(certs),
                "--data",
                str(base / "data"),
                "--listen",
                f"127.0.0.1:{quic}",
                "--api",
                f"127.0.0.1:{api}",
                "--log-format",
                "text",
            ],
        )
        poll_until(lambda: (base / "data" / "controller.json").exists(), 20, "the controller")
        for tenant, device, label in DEVICES:
            _say(f"agent {tenant}/{device}")
            spawn(
                device,
                [
                    str(BIN / "margo-agent"),
                    "--identity",
                    str(certs / tenant / "devices" / device),
                    "--controller",
                    f"127.0.0.1:{quic}",
                    "--state",
                    str(base / "agents" / device),
                    "--label",
                    label,
                    "--metrics-interval",
                    "5",
                    "--log-format",
                    "text",
                ],
            )

        def ctl(tenant: str, *cmd: str, check: bool = True) -> str:
            r = subprocess.run(
                [
                    str(BIN / "margoctl"),
                    "--token-file",
                    str(certs / tenant / "operator.token"),
                    *cmd,
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
            if check and r.returncode != 0:
                raise SystemExit(f"demo: margoctl {' '.join(cmd)} failed: {r.stderr.strip()}")
            return r.stdout

        def all_connected() -> bool:
            for t in ("acme", "globex"):
                listing = ctl(t, "get", "devices", "-o", "json", check=False)
                if not listing or not all(d["connected"] for d in json.loads(listing)):
                    return False
            return True

        poll_until(all_connected, 30, "all agents to connect")
        print(ctl("acme", "get", "devices"), end="")
        sample = ROOT / "examples" / "process-heartbeat.yaml"
        _say(f"apply {sample.relative_to(ROOT)} to the acme devices")
        for _, device, _ in DEVICES[:2]:
            print(ctl("acme", "apply", "-f", str(sample), "--device", device), end="")
        poll_until(
            lambda: (
                all(
                    d["state"] == "installed"
                    for d in json.loads(ctl("acme", "get", "deployments", "-o", "json"))
                )
                and json.loads(ctl("acme", "get", "deployments", "-o", "json"))
            ),
            30,
            "the deployment to be installed",
        )
        print(ctl("acme", "get", "deployments"), end="")
        _say("a producer on press-01 writes telemetry through the agent's socket")
        for i in range(3):
            subprocess.run(
                [
                    str(BIN / "margo-agent"),
                    "emit",
                    "--state",
                    str(base / "agents" / "press-01"),
                    "--stream",
                    "demo.temperature",
                    json.dumps({"celsius": 20.5 + i}),
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )
        poll_until(
            lambda: (
                len(
                    json.loads(
                        ctl(
                            "acme",
                            "get",
                            "telemetry",
                            "--device",
                            "press-01",
                            "--stream",
                            "demo.temperature",
                            "-o",
                            "json",
                        )
                    )
                )
                >= 3
            ),
            20,
            "telemetry",
        )
        print(
            ctl("acme", "get", "telemetry", "--device", "press-01", "--stream", "demo.temperature"),
            end="",
        )
        _say("globex's operator sees only globex devices:")
        print(ctl("globex", "get", "devices"), end="")
        print(
            f"\nTry it yourself:\n  export MARGO_API=http://127.0.0.1:{api} "
            f"MARGO_TOKEN_FILE={certs / 'acme' / 'operator.token'}\n"
            f"  {BIN / 'margoctl'} get devices\n  {BIN / 'margoctl'} watch\n"
            f"Logs: {logs}\n",
            flush=True,
        )
        if not args.once:
            _say("running; Ctrl-C stops the controller and agents")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except TimeoutError as exc:
        print(f"demo: {exc}; see the logs in {logs}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    _say("stopped")
    return 0


def _unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    raise SystemExit(main())
