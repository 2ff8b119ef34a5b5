"""Workload logs end to end: ``margoctl logs`` -> controller API -> a ``logs`` stream over
QUIC -> the agent reading a real process's rotated log, with ``--tail``, ``-f`` following a
running process, a job whose log ends, a viewer operator, and tenant scoping."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from margo_stream.identity.tenant_files import issue_operator
from tests.harness import BIN, Agent, Controller, traversable_to, wait_for

pytestmark = [pytest.mark.integration]

DOC = """\
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata:
  annotations: {applicationId: chatty, id: chatty-1}
  name: chatty
  namespace: test
spec:
  deploymentProfile:
    type: process
    components:
      - name: ticker
        properties:
          command: ["sh", "-c", "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.1; done"]
          restart: always
      - name: job
        properties:
          command: ["sh", "-c", "echo job one; echo job two >&2; sleep 1; echo job three"]
          restart: never
"""


def margoctl(ctl: Controller, token_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "margoctl"), "--api", ctl.api, "--token-file", str(token_file), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def running(pki, tmp_path):
    issue_operator(pki.dir, "acme", "vera", ["viewer"])  # a viewer, known from the start
    ctl = Controller(pki, tmp_path / "data")
    ident = pki.device("acme", "press-01")
    agent = Agent(ident, ctl.quic, traversable_to(tmp_path / "agent"), extra=["--keepalive", "1"])
    tok = pki.token_file("acme")
    try:
        ctl.wait_connected(tok.read_text().strip(), "press-01")
        doc = tmp_path / "chatty.yaml"
        doc.write_text(DOC)
        r = margoctl(ctl, tok, "apply", "-f", str(doc), "--device", "press-01")
        assert r.returncode == 0, r.stderr
        log = agent.state / "work" / "chatty-1" / "ticker.log"
        wait_for(lambda: log.exists() and log.read_text().count("tick") >= 20, what="ticks")
        yield ctl, agent, tok
    finally:
        agent.stop()
        ctl.stop()


def ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^tick (\d+)$", text, re.M)]


def test_tail_follow_viewer_and_scoping(running, pki):
    ctl, agent, tok = running
    # --tail: exactly the last N lines of the component's log, newest last
    r = margoctl(ctl, tok, "logs", "--device", "press-01", "chatty-1", "ticker", "--tail", "5")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 5 and all(line.startswith("tick ") for line in lines), lines
    numbers = ticks(r.stdout)
    assert numbers == list(range(numbers[0], numbers[0] + 5))

    # a viewer may read logs; every component when none is named, each line marked
    viewer = pki.dir / "acme" / "operators" / "vera" / "operator.token"
    job_log = agent.state / "work" / "chatty-1" / "job.log"
    wait_for(lambda: "job three" in job_log.read_text(), what="the job's last line")
    r = margoctl(ctl, viewer, "logs", "--device", "press-01", "chatty-1", "--tail", "50")
    assert r.returncode == 0, r.stderr
    assert "[job] job one" in r.stdout and "[job] job two" in r.stdout  # stderr too
    assert "[ticker] tick " in r.stdout

    # -f follows the running process: new ticks arrive, in order, without gaps
    follow = subprocess.Popen(
        [str(BIN / "margoctl"), "--api", ctl.api, "--token-file", str(viewer), "logs",
         "--device", "press-01", "chatty-1", "ticker", "--tail", "1", "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert follow.stdout is not None
        seen: list[int] = []
        deadline = time.monotonic() + 15
        while len(seen) < 15 and time.monotonic() < deadline:
            line = follow.stdout.readline()
            assert line, follow.stderr.read() if follow.stderr else "margoctl ended"
            seen += ticks(line)
        assert len(seen) >= 15 and seen == list(range(seen[0], seen[0] + len(seen)))
        assert seen[-1] > numbers[-1] + 10  # lines written after the command started
    finally:
        follow.terminate()
        follow.wait(10)

    # -f on a job that finished: its lines, then the command ends by itself
    r = margoctl(ctl, tok, "logs", "--device", "press-01", "chatty-1", "job", "-f")
    assert r.returncode == 0, r.stderr
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("job ")] == [
        "job one",
        "job two",
        "job three",
    ]

    # errors: unknown deployment or component (404), another tenant never sees the device
    r = margoctl(ctl, tok, "logs", "--device", "press-01", "nope", "--tail", "1")
    assert r.returncode == 1 and "404" in r.stderr and "nope" in r.stderr
    r = margoctl(ctl, tok, "logs", "--device", "press-01", "chatty-1", "nope")
    assert r.returncode == 1 and "no component 'nope'" in r.stderr
    globex = pki.token("globex")
    resp = httpx.get(
        f"{ctl.api}/api/v1/devices/press-01/logs/chatty-1",
        headers={"Authorization": f"Bearer {globex}"},
        timeout=10,
    )
    assert resp.status_code == 404
    # the SSE form of the agreed interface: one data: event per line
    with httpx.stream(
        "GET",
        f"{ctl.api}/api/v1/devices/press-01/logs/chatty-1/ticker",
        params={"tail": 3, "follow": 1},
        headers={"Authorization": f"Bearer {pki.token('acme')}"},
        timeout=10,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        data = []
        for line in resp.iter_lines():
            if line.startswith("data: "):
                data.append(line[6:])
            if len(data) >= 5:
                break
    assert all(d.startswith("tick ") for d in data)
