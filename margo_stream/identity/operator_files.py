"""Operator credentials on disk: what ``margoctl`` signs with, and what the controller accepts.

Client side: :func:`load_operator_credentials` reads an operator directory
(``DIR/<tenant>/operators/<name>/``: ``operator.token``, ``operator.key``,
``operator.cert.json``) or a token file, with the key and certificate beside it when present
(the tenant's admin: ``DIR/<tenant>/operator.token``).

Controller side: :func:`load_root_chain` reads and checks a tenant's root metadata versions,
and :class:`OperatorDirectory` maps operator tokens to principals (tenant, name, roles,
expiry): the tenant token (the admin, name ``admin``) and every
``DIR/<tenant>/operators/<name>/operator.token`` whose certificate the tenant's newest root
metadata signed. The directory re-reads the files when their directories change (checked at
most once per ``check_interval``), so removing an operator takes effect without a restart;
expiry is checked on every request by the caller (:meth:`Principal.expired`).

Every file error is one line naming the file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from margo_stream.errors import ConfigError, IdentityError, MargoError
from margo_stream.identity import envelope
from margo_stream.identity.authority import (
    OPERATOR_TYPE,
    Role,
    RootMetadata,
    TrustedRoot,
    read_operator,
    read_root,
    verify_operator,
)

log = logging.getLogger("margo.identity.operators")

TOKEN_FILE = "operator.token"
KEY_FILE = "operator.key"
CERT_FILE = "operator.cert.json"
OPERATORS_DIR = "operators"
ROOT_DIR = "root"
ADMIN = "admin"
CONTROLLER_DIR = "controller"  # the controller's own CA, not a tenant


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} is missing") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: {what} is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {what} is unreadable ({exc.strerror or exc})") from None


def read_token(path: Path) -> str:
    """The one-line token in ``path``: one word of 16+ printable ASCII characters."""
    data = _read(path, "operator token")
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: operator token is not ASCII") from None
    if not token:
        raise ConfigError(f"{path}: operator token is empty")
    if len(token) < 16 or any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ConfigError(f"{path}: operator token must be one word of 16+ characters")
    return token


def read_operator_key(path: Path) -> Ed25519PrivateKey:
    """An unencrypted Ed25519 PKCS#8 PEM private key."""
    data = _read(path, "operator key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{path}: operator key is not a PEM private key ({_one_line(exc)})"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: operator key is not an Ed25519 key")
    return key


def read_certificate(path: Path) -> dict[str, Any]:
    """The operator certificate envelope in ``path``, checked for shape (not for who signed
    it: that needs the tenant's root metadata)."""
    data = _read(path, "operator certificate")
    try:
        env = envelope.parse(data, OPERATOR_TYPE, str(path))
        read_operator(env, str(path))
    except MargoError as exc:
        raise ConfigError(_one_line(exc)) from None
    return env


# --- client side ------------------------------------------------------------------------------


def _client_token(path: Path) -> str:
    """The one-line token a client sends (the controller judges it)."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read token file {path}: {reason}") from None
    if not token or len(token.splitlines()) != 1:
        raise ConfigError(f"token file {path} must hold the token on one line")
    return token


@dataclass(frozen=True)
class OperatorCredentials:
    token: str
    key: Ed25519PrivateKey | None  # None: a token without a key beside it
    certificate: dict[str, Any] | None  # the envelope
    name: str | None  # from the certificate
    tenant: str | None


def load_operator_credentials(
    *, operator_dir: Path | None, token_file: Path | None
) -> OperatorCredentials:
    """The credentials in ``operator_dir`` (token, key and certificate, all required) or in
    ``token_file`` (key and certificate from the token's directory when both are there).
    ``ConfigError`` naming the file otherwise."""
    if operator_dir is not None and token_file is not None:
        raise ConfigError("give an operator directory or a token file, not both")
    if operator_dir is not None:
        directory = Path(operator_dir).expanduser()
        if not directory.is_dir():
            raise ConfigError(f"{directory}: operator directory is missing")
        token_path = directory / TOKEN_FILE
        required = True
    elif token_file is not None:
        token_path = Path(token_file).expanduser()
        directory = token_path.parent
        required = False
    else:
        raise ConfigError(
            "no operator credentials: pass --operator DIR or --token-file PATH "
            "(or set MARGO_OPERATOR or MARGO_TOKEN_FILE)"
        )
    token = _client_token(token_path)
    key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
    if not required and not key_path.exists() and not cert_path.exists():
        return OperatorCredentials(token, None, None, None, None)
    for path, other in ((key_path, cert_path), (cert_path, key_path)):
        if not path.exists() and (required or other.exists()):
            what = "operator key" if path is key_path else "operator certificate"
            raise ConfigError(f"{path}: {what} is missing (it belongs beside {other.name})")
    key = read_operator_key(key_path)
    certificate = read_certificate(cert_path)
    operator = read_operator(certificate)
    if envelope.key_id(operator.key) != envelope.key_id(key.public_key()):
        raise ConfigError(f"{key_path}: operator key is not the key {cert_path.name} certifies")
    return OperatorCredentials(token, key, certificate, operator.name, operator.tenant)


# --- controller side: root metadata -----------------------------------------------------------


def load_root_chain(
    certs: Path, tenant: str, now: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """Every version of the tenant's root metadata (envelopes, oldest first) from
    ``DIR/<tenant>/root/<version>.json``: version 1 signed by its own root keys, each later
    one by the previous and its own (the rotation rule), the newest not expired.
    ``IdentityError`` naming the file otherwise."""
    rdir = Path(certs) / tenant / ROOT_DIR
    if not rdir.is_dir():
        raise IdentityError(
            f"{rdir}: the tenant's root metadata is missing "
            f"(run: margo-certs init --dir {certs} --tenant {tenant})"
        )
    files: dict[int, Path] = {}
    for path in rdir.glob("*.json"):
        if path.stem.isdigit() and int(path.stem) >= 1:
            files[int(path.stem)] = path
    if 1 not in files:
        raise IdentityError(f"{rdir / '1.json'}: the first root metadata version is missing")
    now = now or dt.datetime.now(dt.UTC)
    metas: list[RootMetadata] = []
    for version in range(1, max(files) + 1):
        found = files.get(version)
        if found is None:
            raise IdentityError(f"{rdir / f'{version}.json'}: root metadata version is missing")
        try:
            meta = read_root(_read(found, "root metadata"), str(found))
        except MargoError as exc:
            raise IdentityError(_one_line(exc)) from None
        if meta.version != version or meta.tenant != tenant:
            raise IdentityError(
                f"{found}: holds tenant {meta.tenant!r}'s version {meta.version}, "
                f"not tenant {tenant!r}'s version {version}"
            )
        metas.append(meta)
    try:
        first = metas[0]
        first.verify(first.envelope, "root", f"{files[1]}")
        TrustedRoot(tenant, first).update([m.envelope for m in metas], now)
    except MargoError as exc:
        raise IdentityError(f"{rdir}: {_one_line(exc)}") from None
    if metas[-1].expired(now):  # update() checks this too; kept explicit for a lone version
        raise IdentityError(f"{files[len(metas)]}: the newest root metadata has expired")
    chain = [dict(m.envelope) for m in metas]
    return chain


def newest_root(certs: Path, tenant: str, now: dt.datetime | None = None) -> RootMetadata:
    return read_root(load_root_chain(certs, tenant, now)[-1])


# --- controller side: who a token is ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated operator: the tenant it works in, its name and roles, and when its
    certificate expires (None: the tenant token, which is the controller's own setting)."""

    tenant: str
    name: str
    roles: frozenset[Role]
    expires: dt.datetime | None

    def may(self, role: Role) -> bool:
        return role in self.roles or Role.ADMIN in self.roles

    def expired(self, now: dt.datetime) -> bool:
        return self.expires is not None and now >= self.expires


class Operators(Protocol):
    """What the operator API consults on every request."""

    def authenticate(self, token: str) -> Principal | None:
        """The principal ``token`` belongs to (compared in constant time), even an expired
        one (the caller refuses it and says why); None for an unknown token."""
        ...

    def operators(self, tenant: str) -> list[Principal]:
        """The tenant's operators, by name."""
        ...


def _fingerprint(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class OperatorTable:
    """A fixed token -> principal table (the directory's current state; tests build one)."""

    def __init__(self, entries: Mapping[str, Principal]) -> None:
        self._entries = [(_fingerprint(t), p) for t, p in entries.items()]

    @classmethod
    def admins(cls, tokens: Mapping[str, str]) -> OperatorTable:
        """Each ``{token: tenant}`` as that tenant's admin."""
        return cls(
            {
                t: Principal(tenant, ADMIN, frozenset({Role.ADMIN}), None)
                for t, tenant in tokens.items()
            }
        )

    def authenticate(self, token: str) -> Principal | None:
        probe = _fingerprint(token)
        found: Principal | None = None
        for fingerprint, principal in self._entries:  # no early exit: timing says nothing
            if hmac.compare_digest(probe, fingerprint) and found is None:
                found = principal
        return found

    def operators(self, tenant: str) -> list[Principal]:
        return sorted((p for _, p in self._entries if p.tenant == tenant), key=lambda p: p.name)


def _tenant_dirs(certs: Path) -> list[Path]:
    return sorted(p for p in certs.iterdir() if p.is_dir() and p.name != CONTROLLER_DIR)


def _named_operator(
    odir: Path, tenant: str, root: RootMetadata, now: dt.datetime
) -> tuple[str, Principal]:
    token = read_token(odir / TOKEN_FILE)
    certificate = read_certificate(odir / CERT_FILE)
    try:
        operator = verify_operator(certificate, root, now)
    except MargoError as exc:
        raise ConfigError(f"{odir / CERT_FILE}: {_one_line(exc)}") from None
    if operator.name != odir.name:
        raise ConfigError(f"{odir / CERT_FILE}: certifies {operator.name!r}, not {odir.name!r}")
    return token, Principal(tenant, operator.name, operator.roles, operator.expires)


def scan_operators(
    certs: Path, *, strict: bool, now: dt.datetime | None = None
) -> dict[str, Principal]:
    """``{token: principal}`` for every tenant under ``certs``.

    A bad tenant token file or a token used twice raises ``IdentityError`` when ``strict``
    (start-up) and is logged and left out otherwise (a re-read). A named operator whose files
    are bad, whose certificate the newest root metadata did not sign, or that has expired is
    always logged and left out."""
    certs = Path(certs)
    if not certs.is_dir():
        raise IdentityError(f"{certs}: certificate directory is missing")
    now = now or dt.datetime.now(dt.UTC)
    table: dict[str, Principal] = {}

    def add(token: str, principal: Principal, path: Path, *, fatal: bool) -> None:
        if token in table:
            other = table[token]
            msg = f"{path}: operator token is the same as {other.tenant}/{other.name}'s"
            if fatal:
                raise IdentityError(msg)
            log.warning("%s; refused", msg)
            return
        table[token] = principal

    for tdir in _tenant_dirs(certs):
        tenant, token_path = tdir.name, tdir / TOKEN_FILE
        if token_path.exists():
            try:
                token = read_token(token_path)
            except ConfigError as exc:
                if strict:
                    raise IdentityError(str(exc)) from None
                log.warning("%s; the tenant's admin token is refused", exc)
            else:
                admin = Principal(tenant, ADMIN, frozenset({Role.ADMIN}), None)
                add(token, admin, token_path, fatal=strict)
        odirs = sorted(p for p in (tdir / OPERATORS_DIR).glob("*") if p.is_dir())
        if not odirs:
            continue
        try:
            root = newest_root(certs, tenant, now)
        except IdentityError as exc:
            log.warning("%s; the tenant's named operators are refused", exc)
            continue
        for odir in odirs:
            try:
                token, principal = _named_operator(odir, tenant, root, now)
            except ConfigError as exc:
                log.warning("%s; operator %s/%s refused", exc, tenant, odir.name)
                continue
            add(token, principal, odir / TOKEN_FILE, fatal=strict)
    return table


def _watched(certs: Path) -> tuple[tuple[str, int], ...]:
    """The modification times that change when an operator, token or root version does."""
    paths = [certs]
    for tdir in _tenant_dirs(certs):
        odir = tdir / OPERATORS_DIR
        paths += [tdir, tdir / TOKEN_FILE, tdir / ROOT_DIR, odir]
        if odir.is_dir():
            for one in odir.iterdir():
                paths += [one, one / TOKEN_FILE, one / CERT_FILE]
    out: list[tuple[str, int]] = []
    for path in paths:
        try:
            out.append((str(path), path.stat().st_mtime_ns))
        except OSError:
            out.append((str(path), -1))
    return tuple(out)


class OperatorDirectory:
    """The operators under a certificate directory, re-read when it changes.

    Built strictly (a bad tenant token stops the controller at start-up); later re-reads log
    what is wrong and carry on with what loads. ``authenticate`` and ``operators`` look for
    changes at most once per ``check_interval`` seconds."""

    def __init__(
        self,
        certs: Path,
        *,
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.certs = Path(certs)
        self.check_interval = check_interval
        self._clock = clock
        self._watched = _watched(self.certs)
        self._table = OperatorTable(scan_operators(self.certs, strict=True))
        self._checked_at = clock()

    def refresh(self, *, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._checked_at < self.check_interval:
            return
        self._checked_at = now
        try:
            watched = _watched(self.certs)
            if not force and watched == self._watched:
                return
            table = OperatorTable(scan_operators(self.certs, strict=False))
        except (OSError, MargoError) as exc:
            log.warning("re-reading operators under %s failed: %s", self.certs, _one_line(exc))
            return
        self._watched, self._table = watched, table

    def authenticate(self, token: str) -> Principal | None:
        self.refresh()
        return self._table.authenticate(token)

    def operators(self, tenant: str) -> list[Principal]:
        self.refresh()
        return self._table.operators(tenant)


__all__ = [
    "ADMIN",
    "CERT_FILE",
    "KEY_FILE",
    "OPERATORS_DIR",
    "ROOT_DIR",
    "TOKEN_FILE",
    "OperatorCredentials",
    "OperatorDirectory",
    "OperatorTable",
    "Operators",
    "Principal",
    "load_operator_credentials",
    "load_root_chain",
    "newest_root",
    "read_certificate",
    "read_operator_key",
    "read_token",
    "scan_operators",
]
