"""A tenant's authority in memory, for tests: a root key, root metadata naming a controller key,
and a deployer operator whose signatures make manifest entries acceptable to a device."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from margo_stream.identity.authored import sign_deployment
from margo_stream.identity.authority import Role, make_operator_cert, make_root
from margo_stream.identity.envelope import canonical
from margo_stream.state.digest import sha256_digest
from margo_stream.state.manifest import ManifestEntry
from margo_stream.state.trust import DesiredStateVerifier, Verdict

FAR = dt.datetime(2099, 1, 1, tzinfo=dt.UTC)
PAST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


class Kit:
    def __init__(self, tenant: str, controller_key: Ed25519PrivateKey) -> None:
        self.tenant = tenant
        self.controller_key = controller_key
        self.root_key = Ed25519PrivateKey.generate()
        self.operator_key = Ed25519PrivateKey.generate()
        self.root_env = make_root(
            tenant,
            1,
            FAR,
            root_keys=[self.root_key.public_key()],
            controller_keys=[controller_key.public_key()],
            signers=[self.root_key],
        )
        self.certificate = make_operator_cert(
            tenant,
            "alice",
            [Role.DEPLOYER],
            self.operator_key.public_key(),
            issued=PAST,
            expires=FAR,
            signers=[self.root_key],
        )
        self._clock = PAST
        self.cert_bytes = canonical(self.certificate)
        self.cert_digest = sha256_digest(self.cert_bytes)

    @property
    def chain(self) -> list[bytes]:
        return [canonical(self.root_env)]

    def sign(self, entry: ManifestEntry, now: dt.datetime | None = None) -> ManifestEntry:
        """``entry`` signed by the kit's operator, at ``now`` or else a moment after the last
        signature (so a later signature is always the newer one)."""
        if now is None:
            self._clock += dt.timedelta(milliseconds=1)
            now = self._clock
        envelope = sign_deployment(
            self.tenant, entry.deployment_id, entry.digest, self.operator_key, now=now
        )
        return entry.model_copy(update={"signature": envelope, "certificate": self.cert_digest})

    def blobs(self, blobs: Mapping[str, bytes]) -> dict[str, bytes]:
        return {**blobs, self.cert_digest: self.cert_bytes}


class KitVerifier:
    """A ``DesiredStateVerifier`` whose pushes carry the kit's root metadata."""

    def __init__(self, kit: Kit, inner: DesiredStateVerifier) -> None:
        self.kit = kit
        self.inner = inner

    def verify(
        self,
        data: bytes,
        sig: bytes,
        blobs: Mapping[str, bytes],
        now: dt.datetime,
        root: Sequence[bytes] | None = None,
    ) -> Verdict:
        chain = self.kit.chain if root is None else root
        return self.inner.verify(data, sig, blobs, now, root=chain)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
