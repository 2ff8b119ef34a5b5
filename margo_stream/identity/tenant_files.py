"""A tenant's authority files under the certificate directory: the offline root key, the root
metadata versions, and the operators the root certifies (see ``certs/README.md``).

    DIR/<tenant>/root.key, root.pub         the offline root key (Ed25519); root.key never
                                            needs to be on the controller
    DIR/<tenant>/root/<version>.json        every root metadata version, 1.json first
    DIR/<tenant>/operator.key, .cert.json   the tenant's admin operator (beside operator.token)
    DIR/<tenant>/operators/<name>/          operator.key, operator.cert.json, operator.token
    DIR/<tenant>/root.key.<N>               the root key of version N, kept after a rotation

``ensure_tenant_authority`` (called by ``init_pki``) never overwrites a file and needs the
root key only to sign something missing. ``issue_operator`` and ``rotate_root`` need it.
Results are ``(label, paths, action)`` triples, which ``pki.FileGroup`` wraps (this module
does not import ``pki``: ``pki`` calls it). Errors are ``ConfigError`` naming the file.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from margo_stream.errors import ConfigError, IdentityError, MargoError
from margo_stream.fsutil import atomic_write
from margo_stream.identity import envelope
from margo_stream.identity.authority import (
    Role,
    format_time,
    make_operator_cert,
    make_root,
    read_operator,
    read_root,
)
from margo_stream.identity.operator_files import (
    ADMIN,
    CERT_FILE,
    KEY_FILE,
    OPERATORS_DIR,
    ROOT_DIR,
    TOKEN_FILE,
    load_root_chain,
    read_certificate,
    read_operator_key,
)

Group = tuple[str, tuple[Path, ...], str]  # label, paths, action: written, kept, completed...

ROOT_KEY = "root.key"
ROOT_PUB = "root.pub"
ROOT_DAYS = 3650
ADMIN_DAYS = 825
DEFAULT_OPERATOR_DAYS = 365
KEY_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700
OPERATOR_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _read_public(path: Path, what: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: {what} is unreadable ({exc.strerror or exc})") from None
    except ValueError:
        raise ConfigError(f"{path}: {what} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: {what} is not an Ed25519 key")
    return key


def _read_private(path: Path, what: str) -> Ed25519PrivateKey:
    try:
        return read_operator_key(path)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("operator key", what)) from None


def _root_key(tdir: Path, command: str) -> Ed25519PrivateKey:
    path = tdir / ROOT_KEY
    if not path.exists():
        raise ConfigError(
            f"{path}: {command} needs the tenant's offline root key, which is not there "
            f"(bring root.key back from where it is kept offline)"
        )
    return _read_private(path, "root key")


def _root_versions(tdir: Path) -> list[Path]:
    rdir = tdir / ROOT_DIR
    return sorted((p for p in rdir.glob("*.json") if p.stem.isdigit()), key=lambda p: int(p.stem))


def _newest_root(tdir: Path) -> Any:
    try:
        return read_root(load_root_chain(tdir.parent, tdir.name)[-1])
    except IdentityError as exc:
        raise ConfigError(str(exc)) from None


def _signing_pub(tdir: Path) -> Ed25519PublicKey:
    return _read_public(tdir / "signing.pub", "the controller's signing key")


def _write_cert(path: Path, cert: dict[str, Any]) -> None:
    atomic_write(path, envelope.canonical(cert) + b"\n", mode=PUBLIC_MODE)


def _certify(
    tenant: str,
    name: str,
    roles: Iterable[Role],
    key: Ed25519PublicKey,
    days: int,
    root_key: Ed25519PrivateKey,
) -> dict[str, Any]:
    now = _now()
    return make_operator_cert(
        tenant,
        name,
        roles,
        key,
        issued=now,
        expires=now + dt.timedelta(days=days),
        signers=[root_key],
    )


# --- init -------------------------------------------------------------------------------------


def _ensure_root_key(tdir: Path, tenant: str) -> Group:
    key_path, pub_path = tdir / ROOT_KEY, tdir / ROOT_PUB
    paths = (key_path, pub_path)
    label = f"{tenant} offline root key (Ed25519; move root.key off this machine)"
    if pub_path.exists():
        pub = _read_public(pub_path, "root public key")
        if key_path.exists():
            key = _read_private(key_path, "root key")
            if envelope.key_id(key.public_key()) != envelope.key_id(pub):
                raise ConfigError(f"{key_path}: root key is not the key in {pub_path.name}")
        return label, paths, "kept"
    if key_path.exists():
        key = _read_private(key_path, "root key")
        atomic_write(pub_path, _public_pem(key.public_key()), mode=PUBLIC_MODE)
        return label, paths, "completed"
    if _root_versions(tdir):
        raise ConfigError(
            f"{pub_path} is missing but {tdir / ROOT_DIR} holds root metadata; "
            f"refusing to create a new root key (devices pinned the old one)"
        )
    key = Ed25519PrivateKey.generate()
    atomic_write(key_path, _private_pem(key), mode=KEY_MODE)
    atomic_write(pub_path, _public_pem(key.public_key()), mode=PUBLIC_MODE)
    return label, paths, "written"


def _ensure_root_metadata(tdir: Path, tenant: str) -> Group:
    rdir = tdir / ROOT_DIR
    first = rdir / "1.json"
    label = f"{tenant} root metadata"
    versions = _root_versions(tdir)
    if versions:
        return f"{label} (newest version {versions[-1].stem})", (versions[-1],), "kept"
    root_key = _root_key(tdir, "writing the first root metadata")
    pub = _read_public(tdir / ROOT_PUB, "root public key")
    if envelope.key_id(root_key.public_key()) != envelope.key_id(pub):
        raise ConfigError(f"{tdir / ROOT_KEY}: root key is not the key in {ROOT_PUB}")
    meta = make_root(
        tenant,
        1,
        _now() + dt.timedelta(days=ROOT_DAYS),
        root_keys=[pub],
        controller_keys=[_signing_pub(tdir)],
        signers=[root_key],
    )
    rdir.mkdir(mode=DIR_MODE, exist_ok=True)
    atomic_write(first, envelope.canonical(meta) + b"\n", mode=PUBLIC_MODE)
    return f"{label} version 1 ({ROOT_DAYS} days)", (first,), "written"


def _ensure_operator_files(
    tdir: Path, odir: Path, name: str, roles: Sequence[Role], days: int, *, token: bool
) -> Group:
    """The operator's key and certificate (and token when ``token``), keeping what exists."""
    key_path, cert_path, token_path = odir / KEY_FILE, odir / CERT_FILE, odir / TOKEN_FILE
    paths = (key_path, cert_path, token_path) if token else (key_path, cert_path)
    tenant = tdir.name
    label = f"{tenant} operator {name!r} ({', '.join(roles)})"
    have_key, have_cert = key_path.exists(), cert_path.exists()
    if have_cert and not have_key:
        raise ConfigError(
            f"{cert_path} exists but {KEY_FILE} is missing; move {cert_path.name} away "
            f"to certify a new key"
        )
    wrote: list[str] = []
    if have_key:
        key = _read_private(key_path, "operator key")
    else:
        key = Ed25519PrivateKey.generate()
    if not have_cert:
        root_key = _root_key(tdir, f"certifying operator {name!r}")
        cert = _certify(tenant, name, roles, key.public_key(), days, root_key)
    if not have_key:
        atomic_write(key_path, _private_pem(key), mode=KEY_MODE)
        wrote.append(KEY_FILE)
    if not have_cert:
        _write_cert(cert_path, cert)
        wrote.append(CERT_FILE)
    if token and not token_path.exists():
        atomic_write(token_path, (secrets.token_urlsafe(32) + "\n").encode(), mode=KEY_MODE)
        wrote.append(TOKEN_FILE)
    action = "kept" if not wrote else "written" if len(wrote) == len(paths) else "completed"
    return label, paths, action


def ensure_tenant_authority(tdir: Path, tenant: str) -> list[Group]:
    """Root key, root metadata version 1 and the admin operator for ``tdir`` (after its
    signing key and token exist); keeps every existing file."""
    return [
        _ensure_root_key(tdir, tenant),
        _ensure_root_metadata(tdir, tenant),
        _ensure_operator_files(tdir, tdir, ADMIN, [Role.ADMIN], ADMIN_DAYS, token=False),
    ]


# --- operators --------------------------------------------------------------------------------


def _tenant_dir(dir: Path, tenant: str) -> Path:
    tdir = Path(dir) / tenant
    if not (tdir / "ca.pem").exists():
        raise ConfigError(
            f"unknown tenant {tenant!r}: {tdir / 'ca.pem'} not found "
            f"(run: margo-certs init --dir {dir} --tenant {tenant})"
        )
    return tdir


def _current_root_key(tdir: Path, command: str) -> tuple[Ed25519PrivateKey, Any]:
    """The root key and the newest root metadata, checked to name that key as a root key."""
    key = _root_key(tdir, command)
    newest = _newest_root(tdir)
    if envelope.key_id(key.public_key()) not in newest.roles["root"].keyids:
        hint = " (a rotation left root.key.next: see certs/README.md)"
        raise ConfigError(
            f"{tdir / ROOT_KEY}: not a root key of the newest root metadata "
            f"{tdir / ROOT_DIR / f'{newest.version}.json'}"
            + (hint if (tdir / f"{ROOT_KEY}.next").exists() else "")
        )
    return key, newest


def parse_roles(values: Iterable[str]) -> list[Role]:
    roles: list[Role] = []
    for value in values:
        try:
            role = Role(value)
        except ValueError:
            raise ConfigError(
                f"--role {value!r} is not one of {', '.join(r.value for r in Role)}"
            ) from None
        if role not in roles:
            roles.append(role)
    if not roles:
        raise ConfigError("an operator needs at least one --role")
    return roles


def issue_operator(
    dir: Path, tenant: str, name: str, roles: Iterable[str], days: int = DEFAULT_OPERATOR_DAYS
) -> Group:
    """Certify operator ``name`` of ``tenant`` with ``roles`` for ``days`` under
    ``DIR/<tenant>/operators/<name>/``. A new operator gets a key and a token; an existing one
    keeps both and gets a new certificate (renewal, or a change of roles)."""
    if not OPERATOR_NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r} must match {OPERATOR_NAME.pattern}")
    if name == ADMIN:
        raise ConfigError(f"--name {ADMIN!r} is reserved for the tenant's own operator.token")
    wanted = parse_roles(roles)
    if days < 1:
        raise ConfigError(f"--days must be at least 1, not {days}")
    tdir = _tenant_dir(dir, tenant)
    root_key, _ = _current_root_key(tdir, "margo-certs operator")
    odir = tdir / OPERATORS_DIR / name
    odir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    key_path, cert_path, token_path = odir / KEY_FILE, odir / CERT_FILE, odir / TOKEN_FILE
    renewing = key_path.exists()
    key = _read_private(key_path, "operator key") if renewing else Ed25519PrivateKey.generate()
    cert = _certify(tenant, name, wanted, key.public_key(), days, root_key)
    if not renewing:
        atomic_write(key_path, _private_pem(key), mode=KEY_MODE)
    _write_cert(cert_path, cert)
    if not token_path.exists():
        atomic_write(token_path, (secrets.token_urlsafe(32) + "\n").encode(), mode=KEY_MODE)
    label = (
        f"{tenant} operator {name!r} ({', '.join(wanted)}; {days} days, "
        f"until {cert['signed']['expires']})"
    )
    return label, (key_path, cert_path, token_path), "renewed" if renewing else "written"


# --- root rotation ----------------------------------------------------------------------------


def _operator_certs(tdir: Path) -> list[Path]:
    paths = [tdir / CERT_FILE] if (tdir / CERT_FILE).exists() else []
    return paths + sorted((tdir / OPERATORS_DIR).glob(f"*/{CERT_FILE}"))


def rotate_root(dir: Path, tenant: str) -> list[Group]:
    """A new root key: version N+1 of the root metadata, signed by the old and the new root
    keys, naming the same controller key; the old key is kept as ``root.key.<N>``. Every
    operator certificate the old key signed is signed again by the new one (same operator,
    roles and expiry), so operators keep working against the new version."""
    tdir = _tenant_dir(dir, tenant)
    old_key, newest = _current_root_key(tdir, "margo-certs rotate-root")
    version = newest.version
    kept = tdir / f"{ROOT_KEY}.{version}"
    if kept.exists():
        raise ConfigError(f"{kept} exists already; refusing to overwrite a kept root key")
    controller_keys = [newest.keys[k] for k in newest.roles["controller"].keyids]
    new_key = Ed25519PrivateKey.generate()
    meta = make_root(
        tenant,
        version + 1,
        _now() + dt.timedelta(days=ROOT_DAYS),
        root_keys=[new_key.public_key()],
        controller_keys=controller_keys,
        signers=[old_key, new_key],
    )
    pending = tdir / f"{ROOT_KEY}.next"
    new_path = tdir / ROOT_DIR / f"{version + 1}.json"
    atomic_write(kept, _private_pem(old_key), mode=KEY_MODE)
    atomic_write(pending, _private_pem(new_key), mode=KEY_MODE)
    atomic_write(new_path, envelope.canonical(meta) + b"\n", mode=PUBLIC_MODE)
    os.replace(pending, tdir / ROOT_KEY)
    atomic_write(tdir / ROOT_PUB, _public_pem(new_key.public_key()), mode=PUBLIC_MODE)
    groups: list[Group] = [
        (f"{tenant} old root key (version {version})", (kept,), "kept"),
        (f"{tenant} new root key", (tdir / ROOT_KEY, tdir / ROOT_PUB), "written"),
        (
            f"{tenant} root metadata version {version + 1} (until {meta['signed']['expires']})",
            (new_path,),
            "written",
        ),
    ]
    for path in _operator_certs(tdir):
        groups.append(_resign(path, old_key.public_key(), new_key))
    return groups


def _resign(path: Path, old: Ed25519PublicKey, new_key: Ed25519PrivateKey) -> Group:
    try:
        cert = read_certificate(path)
        operator = read_operator(cert)
        envelope.verify(cert, {envelope.key_id(old): old}, 1, str(path))
    except MargoError as exc:
        return f"operator certificate not re-signed ({exc})", (path,), "kept"
    _write_cert(path, envelope.sign(cert["signed"], [new_key]))
    until = format_time(operator.expires)
    label = (
        f"{operator.tenant} operator {operator.name!r} re-signed by the new root (until {until})"
    )
    return label, (path,), "written"


# --- devices ----------------------------------------------------------------------------------


def copy_root_pub(tdir: Path, device_dir: Path) -> Path:
    """Copy the tenant's ``root.pub`` (what the agent pins) into a device directory."""
    src = tdir / ROOT_PUB
    if not src.exists():
        raise ConfigError(
            f"{src} not found (run: margo-certs init --dir {tdir.parent} --tenant {tdir.name})"
        )
    _read_public(src, "root public key")
    dst = device_dir / ROOT_PUB
    atomic_write(dst, src.read_bytes(), mode=PUBLIC_MODE)
    return dst
