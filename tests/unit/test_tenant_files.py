"""margo-certs' authority files (root key, root metadata, operators, rotation, devices) and
how margoctl and the controller read them back: real files, real Ed25519 keys."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import stat
from pathlib import Path

import pytest

from margo_stream.cli.certs import main as certs_main
from margo_stream.errors import ConfigError, IdentityError
from margo_stream.identity.authority import Role, TrustedRoot, read_root, verify_operator
from margo_stream.identity.envelope import canonical
from margo_stream.identity.operator_files import (
    OperatorDirectory,
    load_operator_credentials,
    load_root_chain,
    newest_root,
)
from margo_stream.identity.pki import device_files, init_pki, issue_device
from margo_stream.identity.tenant_files import issue_operator, rotate_root

NOW = dt.datetime.now(dt.UTC)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def certs(args: list[str], capsys) -> tuple[int, str, str]:
    code = certs_main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def pki(tmp_path) -> Path:
    d = tmp_path / "certs"
    init_pki(d, ["acme", "globex"])
    return d


def test_init_writes_the_root_the_first_root_version_and_the_admin(pki, capsys) -> None:
    t = pki / "acme"
    for name in ("root.key", "operator.key"):
        assert mode(t / name) == 0o600
    assert b"PRIVATE KEY" in (t / "root.key").read_bytes()
    assert b"PUBLIC KEY" in (t / "root.pub").read_bytes()
    [v1] = load_root_chain(pki, "acme")
    assert v1 == json.loads((t / "root" / "1.json").read_text())
    meta = read_root(v1)
    assert meta.version == 1 and meta.tenant == "acme"
    assert meta.expires - NOW > dt.timedelta(days=3640)
    assert set(meta.roles) == {"root", "controller"}
    admin = verify_operator((t / "operator.cert.json").read_bytes(), meta, NOW)
    assert admin.name == "admin" and admin.roles == {Role.ADMIN}
    # issued while this test ran: between the module's NOW and now, plus 825 days
    later = dt.datetime.now(dt.UTC) - NOW
    assert dt.timedelta(days=825) <= admin.expires - NOW <= dt.timedelta(days=825) + later
    # idempotent: nothing changes, every group says kept
    before = {p: p.read_bytes() for p in t.rglob("*") if p.is_file()}
    code, out, _ = certs(["init", "--dir", str(pki), "--tenant", "acme"], capsys)
    assert code == 0 and "\nwritten" not in out and not out.startswith("written")
    assert "kept      acme root metadata (newest version 1)" in out
    assert {p: p.read_bytes() for p in t.rglob("*") if p.is_file()} == before


def test_init_completes_what_is_missing_and_needs_the_root_key_only_to_sign(pki, capsys) -> None:
    t = pki / "acme"
    (t / "root.pub").unlink()
    code, out, _ = certs(["init", "--dir", str(pki), "--tenant", "acme"], capsys)
    assert code == 0 and "completed acme offline root key" in out
    shutil.move(t / "root.key", pki.parent / "offline.key")
    code, out, _ = certs(["init", "--dir", str(pki), "--tenant", "acme"], capsys)
    assert code == 0  # nothing to sign: the offline key is not needed
    (t / "operator.cert.json").unlink()
    code, _, err = certs(["init", "--dir", str(pki), "--tenant", "acme"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert (
        f"{t / 'root.key'}: certifying operator 'admin' needs the tenant's offline root key" in err
    )


def test_operator_command_writes_a_certified_operator(pki, capsys) -> None:
    args = ["operator", "--dir", str(pki), "--tenant", "acme", "--name", "alice"]
    code, out, _ = certs([*args, "--role", "deployer", "--role", "viewer", "--days", "30"], capsys)
    assert code == 0 and out.startswith("written   acme operator 'alice' (deployer, viewer; 30")
    o = pki / "acme" / "operators" / "alice"
    assert mode(o / "operator.key") == 0o600 and mode(o / "operator.token") == 0o600
    op = verify_operator((o / "operator.cert.json").read_bytes(), newest_root(pki, "acme"), NOW)
    assert op.roles == {Role.DEPLOYER, Role.VIEWER} and op.tenant == "acme"
    key, token = (o / "operator.key").read_bytes(), (o / "operator.token").read_text()
    # re-running renews the certificate (roles may change), keeps key and token
    code, out, _ = certs([*args, "--role", "terminal"], capsys)
    assert code == 0 and out.startswith("renewed   acme operator 'alice' (terminal; 365")
    assert (o / "operator.key").read_bytes() == key and (o / "operator.token").read_text() == token
    op = verify_operator((o / "operator.cert.json").read_bytes(), newest_root(pki, "acme"), NOW)
    assert op.roles == {Role.TERMINAL}


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--name", "Alice", "--role", "viewer"], "--name 'Alice' must match"),
        (["--name", "admin", "--role", "viewer"], "'admin' is reserved"),
        (["--name", "bob", "--role", "root"], "--role 'root' is not one of viewer, deployer"),
        (["--name", "bob", "--role", "viewer", "--days", "0"], "--days must be at least 1"),
        (["--name", "bob"], "the following arguments are required: --role"),
    ],
)
def test_operator_command_refuses_bad_input_in_one_line(pki, capsys, extra, fragment) -> None:
    code, _, err = certs(["operator", "--dir", str(pki), "--tenant", "acme", *extra], capsys)
    assert code == 2 and err.count("\n") == 1 and fragment in err, err


def test_operator_and_rotation_need_the_offline_root_key(pki, capsys) -> None:
    (pki / "acme" / "root.key").unlink()
    for cmd, extra in (("operator", ["--name", "bob", "--role", "viewer"]), ("rotate-root", [])):
        code, _, err = certs([cmd, "--dir", str(pki), "--tenant", "acme", *extra], capsys)
        assert code == 2 and err.count("\n") == 1
        assert (
            f"{pki / 'acme' / 'root.key'}: margo-certs {cmd} needs the tenant's offline root key"
            in err
        )
    code, _, err = certs(["rotate-root", "--dir", str(pki), "--tenant", "initech"], capsys)
    assert code == 2 and "unknown tenant 'initech'" in err and "ca.pem" in err


def test_rotate_root_chains_keeps_the_old_key_and_re_signs_operators(pki, capsys) -> None:
    t = pki / "acme"
    issue_operator(pki, "acme", "alice", ["viewer"], days=10)
    old_pub, old_key = (t / "root.pub").read_bytes(), (t / "root.key").read_bytes()
    code, out, _ = certs(["rotate-root", "--dir", str(pki), "--tenant", "acme"], capsys)
    assert code == 0 and "root metadata version 2" in out and "'alice' re-signed" in out
    assert (t / "root.key.1").read_bytes() == old_key and mode(t / "root.key.1") == 0o600
    assert (t / "root.pub").read_bytes() != old_pub and mode(t / "root.key") == 0o600
    v1, v2 = load_root_chain(pki, "acme")
    meta1, meta2 = read_root(v1), read_root(v2)
    assert meta2.version == 2 and meta2.roles["controller"] == meta1.roles["controller"]
    assert meta2.roles["root"] != meta1.roles["root"]
    # a device that pinned the old root.pub follows the chain to version 2
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    pinned = load_pem_public_key(old_pub)
    trusted = TrustedRoot.from_pinned("acme", pinned, v1, NOW).update([v2], NOW)  # type: ignore[arg-type]
    assert trusted.current.version == 2
    for cert in (t / "operator.cert.json", t / "operators" / "alice" / "operator.cert.json"):
        verify_operator(cert.read_bytes(), meta2, NOW)
    # operators certified after the rotation are signed by the new key
    issue_operator(pki, "acme", "bob", ["terminal"])
    verify_operator((t / "operators/bob/operator.cert.json").read_bytes(), meta2, NOW)
    rotate_root(pki, "acme")
    assert [read_root(v).version for v in load_root_chain(pki, "acme")] == [1, 2, 3]
    assert (t / "root.key.2").exists()


def test_root_chain_refuses_a_gap_a_foreign_version_and_a_broken_signature(pki) -> None:
    rotate_root(pki, "acme")
    rdir = pki / "acme" / "root"
    v2 = (rdir / "2.json").read_bytes()
    (rdir / "3.json").write_bytes(v2)
    with pytest.raises(IdentityError, match="3.json: holds tenant 'acme'.s version 2"):
        load_root_chain(pki, "acme")
    (rdir / "3.json").unlink()
    (rdir / "2.json").write_bytes((pki / "globex" / "root" / "1.json").read_bytes())
    with pytest.raises(IdentityError, match="2.json: holds tenant 'globex'"):
        load_root_chain(pki, "acme")
    doc = json.loads(v2)
    doc["signatures"] = doc["signatures"][1:]  # only the new key: the old one did not delegate
    (rdir / "2.json").write_bytes(canonical(doc))
    with pytest.raises(IdentityError, match="by the previous root keys"):
        load_root_chain(pki, "acme")
    (rdir / "1.json").unlink()
    with pytest.raises(IdentityError, match="1.json: the first root metadata version is missing"):
        load_root_chain(pki, "acme")


def test_device_directory_gets_root_pub(pki, capsys) -> None:
    code, out, _ = certs(
        ["device", "--dir", str(pki), "--tenant", "acme", "--device", "d1"], capsys
    )
    ddir = pki / "acme" / "devices" / "d1"
    assert code == 0 and "root.pub" in out
    assert all(p.exists() for p in device_files(ddir)) and ddir / "root.pub" in device_files(ddir)
    assert (ddir / "root.pub").read_bytes() == (pki / "acme" / "root.pub").read_bytes()
    (pki / "acme" / "root.pub").unlink()
    with pytest.raises(ConfigError, match="root.pub not found"):
        issue_device(pki, "acme", "d2")


def test_credentials_from_an_operator_directory_and_from_a_token_file(pki, tmp_path) -> None:
    issue_operator(pki, "acme", "alice", ["deployer"])
    o = pki / "acme" / "operators" / "alice"
    creds = load_operator_credentials(operator_dir=o, token_file=None)
    assert (creds.name, creds.tenant) == ("alice", "acme")
    assert creds.token == (o / "operator.token").read_text().strip()
    assert creds.key is not None and creds.certificate is not None
    assert creds.certificate == json.loads((o / "operator.cert.json").read_text())
    admin = load_operator_credentials(operator_dir=None, token_file=pki / "acme" / "operator.token")
    assert (admin.name, admin.tenant) == ("admin", "acme") and admin.key is not None
    lone = tmp_path / "lone.token"
    lone.write_text("just-a-token\n")
    bare = load_operator_credentials(operator_dir=None, token_file=lone)
    assert bare.token == "just-a-token" and bare.key is bare.certificate is bare.name is None
    # bad inputs: one line naming the file
    (o / "operator.key").write_bytes((pki / "acme" / "operator.key").read_bytes())
    with pytest.raises(ConfigError, match=r"operator\.key: operator key is not the key"):
        load_operator_credentials(operator_dir=o, token_file=None)
    (o / "operator.key").unlink()
    with pytest.raises(ConfigError, match=r"alice/operator\.key: operator key is missing"):
        load_operator_credentials(operator_dir=o, token_file=None)
    with pytest.raises(ConfigError, match=r"nope: operator directory is missing"):
        load_operator_credentials(operator_dir=tmp_path / "nope", token_file=None)
    with pytest.raises(ConfigError, match="not both"):
        load_operator_credentials(operator_dir=o, token_file=lone)
    with pytest.raises(ConfigError, match="MARGO_OPERATOR"):
        load_operator_credentials(operator_dir=None, token_file=None)


def test_operator_directory_follows_the_files_without_restart(pki) -> None:
    issue_operator(pki, "acme", "alice", ["viewer"])
    issue_operator(pki, "globex", "bob", ["deployer", "terminal"], days=2)
    clock = [0.0]
    directory = OperatorDirectory(pki, clock=lambda: clock[0])
    token = (pki / "acme" / "operators" / "alice" / "operator.token").read_text().strip()
    alice = directory.authenticate(token)
    assert alice is not None and (alice.tenant, alice.name, alice.roles) == (
        "acme",
        "alice",
        frozenset({Role.VIEWER}),
    )
    admin = directory.authenticate((pki / "acme" / "operator.token").read_text().strip())
    assert admin is not None and admin.name == "admin" and admin.expires is None
    assert [p.name for p in directory.operators("acme")] == ["admin", "alice"]
    [_, bob] = directory.operators("globex")
    assert bob.expired(NOW + dt.timedelta(days=3)) and not bob.expired(NOW)
    shutil.rmtree(pki / "acme" / "operators" / "alice")
    assert directory.authenticate(token) is not None  # checked at most once a second
    clock[0] += 1.5
    assert directory.authenticate(token) is None
    assert [p.name for p in directory.operators("acme")] == ["admin"]


def test_operator_directory_refuses_a_certificate_the_root_did_not_sign(pki, caplog) -> None:
    issue_operator(pki, "acme", "alice", ["viewer"])
    o = pki / "acme" / "operators" / "alice"
    (o / "operator.cert.json").write_bytes(
        (pki / "globex" / "operator.cert.json").read_bytes()  # another tenant's root signed it
    )
    directory = OperatorDirectory(pki)
    assert directory.authenticate((o / "operator.token").read_text().strip()) is None
    assert "alice/operator.cert.json" in caplog.text and "refused" in caplog.text
    (pki / "acme" / "operator.token").write_text("short\n")
    with pytest.raises(IdentityError, match=r"acme/operator.token: operator token must be"):
        OperatorDirectory(pki)
