"""A tenant's root of trust: root metadata, its rotation, and the operators it certifies.

Theory of operation
-------------------
Each tenant has an offline **root key** (``DIR/<tenant>/root.key``); devices pin its public
half (``root.pub``) at enrolment. The root signs **root metadata** (TUF's root role): the
tenant, a version, an expiry, the keys it knows and which of them may act in each role:

* ``root``: signs root metadata (and so the next version of itself) and operator
  certificates;
* ``controller``: the controller's online key, which signs only manifests (version, expiry,
  digests: freshness), never what a device runs.

**Operators** are certified by the root: an operator certificate names the operator, the
roles it holds (``viewer``, ``deployer``, ``terminal``, ``admin``), its own Ed25519 key and an
expiry. What an operator authors (deployment signatures, terminal grants; see
``operators.py``) is checked against the key in its certificate, the certificate against the
root metadata the device holds, and that against the key the device pinned. A controller that
holds every key of its own can relay, order and withhold, but author nothing.

**Rotation**: version N+1 of the root metadata is accepted only when signed by a threshold of
version N's root keys *and* of its own (a new root key proves possession; the old one
delegates), one version at a time; an older or equal version is refused as a rollback. The
newest version held must not be expired; versions passed through on the way may be.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from margo_stream.errors import AuthorityError
from margo_stream.identity import envelope
from margo_stream.identity.envelope import SignatureMemo
from margo_stream.protocol.codes import Refusal

ROOT_TYPE = "margo-root"
OPERATOR_TYPE = "margo-operator"
MAX_ROOT_KEYS = 64


class Role(enum.StrEnum):
    VIEWER = "viewer"
    DEPLOYER = "deployer"
    TERMINAL = "terminal"
    ADMIN = "admin"


def format_time(value: dt.datetime, *, precise: bool = False) -> str:
    """RFC 3339 UTC with a ``Z``; whole seconds, or microseconds with ``precise`` (for times
    that order documents, like a deployment signature's ``signedAt``)."""
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if precise else "%Y-%m-%dT%H:%M:%SZ"
    return value.astimezone(dt.UTC).strftime(fmt)


_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")


def parse_time(value: object, what: str) -> dt.datetime:
    text = str(value)
    try:
        if not _TIME.fullmatch(text):
            raise ValueError(text)
        parsed = dt.datetime.fromisoformat(text[:-1])  # C code; the shape was checked above
    except ValueError:
        raise AuthorityError(
            f"{what}: {text[:40]!r} is not a time like 2030-01-01T00:00:00Z",
            Refusal.MALFORMED,
        ) from None
    return parsed.replace(tzinfo=dt.UTC)


def _text(signed: Mapping[str, Any], field: str, what: str) -> str:
    value = signed.get(field)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise AuthorityError(f"{what}: {field!r} must be a non-empty string", Refusal.MALFORMED)
    return value


# --- root metadata ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoleKeys:
    keyids: tuple[str, ...]
    threshold: int


@dataclass(frozen=True, slots=True)
class RootMetadata:
    tenant: str
    version: int
    expires: dt.datetime
    keys: Mapping[str, Ed25519PublicKey]
    roles: Mapping[str, RoleKeys]
    envelope: Mapping[str, Any]  # as signed: what a device is sent

    def role_keys(self, role: str) -> tuple[dict[str, Ed25519PublicKey], int]:
        """The keys (by id) that may act as ``role`` and how many of them must."""
        spec = self.roles.get(role)
        if spec is None:
            return {}, 1
        return {k: self.keys[k] for k in spec.keyids if k in self.keys}, spec.threshold

    def verify(
        self,
        env: Mapping[str, Any],
        role: str,
        what: str,
        memo: SignatureMemo | None = None,
    ) -> dict[str, Any]:
        keys, threshold = self.role_keys(role)
        return envelope.verify(env, keys, threshold, what, memo)

    def expired(self, now: dt.datetime) -> bool:
        return now >= self.expires


def _root_from(env: Mapping[str, Any], what: str) -> RootMetadata:
    signed = env["signed"]
    version = signed.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise AuthorityError(f"{what}: 'version' must be a positive integer", Refusal.MALFORMED)
    raw_keys = signed.get("keys")
    raw_roles = signed.get("roles")
    if not isinstance(raw_keys, dict) or len(raw_keys) > MAX_ROOT_KEYS:
        raise AuthorityError(
            f"{what}: 'keys' must map at most {MAX_ROOT_KEYS} key ids", Refusal.MALFORMED
        )
    if not isinstance(raw_roles, dict):
        raise AuthorityError(f"{what}: 'roles' must be an object", Refusal.MALFORMED)
    keys: dict[str, Ed25519PublicKey] = {}
    for kid, doc in raw_keys.items():
        key = envelope.public_key_of(doc, f"{what} key {str(kid)[:16]}")
        if envelope.key_id(key) != kid:
            raise AuthorityError(
                f"{what}: key id {str(kid)[:16]}... does not name its key", Refusal.MALFORMED
            )
        keys[kid] = key
    roles: dict[str, RoleKeys] = {}
    for name, spec in raw_roles.items():
        ids = spec.get("keyids") if isinstance(spec, dict) else None
        threshold = spec.get("threshold") if isinstance(spec, dict) else None
        if (
            not isinstance(ids, list)
            or not all(isinstance(i, str) and i in keys for i in ids)
            or not isinstance(threshold, int)
            or isinstance(threshold, bool)
            or not 1 <= threshold <= len(ids)
        ):
            raise AuthorityError(
                f"{what}: role {str(name)[:20]!r} needs known keyids and 1 <= threshold <= their number",
                Refusal.MALFORMED,
            )
        roles[str(name)] = RoleKeys(tuple(ids), threshold)
    if "root" not in roles:
        raise AuthorityError(f"{what}: no 'root' role", Refusal.MALFORMED)
    return RootMetadata(
        tenant=_text(signed, "tenant", what),
        version=version,
        expires=parse_time(signed.get("expires"), f"{what} expires"),
        keys=keys,
        roles=roles,
        envelope=dict(env),
    )


def make_root(
    tenant: str,
    version: int,
    expires: dt.datetime,
    *,
    root_keys: Sequence[Ed25519PublicKey],
    controller_keys: Sequence[Ed25519PublicKey],
    signers: Iterable[Ed25519PrivateKey],
    threshold: int = 1,
) -> dict[str, Any]:
    """Signed root metadata (an envelope) naming ``root_keys`` and ``controller_keys``."""
    keys = {envelope.key_id(k): envelope.public_key_doc(k) for k in (*root_keys, *controller_keys)}
    signed = {
        "_type": ROOT_TYPE,
        "tenant": tenant,
        "version": version,
        "expires": format_time(expires),
        "keys": keys,
        "roles": {
            "root": {
                "keyids": sorted(envelope.key_id(k) for k in root_keys),
                "threshold": threshold,
            },
            "controller": {
                "keyids": sorted(envelope.key_id(k) for k in controller_keys),
                "threshold": 1,
            },
        },
    }
    return envelope.sign(signed, signers)


def read_root(data: bytes | str | Mapping[str, Any], what: str = "root metadata") -> RootMetadata:
    """Parse root metadata without trusting it (see ``TrustedRoot`` for that)."""
    return _root_from(envelope.parse(data, ROOT_TYPE, what), what)


class TrustedRoot:
    """The root metadata a device trusts: first version checked against the pinned key, every
    later one by the chain rule. Immutable: ``update`` returns the new state."""

    __slots__ = ("tenant", "current")

    def __init__(self, tenant: str, current: RootMetadata) -> None:
        self.tenant = tenant
        self.current = current

    @classmethod
    def from_pinned(
        cls,
        tenant: str,
        pinned: Ed25519PublicKey,
        first: bytes | Mapping[str, Any],
        now: dt.datetime,
    ) -> TrustedRoot:
        """Trust ``first`` if the pinned root key is one of its root keys and signed it."""
        meta = read_root(first)
        kid = envelope.key_id(pinned)
        if kid not in meta.roles["root"].keyids:
            raise AuthorityError(
                "root metadata does not name the root key this device pinned", Refusal.BAD_SIGNATURE
            )
        keys, threshold = meta.role_keys("root")
        good = envelope.signers(meta.envelope, keys)  # each signature checked once
        if kid not in good or len(good) < threshold:
            raise AuthorityError(
                f"root metadata version {meta.version} is not signed by the pinned root key "
                f"and {threshold} of its root keys",
                Refusal.BAD_SIGNATURE,
            )
        return cls._checked(tenant, meta, now)

    @classmethod
    def _checked(cls, tenant: str, meta: RootMetadata, now: dt.datetime) -> TrustedRoot:
        if meta.tenant != tenant:
            raise AuthorityError(
                f"root metadata is for tenant {meta.tenant!r}, not {tenant!r}", Refusal.WRONG_TENANT
            )
        if meta.expired(now):
            raise AuthorityError(
                f"root metadata version {meta.version} expired at {format_time(meta.expires)}",
                Refusal.EXPIRED,
            )
        return cls(tenant, meta)

    def update(self, chain: Sequence[bytes | Mapping[str, Any]], now: dt.datetime) -> TrustedRoot:
        """Follow ``chain`` (versions after the current one, oldest first; the current one may
        lead) to its newest version; refuses a rollback and any broken link."""
        meta = self.current
        offered = [read_root(item) for item in chain]
        if offered and max(o.version for o in offered) < meta.version:
            raise AuthorityError(
                f"root metadata version {max(o.version for o in offered)} is older than the "
                f"held version {meta.version}",
                Refusal.ROOT_ROLLBACK,
            )
        for new in offered:
            if new.version < meta.version:
                continue  # already behind us (sent again with newer ones): never go back
            if new.version == meta.version:
                if new.envelope != meta.envelope:
                    raise AuthorityError(
                        f"root metadata version {new.version} differs from the one held",
                        Refusal.ROOT_ROLLBACK,
                    )
                continue
            if new.version != meta.version + 1:
                raise AuthorityError(
                    f"root metadata version {new.version} skips version {meta.version + 1}",
                    Refusal.ROOT_ROLLBACK,
                )
            what = f"root metadata version {new.version}"
            meta.verify(new.envelope, "root", f"{what} (by the previous root keys)")
            new.verify(new.envelope, "root", f"{what} (by its own root keys)")
            if new.tenant != meta.tenant:
                raise AuthorityError(f"{what} names another tenant", Refusal.WRONG_TENANT)
            meta = new
        return TrustedRoot._checked(self.tenant, meta, now)


# --- operators --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Operator:
    """An operator as its verified certificate says."""

    tenant: str
    name: str
    roles: frozenset[Role]
    key: Ed25519PublicKey
    expires: dt.datetime

    @property
    def key_id(self) -> str:
        return envelope.key_id(self.key)

    def may(self, role: Role) -> bool:
        return role in self.roles or Role.ADMIN in self.roles


def make_operator_cert(
    tenant: str,
    name: str,
    roles: Iterable[Role | str],
    key: Ed25519PublicKey,
    *,
    issued: dt.datetime,
    expires: dt.datetime,
    signers: Iterable[Ed25519PrivateKey],
) -> dict[str, Any]:
    signed = {
        "_type": OPERATOR_TYPE,
        "tenant": tenant,
        "name": name,
        "roles": sorted({Role(r).value for r in roles}),
        "key": envelope.public_key_doc(key),
        "issued": format_time(issued),
        "expires": format_time(expires),
    }
    return envelope.sign(signed, signers)


def read_operator(
    data: bytes | str | Mapping[str, Any], what: str = "operator certificate"
) -> Operator:
    """The operator a certificate names, without checking who signed it."""
    signed = envelope.parse(data, OPERATOR_TYPE, what)["signed"]
    raw_roles = signed.get("roles")
    try:
        roles = frozenset(Role(r) for r in raw_roles) if isinstance(raw_roles, list) else None
    except ValueError:
        roles = None
    if not roles:
        raise AuthorityError(
            f"{what}: 'roles' must list some of {', '.join(r.value for r in Role)}",
            Refusal.MALFORMED,
        )
    return Operator(
        tenant=_text(signed, "tenant", what),
        name=_text(signed, "name", what),
        roles=roles,
        key=envelope.public_key_of(signed.get("key"), f"{what} key"),
        expires=parse_time(signed.get("expires"), f"{what} expires"),
    )


def verify_operator(
    data: bytes | str | Mapping[str, Any],
    root: RootMetadata,
    now: dt.datetime,
    *,
    role: Role | None = None,
    memo: SignatureMemo | None = None,
) -> Operator:
    """The operator of a certificate the root signed, for the root's tenant, not expired, and
    holding ``role`` (or ``admin``) when one is asked for; with ``memo``, a certificate whose
    signature it remembers is not checked again."""
    env = envelope.parse(data, OPERATOR_TYPE, "operator certificate")
    operator = read_operator(env)
    what = f"operator {operator.name!r}"
    root.verify(env, "root", f"{what}'s certificate", memo)
    if operator.tenant != root.tenant:
        raise AuthorityError(
            f"{what} is certified for tenant {operator.tenant!r}", Refusal.WRONG_TENANT
        )
    if now >= operator.expires:
        raise AuthorityError(
            f"{what}'s certificate expired at {format_time(operator.expires)}", Refusal.EXPIRED
        )
    if role is not None and not operator.may(role):
        raise AuthorityError(
            f"{what} lacks the {role.value!r} role (has {', '.join(sorted(operator.roles))})",
            Refusal.ROLE_MISSING,
        )
    return operator
