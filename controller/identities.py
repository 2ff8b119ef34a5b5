"""Device identity lifecycle in the controller: admission, revocation, the allow files.

Theory of operation
-------------------
``IdentityBook`` owns the in-memory ``AllowList`` and is the only thing that changes it, always
after the store (the source of truth) changed: at start and on reload it imports the allow
files (``DIR/<tenant>/allowed/*.json``, written by ``margo-certs device``) into the store and
loads the store's whole table; ``allow`` (enrolment), ``revoke`` and ``allow_again`` (the
operator API) write one record and put it in memory.

``Admission`` is the one place every device transport asks who a certificate proves: the
chain (``PeerVerifier``), then the allow-list, synchronously (a dictionary lookup). When the
allow-list would refuse, the device's own allow file is read once: a device issued by
``margo-certs device`` while the controller runs (a newer file, the key it presents) is
admitted at once and recorded in the store in the background, as a reload would have done. A
refusal is ``PeerRejected("not-allowed: ...")`` or ``PeerRejected("revoked: ...")``; nothing
is registered and no device record is made.

Revocation closes the device's live QUIC session at once (``IDENTITY_REFUSED``, "revoked"); a
session that was admitted just before the revocation and registers after it is closed by the
``recheck`` ready hook.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from cryptography import x509

from controller.allowlist import REVOKED, AllowList
from controller.ports import DeviceLink, TaskSpawner
from controller.registry import SessionRegistry
from controller.store.base import (
    IDENTITY_ALLOWED,
    IDENTITY_REVOKED,
    IdentityImport,
    IdentityRecord,
    Store,
    import_is_newer,
    import_merged,
)
from margo_stream.errors import IdentityError, PeerRejected
from margo_stream.identity.allowed_files import AllowedFile, allowed_path, read_allowed
from margo_stream.identity.spiffe import DeviceIdentity
from margo_stream.identity.verify import PeerVerifier
from margo_stream.protocol.codes import ErrorCode

log = logging.getLogger("margo.controller.identities")


class MustEnrolAgain(Exception):
    """``allow`` of a revoked identity: only a new enrolment (a new key) brings it back."""


def as_import(f: AllowedFile) -> IdentityImport:
    return (f.tenant, f.device_id, f.key_sha256, f.not_after, f.issued)


class IdentityBook:
    def __init__(
        self,
        store: Store,
        registry: SessionRegistry,
        certs: Path,
        tasks: TaskSpawner | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.certs = Path(certs)
        self.tasks = tasks
        self.allowlist = AllowList()
        # told (tenant, device id) of every revocation: device transports with long-lived
        # streams (HTTP/2 push) wake them, and they re-check and close
        self.revoked_listeners: list[Callable[[str, str], None]] = []

    # --- loading --------------------------------------------------------------------------------
    async def load(self, files: Sequence[AllowedFile]) -> list[IdentityRecord]:
        """Import ``files`` into the store, then load the store's allow-list into memory;
        returns the records the files changed."""
        changed = await self.store.import_identities([as_import(f) for f in files])
        self.allowlist.replace(await self.store.list_identities())
        if changed:
            log.info("allow files imported: %d identities allowed or updated", len(changed))
        return changed

    # --- changes --------------------------------------------------------------------------------
    async def allow(self, tenant: str, device_id: str, key_sha256: str, not_after: float) -> None:
        """Allow (or re-allow with a new key) an identity, e.g. after an enrolment."""
        await self.store.allow_identity(tenant, device_id, key_sha256, not_after)
        self.allowlist.put(await self.store.get_identity(tenant, device_id))

    async def revoke(self, tenant: str, device_id: str) -> IdentityRecord:
        """Revoke (``NotFound`` if unknown) and close the device's live session now."""
        await self.store.revoke_identity(tenant, device_id)
        record = await self.store.get_identity(tenant, device_id)
        self.allowlist.put(record)
        link = self.registry.link(tenant, device_id)
        if link is not None:
            link.close(ErrorCode.IDENTITY_REFUSED, "revoked")
        for listener in self.revoked_listeners:
            listener(tenant, device_id)
        log.info("identity revoked: %s/%s", tenant, device_id, extra={"event": "revoked"})
        return record

    async def allow_again(self, tenant: str, device_id: str) -> IdentityRecord:
        """The identity as it stands when it is allowed; ``MustEnrolAgain`` when revoked,
        ``NotFound`` when unknown. (A revoked key never comes back: it must enrol again.)"""
        record = await self.store.get_identity(tenant, device_id)
        if record.state == IDENTITY_REVOKED:
            raise MustEnrolAgain(
                f"device {device_id!r} was revoked; a revoked identity cannot be allowed again:"
                " it must enrol again (a new key), or be re-issued with margo-certs device"
            )
        self.allowlist.put(record)
        return record

    async def recheck(self, link: DeviceLink) -> None:
        """Ready hook: a session admitted just before its identity was revoked is closed."""
        if self.allowlist.state(link.tenant, link.device_id) == IDENTITY_REVOKED:
            link.close(ErrorCode.IDENTITY_REFUSED, "revoked")

    # --- admission ------------------------------------------------------------------------------
    def admit(self, identity: DeviceIdentity) -> None:
        """``PeerRejected`` unless the allow-list admits this verified identity."""
        tenant, device_id, key = identity.tenant, identity.device_id, identity.key_sha256
        reason = self.allowlist.check(tenant, device_id, key)
        if reason is None or self._admit_from_file(tenant, device_id, key):
            return
        record = self.allowlist.get(tenant, device_id)
        if reason == REVOKED:
            detail = f"{identity.spiffe_id} was revoked (it must enrol again)"
        elif record is None:
            detail = f"{identity.spiffe_id} is not on tenant {tenant!r}'s allow-list"
        else:
            detail = f"{identity.spiffe_id} presents another key than the one allowed"
        raise PeerRejected(f"{reason}: {detail}")

    def _admit_from_file(self, tenant: str, device_id: str, key: str) -> bool:
        path = allowed_path(self.certs, tenant, device_id)
        if not key or not path.is_file():
            return False
        try:
            found = read_allowed(path, tenant)
        except IdentityError as exc:
            log.warning("allow file ignored: %s", exc)
            return False
        item = as_import(found)
        old = self.allowlist.get(tenant, device_id)
        if found.key_sha256 != key or not import_is_newer(item, old):
            return False
        record = import_merged(item, old, time.time())
        if record.state != IDENTITY_ALLOWED:
            return False
        self.allowlist.put(record)
        if self.tasks is not None:
            self.tasks.spawn(self.store.import_identities, [item])
        log.info("allow file read at handshake: %s/%s", tenant, device_id)
        return True


class Admission:
    """``PeerCheck``: the certificate chain (``PeerVerifier``), then the allow-list."""

    def __init__(self, verifier: PeerVerifier, book: IdentityBook) -> None:
        self.verifier = verifier
        self.book = book

    def verify(
        self,
        leaf: x509.Certificate | None,
        chain: Sequence[x509.Certificate] = (),
        now: datetime | None = None,
    ) -> DeviceIdentity:
        identity = self.verifier.verify(leaf, chain, now)
        self.book.admit(identity)
        return identity

    def readmit(self, identity: DeviceIdentity, now: datetime | None = None) -> None:
        self.verifier.readmit(identity, now)
        self.book.admit(identity)


__all__ = ["Admission", "IdentityBook", "MustEnrolAgain", "as_import"]
