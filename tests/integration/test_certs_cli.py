"""margo-certs end to end, through the installed console script."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from margo_stream.identity.trust import (
    load_device_credentials,
    load_operator_tokens,
    load_server_credentials,
    read_certificates,
)
from margo_stream.identity.verify import PeerVerifier

pytestmark = pytest.mark.integration

SCRIPT = Path(sys.executable).parent / "margo-certs"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("margo-certs: error: ")
    assert fragment in lines[0]
    assert "Traceback" not in proc.stderr


def test_init_device_and_reinit(tmp_path: Path) -> None:
    assert SCRIPT.exists(), SCRIPT
    d = tmp_path / "certs"
    proc = run("init", "--dir", str(d), "--tenant", "acme", "--tenant", "globex")
    assert proc.returncode == 0, proc.stderr
    assert "kept" not in proc.stdout
    for tenant in ["acme", "globex"]:
        assert (
            f"written   {tenant} fleet-manager certificate spiffe://{tenant}/margo/wfm/"
            in proc.stdout
        )
        assert mode(d / tenant / "controller" / "key.pem") == 0o600
    for rel in ["controller/ca.key", "controller/key.pem"]:
        assert mode(d / rel) == 0o600, rel
    for tenant in ["acme", "globex"]:
        for name in ["ca.key", "signing.key", "operator.token", "root.key", "operator.key"]:
            assert mode(d / tenant / name) == 0o600
        for name in ["ca.pem", "signing.pub", "root.pub", "root/1.json", "operator.cert.json"]:
            assert (d / tenant / name).is_file()
    load_server_credentials(d)
    token = (d / "acme" / "operator.token").read_text()

    proc = run("device", "--dir", str(d), "--tenant", "acme", "--device", "press-01", "--days", "3")
    assert proc.returncode == 0, proc.stderr
    assert "press-01" in proc.stdout
    ddir = d / "acme" / "devices" / "press-01"
    assert sorted(p.name for p in ddir.iterdir()) == [
        "ca.pem",
        "cert.pem",
        "key.pem",
        "root.pub",
        "signing.pub",
    ]
    assert mode(ddir / "key.pem") == 0o600
    creds = load_device_credentials(ddir)
    assert (creds.tenant, creds.device_id) == ("acme", "press-01")

    leaf, *chain = read_certificates(ddir / "cert.pem")
    assert PeerVerifier.from_dir(d).verify(leaf, chain).device_id == "press-01"

    proc = run("init", "--dir", str(d), "--tenant", "acme", "--tenant", "initech")
    assert proc.returncode == 0, proc.stderr
    assert "kept" in proc.stdout and "acme operator token" in proc.stdout
    assert (d / "acme" / "operator.token").read_text() == token
    assert sorted(load_operator_tokens(d).values()) == ["acme", "globex", "initech"]


def test_errors_are_one_line(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    assert run("init", "--dir", str(d), "--tenant", "acme").returncode == 0
    assert_one_line_error(
        run("device", "--dir", str(d), "--tenant", "globex", "--device", "x"),
        "unknown tenant 'globex'",
    )
    assert_one_line_error(
        run("device", "--dir", str(d), "--tenant", "acme", "--device", "a/b"), "device id"
    )
    assert_one_line_error(run("init", "--dir", str(d), "--tenant", "Acme"), "tenant name")
    assert_one_line_error(run("init", "--dir", str(d)), "--tenant")
    assert_one_line_error(run("frobnicate"), "invalid choice")
    assert_one_line_error(
        run("init", "--dir", str(d), "--tenant", "acme", "--host", "no such host"), "--host"
    )
    assert_one_line_error(
        run("device", "--dir", str(d), "--tenant", "acme", "--device", "x", "--days", "0"),
        "--days",
    )
