"""What a device may claim, against a real controller process: a status for a deployment never
issued to the device, or naming a manifest version the controller never issued it, is
refused, logged (tenant, device, deployment, claimed version, error code) and never shown by
the operator API; an honest status next to them is stored. Over QUIC (a raw client speaking
the real protocol with the device's real certificate: the refusal comes back in the status
ack, ``STATUS_REFUSED``; an agent whose hello predates that gets the plain ack) and over
Margo's REST pull API (409, problem ``status-refused``)."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from bench.transports.base import status_document
from bench.transports.rest_client import RestPollClient
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode
from margo_stream.protocol.frames import COMPRESSED
from tests.harness import (
    Agent,
    Controller,
    free_udp_port,
    signed_body,
    traversable_to,
    wait_for,
)
from tests.integration.rawclient import configuration, hello, open_connection, say_hello

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(90)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "process-heartbeat.yaml"
DEPLOYMENT = "heartbeat-0001"
DEVICE = "edge-1"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def apply_heartbeat(pki, ctl: Controller) -> None:
    body = signed_body(pki.token_file("acme"), [EXAMPLE.read_text()], devices=[DEVICE])
    r = httpx.post(
        f"{ctl.api}/api/v1/deployments",
        json=body,
        headers={"Authorization": f"Bearer {pki.token('acme')}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text


def listed(pki, ctl: Controller) -> list[tuple[str, str | None, int | None]]:
    """What the operator API shows of the device's deployments."""
    r = ctl.get(pki.token("acme"), "/deployments", device=DEVICE)
    assert r.status_code == 200, r.text
    return [(i["deploymentId"], i["state"], i["manifestVersion"]) for i in r.json()["items"]]


def refusals(ctl: Controller) -> list[str]:
    return [line for line in ctl.log().splitlines() if "event=status-refused" in line]


def assert_refusals_logged(ctl: Controller, version: int) -> None:
    lines = wait_for(lambda: (found := refusals(ctl)) and len(found) >= 2 and found, 5)
    assert len(lines) == 2, lines  # one line per refusal
    code = f"code={int(ErrorCode.STATUS_REFUSED)}"
    foreign, made_up = sorted(lines, key=lambda line: "deployment=not-mine" not in line)
    for part in ("tenant=acme", f"device={DEVICE}", "deployment=not-mine", code):
        assert part in foreign, foreign
    assert f"claimed_version={version}" in foreign and "reason=deployment-not-issued" in foreign
    for part in (f"deployment={DEPLOYMENT}", "claimed_version=999999", code):
        assert part in made_up, made_up
    assert "reason=unknown-manifest-version" in made_up


class PushCatcher:
    """The raw client's connection handler: keeps the desired-state pushes it is sent."""

    def __init__(self) -> None:
        self.pushes: list[m.Desired] = []
        self.push_streams: list[int] = []

    def stream_opened(self, stream: Any, first: Any) -> None:
        if isinstance(first, m.Desired):
            self.pushes.append(first)
            self.push_streams.append(stream.stream_id)
        stream.on_message = lambda message: None

    def stream_failed(self, stream: Any, event: Any) -> None:
        pass

    def connection_lost(self, exc: Any) -> None:
        pass


async def send_claims(
    conn: Any, claims: list[tuple[str, int]], first_seq: int = 1
) -> dict[int, m.StatusAck]:
    """Send ``(deployment, claimed version)`` statuses on a new status stream; their acks."""
    stream = conn.open_stream()
    for seq, (deployment, claimed) in enumerate(claims, start=first_seq):
        stream.send(
            m.Status(seq=seq, deployment_id=deployment, manifest_version=claimed, state="installed")
        )
    acks: dict[int, m.StatusAck] = {}
    with anyio.fail_after(10):
        while len(acks) < len(claims):
            ack = await stream.receive()
            assert isinstance(ack, m.StatusAck)
            acks[ack.seq] = ack
    return acks


def test_a_plain_status_ack_is_the_map_older_agents_parse() -> None:
    """The refusal members are off the wire unless set: a plain ack is the map agents before
    them parse (strictly); today's hello says it reads them."""
    assert m.to_wire(m.StatusAck(seq=7)) == {"t": "status_ack", "seq": 7}
    refused = m.StatusAck(seq=7, code=int(ErrorCode.STATUS_REFUSED), reason="never issued")
    assert m.parse_message(m.to_wire(refused)) == refused
    assert hello(DEVICE).proto >= m.PROTO_STATUS_REFUSALS


def received_bytes(conn: Any) -> dict[int, bytearray]:
    """Every byte ``conn`` receives, by stream."""
    seen: dict[int, bytearray] = {}
    receive = conn.core.receive

    def recording(stream_id: int, data: bytes, end_stream: bool = False) -> Any:
        seen.setdefault(stream_id, bytearray()).extend(data)
        return receive(stream_id, data, end_stream)

    conn.core.receive = recording
    return seen


def frames_alone(data: bytes) -> list[tuple[bool, bool]]:
    """(compressed, inflates on its own) for each frame of a stream's bytes: a frame of a
    push that refers back to the frames before it (hello proto 4) does not inflate alone."""
    out = []
    while data:
        (word,) = struct.unpack_from(">I", data)
        body, data = data[4 : 4 + (word & ~COMPRESSED)], data[4 + (word & ~COMPRESSED) :]
        alone = True
        if word & COMPRESSED:
            try:
                zlib.decompressobj(-15).decompress(body)
            except zlib.error:
                alone = False
        out.append((bool(word & COMPRESSED), alone))
    return out


async def test_quic_status_claims(pki, tmp_path) -> None:
    ctl = Controller(pki, tmp_path / "data")
    try:
        identity = pki.device("acme", DEVICE)
        conf = configuration(pki.dir, identity / "cert.pem", identity / "key.pem")
        conn = await open_connection(ctl.quic_port, conf)
        catcher = PushCatcher()
        conn.handler = catcher
        streams = received_bytes(conn)
        assert isinstance(await say_hello(conn, DEVICE), m.HelloAck)
        await anyio.to_thread.run_sync(apply_heartbeat, pki, ctl)
        with anyio.fail_after(10):
            while not catcher.pushes:
                await anyio.sleep(0.02)
        version = catcher.pushes[0].version
        # today's hello takes compressed frames: the push's manifest came compressed, and its
        # operator certificate's frame refers back to the manifest (the digest is in both)
        frames = frames_alone(streams[catcher.push_streams[0]])
        assert frames[0] == (True, True) and (True, False) in frames[1:], frames

        acks = await send_claims(
            conn,
            [
                ("not-mine", version),  # a deployment the device was never issued
                (DEPLOYMENT, 999999),  # a manifest version the controller never issued
                (DEPLOYMENT, version),  # the truth
            ],
        )
        refused = int(ErrorCode.STATUS_REFUSED)
        assert acks[1].code == refused and "'not-mine' was not issued" in (acks[1].reason or "")
        assert acks[2].code == refused and "999999 was never issued" in (acks[2].reason or "")
        assert acks[3].code is None and acks[3].reason is None
        assert await anyio.to_thread.run_sync(listed, pki, ctl) == [
            (DEPLOYMENT, "installed", version)
        ]
        assert_refusals_logged(ctl, version)
        conn.close()

        # an agent from before the refusal members (hello proto 1) gets the plain ack, and
        # plain frames: its decoder takes no compressed ones
        old = await open_connection(ctl.quic_port, conf)
        old.core.inflate = False
        old_catcher = PushCatcher()
        old.handler = old_catcher
        old_streams = received_bytes(old)
        control = old.open_stream()
        control.send(hello(DEVICE).model_copy(update={"proto": 1, "manifest_version": None}))
        with anyio.fail_after(5):
            assert isinstance(await control.receive(), m.HelloAck)
        with anyio.fail_after(10):  # the hello named no version: the controller catches it up
            while not old_catcher.pushes:
                await anyio.sleep(0.02)
        assert old_catcher.pushes[0].version == version
        assert not any(c for c, _ in frames_alone(old_streams[old_catcher.push_streams[0]]))
        [ack] = (await send_claims(old, [("not-mine", version)], first_seq=4)).values()
        assert ack == m.StatusAck(seq=4)
        assert await anyio.to_thread.run_sync(listed, pki, ctl) == [
            (DEPLOYMENT, "installed", version)
        ]
        wait_for(lambda: len(refusals(ctl)) == 3, 5)
        old.close()
    finally:
        ctl.stop()


async def test_rest_status_claims(pki, tmp_path) -> None:
    data = tmp_path / "data"
    ctl = Controller(pki, data, extra=["--margo-api", "127.0.0.1:0"])
    try:
        port = int(json.loads((data / "controller.json").read_text())["margo_api"].rsplit(":")[1])
        identity = pki.device("acme", DEVICE)
        client = RestPollClient(identity, "127.0.0.1", port, interval=0.1)
        await client.connect()  # its capabilities make the device known
        try:
            await anyio.to_thread.run_sync(apply_heartbeat, pki, ctl)
            with anyio.fail_after(10):
                version = (await client.next_desired()).version

            async def post(deployment: str, claimed: int) -> tuple[int, dict[str, Any]]:
                doc = status_document(deployment, DEVICE, claimed, "installed", [])
                status, _, body = await client.request(
                    "POST",
                    f"/api/v1/deployments/{deployment}/status",
                    {"content-type": "application/json"},
                    json.dumps(doc).encode(),
                )
                return status, json.loads(body) if body else {}

            status, problem = await post("not-mine", version)
            assert status == 409 and problem["type"].endswith("#status-refused"), problem
            assert problem["retryable"] is False and "not-mine" in problem["detail"]
            assert problem["errors"] == [
                {"field": "deploymentId", "message": "deployment-not-issued"}
            ]
            status, problem = await post(DEPLOYMENT, 999999)
            assert status == 409 and re.search(
                r"version 999999 was never issued", problem["detail"]
            )
            assert problem["errors"][0]["field"] == "adoptedManifestVersion"
            assert (await post(DEPLOYMENT, version))[0] == 200
        finally:
            await client.close()

        assert await anyio.to_thread.run_sync(listed, pki, ctl) == [
            (DEPLOYMENT, "installed", version)
        ]
        device = ctl.device(pki.token("acme"), DEVICE)
        assert device is not None and device["manifest_version"] == version  # not 999999
        assert_refusals_logged(ctl, version)
    finally:
        ctl.stop()


def test_a_real_agent_keeps_its_session_when_refused(pki, tmp_path) -> None:
    """A real agent holding a manifest that another controller database issued (a controller
    brought back without its store) reports on it: refused, the agent logs the refusal, keeps
    its session, and what the new controller issues next is accepted."""
    port = free_udp_port()
    identity = pki.device("acme", DEVICE)
    state = traversable_to(tmp_path / "agent")  # the workload runs as nobody
    token = pki.token("acme")

    def installed(ctl: Controller) -> list[int | None]:
        return [v for d, s, v in listed(pki, ctl) if d == DEPLOYMENT and s == "installed"]

    first = Controller(pki, tmp_path / "data1", quic_port=port)
    try:
        agent = Agent(identity, first.quic, state)
        try:
            first.wait_connected(token, DEVICE)
            apply_heartbeat(pki, first)
            wait_for(lambda: installed(first), 30, what=f"installed\n{first.log_tail()}")
        finally:
            agent.stop()
    finally:
        first.stop()
    assert "refused status" not in agent.log()

    second = Controller(pki, tmp_path / "data2", quic_port=port)
    try:
        agent = Agent(identity, second.quic, state)
        try:
            second.wait_connected(token, DEVICE)
            # the restored version 1 was never issued by this store: refused, and so is the
            # report of the heartbeat's removal (the new store never issued the heartbeat)
            wait_for(lambda: refusals(second), 15, what=f"refusal\n{second.log_tail()}")
            wait_for(lambda: "the controller refused status" in agent.log(), 10)
            assert "code=771" in agent.log()
            assert listed(pki, second) == []
            apply_heartbeat(pki, second)
            wait_for(lambda: installed(second), 30, what=f"installed\n{second.log_tail()}")
            device = second.device(token, DEVICE)
            assert device is not None and device["connection_count"] == 1  # never dropped
        finally:
            agent.stop()
    finally:
        second.stop()
