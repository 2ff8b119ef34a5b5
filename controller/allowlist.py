"""The tenants' allow-lists in memory: which device identities the controller admits.

A valid certificate is necessary, not sufficient (Margo: a valid SVID alone grants nothing).
After its chain verified, a device is admitted only when ``(tenant, device id)`` is on the
allow-list, ``allowed``, with the public key of the certificate it presents. The store's
``device_identities`` table is the one source of truth; this is its copy, loaded at start and
on every reload, and updated on every change (``controller/identities.py``), so the check in
the TLS path is a dictionary lookup and never waits on the store.

``check`` answers ``None`` (admit) or the refusal reason: ``"not-allowed"`` (unknown identity,
or another key than the recorded one) or ``"revoked"``.
"""

from __future__ import annotations

from collections.abc import Iterable

from controller.store.base import IDENTITY_ALLOWED, IDENTITY_REVOKED, IdentityRecord

NOT_ALLOWED = "not-allowed"
REVOKED = "revoked"
UNKNOWN = "unknown"  # the state the API shows for an identity not on the allow-list


class AllowList:
    def __init__(self, records: Iterable[IdentityRecord] = ()) -> None:
        self._entries: dict[tuple[str, str], IdentityRecord] = {}
        self.replace(records)

    def replace(self, records: Iterable[IdentityRecord]) -> None:
        """The whole allow-list at once (start, reload): one assignment."""
        self._entries = {(r.tenant, r.device_id): r for r in records}

    def put(self, record: IdentityRecord) -> None:
        self._entries[(record.tenant, record.device_id)] = record

    def get(self, tenant: str, device_id: str) -> IdentityRecord | None:
        return self._entries.get((tenant, device_id))

    def state(self, tenant: str, device_id: str) -> str:
        """``allowed``, ``revoked`` or ``unknown``."""
        record = self._entries.get((tenant, device_id))
        return UNKNOWN if record is None else record.state

    def check(self, tenant: str, device_id: str, key_sha256: str) -> str | None:
        """``None`` to admit, else the refusal reason (``not-allowed`` or ``revoked``)."""
        record = self._entries.get((tenant, device_id))
        if record is None:
            return NOT_ALLOWED
        if record.state == IDENTITY_REVOKED:
            return REVOKED
        if record.state != IDENTITY_ALLOWED or not key_sha256 or record.key_sha256 != key_sha256:
            return NOT_ALLOWED
        return None

    def __len__(self) -> int:
        return len(self._entries)


__all__ = ["NOT_ALLOWED", "REVOKED", "UNKNOWN", "AllowList"]
