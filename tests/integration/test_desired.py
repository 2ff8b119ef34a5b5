"""Desired state end to end: margoctl apply -> signed push over QUIC -> real processes."""

from __future__ import annotations

import json
import pwd
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    BIN,
    Agent,
    Controller,
    pid_alive,
    signed_body,
    traversable_to,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.fixture
def anyio_backend():
    return "asyncio"


DOC = """\
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata:
  annotations: {{applicationId: probe, id: {id}}}
  name: probe
  namespace: test
spec:
  deploymentProfile:
    type: process
    components:
      - name: probe
        properties:
          command: ["sh", "-c", "echo \\"$SITE_ID $$\\" > out.tmp && mv out.tmp out && exec sleep 600"]
          restart: on-failure
{files}  parameters:
    site:
      value: {site}
      targets: [{{pointer: ENV.SITE_ID, components: [probe]}}]
"""


def write_doc(tmp: Path, site: str, *, dep_id: str = "probe-1", files: str = "") -> Path:
    path = tmp / f"{dep_id}-{site}.yaml"
    path.write_text(DOC.format(id=dep_id, site=site, files=files))
    return path


def margoctl(
    ctl: Controller, token_file: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(BIN / "margoctl"), "--api", ctl.api, "--token-file", str(token_file), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


def deployments(ctl: Controller, token_file: Path, device: str) -> list[dict]:
    return json.loads(
        margoctl(ctl, token_file, "get", "deployments", "--device", device, "-o", "json").stdout
    )


def state_of(ctl: Controller, token_file: Path, device: str, dep: str) -> dict | None:
    return next((d for d in deployments(ctl, token_file, device) if d["deploymentId"] == dep), None)


def workload_out(agent: Agent, dep: str = "probe-1") -> tuple[str, int] | None:
    try:
        site, pid = (agent.state / "work" / dep / "probe" / "out").read_text().split()
        return site, int(pid)
    except (OSError, ValueError):
        return None


def proc_status(pid: int, key: str) -> list[str]:
    """The values of one line of /proc/<pid>/status (``Uid``: real, effective, saved, fs)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, values = line.partition(":")
        if name == key:
            return values.split()
    raise KeyError(key)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


@pytest.fixture
def env(pki, tmp_path):
    ctl = Controller(pki, tmp_path / "data")
    agents: list[Agent] = []

    def start_agent(
        device: str = "press-01", state: str = "agent1", extra: list[str] | None = None
    ) -> Agent:
        ident = tmp_path / "certs" / "acme" / "devices" / device
        if not ident.exists():
            pki.device("acme", device)
        # workloads run as nobody: it must pass through tmp_path's 0700 parents to its
        # working directory (traversable_to: execute only, on that chain of directories)
        state_dir = traversable_to(tmp_path / state)
        a = Agent(ident, ctl.quic, state_dir, extra=["--keepalive", "1", *(extra or [])])
        agents.append(a)
        return a

    yield ctl, start_agent, pki.token_file("acme")
    for a in agents:
        a.stop()
    ctl.stop()


def test_apply_change_delete_with_real_processes(env, tmp_path):
    ctl, start_agent, tok = env
    agent = start_agent()
    ctl.wait_connected(tok.read_text().strip(), "press-01")
    margoctl(ctl, tok, "apply", "-f", str(write_doc(tmp_path, "SITE-A")), "--device", "press-01")
    wait_for(
        lambda: (state_of(ctl, tok, "press-01", "probe-1") or {}).get("state") == "installed",
        what="installed",
    )
    site, pid1 = wait_for(lambda: workload_out(agent), what="workload output")
    assert site == "SITE-A"
    # least privilege: the workload runs as nobody with no supplementary group and wrote its
    # own working directory; the directories on the way let it pass, not read; the agent's
    # own state stays private
    nobody = pwd.getpwnam("nobody")
    assert proc_status(pid1, "Uid") == [str(nobody.pw_uid)] * 4
    assert proc_status(pid1, "Gid") == [str(nobody.pw_gid)] * 4
    assert proc_status(pid1, "Groups") == []
    work = agent.state / "work" / "probe-1"
    assert (work / "probe" / "out").stat().st_uid == nobody.pw_uid
    assert (work / "probe").stat().st_uid == nobody.pw_uid and mode(work / "probe") == 0o700
    assert (work / "probe.log").stat().st_uid == nobody.pw_uid
    assert [mode(d) for d in (agent.state, agent.state / "work", work)] == [0o711] * 3
    assert mode(agent.state / "desired") == 0o700
    assert mode(agent.state / "agent-status.json") == 0o600
    item = state_of(ctl, tok, "press-01", "probe-1")
    assert item["manifestVersion"] == 1 and item["components"][0]["state"] == "installed"
    # change a parameter: the component restarts with the new environment
    margoctl(ctl, tok, "apply", "-f", str(write_doc(tmp_path, "SITE-B")), "--device", "press-01")
    site, pid2 = wait_for(
        lambda: (o := workload_out(agent)) and o[0] == "SITE-B" and o, what="restart"
    )
    assert pid2 != pid1
    wait_for(lambda: not pid_alive(pid1), what="old process gone")
    wait_for(
        lambda: state_of(ctl, tok, "press-01", "probe-1")["manifestVersion"] == 2, what="v2 adopted"
    )
    # re-applying the same document changes nothing on the device
    margoctl(ctl, tok, "apply", "-f", str(write_doc(tmp_path, "SITE-B")), "--device", "press-01")
    assert workload_out(agent)[1] == pid2
    # delete: absence from the manifest removes it
    margoctl(ctl, tok, "delete", "deployment", "probe-1", "--device", "press-01")
    wait_for(lambda: "applied manifest version 3" in agent.log(), what="the delete's manifest")
    # the delete is version 3: the re-apply made no manifest of its own, so nothing could have
    # restarted the workload in between (manifests reach the agent in order)
    applied = {int(v) for v in re.findall(r"applied manifest version (\d+)", agent.log())}
    assert applied == {1, 2, 3}
    wait_for(lambda: not pid_alive(pid2), what="process stopped after delete")
    wait_for(
        lambda: (
            (state_of(ctl, tok, "press-01", "probe-1") or {"state": "removed"})["state"]
            == "removed"
        ),
        what="removed status",
    )


def test_offline_agent_restart_restores_workloads(env, tmp_path, pki):
    ctl, start_agent, tok = env
    agent = start_agent()
    ctl.wait_connected(tok.read_text().strip(), "press-01")
    margoctl(ctl, tok, "apply", "-f", str(write_doc(tmp_path, "SITE-A")), "--device", "press-01")
    _, pid1 = wait_for(lambda: workload_out(agent), what="workload output")
    wait_for(
        lambda: (state_of(ctl, tok, "press-01", "probe-1") or {}).get("state") == "installed",
        what="installed",
    )
    ctl.stop()
    assert agent.stop() == 0
    assert not pid_alive(pid1)  # a stopped agent stops its workloads
    (agent.state / "work" / "probe-1" / "probe" / "out").unlink()
    # no controller anywhere: the agent brings the workload back from disk
    offline = Agent(tmp_path / "certs/acme/devices/press-01", "127.0.0.1:9", agent.state)
    try:
        site, pid2 = wait_for(lambda: workload_out(offline), what="restored workload")
        assert site == "SITE-A" and pid2 != pid1
        assert "restored manifest version 1" in offline.log()
    finally:
        offline.stop()


def test_offline_device_gets_newest_version_on_reconnect(env, tmp_path):
    ctl, start_agent, tok = env
    ctl_token = tok.read_text().strip()
    first = start_agent("press-02", "agent2")
    ctl.wait_connected(ctl_token, "press-02")
    first.stop()  # the device is known, then goes away
    margoctl(ctl, tok, "apply", "-f", str(write_doc(tmp_path, "SITE-A")), "--device", "press-02")
    margoctl(ctl, tok, "apply", "-f", str(write_doc(tmp_path, "SITE-C")), "--device", "press-02")
    agent = start_agent("press-02", "agent2")
    ctl.wait_connected(ctl_token, "press-02", min_connections=2)
    site, _ = wait_for(lambda: workload_out(agent), what="workload after reconnect")
    assert site == "SITE-C"


def test_delta_push_sends_only_the_changed_blob(env, tmp_path):
    ctl, start_agent, tok = env
    agent = start_agent()
    ctl.wait_connected(tok.read_text().strip(), "press-01")
    blobs = [f"config file {i}\n".encode() * 2000 for i in range(5)]
    import base64
    import hashlib

    listing = "".join(
        f"    - {{name: conf/f{i}.txt, digest: 'sha256:{hashlib.sha256(b).hexdigest()}'}}\n"
        for i, b in enumerate(blobs)
    )
    files = "  files:\n" + listing
    for site in ("SITE-A", "SITE-B"):
        doc = write_doc(tmp_path, site, files=files).read_text()
        body = signed_body(
            tok,
            [doc],
            devices=["press-01"],
            blobs=[base64.b64encode(b).decode() for b in blobs],
        )
        import httpx

        r = httpx.post(
            f"{ctl.api}/api/v1/deployments",
            json=body,
            headers={"Authorization": f"Bearer {tok.read_text().strip()}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        wait_for(lambda s=site: (o := workload_out(agent)) and o[0] == s, what=f"{site} running")
    files_dir = agent.state / "work" / "probe-1" / "files"
    assert (files_dir / "conf" / "f3.txt").read_bytes() == blobs[3]
    # the workload (nobody) reads its files through its group; they stay the agent's
    nobody = pwd.getpwnam("nobody")
    for d in (files_dir, files_dir / "conf"):
        assert (d.stat().st_uid, d.stat().st_gid, mode(d)) == (0, nobody.pw_gid, 0o750)
    assert mode(files_dir / "conf" / "f3.txt") == 0o644
    # the controller logs the adoption once the device's answer arrives, which can be just
    # after the restarted workload wrote its output
    wait_for(lambda: "adopted manifest version 2" in ctl.log(), what="v2 adoption logged")
    first_adoption: dict[int, tuple[int, int]] = {}  # version -> (blobs sent, bytes)
    for line in ctl.log().splitlines():
        if "event=desired-adopted" in line:
            version = int(re.search(r"manifest version (\d+)", line).group(1))
            first_adoption.setdefault(
                version,
                (
                    int(re.search(r"blobs_sent=(\d+)", line).group(1)),
                    int(re.search(r"bytes=(\d+)", line).group(1)),
                ),
            )
    # the document + 5 files + the operator's certificate, then only the changed document
    assert [first_adoption[v][0] for v in (1, 2)] == [7, 1], first_adoption
    assert first_adoption[2][1] < 3000 < first_adoption[1][1]


def test_push_signed_with_another_key_is_refused(env, tmp_path, pki):
    ctl, start_agent, tok = env
    agent = start_agent()
    ctl.wait_connected(tok.read_text().strip(), "press-01")
    margoctl(ctl, tok, "apply", "-f", str(write_doc(tmp_path, "SITE-A")), "--device", "press-01")
    wait_for(lambda: workload_out(agent), what="v1 running")
    # the controller's copy of the signing key is swapped for a key the device never pinned
    ctl.stop()
    globex_key = (pki.dir / "globex" / "signing.key").read_bytes()
    (pki.dir / "acme" / "signing.key").write_bytes(globex_key)
    ctl2 = Controller(pki, tmp_path / "data", quic_port=ctl.quic_port)
    try:
        margoctl(
            ctl2, tok, "apply", "-f", str(write_doc(tmp_path, "SITE-EVIL")), "--device", "press-01"
        )
        wait_for(lambda: "bad-signature" in agent.log(), what="refusal")
        assert workload_out(agent)[0] == "SITE-A"  # still running the verified version
        wait_for(
            lambda: "refused manifest version 2: bad-signature" in ctl2.log(),
            what="controller logs refusal",
        )
    finally:
        ctl2.stop()


async def test_torn_push_leaves_the_old_workload_running(pki, tmp_path):
    import base64
    import hashlib
    import os

    import anyio
    import httpx

    from bench.relay import Impairment, UdpRelay

    # the 40 MiB blob travels base64 in one apply body: past the default --api-max-body
    ctl = Controller(pki, tmp_path / "data", extra=["--api-max-body", "64MiB"])
    tok = pki.token_file("acme")
    token = tok.read_text().strip()
    ident = pki.device("acme", "press-01")
    try:
        async with UdpRelay(
            ("127.0.0.1", 0), ("127.0.0.1", ctl.quic_port), Impairment(seed=2)
        ) as relay:
            agent = Agent(
                ident,
                f"127.0.0.1:{relay.port}",
                traversable_to(tmp_path / "agent1"),  # the workload runs as nobody
                extra=["--keepalive", "0.3", "--idle-timeout", "3"],
            )
            try:
                await anyio.to_thread.run_sync(lambda: ctl.wait_connected(token, "press-01"))
                margoctl(
                    ctl,
                    tok,
                    "apply",
                    "-f",
                    str(write_doc(tmp_path, "SITE-A")),
                    "--device",
                    "press-01",
                )
                _, pid1 = await anyio.to_thread.run_sync(
                    lambda: wait_for(lambda: workload_out(agent))
                )
                big = os.urandom(40 << 20)
                files = f"  files:\n    - {{name: big.bin, digest: 'sha256:{hashlib.sha256(big).hexdigest()}'}}\n"
                body = signed_body(
                    tok,
                    [write_doc(tmp_path, "SITE-B", files=files).read_text()],
                    devices=["press-01"],
                    blobs=[base64.b64encode(big).decode()],
                )
                sent_before = relay.stats().downstream.bytes_forwarded
                async with httpx.AsyncClient(timeout=60) as client:
                    r = await client.post(
                        f"{ctl.api}/api/v1/deployments",
                        json=body,
                        headers={"Authorization": f"Bearer {token}"},
                    )
                assert r.status_code == 200, r.text
                # cut the link mid-transfer, once a megabyte of the 40 MiB blob has gone through
                with anyio.fail_after(30):
                    while relay.stats().downstream.bytes_forwarded < sent_before + (1 << 20):
                        await anyio.sleep(0.001)
                relay.blackhole(True)
                await anyio.to_thread.run_sync(
                    lambda: wait_for(
                        lambda: "controller unresponsive" in agent.log(), what="dead link noticed"
                    )
                )
                assert "applied manifest version 2" not in agent.log()
                assert workload_out(agent) == ("SITE-A", pid1) and pid_alive(pid1)
                relay.blackhole(False)
                await anyio.to_thread.run_sync(
                    lambda: wait_for(
                        lambda: (o := workload_out(agent)) and o[0] == "SITE-B",
                        timeout=60,
                        what="v2 after reconnect",
                    )
                )
                assert (agent.state / "work/probe-1/files/big.bin").stat().st_size == len(big)
            finally:
                agent.stop()
    finally:
        ctl.stop()


def test_margoctl_sign_writes_the_body_apply_sends(env, tmp_path):
    """``margoctl sign`` prints what the web console's apply form posts: signed here, with the
    operator's key; the controller takes it as it takes ``margoctl apply``."""
    ctl, start_agent, tok = env
    start_agent()
    ctl.wait_connected(token_of(tok), "press-01")
    signed = json.loads(margoctl(ctl, tok, "sign", "-f", str(write_doc(tmp_path, "SIGNED"))).stdout)
    assert set(signed) == {"documents", "signatures", "certificate"}
    r = httpx.post(
        f"{ctl.api}/api/v1/deployments",
        json={**signed, "devices": ["press-01"]},
        headers={"Authorization": f"Bearer {token_of(tok)}"},
        timeout=10,
    )
    assert r.status_code in (200, 201), r.text
    wait_for(lambda: (state_of(ctl, tok, "press-01", "probe-1") or {}).get("state") == "installed")
    tampered = {**signed, "documents": [signed["documents"][0].replace("SIGNED", "FORGED")]}
    r = httpx.post(
        f"{ctl.api}/api/v1/deployments",
        json={**tampered, "devices": ["press-01"]},
        headers={"Authorization": f"Bearer {token_of(tok)}"},
        timeout=10,
    )
    assert r.status_code >= 400, r.text  # the signature covers the exact bytes


def token_of(token_file: Path) -> str:
    return token_file.read_text().strip()
