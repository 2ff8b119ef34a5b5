#!/usr/bin/env python3
"""The project's two entry points, on a fresh machine with only python3:

    python3 dev.py demo   # controller + agents on the embedded SQLite store, sample deployment
    python3 dev.py test   # the whole test suite

Each creates .venv (if missing or out of date) and installs what it needs by itself.
"""

from __future__ import annotations

import hashlib
import os
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
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "-e", f"{ROOT}[bench,test]"], check=True)
    STAMP.write_text(want)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test"):
        print(__doc__.strip())
        return 2
    ensure_venv()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if sys.argv[1] == "test":
        args = sys.argv[2:] or ["-q", "-p", "no:cacheprovider"]
        return subprocess.run([str(BIN / "python"), "-m", "pytest", *args], cwd=ROOT, env=env).returncode
    return subprocess.run([str(BIN / "python"), "-m", "bench.demo", *sys.argv[2:]], cwd=ROOT,
                          env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
