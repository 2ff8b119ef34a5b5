"""A private tinyproxy (Debian's package, installed by ``dev.py test``) for the proxy tests: its
own configuration file in a temporary directory, a free loopback port, stopped by its pid."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Tinyproxy:
    """``with Tinyproxy(tmp) as proxy:`` -> ``proxy.url``; ``auth=("user", "pass")`` requires
    basic credentials, ``connect_ports`` limits the ports CONNECT may reach (403 otherwise)."""

    def __init__(
        self,
        directory: Path,
        *,
        auth: tuple[str, str] | None = None,
        connect_ports: tuple[int, ...] = (),
    ) -> None:
        if not Path(TINYPROXY).exists():
            pytest.skip("tinyproxy is not installed (dev.py test installs Debian's package)")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.auth = auth
        self.connect_ports = connect_ports
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "tinyproxy.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _config(self, port: int) -> str:
        lines = [
            f"Port {port}",
            "Listen 127.0.0.1",
            "Timeout 60",
            "MaxClients 50",
            "LogLevel Info",
            f'PidFile "{self.dir / "tinyproxy.pid"}"',
            "Allow 127.0.0.1",
            "DisableViaHeader Yes",
        ]
        if self.auth is not None:
            lines.append(f"BasicAuth {self.auth[0]} {self.auth[1]}")
        lines += [f"ConnectPort {p}" for p in self.connect_ports]
        return "\n".join(lines) + "\n"

    def start(self) -> Tinyproxy:
        for _ in range(5):  # a free port can be taken between the probe and tinyproxy's bind
            port = _free_tcp_port()
            conf = self.dir / "tinyproxy.conf"
            conf.write_text(self._config(port))
            log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the process
            self.proc = subprocess.Popen(
                [TINYPROXY, "-d", "-c", str(conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _accepts(port):
                    self.port = port
                    return self
                time.sleep(0.05)
            self.stop()
        raise AssertionError(f"tinyproxy did not start\n{self.log()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> Tinyproxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
