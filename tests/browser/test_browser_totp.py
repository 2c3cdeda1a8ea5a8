"""TOTP in Chromium: enrol from the page, log in with password and code, recovery codes, disable.

The authenticator app is pyotp, fed the secret read from ``#totp-secret`` the
way a person would type it. Codes follow the real clock, so the test waits
for a new 30-second step where a code must not be one already used.
"""

from __future__ import annotations

import re
import time

import pyotp
from playwright.sync_api import Page, expect

from browsing import PASSWORD, register, serious_violations, structure_problems

STEP = 30


def fresh_code(secret: str, not_step: int | None = None) -> tuple[str, int]:
    """The app's code now, waiting for a new step if this one is spent or about to end."""
    while True:
        now = time.time()
        step = int(now) // STEP
        if step != not_step and STEP - now % STEP > 3:
            return pyotp.TOTP(secret).at(now), step
        time.sleep(STEP - now % STEP + 0.2)


def password_step(page: Page, username: str) -> None:
    page.goto("/login")
    page.locator("main").get_by_label("Username").fill(username)
    page.locator("main").get_by_label("Password").fill(PASSWORD)
    page.locator("main").get_by_role("button", name="Log in").click()
    expect(page).to_have_url(re.compile(r"/login/two-factor$"))
    expect(page.locator(".who")).to_have_count(0)  # not logged in yet


def code_step(page: Page, code: str) -> None:
    page.get_by_label("Code").fill(code)
    page.get_by_role("button", name="Continue").click()


def log_out(page: Page) -> None:
    page.get_by_role("button", name="Log out", exact=True).click()
    expect(page.get_by_role("banner")).not_to_contain_text("Logged in as")


def check_page(page: Page) -> None:
    assert serious_violations(page) == []
    assert structure_problems(page) == []


def test_totp_enrol_login_recovery_code_once_and_disable(page: Page, watch) -> None:
    register(page, "tina")
    page.goto("/login")
    page.locator("main").get_by_label("Username").fill("tina")
    page.locator("main").get_by_label("Password").fill(PASSWORD)
    page.locator("main").get_by_role("button", name="Log in").click()
    expect(page.locator(".who")).to_contain_text("Logged in as tina")

    # Enrol: the key as text and as a QR code drawn in the page (no image request, no script).
    page.goto("/security")
    page.get_by_role("link", name="Set up an authenticator app").click()
    expect(page).to_have_url(re.compile(r"/security/totp$"))
    secret = page.locator("#totp-secret").inner_text().replace(" ", "")
    assert re.fullmatch(r"[A-Z2-7]{32}", secret)
    qr = page.locator("svg.totp-qr")
    expect(qr).to_be_visible()
    assert qr.bounding_box()["width"] >= 150
    check_page(page)
    code, enrol_step = fresh_code(secret)
    page.get_by_label("Code").fill(code)
    page.get_by_role("button", name="Turn on two-step sign-in").click()
    codes = page.locator(".recovery-code").all_inner_texts()
    assert len(codes) == 10 and len(set(codes)) == 10
    check_page(page)
    log_out(page)

    # Password, then the code: the enrolment code is spent, a new step's code works.
    password_step(page, "tina")
    check_page(page)
    expect(page.locator("#passkey-second-factor")).to_be_disabled()
    if int(time.time()) // STEP == enrol_step:
        code_step(page, code)
        expect(page.locator(".error")).to_contain_text("did not work")
        expect(page.locator(".who")).to_have_count(0)
    code, login_step = fresh_code(secret, not_step=enrol_step)
    code_step(page, code)
    expect(page).to_have_url(re.compile(r"/account-details$"))
    expect(page.locator(".who")).to_contain_text("Logged in as tina")
    log_out(page)

    # A recovery code, typed loosely, works once; the second time it is refused.
    recovery = codes[0]
    password_step(page, "tina")
    code_step(page, recovery.lower().replace("-", " "))
    expect(page.locator(".who")).to_contain_text("Logged in as tina")
    page.goto("/security")
    expect(page.locator("#recovery-left")).to_have_text("9")
    check_page(page)
    log_out(page)
    password_step(page, "tina")
    code_step(page, recovery)
    expect(page.locator(".error")).to_contain_text("did not work")
    expect(page.locator(".who")).to_have_count(0)
    code_step(page, codes[1])
    expect(page.locator(".who")).to_contain_text("Logged in as tina")

    # Disable: the secret and the codes go; the password alone logs in again.
    page.goto("/security")
    page.get_by_role("button", name="Turn off two-step sign-in").click()
    expect(page.locator(".flash")).to_contain_text("Two-step sign-in is off")
    expect(page.locator("main")).to_contain_text("Off:")
    log_out(page)
    page.goto("/login")
    page.locator("main").get_by_label("Username").fill("tina")
    page.locator("main").get_by_label("Password").fill(PASSWORD)
    page.locator("main").get_by_role("button", name="Log in").click()
    expect(page).to_have_url(re.compile(r"/account-details$"))
    assert watch.unexpected_errors(422) == []
