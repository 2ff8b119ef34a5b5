"""What operators author and sign on their own machines: deployment signatures and terminal
grants, and how a device checks them against its root of trust.

A **deployment signature** is an operator's envelope over ``{tenant, deploymentId, digest,
signedAt}``: the digest covers the document's exact bytes, so a changed document is not the
signed one, and ``signedAt`` lets a device refuse an older signature for a deployment it
already holds a newer one for (a replay). It must come from an operator with ``deployer``
(or ``admin``) whose certificate the tenant's root signed and that has not expired.

A **terminal grant** is an operator's envelope over ``{tenant, device, command, tty,
operator, expires, nonce}``: valid for one device, one command (or the login shell), at most
``MAX_GRANT_SECONDS``, once. It must come from an operator with ``terminal`` (or ``admin``).
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from margo_stream.errors import AuthorityError
from margo_stream.identity import envelope
from margo_stream.identity.authority import (
    Operator,
    Role,
    RootMetadata,
    format_time,
    parse_time,
    verify_operator,
)
from margo_stream.protocol.codes import Refusal

DEPLOYMENT_TYPE = "margo-deployment-signature"
GRANT_TYPE = "margo-terminal-grant"
MAX_GRANT_SECONDS = 300
CLOCK_SKEW = dt.timedelta(seconds=60)


# --- deployments ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignedDeployment:
    operator: Operator
    signed_at: dt.datetime


def sign_deployment(
    tenant: str, deployment_id: str, digest: str, key: Ed25519PrivateKey, *, now: dt.datetime
) -> dict[str, Any]:
    signed = {
        "_type": DEPLOYMENT_TYPE,
        "tenant": tenant,
        "deploymentId": deployment_id,
        "digest": digest,
        "signedAt": format_time(now, precise=True),
    }
    return envelope.sign(signed, [key])


def verify_deployment(
    signature: bytes | str | Mapping[str, Any],
    certificate: bytes | str | Mapping[str, Any],
    root: RootMetadata,
    *,
    deployment_id: str,
    digest: str,
    now: dt.datetime,
) -> SignedDeployment:
    """Who signed this exact deployment document, checked all the way to the root."""
    operator = verify_operator(certificate, root, now, role=Role.DEPLOYER)
    return verify_signed_by(
        signature, operator, root.tenant, deployment_id=deployment_id, digest=digest, now=now
    )


def verify_signed_by(
    signature: bytes | str | Mapping[str, Any],
    operator: Operator,
    tenant: str,
    *,
    deployment_id: str,
    digest: str,
    now: dt.datetime,
) -> SignedDeployment:
    """``verify_deployment`` for an operator whose certificate was already verified (a
    ``deployer`` of ``tenant``'s root, not expired at ``now``)."""
    what = f"deployment {deployment_id!r}"
    env = envelope.parse(signature, DEPLOYMENT_TYPE, f"{what}'s signature")
    signed = envelope.verify(env, {operator.key_id: operator.key}, 1, f"{what}'s signature")
    if signed.get("tenant") != tenant:
        raise AuthorityError(f"{what} was signed for another tenant", Refusal.WRONG_TENANT)
    if signed.get("deploymentId") != deployment_id or signed.get("digest") != digest:
        raise AuthorityError(
            f"{what}: the signature is for {str(signed.get('deploymentId'))[:60]!r} "
            f"{str(signed.get('digest'))[:80]}, not this document ({digest})",
            Refusal.DIGEST_MISMATCH,
        )
    signed_at = parse_time(signed.get("signedAt"), f"{what} signedAt")
    if signed_at > now + CLOCK_SKEW:
        raise AuthorityError(
            f"{what} is signed in the future ({format_time(signed_at)})", Refusal.MALFORMED
        )
    return SignedDeployment(operator, signed_at)


# --- terminal grants --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    operator: Operator
    device: str
    command: tuple[str, ...] | None
    tty: bool
    expires: dt.datetime
    nonce: str


def make_grant(
    tenant: str,
    device: str,
    command: list[str] | None,
    *,
    tty: bool,
    operator: str,
    key: Ed25519PrivateKey,
    now: dt.datetime,
    seconds: int = 60,
) -> dict[str, Any]:
    if not 1 <= seconds <= MAX_GRANT_SECONDS:
        raise ValueError(f"a grant lasts 1..{MAX_GRANT_SECONDS} s, not {seconds}")
    signed = {
        "_type": GRANT_TYPE,
        "tenant": tenant,
        "device": device,
        "command": command,
        "tty": tty,
        "operator": operator,
        "expires": format_time(now + dt.timedelta(seconds=seconds)),
        "nonce": secrets.token_hex(16),
    }
    return envelope.sign(signed, [key])


def verify_grant(
    grant: bytes | str | Mapping[str, Any],
    certificate: bytes | str | Mapping[str, Any],
    root: RootMetadata,
    *,
    device: str,
    command: list[str] | None,
    tty: bool,
    now: dt.datetime,
) -> Grant:
    """The grant, checked: signed by a ``terminal`` operator the root certified, for this
    tenant, device, command and terminal mode, and not expired. (Reuse is the caller's check:
    ``NonceLedger``.)"""
    operator = verify_operator(certificate, root, now, role=Role.TERMINAL)
    env = envelope.parse(grant, GRANT_TYPE, "terminal grant")
    signed = envelope.verify(env, {operator.key_id: operator.key}, 1, "terminal grant")
    if signed.get("tenant") != root.tenant:
        raise AuthorityError("the terminal grant is for another tenant", Refusal.WRONG_TENANT)
    if signed.get("device") != device:
        raise AuthorityError(
            f"the terminal grant is for device {str(signed.get('device'))[:60]!r}",
            Refusal.WRONG_DEVICE,
        )
    if signed.get("operator") != operator.name:
        raise AuthorityError("the terminal grant names another operator", Refusal.MALFORMED)
    granted = signed.get("command")
    if granted != command or signed.get("tty") is not tty:
        raise AuthorityError("the terminal grant is for another command", Refusal.MALFORMED)
    expires = parse_time(signed.get("expires"), "terminal grant expires")
    if now >= expires:
        raise AuthorityError(
            f"the terminal grant expired at {format_time(expires)}", Refusal.EXPIRED
        )
    if expires > now + dt.timedelta(seconds=MAX_GRANT_SECONDS) + CLOCK_SKEW:
        raise AuthorityError(
            f"the terminal grant lasts longer than {MAX_GRANT_SECONDS} s", Refusal.MALFORMED
        )
    nonce = signed.get("nonce")
    if not isinstance(nonce, str) or not 16 <= len(nonce) <= 64:
        raise AuthorityError("the terminal grant has no usable nonce", Refusal.MALFORMED)
    return Grant(
        operator=operator,
        device=device,
        command=tuple(command) if command is not None else None,
        tty=tty,
        expires=expires,
        nonce=nonce,
    )


class NonceLedger:
    """Nonces of grants already used, each kept until its grant expires (so bounded by how
    many grants can be live at once, ``max_entries`` at most; when full, a new grant is refused
    rather than an old nonce forgotten)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._max = max_entries
        self._seen: dict[str, dt.datetime] = {}

    def use(self, grant: Grant, now: dt.datetime) -> None:
        self._seen = {n: e for n, e in self._seen.items() if e > now}
        if grant.nonce in self._seen:
            raise AuthorityError("the terminal grant was used before", Refusal.REPLAYED)
        if len(self._seen) >= self._max:
            raise AuthorityError(
                "too many live terminal grants; try again shortly", Refusal.REPLAYED
            )
        self._seen[grant.nonce] = grant.expires

    def items(self) -> dict[str, dt.datetime]:
        return dict(self._seen)

    def load(self, items: Mapping[str, dt.datetime]) -> None:
        self._seen.update(items)
