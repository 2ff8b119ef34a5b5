"""A document stored under older, looser rules does not hold back a device's other deployments:
after a restart (nothing cached), the controller leaves it out of the manifest with a warning."""

from __future__ import annotations

import anyio

from controller.store.base import DeploymentDraft
from controller.store.sqlite import SqliteStore
from tests.harness import Agent, Controller, traversable_to, wait_for
from tests.integration.test_desired import margoctl, state_of, workload_out, write_doc

LOOSE = """\
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata:
  annotations: {applicationId: loose, id: loose-1}
  name: loose
  namespace: test
spec:
  deploymentProfile:
    type: process
    components:
      - name: loose
        properties:
          command: ["sleep", "600"]
          workingDir: a/../../..
"""


async def _store_loose_document(db) -> None:
    store = SqliteStore(db)
    await store.open()
    try:
        await store.apply(
            "acme",
            blobs=[],
            deployments=[
                DeploymentDraft(
                    deployment_id="loose-1",
                    document=LOOSE.encode(),
                    name="loose",
                    profile="process",
                )
            ],
            devices=["press-01"],
        )
    finally:
        await store.close()


def test_a_document_stored_under_looser_rules_is_left_out(pki, tmp_path):
    tok = pki.token_file("acme")
    token = tok.read_text().strip()
    ident = pki.device("acme", "press-01")
    ctl = Controller(pki, tmp_path / "data")
    agent = Agent(ident, ctl.quic, traversable_to(tmp_path / "agent"), extra=["--keepalive", "1"])
    try:
        ctl.wait_connected(token, "press-01")
        margoctl(
            ctl, tok, "apply", "-f", str(write_doc(tmp_path, "SITE-A")), "--device", "press-01"
        )
        wait_for(lambda: workload_out(agent), what="first workload")
        port = ctl.quic_port
        ctl.stop()
        # what an older controller accepted and every agent refuses
        anyio.run(_store_loose_document, ctl.data / "controller.db")
        ctl = Controller(pki, tmp_path / "data", quic_port=port)
        ctl.wait_connected(token, "press-01")
        doc = write_doc(tmp_path, "SITE-B", dep_id="probe-2")
        margoctl(ctl, tok, "apply", "-f", str(doc), "--device", "press-01")
        wait_for(lambda: workload_out(agent, "probe-2"), what="the device's next deployment")
        wait_for(
            lambda: (state_of(ctl, tok, "press-01", "probe-2") or {}).get("state") == "installed",
            what="probe-2 installed",
        )
        assert workload_out(agent) is not None  # probe-1 still runs
        assert "leaving loose-1 out of acme/press-01's manifest" in ctl.log()
        assert "has a '..' component" in ctl.log()
    finally:
        agent.stop()
        ctl.stop()
