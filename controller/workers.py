"""``margo-controller --workers N``: N controller processes on one host, sharing its ports.

Theory of operation
-------------------
Each worker is a whole controller (``controller.service.Controller``): its own QUIC endpoint,
operator API, instance id and device leases in the cluster on the PostgreSQL store. They
share the ports through SO_REUSEPORT: the kernel hashes each UDP datagram's 4-tuple to one of
the sockets bound to the QUIC port, so a device's packets keep reaching the process that holds
its connection; the operator API's TCP connections are spread the same way. A datagram that
reaches another worker (the group changed when a worker died or started, a device's address
changed) names a connection that worker does not know: it answers with a stateless reset
(``margo_stream.transport.stateless_reset``; every worker derives the tokens from the same
key in the data directory, created here before any worker starts), and the agent reconnects
at once. Nothing is dropped silently.

The parent supervises: it starts worker 0 on the ports given (a port 0 becomes a real one),
then the others on the ports worker 0 got; restarts a worker that dies; passes SIGTERM/SIGINT
(stop) and SIGHUP (reload) on; and writes the ready file (``DATA/controller.json``) listing
the ports and the workers once all are ready. Workers write theirs to
``DATA/controller.worker-<i>.json``. The SQLite store is one process's: ``--workers`` above 1
needs ``--store postgresql://...``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.cluster import is_postgres
from controller.config import ControllerConfig
from margo_stream.errors import ConfigError
from margo_stream.fsutil import atomic_write
from margo_stream.transport.stateless_reset import load_reset_key

log = logging.getLogger("margo.controller.workers")

WORKER_ENV = "MARGO_CONTROLLER_WORKER"  # set in a worker's environment: its index
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
RESTART_DELAY = (0.5, 30.0)  # first and longest pause before a crashed worker is restarted


# --- in a worker -----------------------------------------------------------------------------------
def worker_index() -> int | None:
    """This process's index when it is a worker of ``--workers``, else None."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None and value.isdigit() else None


def ready_file(config: ControllerConfig) -> Path:
    """Where this controller says it is ready (a worker: its own file beside the parent's)."""
    index = worker_index()
    if index is None:
        return config.ready_file
    return config.data / f"controller.worker-{index}.json"


def shares_ports() -> bool:
    """Whether this controller's sockets join a SO_REUSEPORT group (it is a worker)."""
    return worker_index() is not None


def tcp_socket(family: socket.AddressFamily) -> socket.socket:
    """The operator API's listening socket (in a worker: one of the group on its port)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shares_ports():
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def split_workers(argv: list[str]) -> tuple[int, list[str]]:
    """``--workers N`` (or ``--workers=N``) taken out of ``argv``: (N, the rest); N is 1 when
    absent. ``ConfigError`` for a value that is not a positive integer."""
    rest: list[str] = []
    workers = "1"
    items = iter(argv)
    for arg in items:
        if arg == "--workers":
            workers = next(items, "")
        elif arg.startswith("--workers="):
            workers = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if not workers.isdigit() or int(workers) < 1:
        raise ConfigError(f"--workers {workers!r}: expected a positive number of processes")
    return int(workers), rest


def check_workers(workers: int, store: str | None) -> None:
    if workers > 1 and not is_postgres(store):
        raise ConfigError(
            f"--workers {workers} needs a store several processes can share: give --store "
            "postgresql://USER@HOST:PORT/DB (the SQLite store in --data is one process's)"
        )


# --- the parent ----------------------------------------------------------------------------------
class _Worker:
    def __init__(self, index: int, ready: Path) -> None:
        self.index = index
        self.ready = ready
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] | None = None
        self.restarts = 0
        self.restart_at: float | None = None


class Supervisor:
    """Starts, watches and stops the workers (see the module note)."""

    def __init__(self, workers: int, config: ControllerConfig, argv: list[str]) -> None:
        self.config = config
        self.argv = argv  # the controller's arguments, --workers taken out
        self.ports: list[str] = []  # --listen/--api the workers after the first are given
        self.workers = [
            _Worker(i, config.data / f"controller.worker-{i}.json") for i in range(workers)
        ]
        self._stop = False
        self._reload = False

    # --- processes ---------------------------------------------------------------------------------
    def _spawn(self, worker: _Worker) -> None:
        worker.ready.unlink(missing_ok=True)
        worker.info = None
        worker.proc = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", *self.argv, *self.ports],
            env={**os.environ, WORKER_ENV: str(worker.index)},
        )
        log.info("worker %d started: pid %d", worker.index, worker.proc.pid)

    def _ready(self, worker: _Worker) -> bool:
        if worker.info is not None:
            return True
        assert worker.proc is not None
        try:
            info = json.loads(worker.ready.read_text())
        except (OSError, ValueError):
            return False
        if info.get("pid") != worker.proc.pid:
            return False
        worker.info = info
        return True

    def _wait_ready(self, workers: list[_Worker]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(self._ready(w) for w in workers):
            for w in workers:
                assert w.proc is not None
                if w.proc.poll() is not None:
                    raise ConfigError(
                        f"worker {w.index} exited with status {w.proc.returncode} at start"
                    )
            if self._stop:
                return
            if time.monotonic() > deadline:
                raise ConfigError(f"workers not ready after {READY_TIMEOUT:.0f}s")
            time.sleep(0.05)

    def _write_ready(self) -> None:
        first = self.workers[0].info or {}
        info = {
            "quic": first.get("quic"),
            "api": first.get("api"),
            **({"tcp": first["tcp"]} if first.get("tcp") else {}),
            "pid": os.getpid(),
            "started": time.time(),
            "instances": [w.info.get("instance") for w in self.workers if w.info],
            "workers": [
                {"index": w.index, "pid": w.info.get("pid"), "instance": w.info.get("instance")}
                for w in self.workers
                if w.info
            ],
        }
        atomic_write(self.config.ready_file, json.dumps(info).encode())

    # --- life ----------------------------------------------------------------------------------------
    def run(self) -> int:
        check_workers(len(self.workers), self.config.store)
        self.config.data.mkdir(parents=True, exist_ok=True)
        self.config.ready_file.unlink(missing_ok=True)
        load_reset_key(self.config.data)  # one stateless-reset key for every worker
        handlers = self._signals()
        try:
            first = self.workers[0]
            self._spawn(first)
            self._wait_ready([first])
            if first.info is not None:
                # the others join the ports the first one bound (a port 0 is now a real one)
                host, port = str(first.info["quic"]).rsplit(":", 1)
                api_host_port = str(first.info["api"]).split("://", 1)[1]
                self.ports = ["--listen", f"{host}:{port}", "--api", api_host_port]
                if first.info.get("tcp"):  # --tcp-listen: the same SO_REUSEPORT group
                    self.ports += ["--tcp-listen", str(first.info["tcp"])]
            for worker in self.workers[1:]:
                self._spawn(worker)
            self._wait_ready(self.workers)
            if not self._stop:
                self._write_ready()
                log.info(
                    "%d workers ready: quic %s, api %s",
                    len(self.workers),
                    first.info and first.info["quic"],
                    first.info and first.info["api"],
                    extra={"event": "workers-ready"},
                )
            self._watch()
        finally:
            self._stop_all()
            self.config.ready_file.unlink(missing_ok=True)
            for sig, old in handlers.items():
                signal.signal(sig, old)
        return 0

    def _signals(self) -> dict[int, Any]:
        def stop(_sig: int, _frame: object) -> None:
            self._stop = True

        def reload(_sig: int, _frame: object) -> None:
            self._reload = True

        wanted: dict[int, Callable[[int, object], None]] = {
            signal.SIGTERM: stop,
            signal.SIGINT: stop,
            signal.SIGHUP: reload,
        }
        return {sig: signal.signal(sig, handler) for sig, handler in wanted.items()}

    def _watch(self) -> None:
        while not self._stop:
            if self._reload:
                self._reload = False
                self._signal_all(signal.SIGHUP)
            changed = False
            for worker in self.workers:
                changed |= self._tend(worker)
            if changed and all(w.info is not None for w in self.workers):
                self._write_ready()
            time.sleep(0.1)

    def _tend(self, worker: _Worker) -> bool:
        """Restart ``worker`` if it died (after a pause that grows while it keeps dying);
        whether its ready state changed."""
        proc = worker.proc
        assert proc is not None
        now = time.monotonic()
        if worker.restart_at is not None:
            if now < worker.restart_at:
                return False
            worker.restart_at = None
            self._spawn(worker)
            return False
        if proc.poll() is not None:
            delay = min(RESTART_DELAY[0] * 2**worker.restarts, RESTART_DELAY[1])
            worker.restarts += 1
            worker.restart_at = now + delay
            worker.info = None
            log.warning(
                "worker %d (pid %d) exited with status %s; restarting it in %.1fs",
                worker.index,
                proc.pid,
                proc.returncode,
                delay,
                extra={"event": "worker-died", "worker": worker.index},
            )
            return True
        if worker.info is None and self._ready(worker):
            log.info("worker %d ready again", worker.index, extra={"event": "worker-ready"})
            return True
        return False

    def _signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.proc.send_signal(sig)

    def _stop_all(self) -> None:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in self.workers:
            if worker.proc is None:
                continue
            try:
                worker.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait(5)


def supervise(prog: str, workers: int, config: ControllerConfig, argv: list[str]) -> int:
    """Run ``workers`` controller processes (``argv``: the controller's arguments without
    ``--workers``); the exit status. ``margo-controller`` calls this for ``--workers`` > 1."""
    from margo_stream.cli.common import fail

    try:
        return Supervisor(workers, config, argv).run()
    except ConfigError as exc:
        return fail(prog, str(exc))


__all__ = [
    "WORKER_ENV",
    "check_workers",
    "ready_file",
    "shares_ports",
    "split_workers",
    "supervise",
    "tcp_socket",
    "worker_index",
]
