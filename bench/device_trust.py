"""A simulated device's trust in the desired state it is sent, kept as the agent keeps it.

Every transport's device checks an update with the agent's own
``margo_stream.state.trust.DesiredStateVerifier``: the tenant's root metadata, checked against the
root key the device pinned; the manifest signature by a controller key that root names; tenant
and device; no rollback and no version reuse; expiry; every blob's digest; and each new or
changed deployment's operator signature, by an operator whose certificate the root signed with
the deployer role. A device then advances its trust state on disk (``verifier.accept``: one
``fdatasync``, on the agent's durable-write threads, as the agent does) before it reports anything. The QUIC and
TCP clients (``bench.transports.quic``) run the verifier inside the agent's own desired-state
stream handling; :class:`DeviceTrust` runs it for the other transports' devices (rest-poll,
h2-push, mqtt) over each update, with the blobs the update delivered plus those the device held.

What is simulated, stated plainly: the HTTP and MQTT transports carry no root metadata (a QUIC
device is sent the tenant's root versions newer than its own in the answer to its hello, and
adopts them with ``DesiredFeature.adopt_root``). So a device of those transports is provisioned
with its tenant's root metadata at enrolment: :func:`tenant_root_chain` reads the versions
``margo-certs`` keeps under ``<certs>/<tenant>/root/`` (the ones the controller relays to QUIC
devices, from the same files), and :class:`DeviceTrust` adopts them with the verifier's own
``adopt_root`` (checked against the device's pinned ``root.pub``) before the device first
connects. A root rotated later does not reach such a device.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from agent.desired import Overlay
from bench.transports.base import DesiredUpdate
from margo_stream.durable_io import run_durable
from margo_stream.identity.envelope import canonical
from margo_stream.identity.operator_files import load_root_chain
from margo_stream.identity.trust import load_signing_pub
from margo_stream.state.trust import DesiredStateVerifier

TRUST_FILE = "trust.json"  # in the device's state directory, as the QUIC client keeps it


def tenant_root_chain(certs: Path, tenant: str) -> list[bytes]:
    """Every version of the tenant's root metadata, oldest first, as the controller sends it
    (canonical bytes; ``IdentityError`` naming the file when one is missing or broken)."""
    return [canonical(env) for env in load_root_chain(certs, tenant)]


class DeviceTrust:
    """One device's ``DesiredStateVerifier`` and its trust state (``<state_dir>/trust.json``).

    Construction writes to disk (the trust state, the adopted root): call it off the event loop.
    """

    def __init__(
        self,
        tenant: str,
        device_id: str,
        identity_dir: Path,
        state_dir: Path,
        root_chain: Sequence[bytes],
    ) -> None:
        self.verifier = DesiredStateVerifier(
            tenant,
            device_id,
            load_signing_pub(Path(identity_dir) / "root.pub"),
            Path(state_dir) / TRUST_FILE,
        )
        newer = list(root_chain[self.verifier.root_version or 0 :])  # as the controller sends
        if newer:
            self.verifier.adopt_root(newer, dt.datetime.now(dt.UTC))

    async def hold(
        self, update: DesiredUpdate, held_blobs: Mapping[str, bytes]
    ) -> DesiredUpdate | None:
        """Verify ``update`` in full and keep it: the update with ``verified`` (the manifest)
        and ``held_at`` (``time.monotonic()`` right after the check) set, once the trust state
        is durable; ``None`` for the desired state already held (the same version and bytes).
        A refused update raises ``TrustError`` and changes nothing."""
        verdict = self.verifier.verify(
            update.manifest_bytes,
            update.signature,
            Overlay(update.blobs, held_blobs),  # the agent's own view: the update's blobs first
            now=dt.datetime.now(dt.UTC),
        )
        if verdict.unchanged:
            return None
        held_at = time.monotonic()  # delivered and verified: the bench's clock stops here
        await run_durable(self.verifier.accept, verdict)  # as the agent's DesiredFeature
        return dataclasses.replace(
            update, version=verdict.version, verified=verdict.manifest, held_at=held_at
        )


__all__ = ["TRUST_FILE", "DeviceTrust", "tenant_root_chain"]
