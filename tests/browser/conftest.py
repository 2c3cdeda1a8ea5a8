"""Real-browser fixtures: one gunicorn server and one headless Chromium shared by the session.

Chromium is Debian's (``/usr/bin/chromium``, or the ``CHROMIUM`` env var); Playwright
only drives it. Where no browser exists the tests skip with a reason, except under
``CI``, where a missing browser fails the run: CI must never pass by testing nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import Gunicorn

try:
    from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

    from browsing import Watch, new_context
except ImportError as missing:  # the test extras are not installed
    if os.environ.get("CI"):
        raise
    MISSING = f"browser tests not collected: {missing} (pip install -e '.[test]')"
    collect_ignore_glob = ["test_*.py"]
else:
    MISSING = ""

DEFAULT_CHROMIUM = "/usr/bin/chromium"
# This machine's network is closed: without the background-networking flags
# Chromium floods refused connections (updates, sync, safe browsing).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def pytest_report_header() -> str | None:
    return MISSING or None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.slow)


def _unavailable(reason: str) -> None:
    """Skip, or fail under CI, where a missing browser must not pass silently."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so a missing browser is a failure)", pytrace=False)
    pytest.skip(reason)


def chromium_path() -> str | None:
    """The Chromium to drive: ``CHROMIUM`` if set, else Debian's, if it is there."""
    return shutil.which(os.environ.get("CHROMIUM") or DEFAULT_CHROMIUM)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    path = chromium_path()
    if path is None:
        _unavailable(
            f"no Chromium at {os.environ.get('CHROMIUM') or DEFAULT_CHROMIUM} "
            "(apt-get install chromium, or set CHROMIUM)"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=path, headless=True, args=CHROMIUM_FLAGS
        )
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def server(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """The app as ``make run`` serves it, limits off (no test here is about limits)."""
    tmp = tmp_path_factory.mktemp("browser-server")
    with Gunicorn(tmp, env={"FLASK_RATELIMIT_ENABLED": "false"}) as running:
        yield running


@pytest.fixture
def context(browser: Browser, server: Gunicorn) -> Iterator[BrowserContext]:
    """A fresh profile per test: no cookie from another test leaks in."""
    ctx = new_context(browser, server.url)
    yield ctx
    ctx.close()


@pytest.fixture
def watch(context: BrowserContext) -> Watch:
    """Record CSP violations, console errors and page errors in every page of ``context``."""
    return Watch(context)


@pytest.fixture
def page(context: BrowserContext, watch: Watch) -> Iterator[Page]:
    page = context.new_page()
    yield page
    # Whatever a test checked, no page it opened may break the CSP.
    assert watch.csp_violations == [], watch.csp_violations


@pytest.fixture
def mobile_page(browser: Browser, server: Gunicorn) -> Iterator[tuple[Page, Watch]]:
    """A page on a 375-pixel-wide phone screen, touch and all."""
    ctx = new_context(
        browser,
        server.url,
        viewport={"width": 375, "height": 740},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    watcher = Watch(ctx)
    yield ctx.new_page(), watcher
    assert watcher.csp_violations == [], watcher.csp_violations
    ctx.close()
