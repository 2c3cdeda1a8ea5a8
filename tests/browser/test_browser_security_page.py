"""The security page in Chromium: three sessions, one ended from the page, and the sign-in notice.

Two Chromium profiles and a command-line client (``requests``) log in as one
user. The server trusts one proxy hop, so each client can say where it comes
from with ``X-Forwarded-For`` (documentation addresses, RFC 5737) and the page
shows three addresses instead of 127.0.0.1 three times. The second profile
also sends a Firefox User-Agent, so the page names two different browsers.

Makes docs/security-page.png and docs/sign-in-notice.png with UPDATE_DOCS_SCREENSHOTS=1.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, BrowserContext, Page, expect

from browsing import (
    PASSWORD,
    Watch,
    login,
    new_context,
    register,
    serious_violations,
    shot,
    structure_problems,
)
from servers import Gunicorn

# The screenshots go to docs/ only when asked (UPDATE_DOCS_SCREENSHOTS=1): a
# test run must not change tracked files. Otherwise they go to a temporary folder.
DOCS = (
    Path(__file__).resolve().parents[2] / "docs"
    if os.environ.get("UPDATE_DOCS_SCREENSHOTS")
    else Path(tempfile.mkdtemp(prefix="secure_app-shots-"))
)
FIREFOX = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0"
ENDED = "this session was ended elsewhere"


@pytest.fixture(scope="module")
def proxied(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    env = {"FLASK_RATELIMIT_ENABLED": "false", "FLASK_PROXY_HOPS": "1"}
    with Gunicorn(tmp_path_factory.mktemp("security-page"), env=env) as running:
        yield running


def profile(browser: Browser, server: Gunicorn, ip: str, **options: object) -> BrowserContext:
    return new_context(browser, server.url, extra_http_headers={"X-Forwarded-For": ip}, **options)


def cli_session(server: Gunicorn, ip: str) -> requests.Session:
    cli = requests.Session()
    cli.headers["X-Forwarded-For"] = ip
    return cli


def cli_login(server: Gunicorn, cli: requests.Session, username: str, password: str) -> int:
    html = cli.get(server.url + "/login").text
    token = re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', html)[1]
    data = {"username": username, "password": password, "csrf_token": token}
    return cli.post(server.url + "/login", data=data, allow_redirects=False).status_code


def check(page: Page) -> None:
    assert structure_problems(page) == []
    assert serious_violations(page) == []


def test_three_sessions_one_ended_from_the_page(browser: Browser, proxied: Gunicorn) -> None:
    laptop_ctx = profile(browser, proxied, "198.51.100.23")
    other_ctx = profile(browser, proxied, "203.0.113.41", user_agent=FIREFOX)
    watch = Watch(laptop_ctx), Watch(other_ctx)
    try:
        laptop, other = laptop_ctx.new_page(), other_ctx.new_page()
        register(laptop, "iris")
        login(laptop, "iris")
        login(other, "iris")
        cli = cli_session(proxied, "192.0.2.80")
        assert cli_login(proxied, cli, "iris", PASSWORD) == 302

        laptop.goto("/account-details")
        laptop.get_by_role("link", name="Security and sessions").click()
        expect(laptop).to_have_url(re.compile(r"/security$"))
        sessions = laptop.locator("#sessions li.session")
        expect(sessions).to_have_count(3)
        expect(laptop.locator("#sessions")).to_contain_text("You have 3 active sessions")
        current = laptop.locator("li.session-current")
        expect(current).to_contain_text("(this browser)")
        expect(current).to_contain_text("198.51.100.23")
        expect(current.get_by_role("button")).to_have_count(0)  # no "End" for this one
        firefox = sessions.filter(has_text="Firefox 128 on Windows")
        expect(firefox).to_contain_text("203.0.113.41")
        expect(sessions.filter(has_text="Python Requests")).to_contain_text("192.0.2.80")
        check(laptop)
        DOCS.mkdir(exist_ok=True)
        laptop.screenshot(path=DOCS / "security-page.png", full_page=True)

        firefox.get_by_role("button", name="End this session").click()
        expect(laptop.locator(".flash-success")).to_contain_text(
            "The session on Firefox 128 on Windows has ended"
        )
        expect(sessions).to_have_count(2)
        expect(laptop.locator("#recent-activity li").first).to_contain_text(
            "Session ended from the security page (Firefox 128 on Windows)"
        )
        check(laptop)
        shot(laptop, "security-session-ended")

        # The other browser, at its next click, lands on the login page and is told why.
        other.goto("/account-details")
        expect(other).to_have_url(re.compile(r"/login\?next=/account-details$"))
        expect(other.locator(".flashes")).to_contain_text(ENDED)
        expect(other.locator(".who")).to_have_count(0)
        check(other)
        shot(other, "security-ended-elsewhere-login")
        # The CLI client was not ended: the record is per session, not per user.
        assert cli.get(proxied.url + "/account-details", allow_redirects=False).status_code == 200
        for w in watch:
            assert w.csp_violations == [] and w.unexpected_errors() == []
    finally:
        laptop_ctx.close()
        other_ctx.close()


def test_sign_in_notice_after_failed_attempts(browser: Browser, proxied: Gunicorn) -> None:
    ctx = profile(browser, proxied, "198.51.100.23")
    watch = Watch(ctx)
    try:
        page = ctx.new_page()
        register(page, "noor")
        login(page, "noor")
        page.get_by_role("button", name="Log out", exact=True).click()
        expect(page.get_by_role("banner")).not_to_contain_text("Logged in as")
        for ip in ("192.0.2.10", "192.0.2.11", "203.0.113.7"):
            cli = cli_session(proxied, ip)
            assert cli_login(proxied, cli, "noor", "a wrong guess at the password") == 200

        login(page, "noor")
        notice = page.locator(".flashes")
        expect(notice).to_contain_text(
            re.compile(
                r"3 failed sign-in attempts since your last visit, "
                r"the last from 203\.0\.113\.7 at \d\d:\d\d UTC\."
            )
        )
        check(page)
        page.screenshot(path=DOCS / "sign-in-notice.png")
        notice.get_by_role("link", name="See recent activity").click()
        expect(page).to_have_url(re.compile(r"/security#recent-activity$"))
        failures = page.locator("#recent-activity li.event-failure")
        expect(failures).to_have_count(3)
        expect(failures.first).to_contain_text("203.0.113.7")
        check(page)
        assert watch.csp_violations == [] and watch.unexpected_errors() == []
    finally:
        ctx.close()
