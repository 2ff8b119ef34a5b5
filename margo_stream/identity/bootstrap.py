"""One-time bootstrap tokens: how a device proves it may enrol (EST ``simpleenroll``).

``margo-certs bootstrap --dir DIR --tenant acme --device press-09 [--ttl 24h]`` writes::

    DIR/acme/bootstrap/press-09.token   the secret (0600): handed to the device's installer
    DIR/acme/bootstrap/press-09.json    the record the controller checks: the token's SHA-256,
                                        tenant, device, issued, expires, and used_at once spent

The controller never needs the secret itself: it hashes what the device presents and compares
the digest with every record in constant time. A token is bound to one tenant and one device,
works once (``used_at`` is written into the record, so a restart does not bring it back) and
expires. Issuing a new token for a device replaces the old one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from pathlib import Path

from margo_stream.errors import ConfigError, IdentityError
from margo_stream.fsutil import atomic_write
from margo_stream.identity.spiffe import validate_device_id, validate_tenant

BOOTSTRAP_DIR = "bootstrap"
DEFAULT_TTL = 24 * 3600.0
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str, *, what: str = "duration") -> float:
    """Seconds in ``90s``, ``15m``, ``24h``, ``30d``, ``1h30m`` or a bare number of seconds."""
    raw = text.strip()
    try:
        value = float(raw)
    except ValueError:
        parts = _DURATION_RE.findall(raw)
        if not parts or "".join(n + u for n, u in parts) != raw:
            raise ConfigError(
                f"{what} {text!r} is not a duration (examples: 90s, 15m, 24h, 30d)"
            ) from None
        value = sum(float(n) * _UNITS[u] for n, u in parts)
    if value <= 0:
        raise ConfigError(f"{what} {text!r} must be longer than zero")
    return value


def token_digest(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


def bootstrap_paths(dir: Path, tenant: str, device_id: str) -> tuple[Path, Path]:
    """``(token file, record file)`` of one device's bootstrap token."""
    bdir = Path(dir) / tenant / BOOTSTRAP_DIR
    return bdir / f"{device_id}.token", bdir / f"{device_id}.json"


def issue_bootstrap_token(
    dir: Path, tenant: str, device_id: str, ttl: float = DEFAULT_TTL, *, now: float | None = None
) -> tuple[Path, float]:
    """Write a fresh token and its record; returns ``(token file, expiry unix seconds)``."""
    try:
        validate_tenant(tenant)
        validate_device_id(device_id)
    except IdentityError as exc:
        raise ConfigError(str(exc)) from None
    tdir = Path(dir) / tenant
    if not (tdir / "ca.pem").exists() or not (tdir / "ca.key").exists():
        raise ConfigError(
            f"unknown tenant {tenant!r}: {tdir / 'ca.pem'} not found "
            f"(run: margo-certs init --dir {dir} --tenant {tenant})"
        )
    if ttl <= 0:
        raise ConfigError(f"--ttl must be longer than zero, not {ttl}")
    issued = time.time() if now is None else now
    token = secrets.token_urlsafe(32)
    token_path, record_path = bootstrap_paths(dir, tenant, device_id)
    token_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    record = {
        "tenant": tenant,
        "device": device_id,
        "token_sha256": token_digest(token),
        "issued": issued,
        "expires": issued + ttl,
        "used_at": None,
    }
    # the record first: a token file without its record would be a secret nobody accepts
    atomic_write(record_path, (json.dumps(record, indent=1) + "\n").encode(), mode=0o600)
    atomic_write(token_path, (token + "\n").encode(), mode=0o600)
    return token_path, issued + ttl


class Refused(Exception):
    """An enrolment the token does not allow: ``status`` 401 (bad token) or 403 (not yours)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _ts(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


class BootstrapTokens:
    """The controller's view of every tenant's bootstrap records (read from disk per use, so a
    token issued while the controller runs works at once)."""

    def __init__(self, certs_dir: Path) -> None:
        self.dir = Path(certs_dir)

    def _records(self) -> list[tuple[Path, dict[str, object]]]:
        out = []
        for path in sorted(self.dir.glob(f"*/{BOOTSTRAP_DIR}/*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and isinstance(record.get("token_sha256"), str):
                out.append((path, record))
        return out

    def redeem(self, tenant: str, device_id: str, token: str, *, now: float | None = None) -> None:
        """Spend ``token`` for ``device_id`` of ``tenant``, or raise ``Refused`` naming why.

        Synchronous from check to the ``used_at`` write, so two requests in one event loop
        cannot both spend a token.
        """
        now = time.time() if now is None else now
        digest = token_digest(token).encode()
        found: tuple[Path, dict[str, object]] | None = None
        for path, record in self._records():  # compare with all of them: constant time each
            if hmac.compare_digest(digest, str(record["token_sha256"]).encode()) and not found:
                found = (path, record)
        if found is None:
            raise Refused(401, "unknown bootstrap token")
        path, record = found
        if record.get("tenant") != tenant:
            raise Refused(403, f"bootstrap token was not issued for tenant {tenant!r}")
        if record.get("device") != device_id:
            raise Refused(403, f"bootstrap token is not bound to device {device_id!r}")
        used_at = record.get("used_at")
        if isinstance(used_at, int | float):
            raise Refused(401, f"bootstrap token was already used at {_ts(used_at)}")
        expires = record.get("expires")
        if not isinstance(expires, int | float) or now >= expires:
            shown = _ts(expires) if isinstance(expires, int | float) else "an unknown time"
            raise Refused(401, f"bootstrap token expired at {shown}")
        record["used_at"] = now
        atomic_write(path, (json.dumps(record, indent=1) + "\n").encode(), mode=0o600)


__all__ = [
    "BOOTSTRAP_DIR",
    "DEFAULT_TTL",
    "BootstrapTokens",
    "Refused",
    "bootstrap_paths",
    "issue_bootstrap_token",
    "parse_duration",
    "token_digest",
]
