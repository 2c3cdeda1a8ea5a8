"""Keyboard users: every form works with Tab, typing and Enter alone, and focus can be seen."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from browsing import PASSWORD, focused, shot, sign_up, tab_to

# site.css draws a 3 px solid ring; Chromium's own ring is a 1 px "auto" one.
MIN_OUTLINE_PX = 2


def type_into(page: Page, selector: str, text: str) -> None:
    """Type into the focused field, after checking that the focus is where it should be."""
    assert page.evaluate("s => document.activeElement.matches(s)", selector), focused(page)
    page.keyboard.type(text)


def test_first_tab_shows_a_skip_link_that_jumps_to_the_content(page: Page) -> None:
    page.goto("/login")
    page.keyboard.press("Tab")
    assert focused(page)["text"] == "Skip to content"
    box = page.locator(".skip-link").bounding_box()
    assert box is not None and box["x"] >= 0 and box["y"] >= 0, "the skip link stays off-screen"
    shot(page, "keyboard-skip-link")
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"#main$"))


def test_register_and_login_forms_complete_with_tab_typing_and_enter_alone(page: Page) -> None:
    page.goto("/register")
    tab_to(page, "#username")
    type_into(page, "#username", "kbd-user")
    page.keyboard.press("Tab")
    type_into(page, "#password", PASSWORD)
    page.keyboard.press("Tab")
    type_into(page, "#confirm", PASSWORD)
    page.keyboard.press("Enter")
    expect(page.locator(".flash-success")).to_contain_text("Your account is ready")

    expect(page).to_have_url(re.compile(r"/login$"))
    tab_to(page, "main #username")
    type_into(page, "#username", "kbd-user")
    page.keyboard.press("Tab")
    type_into(page, "#password", PASSWORD)
    page.keyboard.press("Enter")
    expect(page.get_by_role("banner")).to_contain_text("Logged in as kbd-user")


def test_account_form_saves_with_tab_typing_and_enter_alone(page: Page) -> None:
    sign_up(page, "kbd-account")
    page.goto("/account-details")
    tab_to(page, "#full_name")
    type_into(page, "#full_name", "Kay Board")
    page.keyboard.press("Tab")
    type_into(page, "#email", "kay@example.org")
    page.keyboard.press("Tab")
    type_into(page, "#phone", "+1 555 0100")
    page.keyboard.press("Tab")
    type_into(page, "#bio", "Never touches a mouse.")
    page.keyboard.press("Tab")  # the file chooser: one stop, left empty
    assert focused(page)["name"] == "photo"
    page.keyboard.press("Tab")
    assert focused(page)["text"] == "Save"
    page.keyboard.press("Enter")
    expect(page.locator(".flash-success")).to_have_text("Your details have been saved.")
    page.reload()
    expect(page.get_by_label("Full name")).to_have_value("Kay Board")
    expect(page.get_by_label("Email")).to_have_value("kay@example.org")
    expect(page.get_by_label("Phone")).to_have_value("+1 555 0100")
    expect(page.get_by_label("About you")).to_have_value("Never touches a mouse.")


def tab_stops(page: Page, limit: int = 40) -> list[dict]:
    """Walk the whole tab order once, recording each focused element and its outline."""
    stops = []
    for _ in range(limit):
        page.keyboard.press("Tab")
        state = focused(page)
        if state["tag"] == "body" or (stops and state == stops[0]):
            break
        stops.append(state)
    return stops


def assert_focus_visible(stops: list[dict]) -> None:
    assert stops, "nothing could be reached with Tab"
    for stop in stops:
        assert stop["focusVisible"], stop
        assert stop["outlineStyle"] == "solid", stop
        assert stop["outlineWidth"] >= MIN_OUTLINE_PX, stop


def test_focus_ring_from_site_css_shows_on_every_tab_stop_logged_out(page: Page) -> None:
    page.goto("/login")
    stops = tab_stops(page)
    assert {"username", "password"} <= {s["name"] for s in stops}
    assert_focus_visible(stops)


def test_focus_ring_from_site_css_shows_on_every_tab_stop_of_the_account_page(
    page: Page,
) -> None:
    sign_up(page, "kbd-focus")
    expect(page).to_have_url(re.compile(r"/account-details$"))
    stops = tab_stops(page)
    names = {s["name"] for s in stops}
    assert {"full_name", "email", "phone", "bio", "photo", "password"} <= names
    assert "Log out" in {s["text"] for s in stops}
    assert_focus_visible(stops)
    page.keyboard.press("Shift+Tab")
    shot(page, "keyboard-focus-account")
