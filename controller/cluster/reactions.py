"""What a controller does with the news of the others in its cluster, and what it tells them.

- DESIRED: another instance stored new manifests for these devices: push to those held here
  (and wake the other device transports), after forgetting what was cached of them.
- REPLACED: these devices connected to another instance with a newer lease generation: close
  their sessions here with ``REPLACED``, naming that instance.
- REVOKED: these identities were revoked through another instance: read them again from the
  store into the allow-list and close their sessions here.
- ALLOWED: these identities were allowed through another instance (an EST enrolment): read
  them again, so this instance admits their new keys at once.
- RESYNC: changes may have been missed: drop cached manifests (and push what devices lack),
  re-read the allow-list.

A lease this instance could not renew (``on_lost``) ends its session the same way as REPLACED.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from controller.identities import IdentityBook
from controller.ports import ChangeKind, Cluster, ClusterChange, DesiredChangeFanout, Lease
from controller.registry import SessionRegistry
from controller.store.base import IDENTITY_REVOKED, Store
from margo_stream.errors import NotFound, StoreError
from margo_stream.protocol.codes import ErrorCode

log = logging.getLogger("margo.controller.cluster")


class ClusterReactions:
    def __init__(
        self,
        cluster: Cluster,
        registry: SessionRegistry,
        store: Store,
        identities: IdentityBook,
        revoked_here: Callable[[str, str], None],
    ) -> None:
        self.cluster = cluster
        self.registry = registry
        self.store = store
        self.identities = identities
        self.revoked_here = revoked_here  # wakes the other device transports' streams
        self.desired: DesiredChangeFanout | None = None
        self.counts = dict.fromkeys(ChangeKind, 0)

    # --- telling the others --------------------------------------------------------------------
    async def publish_desired(self, tenant: str, device_ids: list[str]) -> None:
        """After a change applied here was pushed to this instance's devices."""
        await self.cluster.publish(ClusterChange(ChangeKind.DESIRED, tenant, tuple(device_ids)))

    def revoked(self, tenant: str, device_id: str, spawn: Callable[..., None]) -> None:
        """An identity was revoked here (``IdentityBook.revoked_listeners``)."""
        spawn(self._publish_revoked, tenant, device_id)

    async def _publish_revoked(self, tenant: str, device_id: str) -> None:
        await self._publish_identity(ChangeKind.REVOKED, tenant, device_id)

    async def allowed(self, tenant: str, device_id: str) -> None:
        """An identity was allowed here (an enrolment): the others re-read it."""
        await self._publish_identity(ChangeKind.ALLOWED, tenant, device_id)

    async def _publish_identity(self, kind: ChangeKind, tenant: str, device_id: str) -> None:
        try:
            await self.cluster.publish(ClusterChange(kind, tenant, (device_id,)))
        except StoreError as exc:
            log.error("the other controllers were not told of an identity %s: %s", kind, exc)

    # --- hearing from them ---------------------------------------------------------------------
    async def on_change(self, change: ClusterChange) -> None:
        self.counts[change.kind] += 1
        if change.kind is ChangeKind.DESIRED:
            assert self.desired is not None, "the desired-state fan-out is not wired"
            await self.desired.changed_elsewhere(change.tenant, list(change.devices))
        elif change.kind is ChangeKind.REPLACED:
            for device_id, generation in zip(change.devices, change.generations, strict=False):
                self._replaced(change.tenant, device_id, generation, change.origin)
        elif change.kind in (ChangeKind.REVOKED, ChangeKind.ALLOWED):
            for device_id in change.devices:
                await self._identity(change.tenant, device_id)
        elif change.kind is ChangeKind.RESYNC:
            log.warning(
                "cluster: changes may have been missed; dropping cached state",
                extra={"event": "cluster-resync"},
            )
            self.identities.allowlist.replace(await self.store.list_identities())
            if self.desired is not None:
                await self.desired.resync()

    def on_lost(self, lease: Lease) -> None:
        view = self.registry.get(lease.tenant, lease.device_id)
        if view is not None and view.handle is not None and view.generation == lease.generation:
            view.handle.close(
                ErrorCode.REPLACED, "replaced by a newer connection on another instance"
            )
            log.info(
                "closed %s/%s: its lease was taken by another instance",
                lease.tenant,
                lease.device_id,
                extra={"event": "session-replaced-remote"},
            )

    def _replaced(self, tenant: str, device_id: str, generation: int, holder: str) -> None:
        view = self.registry.get(tenant, device_id)
        if view is None or view.handle is None or view.generation >= generation:
            return
        view.handle.close(
            ErrorCode.REPLACED, f"replaced by a newer connection on instance {holder}"
        )
        log.info(
            "closed %s/%s: it connected to instance %s",
            tenant,
            device_id,
            holder,
            extra={"event": "session-replaced-remote", "holder": holder},
        )

    async def _identity(self, tenant: str, device_id: str) -> None:
        try:
            record = await self.store.get_identity(tenant, device_id)
        except NotFound:
            return
        self.identities.allowlist.put(record)
        if record.state != IDENTITY_REVOKED:
            return
        link = self.registry.link(tenant, device_id)
        if link is not None:
            link.close(ErrorCode.IDENTITY_REFUSED, "revoked")
        self.revoked_here(tenant, device_id)
