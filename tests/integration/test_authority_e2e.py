"""The controller authors nothing: a controller process holding every controller key (TLS,
the manifest-signing key, the store) but no operator key cannot make a real agent run a
document no operator signed, a document other than the one signed, or an older signed
version; the agent keeps its workload and its status says why.

The compromised controller is the project's own controller, run in this process, whose store
and push the test drives directly (as an attacker with the process would); the agent is a real
``margo-agent`` process with real workloads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from controller.config import ControllerConfig
from controller.service import Controller
from controller.store.base import DeploymentDraft
from margo_stream.identity.envelope import canonical
from margo_stream.state.digest import sha256_digest
from tests.harness import Agent, signed_body, traversable_to, wait_for
from tests.integration.test_desired import workload_out, write_doc

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _status(ctl: Controller, deployment: str) -> dict[str, Any] | None:
    for record in await ctl.store.list_statuses("acme", "press-01"):
        if record.deployment_id == deployment:
            return dict(record.status)
    return None


async def _wait_status(ctl: Controller, deployment: str, code: str) -> dict[str, Any]:
    with anyio.fail_after(20):
        while True:
            status = await _status(ctl, deployment)
            error = (status or {}).get("status", {}).get("error") or {}
            if error.get("code") == code:
                return status or {}
            await anyio.sleep(0.05)


async def _forge(ctl: Controller, doc: bytes, *, signature: str | None, cert: str | None) -> None:
    """What a compromised controller can do: store a deployment version and push it."""
    await ctl.store.apply(
        "acme",
        blobs=[],
        deployments=[
            DeploymentDraft(
                deployment_id="probe-1",
                document=doc,
                name="probe",
                profile="process",
                signature=signature,
                certificate=cert,
            )
        ],
        devices=["press-01"],
    )
    ctl.features.documents._docs.clear()  # the forger's own process: no cache to trust
    await ctl.desired.desired_changed("acme", ["press-01"])


async def test_a_controller_without_operator_keys_cannot_change_a_workload(
    pki, tmp_path: Path
) -> None:
    config = ControllerConfig(
        certs=pki.dir, data=tmp_path / "data", listen_port=0, api_port=0, keepalive=2.0
    )
    ctl = Controller(config)
    ident = pki.device("acme", "press-01")
    token_file = pki.token_file("acme")
    async with anyio.create_task_group() as tg:
        await tg.start(ctl.run)
        # the workload runs as nobody, which must pass through tmp_path's 0700 parents
        agent = Agent(ident, f"127.0.0.1:{ctl.quic_port}", traversable_to(tmp_path / "agent"))
        api = f"http://127.0.0.1:{ctl.api_port}/api/v1"
        headers = {"Authorization": f"Bearer {pki.token('acme')}"}
        try:
            async with httpx.AsyncClient(headers=headers, timeout=10) as client:
                with anyio.fail_after(20):
                    while (await client.get(f"{api}/devices/press-01")).status_code != 200:
                        await anyio.sleep(0.05)
                doc_a = write_doc(tmp_path, "SITE-A").read_text()
                r = await client.post(
                    f"{api}/deployments",
                    json=signed_body(token_file, [doc_a], devices=["press-01"]),
                )
                assert r.status_code == 200, r.text
                _, pid = await anyio.to_thread.run_sync(
                    lambda: wait_for(lambda: workload_out(agent))
                )
                signed_a = json.loads(
                    (await ctl.store.get_deployment("acme", "probe-1")).signature or "null"
                )
                record_a = await ctl.store.get_deployment("acme", "probe-1")

                # 1. a document no operator signed
                doc_evil = write_doc(tmp_path, "SITE-EVIL").read_bytes()
                await _forge(ctl, doc_evil, signature=None, cert=None)
                status = await _wait_status(ctl, "probe-1", "unsigned")
                assert status["status"]["state"] == "failed"
                assert "not signed" in status["status"]["error"]["message"]

                # 2. another document under the genuine signature of SITE-A
                await _forge(
                    ctl, doc_evil, signature=canonical(signed_a).decode(), cert=record_a.certificate
                )
                await _wait_status(ctl, "probe-1", "digest-mismatch")

                # 3. an unsigned document posted straight to the API is refused at once
                r = await client.post(
                    f"{api}/deployments",
                    json={"documents": [doc_evil.decode()], "devices": ["press-01"]},
                )
                assert r.status_code == 422 and "signed" in r.json()["detail"]

                # 4. a replay: SITE-B legitimately, then SITE-A again under its older signature
                doc_b = write_doc(tmp_path, "SITE-B").read_text()
                r = await client.post(
                    f"{api}/deployments",
                    json=signed_body(token_file, [doc_b], devices=["press-01"]),
                )
                assert r.status_code == 200, r.text
                site_b, pid_b = await anyio.to_thread.run_sync(
                    lambda: wait_for(lambda: (o := workload_out(agent)) and o[0] == "SITE-B" and o)
                )
                assert sha256_digest(doc_a.encode()) == record_a.digest
                await _forge(
                    ctl,
                    doc_a.encode(),
                    signature=canonical(signed_a).decode(),
                    cert=record_a.certificate,
                )
                status = await _wait_status(ctl, "probe-1", "stale")
                assert "replay" in status["status"]["error"]["message"]

                # through all of it the device kept running what an operator signed last
                assert workload_out(agent) == (site_b, pid_b)
                assert pid_b != pid
        finally:
            agent.stop()
            ctl.shutdown()


async def test_terminals_open_only_on_a_fresh_operator_grant(pki, tmp_path: Path) -> None:
    import datetime as dt

    from controller.terminal import TerminalUnavailable
    from margo_stream.identity.authored import make_grant
    from margo_stream.identity.operator_files import load_operator_credentials

    config = ControllerConfig(certs=pki.dir, data=tmp_path / "data", listen_port=0, api_port=0)
    ctl = Controller(config)
    creds = load_operator_credentials(operator_dir=None, token_file=pki.token_file("acme"))
    assert creds.key is not None and creds.name == "admin"
    cert = canonical(creds.certificate or {})
    terminals = ctl.features.terminals

    def grant(command: list[str] | None, *, device: str = "press-01", seconds: int = 60) -> bytes:
        assert creds.key is not None
        env = make_grant(
            "acme",
            device,
            command,
            tty=False,
            operator="admin",
            key=creds.key,
            now=dt.datetime.now(dt.UTC),
            seconds=seconds,
        )
        return canonical(env)

    async def run(command: list[str], grant_bytes: bytes | None, cert_bytes: bytes | None = cert):
        return await terminals.open(
            "acme",
            "press-01",
            operator="admin",
            command=command,
            rows=24,
            cols=80,
            tty=False,
            grant=grant_bytes,
            certificate=cert_bytes,
        )

    async with anyio.create_task_group() as tg:
        await tg.start(ctl.run)
        agent = Agent(
            pki.device("acme", "press-01"), f"127.0.0.1:{ctl.quic_port}", tmp_path / "agent"
        )
        try:
            with anyio.fail_after(20):
                while ctl.registry.link("acme", "press-01") is None:
                    await anyio.sleep(0.05)
            # a controller holding every key of its own, relaying no grant: no shell
            with pytest.raises(TerminalUnavailable, match="no operator grant") as info:
                await run(["id"], None)
            assert info.value.kind == "refused"
            # a grant for another command, another device, or signed with no certificate
            with pytest.raises(TerminalUnavailable, match="another command"):
                await run(["cat", "/etc/shadow"], grant(["id"]))
            with pytest.raises(TerminalUnavailable, match="another device|device 'press-02'"):
                await run(["id"], grant(["id"], device="press-02"))
            # a genuine grant opens exactly one session; replayed, it opens nothing
            good = grant(["id"])
            session = await run(["id"], good)
            assert session.operator == "admin"
            await session.finish(session.outcome or _outcome())
            with pytest.raises(TerminalUnavailable, match="used before"):
                await run(["id"], good)
            # and the agent remembers it across a restart
            old = ctl.registry.link("acme", "press-01")
            agent.stop()
            agent = Agent(
                pki.device("acme", "press-01"), f"127.0.0.1:{ctl.quic_port}", tmp_path / "agent"
            )
            with anyio.fail_after(20):
                while (link := ctl.registry.link("acme", "press-01")) is None or link is old:
                    await anyio.sleep(0.05)
            await anyio.sleep(0.2)  # the hello's answer (and its root metadata) is processed
            with pytest.raises(TerminalUnavailable, match="used before"):
                await run(["id"], good)
            audits = await ctl.store.list_session_audits("acme")
            assert {a.operator for a in audits} == {"admin"}
        finally:
            agent.stop()
            ctl.shutdown()


def _outcome():
    from controller.terminal import Outcome

    return Outcome(error="closed by the test")
