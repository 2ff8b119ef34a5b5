"""The web console in a real headless Chromium (Playwright) against a real controller and real
agents: sign-in, the fleet (live), a deployment's state on the device page within 3 s of an
apply without a reload, tenant isolation, a viewer without the apply form, the deployments and
rollouts pages; a screenshot of each page goes to ``<pytest basetemp>/console-screenshots/``
(or ``$MARGO_TEST_ARTIFACTS/console``) for review."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from margo_stream.identity.tenant_files import issue_operator
from margo_stream.telemetry_client import TelemetryClient
from tests.console_browser import browser, screenshot, sign_in
from tests.harness import BIN, Agent, Controller, Pki, signed_body, traversable_to, wait_for

pytestmark = pytest.mark.integration

LIVE = 3.0  # seconds: the page shows what the API shows within this, without a reload

DOC = """\
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata:
  annotations: {{applicationId: console-probe, id: {id}}}
  name: console-probe
  namespace: test
spec:
  deploymentProfile:
    type: process
    components:
      - name: main
        properties:
          command: ["sh", "-c", "echo started {id}; exec sleep 600"]
          restart: on-failure
"""


@dataclass
class Fleet:
    pki: Pki
    ctl: Controller
    tmp: Path
    shots: Path
    agents: dict[str, Agent] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return self.ctl.api

    def token(self, tenant: str = "acme") -> str:
        return self.pki.token(tenant)

    def viewer_token(self) -> str:
        return (self.pki.dir / "acme" / "operators" / "vera" / "operator.token").read_text().strip()

    def start(self, tenant: str, device: str) -> Agent:
        ident = self.pki.device(tenant, device)
        state = traversable_to(self.tmp / f"agent-{device}")
        agent = Agent(ident, self.ctl.quic, state, extra=["--keepalive", "1"])
        self.agents[device] = agent
        return agent

    def state_of(self, device: str, deployment: str) -> str | None:
        r = self.ctl.get(self.token(), "/deployments", device=device)
        for item in r.json()["items"]:
            if item["deploymentId"] == deployment:
                return str(item["state"])
        return None


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("console")
    pki = Pki(tmp)
    issue_operator(pki.dir, "acme", "vera", ["viewer"])
    ctl = Controller(pki, tmp / "data")
    artifacts = os.environ.get("MARGO_TEST_ARTIFACTS")
    shots = (
        Path(artifacts) / "console"
        if artifacts
        else tmp_path_factory.getbasetemp() / "console-screenshots"
    )
    f = Fleet(pki, ctl, tmp, shots)
    try:
        for tenant, device in (("acme", "press-01"), ("acme", "press-02"), ("globex", "mill-07")):
            f.start(tenant, device)
        for tenant, device in (("acme", "press-01"), ("acme", "press-02"), ("globex", "mill-07")):
            ctl.wait_connected(f.token(tenant), device)
        yield f
    finally:
        for agent in f.agents.values():
            agent.stop()
        ctl.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with browser() as b:
        yield b


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    yield p
    context.close()
    assert not errors, f"script errors on the page: {errors}"


def fleet_ids(page: Any) -> list[str]:
    return [t.strip() for t in page.locator("#fleet tbody th").all_inner_texts()]


def test_the_console_is_served_with_a_strict_policy(fleet: Fleet) -> None:
    r = httpx.get(f"{fleet.base}/", follow_redirects=False, timeout=10)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    r = httpx.get(f"{fleet.base}/ui/", timeout=10)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "<script>" not in r.text  # no inline script: the policy allows none
    again = httpx.get(f"{fleet.base}/ui/", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    assert httpx.get(f"{fleet.base}/ui/static/..%2Fapi.py").status_code == 404
    # the page holds no data: everything comes from the API, which wants a token
    assert httpx.get(f"{fleet.base}/api/v1/me").status_code == 401
    me = httpx.get(
        f"{fleet.base}/api/v1/me", headers={"Authorization": f"Bearer {fleet.viewer_token()}"}
    ).json()
    assert me["tenant"] == "acme" and me["roles"] == ["viewer"] and me["may"]["apply"] is False


def test_sign_in_and_the_fleet_lists_the_connected_devices_live(fleet: Fleet, page: Any) -> None:
    sign_in(page, fleet.base, "not-a-token", expect_ok=False)
    page.locator("#signin-error").filter(has_text="refused").wait_for(timeout=5000)
    screenshot(page, fleet.shots, "01-sign-in-refused")

    sign_in(page, fleet.base, fleet.token("acme"))
    page.locator("#fleet tbody tr").first.wait_for(timeout=5000)
    assert fleet_ids(page) == ["press-01", "press-02"]
    for device in ("press-01", "press-02"):
        tr = page.locator(f'#fleet tr[data-device-id="{device}"]')
        assert "connected" in tr.inner_text() and "quic" in tr.inner_text()
    assert "mill-07" not in page.content()
    page.evaluate("window.__sameDocument = true")

    # a device connecting appears without a reload
    fleet.start("acme", "press-03")
    fleet.ctl.wait_connected(fleet.token("acme"), "press-03")
    connected_at = time.monotonic()
    page.locator('#fleet tr[data-device-id="press-03"]').filter(has_text="connected").wait_for(
        timeout=LIVE * 1000
    )
    assert time.monotonic() - connected_at <= LIVE
    assert fleet_ids(page) == ["press-01", "press-02", "press-03"]
    assert page.evaluate("window.__sameDocument") is True
    screenshot(page, fleet.shots, "02-fleet")

    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("Operator token").wait_for()
    assert page.evaluate("sessionStorage.length") == 0
    assert "press-01" not in page.locator("main").inner_text()


def test_apply_from_the_form_changes_the_device_page_without_a_reload(
    fleet: Fleet, chromium: Any, page: Any
) -> None:
    # some telemetry, for the device page's charts
    client = TelemetryClient(fleet.agents["press-01"].state / "telemetry.sock")
    for i in range(30):
        client.emit("env", {"temperature": 20 + (i % 7) * 0.5, "humidity": 40 + i % 5})
    wait_for(
        lambda: (
            len(fleet.ctl.get(fleet.token(), "/devices/press-01/telemetry").json()["items"]) >= 30
        ),
        what="telemetry stored",
    )

    sign_in(page, fleet.base, fleet.token("acme"))
    page.goto(f"{fleet.base}/ui/#/devices/press-01")
    page.locator("#device-title").filter(has_text="press-01").wait_for()
    page.locator('figure.chart[data-stream="env"]').wait_for(timeout=5000)
    page.evaluate("window.__sameDocument = true")

    # a second tab (its own sign-in: the token lives in one tab) applies through the form
    form_page = page.context.new_page()
    sign_in(form_page, fleet.base, fleet.token("acme"))
    form_page.get_by_role("link", name="Apply").click()
    body = signed_body(fleet.pki.token_file("acme"), [DOC.format(id="console-1")])
    form_page.get_by_label("Signed apply request (JSON)").fill(json.dumps(body))
    form_page.get_by_label("Target devices (ids separated by spaces or commas)").fill("press-01")
    form_page.get_by_role("button", name="Apply", exact=True).click()
    applied_at = time.monotonic()
    form_page.locator("#apply-result").filter(has_text="Applied console-1").wait_for(timeout=10_000)
    screenshot(form_page, fleet.shots, "04-apply")

    row = page.locator('#deployments tr[data-deployment-id="console-1"]')
    row.wait_for(timeout=LIVE * 1000)  # shown within 3 s of the apply, whatever its state
    assert time.monotonic() - applied_at <= LIVE + 1.0  # (+ the form's own round trip)
    wait_for(lambda: fleet.state_of("press-01", "console-1") == "installed", 30, what="installed")
    installed_at = time.monotonic()
    page.locator(
        '#deployments tr[data-deployment-id="console-1"][data-state="installed"]'
    ).wait_for(timeout=LIVE * 1000)
    assert time.monotonic() - installed_at <= LIVE
    assert "main: installed" in row.inner_text()
    assert page.evaluate("window.__sameDocument") is True  # no reload, no navigation
    page.locator("#device-events").filter(has_text="deployment.status").wait_for(timeout=5000)

    # the workload's logs: shown, or "logs unavailable" when the controller does not serve them
    page.get_by_role("button", name="Logs of console-1").click()
    status = page.locator("#s-logs ~ div p[role=status], #s-logs + div p[role=status]")
    wait_for(
        lambda: "last" in status.inner_text() or "logs unavailable" in status.inner_text(),
        10,
        what="the logs panel",
    )
    screenshot(page, fleet.shots, "03-device")

    form_page.goto(f"{fleet.base}/ui/#/deployments")
    form_page.locator('#all-deployments tr[data-deployment-id="console-1"]').wait_for()
    screenshot(form_page, fleet.shots, "05-deployments")
    form_page.close()


def test_rollouts_pages_show_progress(fleet: Fleet, page: Any) -> None:
    doc = fleet.tmp / "rollout.yaml"
    doc.write_text(DOC.format(id="console-2"))
    r = subprocess.run(
        [
            str(BIN / "margoctl"),
            "--api",
            fleet.base,
            "--token-file",
            str(fleet.pki.token_file("acme")),
            "rollout",
            "create",
            "gentle",
            "-f",
            str(doc),
            "--device",
            "press-01",
            "--device",
            "press-02",
            "--steps",
            "1,100%",
            "--healthy-for",
            "1s",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    sign_in(page, fleet.base, fleet.token("acme"))
    page.get_by_role("link", name="Rollouts").click()
    page.locator('#rollouts tr[data-rollout="gentle"]').wait_for(timeout=5000)
    screenshot(page, fleet.shots, "06-rollouts")
    page.get_by_role("link", name="gentle").click()
    page.locator("#rollout-steps tbody tr").nth(1).wait_for(timeout=5000)
    try:
        page.locator("dd").filter(has_text="succeeded").wait_for(timeout=30_000)
    except Exception:
        raise AssertionError(fleet.ctl.get(fleet.token(), "/rollouts/gentle").text) from None
    assert "2 of 2 steps done" in page.locator("main").inner_text()
    screenshot(page, fleet.shots, "07-rollout")


def test_another_tenants_devices_never_appear(fleet: Fleet, page: Any) -> None:
    sign_in(page, fleet.base, fleet.token("globex"))
    page.locator("#fleet tbody tr").first.wait_for(timeout=5000)
    assert fleet_ids(page) == ["mill-07"]
    # acme's devices keep producing events; none of them reaches globex's page
    fleet.agents["press-02"].stop()
    fleet.ctl.wait_connected(fleet.token("acme"), "press-02", connected=False)
    fleet.start("acme", "press-02")
    fleet.ctl.wait_connected(fleet.token("acme"), "press-02")
    time.sleep(1.0)  # what the page would have shown by now, had it been sent an acme event
    for view, title in (
        ("#/devices", "Fleet"),
        ("#/deployments", "Deployments"),
        ("#/rollouts", "Rollouts"),
    ):
        page.goto(f"{fleet.base}/ui/{view}")
        page.locator("#view h1").filter(has_text=title).wait_for()
        page.locator("#view > div:not([aria-busy])").wait_for()  # rendered from the API
        text = page.content()
        assert not any(d in text for d in ("press-01", "press-02", "press-03", "console-"))
    page.goto(f"{fleet.base}/ui/#/devices/press-01")
    page.locator("p.error").filter(has_text="No device press-01 in this tenant").wait_for()
    screenshot(page, fleet.shots, "08-other-tenant")


def test_a_viewer_sees_no_apply_form(fleet: Fleet, page: Any) -> None:
    sign_in(page, fleet.base, fleet.viewer_token())
    page.locator("#fleet tbody tr").first.wait_for(timeout=5000)
    assert page.locator("#nav-apply").is_hidden()
    assert page.locator("#who-name").inner_text().startswith("vera (viewer)")
    page.goto(f"{fleet.base}/ui/#/apply")
    page.get_by_text("Applying needs the deployer role").wait_for()
    assert page.locator("form#apply-form").count() == 0
    assert page.locator("textarea, input[type=file]").count() == 0
    screenshot(page, fleet.shots, "09-viewer-apply")
    # the page only hides it; the API is what refuses it
    refused = httpx.post(
        f"{fleet.base}/api/v1/deployments",
        json=signed_body(fleet.pki.token_file("acme"), [DOC.format(id="console-3")]),
        headers={"Authorization": f"Bearer {fleet.viewer_token()}"},
        timeout=10,
    )
    assert refused.status_code == 403
