"""Headless Chromium for the viewer's tests: Debian's ``chromium`` driven by playwright.

Playwright's own browser download is never used (no network): the tests launch the system
binary (``TRACKSTAR_CHROMIUM``, else ``/usr/bin/chromium``). Where it is missing the browser
tests skip, except when ``TRACKSTAR_REQUIRE_BROWSER=1`` (set by ``.ci/run``, which installs
the package): there a missing browser fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import numpy as np
import pytest

# Flags for a closed network and a root user: no sandbox, no background connections.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium_path() -> str | None:
    """The Chromium binary the tests drive, or None."""
    for candidate in (
        os.environ.get("TRACKSTAR_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def require_chromium() -> str:
    """The binary; skips the test without one (fails where CI requires the browser)."""
    path = chromium_path()
    if path is None:
        why = "no Chromium (apt-get install chromium, or set TRACKSTAR_CHROMIUM)"
        if os.environ.get("TRACKSTAR_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return path


@contextlib.contextmanager
def open_page(html_file: str, width: int = 1400, height: int = 900) -> Iterator:
    """A playwright page with ``html_file`` loaded (``file://``) and rendered."""
    binary = require_chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto("file://" + os.path.abspath(html_file))
            page.wait_for_selector("body[data-rendered]")
            page.errors = errors  # script errors, checked by the tests
            yield page
        finally:
            browser.close()


def distinct_colors(png_file: str) -> int:
    """How many distinct RGB colours a screenshot holds (a blank page has one or two)."""
    from PIL import Image

    with Image.open(png_file) as im:
        rgb = np.asarray(im.convert("RGB")).reshape(-1, 3)
    return len(np.unique(rgb, axis=0))
