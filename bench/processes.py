"""The bench's child processes: the CPU split between server and clients, the handle on one
JSON-lines worker process (commands in, events out), waiting for a server's ready file and
stopping a server. Used by ``margo-bench connect`` and the transport fleet."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any


def cpu_split() -> tuple[set[int], set[int]]:
    """(server CPUs, client CPUs): the server gets the first usable core to itself."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    return {cpus[0]}, set(cpus[1:])


class Worker:
    """One worker process (``bench.simfleet``, ``bench.fleet_worker``) speaking JSON lines,
    and what it reported."""

    def __init__(self, proc: asyncio.subprocess.Process, index: int) -> None:
        self.proc = proc
        self.index = index
        self.connected = 0
        self.gave_up = 0
        self.failures = 0
        self.ready: dict[str, Any] | None = None
        self.ramped: dict[str, Any] | None = None
        self.events: dict[str, asyncio.Queue[dict[str, Any]]] = {
            name: asyncio.Queue() for name in ("ready", "ramped", "status", "stopped")
        }
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.get("ev")
            if kind == "progress":
                self.connected = event["connected"]
                self.gave_up = event["gave_up"]
                self.failures = event["failures"]
            elif kind in self.events:
                if kind == "ramped":
                    self.connected = len(event["times"])
                    self.gave_up = event["gave_up"]
                    self.failures = event["failures"]
                self.events[kind].put_nowait(event)

    async def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()

    async def wait(self, kind: str, timeout: float) -> dict[str, Any]:
        getter = asyncio.ensure_future(self.events[kind].get())
        died = asyncio.ensure_future(self.proc.wait())
        done, _ = await asyncio.wait(
            {getter, died}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if getter in done:
            died.cancel()
            return getter.result()
        getter.cancel()
        died.cancel()
        what = (
            f"exited with {self.proc.returncode}"
            if died in done
            else f"no '{kind}' in {timeout:.0f} s"
        )
        raise RuntimeError(f"worker {self.index} {what} (see its log)")

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.send("stop")
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.reader.cancel()


def program(proc: subprocess.Popen[bytes]) -> str:
    """The program ``proc`` runs: the first word of its command line."""
    args = proc.args
    if isinstance(args, str | bytes | os.PathLike):
        return os.fsdecode(args)
    return os.fsdecode(args[0])


def wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{program(proc)} exited with {proc.returncode} (see its log)")
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text())
        time.sleep(0.05)
    raise RuntimeError(f"{path} did not appear within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
