"""The enrolment server takes the tenants and CA bundles of a reload, all at once or not at
all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.enroll import EnrollServer
from margo_stream.errors import ConfigError
from margo_stream.identity.pki import init_pki


async def _allow(*args: Any) -> None:
    return None


def test_retrust_swaps_tenants_and_ca_trust_only_when_called(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_pki(certs, ["acme"], ["localhost"])
    server = EnrollServer(certs, None, None, ["acme"], lifetime=60.0, allow=_allow)  # type: ignore[arg-type]
    before = server.ssl_context
    assert len(before.get_ca_certs()) == 1

    init_pki(certs, ["acme", "globex"], ["localhost"])  # a tenant added while running
    swap = server.retrust(["acme", "globex"])
    assert server.tenants == ["acme"] and server.ssl_context is before  # checked, not yet in force
    swap()
    assert server.tenants == ["acme", "globex"]
    assert len(server.ssl_context.get_ca_certs()) == 2

    (certs / "globex" / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="tenant CA"):
        server.retrust(["acme", "globex"])  # a broken bundle: nothing changes
    assert len(server.ssl_context.get_ca_certs()) == 2
