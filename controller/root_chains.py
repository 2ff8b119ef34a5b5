"""Each tenant's root metadata chain as the controller relays it to devices.

The controller holds no root key: it reads the signed versions ``margo-certs`` wrote under
``DIR/<tenant>/root/`` and sends a device every version newer than the one it reports. A
rotation (a new version file) is picked up without a restart: the directory is looked at again
at most once per ``RECHECK_S``.
"""

from __future__ import annotations

import time
from pathlib import Path

from margo_stream.identity.envelope import canonical
from margo_stream.identity.operator_files import load_root_chain

RECHECK_S = 1.0


class RootChains:
    def __init__(self, certs: Path) -> None:
        self.certs = certs
        self._chains: dict[str, tuple[tuple[int, ...], list[bytes]]] = {}
        self._checked: dict[str, float] = {}

    def chain(self, tenant: str) -> list[bytes]:
        """Every version of the tenant's root metadata, canonical bytes, oldest first
        (``IdentityError`` naming the file when it is missing or broken)."""
        now = time.monotonic()
        cached = self._chains.get(tenant)
        if cached is not None and now - self._checked.get(tenant, 0.0) < RECHECK_S:
            return cached[1]
        self._checked[tenant] = now
        rdir = self.certs / tenant / "root"
        try:
            stamp = tuple(sorted(p.stat().st_mtime_ns for p in rdir.glob("*.json")))
        except OSError:
            stamp = ()
        if cached is not None and cached[0] == stamp:
            return cached[1]
        chain = [canonical(env) for env in load_root_chain(self.certs, tenant)]
        self._chains[tenant] = (stamp, chain)
        return chain

    def newer_than(self, tenant: str, version: int | None) -> list[bytes]:
        """The versions after ``version`` (all of them for ``None``)."""
        chain = self.chain(tenant)
        return chain if version is None else chain[version:]
