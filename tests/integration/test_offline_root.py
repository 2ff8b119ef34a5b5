"""The controller never needs the offline root key nor any operator's key: started as a real
process from a certificate directory with every one of them deleted, it runs and serves the
operator API with the roles the root certified, and follows operator changes without restart."""

from __future__ import annotations

import shutil

import pytest

from margo_stream.identity.tenant_files import issue_operator
from tests.harness import Controller, Pki, wait_for

pytestmark = pytest.mark.integration


def test_controller_runs_without_root_or_operator_keys(tmp_path) -> None:
    pki = Pki(tmp_path)
    issue_operator(pki.dir, "acme", "vera", ["viewer"])
    issue_operator(pki.dir, "acme", "dora", ["deployer"])
    keys = [*pki.dir.rglob("root.key*"), *pki.dir.rglob("operator.key")]
    assert len(keys) == 6  # two root keys, two admins, vera and dora
    for key in keys:
        key.unlink()
    assert not [*pki.dir.rglob("root.key*"), *pki.dir.rglob("operator.key")]
    vera = (pki.dir / "acme/operators/vera/operator.token").read_text().strip()
    dora = (pki.dir / "acme/operators/dora/operator.token").read_text().strip()
    ctl = Controller(pki, tmp_path / "data")
    try:
        assert ctl.get(pki.token("acme"), "/devices").status_code == 200
        assert ctl.get(vera, "/devices").status_code == 200
        names = [i["name"] for i in ctl.get(vera, "/operators").json()["items"]]
        assert names == ["admin", "dora", "vera"]
        refused = ctl.get(vera, "/nowhere")
        assert refused.status_code == 403 and "lacks the 'admin' role" in refused.json()["detail"]
        assert ctl.get(dora, "/operators").status_code == 403
        shutil.rmtree(pki.dir / "acme/operators/vera")  # removed: refused without a restart
        wait_for(lambda: ctl.get(vera, "/devices").status_code == 401, what="vera refused")
        assert ctl.get(pki.token("globex"), "/operators").json()["items"][0]["name"] == "admin"
    finally:
        assert ctl.stop() == 0, ctl.log_tail()
