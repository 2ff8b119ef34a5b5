"""The rollout driver: runs the state machines of the rollouts this controller holds.

Theory of operation
-------------------
One task (``run``, in the controller's task group) claims the active rollouts whose lease is
free, expired or already its own (``Store.claim_rollouts``; renewed every third of the lease),
so that with several controllers on one PostgreSQL store each rollout runs on exactly one of
them, and another takes over within a lease when its instance dies. Each pass over a held
rollout reads it, gives its machine what the devices reported (the newest stored status of the
rollout's deployment, whoever received it) and the time, stores the new state together with
its events (compare-and-set on the rollout's version: an operator's pause or abort saved
meanwhile wins, and the pass is redone on the next tick), then performs the actions:

- ``Assign``: record each device's previous assignment of the deployment (saved before
  anything changes, so a rollback always knows it), point the devices at the rollout's
  document, push (``DesiredChanges``: signed manifests, to every controller of the cluster),
  and note the manifest version that carries the revision;
- ``Restore``: give each device its previous assignment back (or none), push.

Both are idempotent, so a pass cut short by a crash is simply done again by whoever holds the
rollout next. Idle (no active rollout) the driver only wakes to claim, every
``claim_interval`` seconds, or when the API says a rollout was created or commanded.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import defaultdict
from typing import Any

import anyio

from controller.document_cache import CachedDocument, DocumentCache
from controller.labels import selector_matches
from controller.ports import DesiredChanges
from controller.rollouts.machine import (
    ACTIVE,
    Action,
    Assign,
    Emit,
    Observation,
    Phase,
    Restore,
    RolloutMachine,
)
from controller.rollouts.spec import RolloutSpec
from controller.store.base import DeploymentDraft, Store
from controller.store.rollouts import RolloutConflict, RolloutRecord
from margo_stream.errors import NotFound
from margo_stream.state.documents import parse_deployment
from margo_stream.state.status import status_from_margo

log = logging.getLogger("margo.controller.rollouts")

TICK = 0.25  # between passes while a rollout is active
LEASE_TTL = 15.0
JOIN_INTERVAL = 2.0  # how often a --selector rollout looks for devices that joined


class RolloutDriver:
    def __init__(
        self,
        store: Store,
        owner: str,
        *,
        documents: DocumentCache | None = None,
        tick: float = TICK,
        lease_ttl: float = LEASE_TTL,
    ) -> None:
        self.store = store
        self.documents = documents  # the desired-state push's parsed documents
        self.owner = owner
        self.tick = tick
        self.lease_ttl = lease_ttl
        self.claim_interval = lease_ttl / 3
        self._wake = anyio.Event()
        self._held: list[tuple[str, str]] = []
        self._claimed_at = -1e9
        self._joins_at: dict[tuple[str, str], float] = {}
        self.passes = 0
        self._steal = False

    def wake(self) -> None:
        """A rollout was created or commanded: claim and run at once."""
        self._wake.set()
        self._claimed_at = -1e9

    async def run(self, changes: DesiredChanges, exclusive: bool = False) -> None:
        """Drive rollouts until cancelled; the leases are given up on the way out. A
        controller alone on its store (``exclusive``) first takes the leases an earlier run of
        it left behind, so a killed controller's rollouts resume at once after a restart."""
        self._steal = exclusive
        try:
            while True:
                try:
                    await self.pass_once(changes)
                except Exception:
                    log.exception("rollout pass failed; trying again")
                delay = self.tick if self._held else self.claim_interval
                with anyio.move_on_after(delay):
                    await self._wake.wait()
                self._wake = anyio.Event()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self.store.release_rollouts(self.owner)
                except Exception as exc:  # the store may be closing: the leases expire
                    log.info("could not release rollout leases: %s", exc)

    async def pass_once(self, changes: DesiredChanges) -> None:
        now = time.monotonic()
        if now - self._claimed_at >= self.claim_interval:
            self._held = await self.store.claim_rollouts(
                self.owner, ttl=self.lease_ttl, steal=self._steal
            )
            self._steal = False
            self._claimed_at = now
            alive = set(self._held)
            for key in [k for k in self._joins_at if k not in alive]:
                del self._joins_at[key]
        observed: dict[str, dict[str, dict[str, Any]]] = {}
        for tenant, name in list(self._held):
            try:
                done = await self.advance(tenant, name, changes, observed)
            except RolloutConflict as exc:
                log.info("rollout %s/%s changed meanwhile, next pass: %s", tenant, name, exc)
                continue
            except NotFound:
                done = True
            if done:
                self._held.remove((tenant, name))
        self.passes += 1

    # --- one rollout --------------------------------------------------------------------------
    async def advance(
        self,
        tenant: str,
        name: str,
        changes: DesiredChanges,
        observed: dict[str, dict[str, dict[str, Any]]],
    ) -> bool:
        """One pass over one rollout; whether it has ended."""
        record = await self.store.get_rollout(tenant, name)
        spec = RolloutSpec.from_json(record.spec)
        machine = RolloutMachine.from_json(spec, record.state)
        if machine.phase not in ACTIVE:
            return True
        before = machine.to_json()
        wall = time.time()
        actions: list[Action] = []
        if spec.selector and machine.phase in (Phase.RUNNING, Phase.PAUSED):
            actions += await self._joiners(tenant, name, spec, machine, wall)
        if machine.phase is Phase.RUNNING and machine.current >= 0:
            watched = [
                d
                for d in machine.steps[machine.current].devices
                if (t := machine.devices[d]).version is not None
                and t.failed is None
                and not t.healthy
            ]
            if watched:
                statuses = await self._statuses(tenant, spec.deployment_id, observed)
                for device_id in watched:
                    actions += machine.observe(
                        device_id, _observation(statuses.get(device_id)), wall
                    )
        actions += machine.tick(wall)
        record = await self._save(record, machine, actions, before)
        for action in actions:
            if isinstance(action, Assign):
                record = await self._assign(record, machine, action, changes)
            elif isinstance(action, Restore):
                record = await self._restore(record, machine, action, changes)
        return machine.phase not in ACTIVE

    async def _save(
        self,
        record: RolloutRecord,
        machine: RolloutMachine,
        actions: list[Action],
        before: dict[str, Any] | None = None,
    ) -> RolloutRecord:
        events = [(a.kind, a.device, a.payload) for a in actions if isinstance(a, Emit)]
        state = machine.to_json()
        if not events and state == before:
            return record
        return await self.store.save_rollout(
            record.tenant,
            record.name,
            version=record.version,
            state=state,
            phase=str(machine.phase),
            events=events,
        )

    async def _statuses(
        self, tenant: str, deployment_id: str, observed: dict[str, dict[str, dict[str, Any]]]
    ) -> dict[str, dict[str, Any]]:
        """device -> newest stored status of ``deployment_id`` (read once per tenant and pass)."""
        key = f"{tenant}\0{deployment_id}"
        found = observed.get(key)
        if found is None:
            found = {}
            for s in await self.store.list_statuses(tenant):
                if s.deployment_id == deployment_id:
                    found[s.device_id] = {"status": s.status, "updated_at": s.updated_at}
            observed[key] = found
        return found

    async def _joiners(
        self, tenant: str, name: str, spec: RolloutSpec, machine: RolloutMachine, wall: float
    ) -> list[Action]:
        key = (tenant, name)
        now = time.monotonic()
        if now - self._joins_at.get(key, -1e9) < JOIN_INTERVAL:
            return []
        self._joins_at[key] = now
        selector = dict(spec.selector)
        known = set(machine.targets)
        new = [
            r.device_id
            for r in await self.store.list_devices(tenant)
            if r.device_id not in known and selector_matches(selector, r.labels, r.reported_labels)
        ]
        return machine.join(sorted(new), wall) if new else []

    async def _assign(
        self,
        record: RolloutRecord,
        machine: RolloutMachine,
        action: Assign,
        changes: DesiredChanges,
    ) -> RolloutRecord:
        spec = machine.spec
        tenant = record.tenant
        devices = list(action.devices)
        unprepared = [d for d in devices if not machine.devices[d].prepared]
        if unprepared:
            current = {
                a.device_id: a.digest
                for a in await self.store.list_assignments(tenant)
                if a.deployment_id == spec.deployment_id
            }
            for d in unprepared:
                machine.prepared(d, current.get(d))
            # saved before anything changes: a rollback must know what to give back
            record = await self._save(record, machine, [])
        await self.store.assign(tenant, devices, spec.deployment_id, spec.digest)
        await changes.desired_changed(tenant, devices)
        latest = await self.store.latest_manifests(tenant, devices)
        for d in devices:
            manifest = latest.get(d)
            if manifest is not None:
                machine.assigned(d, manifest.version)
        log.info(
            "rollout %s/%s: %d device(s) assigned %s",
            tenant,
            record.name,
            len(devices),
            spec.digest[:19],
            extra={"event": "rollout-assigned", "rollout": record.name},
        )
        return await self._save(record, machine, [])

    async def _restore(
        self,
        record: RolloutRecord,
        machine: RolloutMachine,
        action: Restore,
        changes: DesiredChanges,
    ) -> RolloutRecord:
        spec = machine.spec
        tenant = record.tenant
        by_digest: dict[str | None, list[str]] = defaultdict(list)
        for device_id, previous in action.devices:
            by_digest[previous].append(device_id)
        for digest, devices in by_digest.items():
            if digest is not None:
                if digest != spec.digest:
                    await self._resign(tenant, spec, digest)
                await self.store.assign(tenant, devices, spec.deployment_id, digest)
                continue
            for device_id in devices:
                try:
                    await self.store.unassign(tenant, device_id, spec.deployment_id)
                except NotFound:
                    pass  # never assigned (a crash before the assignment): nothing to undo
        restored = [d for d, _ in action.devices]
        await changes.desired_changed(tenant, restored)
        events: list[Action] = []
        wall = time.time()
        for d in restored:
            events += machine.restored(d, wall)
        log.info(
            "rollout %s/%s: %d device(s) given their previous desired state back",
            tenant,
            record.name,
            len(restored),
            extra={"event": "rollout-restored", "rollout": record.name},
        )
        return await self._save(record, machine, events)

    async def _resign(self, tenant: str, spec: RolloutSpec, digest: str) -> None:
        """Give the version a rollback brings back the operator's rollback signature (newer
        than the revision's: a device refuses an older signature as a replay)."""
        signature = dict(spec.rollback).get(digest)
        if signature is None:
            log.warning(
                "rollout %s/%s: no rollback signature for %s; devices holding the revision will"
                " refuse its older signature (sign it with margoctl rollout create)",
                tenant,
                spec.name,
                digest[:19],
                extra={"event": "rollout-unsigned-rollback", "rollout": spec.name},
            )
            return
        record = await self.store.get_deployment(tenant, spec.deployment_id, digest)
        if record.signature == signature:
            return
        data = await self.store.get_blob(tenant, digest)
        draft = DeploymentDraft(
            deployment_id=spec.deployment_id,
            document=data,
            name=record.name,
            profile=record.profile,
            signature=signature,
            certificate=spec.certificate,
        )
        await self.store.apply(tenant, blobs=[], deployments=[draft], devices=[])
        if self.documents is not None:
            document = await anyio.to_thread.run_sync(
                functools.partial(parse_deployment, data, source=f"deployment {digest}")
            )
            self.documents.put(
                tenant, digest, CachedDocument(document, json.loads(signature), spec.certificate)
            )


def _observation(item: dict[str, Any] | None) -> Observation | None:
    if item is None:
        return None
    try:
        status = status_from_margo(item["status"])
    except ValueError:
        return None
    error = status.error or next((c.error for c in status.components if c.error), None)
    return Observation(
        state=status.state,
        version=status.manifest_version,
        updated_at=float(item["updated_at"]),
        error=f"{error.code}: {error.message}" if error else None,
    )
