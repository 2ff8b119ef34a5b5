#!/usr/bin/env python3
"""The project's two entry points, on a fresh machine with only python3:

    python3 dev.py demo   # controller + agents on the embedded SQLite store, sample deployment
    python3 dev.py test   # lint, format and type checks, then the whole test suite

Each creates .venv (if missing or out of date) and installs what it needs by itself.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".margo-installed"


def ensure_venv() -> None:
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == want and (BIN / "python").exists():
        return
    if not (BIN / "python").exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing margo-stream and its dependencies into .venv ...", flush=True)
    subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-e",
            f"{ROOT}[bench,test]",
        ],
        check=True,
    )
    STAMP.write_text(want)


def apt_install(package: str, purpose: str, otherwise: str) -> None:
    """Install Debian's ``package`` when we can (root with apt), saying what it is for;
    otherwise print ``otherwise`` (what happens to the tests that need it)."""
    import shutil

    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"note: {package} is not installed; {otherwise}", flush=True)
        return
    print(f"installing {package} (Debian package) for {purpose} ...", flush=True)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    install = ["apt-get", "install", "-y", "-q", package]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    ok = subprocess.run(install, env=env, **quiet).returncode == 0
    if not ok:
        subprocess.run(["apt-get", "update", "-q"], env=env, **quiet)
        ok = subprocess.run(install, env=env, **quiet).returncode == 0
    if not ok:
        print(f"note: could not install {package}; {otherwise}", flush=True)


def ensure_mosquitto() -> None:
    """The transport bench and its conformance test run a real Mosquitto broker (Debian's
    package). Install it when we can (root with apt); otherwise those tests say why they skip."""
    import shutil

    if shutil.which("mosquitto") or os.path.exists("/usr/sbin/mosquitto"):
        return
    apt_install("mosquitto", "the MQTT transport", "the MQTT transport tests will be skipped")


def ensure_postgresql() -> None:
    """The PostgreSQL store's tests start a private server (tests/pg_server.py) from Debian's
    package. Install it when we can (root with apt); otherwise those tests fail saying why."""
    import glob
    import shutil

    if glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb"):
        return
    apt_install(
        "postgresql", "the PostgreSQL store", "the PostgreSQL store tests will fail (no initdb)"
    )


def ensure_tinyproxy() -> None:
    """The TCP carrier's proxy tests start a private tinyproxy (Debian's package) with their own
    configuration. Install it when we can (root with apt); otherwise those tests say why they
    skip."""
    import shutil

    if shutil.which("tinyproxy") or os.path.exists("/usr/bin/tinyproxy"):
        return
    apt_install("tinyproxy", "the HTTP proxy tests", "the HTTP proxy tests will be skipped")


def ensure_prometheus() -> None:
    """The metrics tests start a private Prometheus server (Debian's package, its own
    configuration in a temporary directory) that scrapes the controller and an agent. Install
    it when we can (root with apt); otherwise those tests say why they skip."""
    import shutil

    if shutil.which("prometheus") or os.path.exists("/usr/bin/prometheus"):
        return
    apt_install("prometheus", "the metrics tests", "the Prometheus scrape test will be skipped")


def ensure_browser() -> None:
    """The web console's tests drive a real headless Chromium with Playwright. Playwright's own
    build comes from a CDN that may be unreachable: try it, else install Debian's chromium
    (tests/console_browser.py uses whichever exists; without either those tests skip)."""
    import glob
    import shutil

    if glob.glob(os.path.expanduser("~/.cache/ms-playwright/chromium*/chrome-linux*/chrome")):
        return
    if shutil.which("chromium") or os.path.exists("/usr/lib/chromium/chromium"):
        return
    print("installing Playwright's Chromium for the console tests ...", flush=True)
    try:
        fetched = subprocess.run(
            [str(BIN / "python"), "-m", "playwright", "install", "chromium"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        fetched = None
    if fetched is None or fetched.returncode != 0:
        apt_install("chromium", "the web console tests", "the console tests will be skipped")


# Run before pytest by `dev.py test`; each must pass for the command to succeed.
CHECKS = {
    "lint (ruff check)": ["ruff", "check", "."],
    "format (ruff format --check)": ["ruff", "format", "--check", "."],
    "types (mypy, [tool.mypy] in pyproject.toml)": ["mypy"],
}


def run_tests(env: dict[str, str], pytest_args: list[str]) -> int:
    """Every check, then pytest, all of them even after a failure; non-zero if any failed."""
    failed = []
    steps = {name: [str(BIN / "python"), "-m", *cmd] for name, cmd in CHECKS.items()}
    steps["tests (pytest)"] = [str(BIN / "python"), "-m", "pytest", *pytest_args]
    for name, cmd in steps.items():
        print(f"== {name}", flush=True)
        if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
            print(f"FAILED: {name}", flush=True)
            failed.append(name)
    if failed:
        print("failed checks: " + ", ".join(failed), flush=True)
        return 1
    return 0


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test"):
        print(__doc__.strip())
        return 2
    ensure_venv()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if sys.argv[1] == "test":
        ensure_mosquitto()
        ensure_postgresql()
        ensure_tinyproxy()
        ensure_prometheus()
        ensure_browser()
        return run_tests(env, sys.argv[2:] or ["-q", "-p", "no:cacheprovider"])
    demo = subprocess.Popen(
        [str(BIN / "python"), "-m", "bench.demo", *sys.argv[2:]], cwd=ROOT, env=env
    )
    # a SIGTERM to this script (a supervisor, `timeout`) stops the demo's controller and agents
    # too, as Ctrl-C does; the demo handles both signals itself
    signal.signal(signal.SIGTERM, lambda signum, _frame: demo.send_signal(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: demo.send_signal(signum))
    return demo.wait()


if __name__ == "__main__":
    raise SystemExit(main())
