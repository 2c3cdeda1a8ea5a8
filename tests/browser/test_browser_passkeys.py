"""Passkeys in Chromium, with the DevTools protocol's virtual authenticator.

The site is served at ``http://localhost:<port>`` with ``FLASK_PUBLIC_URL``
to match: an RP ID is a host name, never an IP address. The authenticator is
Chromium's own (``WebAuthn.addVirtualAuthenticator``: internal transport,
resident keys, user verification on), so the page's script, the browser's
WebAuthn code and the server's py_webauthn checks all run for real.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pyotp
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from browsing import PASSWORD, Watch, new_context, register, serious_violations
from servers import Gunicorn

AUTHENTICATOR = {
    "protocol": "ctap2",
    "transport": "internal",
    "hasResidentKey": True,
    "hasUserVerification": True,
    "isUserVerified": True,
    "automaticPresenceSimulation": True,
}


@pytest.fixture(scope="module")
def localhost_server(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = Gunicorn(
        tmp_path_factory.mktemp("passkey-server"), env={"FLASK_RATELIMIT_ENABLED": "false"}
    )
    origin = f"http://localhost:{server.port}"
    server.env["FLASK_PUBLIC_URL"] = origin
    with server:
        yield origin


@pytest.fixture
def passkey_context(browser: Browser, localhost_server: str) -> Iterator[BrowserContext]:
    ctx = new_context(browser, localhost_server)
    yield ctx
    ctx.close()


@pytest.fixture
def passkey_page(passkey_context: BrowserContext) -> Iterator[tuple[Page, Watch, dict]]:
    """A page, what went wrong in it, and a virtual authenticator attached to it."""
    watch = Watch(passkey_context)
    page = passkey_context.new_page()
    cdp = passkey_context.new_cdp_session(page)
    cdp.send("WebAuthn.enable")
    added = cdp.send("WebAuthn.addVirtualAuthenticator", {"options": AUTHENTICATOR})
    device = {"cdp": cdp, "id": added["authenticatorId"]}
    yield page, watch, device
    assert watch.csp_violations == [], watch.csp_violations
    assert watch.unexpected_errors() == [], watch.unexpected_errors()


def log_in_with_password(page: Page, username: str) -> None:
    page.goto("/login")
    page.locator("main").get_by_label("Username").fill(username)
    page.locator("main").get_by_label("Password").fill(PASSWORD)
    page.locator("main").get_by_role("button", name="Log in").click()


def log_out(page: Page) -> None:
    page.get_by_role("button", name="Log out", exact=True).click()
    expect(page.get_by_role("banner")).not_to_contain_text("Logged in as")


def clean(page: Page) -> None:
    assert serious_violations(page) == []


def stored_credentials(device: dict) -> list[dict]:
    return device["cdp"].send("WebAuthn.getCredentials", {"authenticatorId": device["id"]})[
        "credentials"
    ]


def current_code(secret: str) -> str:
    """The app's code now, waiting for the next 30-second step if this one is about to end."""
    if 30 - time.time() % 30 < 3:
        time.sleep(30 - time.time() % 30 + 0.2)
    return pyotp.TOTP(secret).now()


def test_register_sign_in_second_step_and_remove(passkey_page) -> None:
    page, _, device = passkey_page
    register(page, "pia")
    log_in_with_password(page, "pia")
    expect(page.locator(".who")).to_contain_text("Logged in as pia")

    # Register: a name, then the browser's own ceremony, driven by the page's script.
    page.goto("/security")
    expect(page.locator("#add-passkey")).to_be_enabled()
    clean(page)
    page.locator("#passkey-name").fill("Laptop")
    page.locator("#add-passkey").click()
    expect(page.locator(".flash-success")).to_contain_text("Laptop")
    expect(page).to_have_url(re.compile(r"/security$"))
    expect(page.locator(".passkey-name")).to_have_text(["Laptop"])
    [credential] = stored_credentials(device)
    assert credential["isResidentCredential"] and credential["rpId"] == "localhost"
    clean(page)
    log_out(page)

    # Sign in with the passkey and nothing else: no username, no password.
    page.goto("/login")
    clean(page)
    page.locator("#passkey-login").click()
    expect(page.locator(".who")).to_contain_text("Logged in as pia")
    expect(page).to_have_url(re.compile(r"/account-details$"))

    # TOTP too (the passkey sign-in was a fresh authentication, so no re-authentication).
    page.goto("/security/totp")
    secret = page.locator("#totp-secret").inner_text().replace(" ", "")
    page.get_by_label("Code").fill(current_code(secret))
    page.get_by_role("button", name="Turn on two-step sign-in").click()
    expect(page.locator(".recovery-code")).to_have_count(10)
    log_out(page)

    # The passkey as the second step after a password.
    log_in_with_password(page, "pia")
    expect(page).to_have_url(re.compile(r"/login/two-factor$"))
    expect(page.locator(".who")).to_have_count(0)
    expect(page.get_by_label("Code")).to_be_visible()
    clean(page)
    page.locator("#passkey-second-factor").click()
    expect(page.locator(".who")).to_contain_text("Logged in as pia")

    # Remove it: the authenticator still holds it, but the site no longer accepts it.
    page.goto("/security")
    page.get_by_role("button", name="Remove Laptop").click()
    expect(page.locator(".flash-success")).to_contain_text("removed")
    expect(page.locator(".passkey-name")).to_have_count(0)
    log_out(page)
    page.goto("/login")
    page.locator("#passkey-login").click()
    expect(page).to_have_url(re.compile(r"/login$"))
    expect(page.locator(".flash-error")).to_contain_text("did not work")
    expect(page.locator(".who")).to_have_count(0)
    assert len(stored_credentials(device)) == 1


def test_a_refused_ceremony_says_so_and_offers_a_retry(passkey_page) -> None:
    page, _, device = passkey_page
    register(page, "quinn")
    log_in_with_password(page, "quinn")
    page.goto("/security")
    page.locator("#passkey-name").fill("Phone")
    page.locator("#add-passkey").click()
    expect(page.locator(".passkey-name")).to_have_text(["Phone"])
    log_out(page)
    # The person does not confirm on the device: the page says so and offers to try again.
    device["cdp"].send(
        "WebAuthn.setUserVerified", {"authenticatorId": device["id"], "isUserVerified": False}
    )
    page.goto("/login")
    page.locator("#passkey-login").click()
    expect(page.locator("#passkey-error")).to_be_visible()
    expect(page.locator("#passkey-continue")).to_have_text("Try again")
    expect(page.locator("#passkey-continue")).to_be_enabled()
    clean(page)
    device["cdp"].send(
        "WebAuthn.setUserVerified", {"authenticatorId": device["id"], "isUserVerified": True}
    )
    page.locator("#passkey-continue").click()
    expect(page.locator(".who")).to_contain_text("Logged in as quinn")


def test_without_script_the_passkey_buttons_say_they_cannot_work(
    browser: Browser, localhost_server: str
) -> None:
    ctx = new_context(browser, localhost_server, java_script_enabled=False)
    try:
        page = ctx.new_page()
        for path in ("/", "/login"):
            page.goto(path)
            expect(page.locator("#passkey-login")).to_be_disabled()
            expect(page.locator("#passkey-login-note")).to_contain_text("cannot use them")
            # The password form works as before.
            expect(page.locator("main").get_by_role("button", name="Log in")).to_be_enabled()
    finally:
        ctx.close()


def test_home_page_offers_the_passkey_with_the_script_pinned(passkey_page) -> None:
    page, _, _ = passkey_page
    page.goto("/")
    expect(page.locator("#passkey-login")).to_be_enabled()
    expect(page.locator("#passkey-login-note")).to_contain_text("fingerprint")
    script = page.locator("script[src^='/public/js/passkeys.js']")
    assert script.get_attribute("integrity").startswith("sha384-")
    clean(page)
