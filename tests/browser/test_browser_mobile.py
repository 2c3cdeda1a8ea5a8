"""Small screens: at 375 CSS pixels nothing scrolls sideways and every form still works."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from browsing import PASSWORD, Watch, photo_jpeg, shot, sideways_overflow, slug

PUBLIC = ["/", "/second", "/login", "/register", "/no-such-page", "/logout"]
MEMBER = ["/", "/second", "/account-details", "/change-password", "/no-such-page"]
# The longest name the rules allow, in the widest letter, with no place to break a line;
# the header shows it as text.
LONG_NAME = "w" * 32
UNBROKEN = "Supercalifragilistic" * 5


def assert_fits(page: Page, name: str) -> None:
    assert sideways_overflow(page) is None
    shot(page, f"{name}-mobile")


def assert_fields_fit(page: Page) -> None:
    """Every visible field and button lies inside the screen and is wide enough to use."""
    # Measure the page as styled: right after a redirect the DOM can be there
    # before site.css is applied, and an unstyled button is 21 px high.
    page.wait_for_load_state("load")
    width = page.viewport_size["width"]
    controls = page.locator("main input:visible, main textarea:visible, main button:visible")
    assert controls.count() > 0
    for i in range(controls.count()):
        box = controls.nth(i).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, box
        assert box["height"] >= 24, f"too small to tap: {box}"


def test_no_public_page_scrolls_sideways_at_375px(mobile_page: tuple[Page, Watch]) -> None:
    page, watch = mobile_page
    for path in PUBLIC:
        page.goto(path)
        assert_fits(page, f"public-{slug(path)}")
    assert watch.csp_violations == []


def test_phone_user_registers_logs_in_and_saves_long_unbroken_details_without_sideways_scroll(
    mobile_page: tuple[Page, Watch],
) -> None:
    page, watch = mobile_page
    page.goto("/register")
    assert_fields_fit(page)
    page.get_by_label("Username").fill(LONG_NAME)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Repeat the password").fill(PASSWORD)
    page.get_by_role("button", name="Create account").tap()
    expect(page.locator(".flash-success")).to_contain_text("Your account is ready")

    assert_fields_fit(page)
    page.locator("main").get_by_label("Username").fill(LONG_NAME)
    page.locator("main").get_by_label("Password").fill(PASSWORD)
    page.locator("main").get_by_role("button", name="Log in").tap()
    expect(page).to_have_url(re.compile(r"/account-details$"))
    expect(page.get_by_role("banner")).to_contain_text(f"Logged in as {LONG_NAME}")

    assert_fields_fit(page)
    page.get_by_label("Full name").fill(UNBROKEN)
    page.get_by_label("Email").fill(f"{'x' * 60}@example.org")
    page.get_by_label("Phone").fill("+1 555 0100")
    page.get_by_label("About you").fill(UNBROKEN * 5)
    page.get_by_label(re.compile(r"^Profile photo \(JPEG")).set_input_files(
        {"name": "me.jpg", "mimeType": "image/jpeg", "buffer": photo_jpeg((600, 900))}
    )
    page.get_by_role("button", name="Save").tap()
    expect(page.locator(".flash-success")).to_have_text("Your details have been saved.")
    expect(page.get_by_label("Full name")).to_have_value(UNBROKEN)
    page.wait_for_function("document.querySelector('img.profile-photo').complete")

    for path in MEMBER:
        page.goto(path)
        expect(page.get_by_role("banner")).to_contain_text(LONG_NAME)
        assert_fits(page, f"member-{slug(path)}")
    # The longest name makes the largest QR code (version 7, 53 modules): on the
    # narrowest phone still in use it shrinks to fit its card.
    page.set_viewport_size({"width": 320, "height": 640})
    page.goto("/security/totp")
    qr = page.locator("svg.totp-qr")
    expect(qr).to_be_visible()
    assert 150 <= qr.bounding_box()["width"]
    assert_fits(page, "totp-320px")
    page.set_viewport_size({"width": 375, "height": 740})
    page.goto("/account-details")
    page.get_by_label("Email").fill("not an address")
    page.get_by_role("button", name="Save").tap()
    expect(page.get_by_label("Email")).to_have_attribute("aria-invalid", "true")
    assert_fields_fit(page)
    assert_fits(page, "account-errors")
    assert watch.csp_violations == []
    assert watch.unexpected_errors(404, 422) == []
