"""The store's part for rollouts (``controller.rollouts``): records and the protocol both
stores implement (``sqlite_rollouts``, ``pg_rollouts``).

A rollout is one row: its name (unique per tenant), the operator's request (``spec``), the
state machine's state (``state``, JSON), its phase (a column, so active rollouts are found by
index), a ``version`` that grows with every save, and a lease: the controller instance that
runs it (``owner``) until ``owner_until``. Saves are compare-and-set on ``version``
(``RolloutConflict`` when someone saved in between: read it again and redo the change); the
driver claims active rollouts whose lease is free or expired, so with several controllers on
one PostgreSQL store exactly one of them runs each rollout at a time. A save appends the
machine's events to the tenant's feed in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

JsonDict = dict[str, Any]
ACTIVE_PHASES = ("running", "paused", "rolling-back")
RolloutEvent = tuple[str, str | None, JsonDict]  # (kind, device_id, payload)


class RolloutConflict(ValueError):
    """The rollout was saved by someone else since it was read: read it again."""


class RolloutExists(ValueError):
    """A rollout of that name exists in the tenant already."""


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    tenant: str
    name: str
    version: int
    phase: str
    spec: JsonDict
    state: JsonDict
    created: float
    updated: float
    owner: str | None
    owner_until: float | None


class RolloutStore(Protocol):
    async def create_rollout(
        self,
        tenant: str,
        name: str,
        *,
        spec: JsonDict,
        state: JsonDict,
        phase: str,
        events: Sequence[RolloutEvent] = (),
        now: float | None = None,
    ) -> RolloutRecord:
        """``RolloutExists`` when the name is taken."""
        ...

    async def get_rollout(self, tenant: str, name: str) -> RolloutRecord:
        """``NotFound`` for an unknown name."""
        ...

    async def list_rollouts(self, tenant: str, *, limit: int = 100) -> list[RolloutRecord]:
        """Newest first."""
        ...

    async def save_rollout(
        self,
        tenant: str,
        name: str,
        *,
        version: int,
        state: JsonDict,
        phase: str,
        events: Sequence[RolloutEvent] = (),
        now: float | None = None,
    ) -> RolloutRecord:
        """Store the new state if the stored version is still ``version``
        (``RolloutConflict`` otherwise); the record now has ``version + 1``."""
        ...

    async def claim_rollouts(
        self, owner: str, *, ttl: float, now: float | None = None, steal: bool = False
    ) -> list[tuple[str, str]]:
        """Take (or keep) the lease of every active rollout that is free, expired or already
        ``owner``'s (with ``steal``: whoever holds it; for a controller alone on its store,
        whose earlier run was killed), until ``now + ttl``; returns the ``(tenant, name)`` it
        holds."""
        ...

    async def release_rollouts(self, owner: str) -> None:
        """Give up every lease ``owner`` holds (at shutdown: another instance takes over)."""
        ...
