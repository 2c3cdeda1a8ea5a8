"""Forgot password in Chromium, served by gunicorn: the link from the outbox, a new login.

The account's verified address is written into the record by the test (the
account page's email change belongs to another change); everything after
that is what a person does: the forms by keyboard and mouse, the newest
``.eml`` in ``data/outbox``, the link in it.
"""

from __future__ import annotations

import email
import email.policy
import re
import time
from pathlib import Path

from playwright.sync_api import Page, expect

from browsing import PASSWORD, register, serious_violations, tab_to
from secure_app.store.text import TextStore

NEW_PASSWORD = "harbour lights flicker over slate roofs"
LINK_RE = re.compile(r"^(http://\S+/reset-password/\S+?)\r?$", re.M)


def newest_link(outbox: Path, after: set[str], timeout: float = 15) -> str:
    """The reset link of the first message that appears in ``outbox`` beyond ``after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # the server's mail thread writes it soon after the page
        new = (
            sorted(p for p in outbox.glob("*.eml") if p.name not in after)
            if outbox.exists()
            else []
        )
        if new:
            msg = email.message_from_bytes(new[-1].read_bytes(), policy=email.policy.default)
            return LINK_RE.search(msg.get_body(("plain",)).get_content()).group(1)
        time.sleep(0.05)
    raise AssertionError(f"no new message in {outbox}")


def log_in(page: Page, username: str, password: str) -> None:
    page.locator("main").get_by_label("Username").fill(username)
    page.locator("main").get_by_label("Password").fill(password)
    page.locator("main").get_by_role("button", name="Log in").click()


def test_forgot_password_from_the_outbox_to_a_new_login(page: Page, server, watch) -> None:
    register(page, "erin")
    data = server.tmp / "data"
    store = TextStore(data)
    try:
        store.update(
            "erin", lambda r: r.update(email="erin@example.org", email_verified="erin@example.org")
        )
    finally:
        store.close()
    outbox = data / "outbox"
    before = {p.name for p in outbox.glob("*.eml")} if outbox.exists() else set()

    page.goto("/login")
    tab_to(page, "a[href='/forgot-password']")
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/forgot-password$"))
    assert serious_violations(page) == []
    page.get_by_label("Email").fill("erin@example.org")
    page.get_by_role("button", name="Send the link").click()
    expect(page.locator("h1")).to_have_text("Check your email")

    link = newest_link(outbox, before)
    assert link.startswith(f"http://localhost:{server.port}/reset-password/")
    response = page.goto(link)
    assert response.status == 200
    assert response.headers["referrer-policy"] == "no-referrer"
    assert serious_violations(page) == []
    page.get_by_label("New password", exact=True).fill(NEW_PASSWORD)
    page.get_by_label("Repeat the new password").fill(NEW_PASSWORD)
    page.get_by_role("button", name="Set the new password").click()
    expect(page).to_have_url(re.compile(r"/login$"))
    expect(page.locator(".flash-success")).to_contain_text("Your password has been reset")
    expect(page.locator(".who")).to_have_count(0)  # the reset logged nobody in

    log_in(page, "erin", PASSWORD)  # the old password
    expect(page.locator("main")).to_contain_text("Invalid username or password.")
    log_in(page, "erin", NEW_PASSWORD)
    expect(page.locator(".who")).to_contain_text("Logged in as erin")

    used = page.goto(link)  # the used link
    assert used.status == 404
    expect(page.locator("h1")).to_have_text("This link does not work")
    assert watch.unexpected_errors(404) == []
