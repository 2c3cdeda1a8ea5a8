"""The whole journey in Chromium, served by gunicorn: nothing blocked, nothing left behind."""

from __future__ import annotations

import re

from playwright.sync_api import BrowserContext, Page, expect

from browsing import (
    PASSWORD,
    drop_csrf_token,
    login,
    photo_jpeg,
    register,
    shot,
)

DETAILS = {
    "Full name": "Ada Lovelace-Byron",
    "Email": "ada@example.org",
    "Phone": "+44 (20) 7946 0958",
}
# Markup in user text must come back as text: were it markup, the CSP listener would see it.
BIO = 'Writes notes on engines.\n<script>alert(1)</script> <b style="color:red">ünïcode ✓</b>'
PERSONAL = [*DETAILS.values(), "Writes notes on engines", "Lovelace"]


def photo_state(page: Page) -> dict:
    return page.locator("img.profile-photo").evaluate(
        "img => ({complete: img.complete, naturalWidth: img.naturalWidth, alt: img.alt})"
    )


def test_journey_register_login_save_photo_reload_logout_then_back_shows_no_personal_data(
    page: Page, context: BrowserContext, watch
) -> None:
    page.goto("/")
    shot(page, "home")
    register(page, "ada")
    login(page, "ada")
    expect(page).to_have_url(re.compile(r"/account-details$"))
    expect(page.get_by_role("banner")).to_contain_text("Logged in as ada")

    # Chromium kept the session cookie over plain http, locked away from scripts.
    [cookie] = [c for c in context.cookies() if c["name"] == "session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    assert page.evaluate("document.cookie") == ""

    for label, value in DETAILS.items():
        page.get_by_label(label).fill(value)
    page.get_by_label("About you").fill(BIO)
    page.get_by_label(re.compile(r"^Profile photo \(JPEG")).set_input_files(
        {"name": "holiday.jpg", "mimeType": "image/jpeg", "buffer": photo_jpeg()}
    )
    page.get_by_role("button", name="Save").click()
    expect(page.locator(".flash-success")).to_have_text("Your details have been saved.")

    photo = page.locator("img.profile-photo")
    expect(photo).to_be_visible()
    page.wait_for_function("document.querySelector('img.profile-photo').complete")
    state = photo_state(page)
    assert state["naturalWidth"] > 0, "the photo did not render"
    assert state["alt"] == "Profile photo of Ada Lovelace-Byron"
    shot(page, "account")

    page.reload()
    for label, value in DETAILS.items():
        expect(page.get_by_label(label)).to_have_value(value)
    expect(page.get_by_label("About you")).to_have_value(BIO)
    page.wait_for_function("document.querySelector('img.profile-photo').complete")
    assert photo_state(page)["naturalWidth"] > 0, "the photo was not kept"
    assert page.locator("b").filter(has_text="ünïcode").count() == 0, "user text became markup"

    page.get_by_role("button", name="Log out", exact=True).click()
    expect(page.get_by_role("banner")).not_to_contain_text("Logged in as")
    expect(page.get_by_role("navigation")).to_contain_text("Log in")

    # Back must not bring the account page out of any cache, nor must a reload.
    page.go_back()
    page.wait_for_load_state()
    for text in PERSONAL:
        assert text not in page.content(), f"{text!r} shown after logout and Back"
    page.reload()
    expect(page).to_have_url(re.compile(r"/login\?next=(/|%2F)account-details$"))
    for text in PERSONAL:
        assert text not in page.content(), f"{text!r} shown after logout, Back and reload"
    assert page.locator("img.profile-photo").count() == 0

    assert watch.csp_violations == []
    assert watch.unexpected_errors() == []


def test_site_css_applies_under_the_strict_csp(page: Page, watch) -> None:
    page.goto("/")
    header = page.locator(".site-header")
    # Computed styles that only site.css sets: the browser loaded it and the CSP let it in.
    expect(header).to_have_css("background-color", "rgb(30, 58, 138)")
    expect(page.locator(".card").first).to_have_css("border-radius", "8px")
    expect(page.locator("body")).to_have_css("background-color", "rgb(243, 245, 249)")
    favicon = page.request.get(page.locator("link[rel=icon]").get_attribute("href"))
    assert favicon.ok and favicon.headers["content-type"].startswith("image/svg+xml")
    assert watch.csp_violations == []
    assert watch.unexpected_errors() == []


def test_forged_register_form_without_csrf_token_is_refused_and_stores_nothing(
    page: Page, watch
) -> None:
    page.goto("/register")
    drop_csrf_token(page)
    page.get_by_label("Username").fill("mallory")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Repeat the password").fill(PASSWORD)
    with page.expect_response(lambda r: r.url.endswith("/register")) as posted:
        page.get_by_role("button", name="Create account").click()
    assert posted.value.status == 400
    expect(page.get_by_role("heading", level=1)).to_have_text("Bad request")
    shot(page, "error-400")

    # Nothing was stored: the same name can still be registered, once, properly.
    register(page, "mallory")
    assert watch.csp_violations == []
    assert watch.unexpected_errors(400) == []
