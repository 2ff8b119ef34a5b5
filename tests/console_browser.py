"""A real, headless Chromium driven by Playwright for the web console's tests.

Playwright's own build of Chromium comes from a CDN (``playwright install``) that may be
unreachable; `dev.py test` tries it and falls back to Debian's ``chromium`` package, which
Playwright drives through ``executable_path``. Without either (or without the ``playwright``
package, a test extra) the tests that need a browser skip, saying which is missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

SYSTEM_CHROMIUM = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium_executable(playwright: Any) -> str | None:
    """``$MARGO_CHROMIUM``, else Playwright's own Chromium when installed, else Debian's."""
    chosen = os.environ.get("MARGO_CHROMIUM")
    if chosen:
        return chosen
    try:
        own = playwright.chromium.executable_path
    except Exception:  # noqa: BLE001 - Playwright raises when its browser is not installed
        own = None
    if own and Path(own).exists():
        return str(own)
    for candidate in (*SYSTEM_CHROMIUM, shutil.which("chromium") or ""):
        if candidate and Path(candidate).exists():
            return candidate
    return None


@contextmanager
def browser() -> Iterator[Any]:
    """A headless Chromium (a Playwright ``Browser``), closed at the end."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the console tests need the 'playwright' package (pip install -e '.[test]')")
    with sync_playwright() as pw:
        exe = chromium_executable(pw)
        if exe is None:
            pytest.skip(
                "the console tests need Chromium: 'playwright install chromium' or Debian's "
                "'chromium' package (python3 dev.py test installs it when it can)"
            )
        # --no-sandbox: the suite runs as root in a container, where Chromium's sandbox cannot
        # start; the pages it loads are our own, from loopback
        launched = pw.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


def sign_in(page: Any, base: str, token: str, *, expect_ok: bool = True) -> None:
    """Open the console at ``base`` and sign in with ``token`` through its form."""
    page.goto(f"{base}/")
    page.get_by_label("Operator token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    if expect_ok:
        page.locator("#who").wait_for(state="visible", timeout=10_000)


def screenshot(page: Any, directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
