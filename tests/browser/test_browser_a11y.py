"""Accessibility: axe-core finds nothing serious on any page, logged in or out, errors included.

Each page also gets the checks axe cannot make on its own: one language, the
landmarks, one h1, a label for every field, and every error message tied to
its field with ``aria-describedby`` and ``aria-invalid``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from browsing import (
    PASSWORD,
    Watch,
    drop_csrf_token,
    new_context,
    serious_violations,
    shot,
    sign_up,
    slug,
    structure_problems,
)
from servers import Gunicorn

# (path, expected status) as a visitor reaches them by typing the address.
PUBLIC = [
    ("/", 200),
    ("/second", 200),
    ("/login", 200),
    ("/register", 200),
    ("/no-such-page", 404),
    ("/logout", 405),  # a GET: logout is POST only
]
MEMBER = [
    ("/", 200),
    ("/second", 200),
    ("/account-details", 200),
    ("/change-password", 200),
    ("/no-such-page", 404),
    ("/logout", 405),
]


def assert_accessible(page: Page, name: str) -> None:
    shot(page, name)
    assert structure_problems(page) == []
    assert serious_violations(page) == []


@pytest.fixture(scope="module")
def member_context(browser: Browser, server: Gunicorn) -> Iterator[BrowserContext]:
    """One logged-in profile for the whole module (it never logs out)."""
    ctx = new_context(browser, server.url)
    page = ctx.new_page()
    sign_up(page, "grace")
    page.close()
    yield ctx
    ctx.close()


@pytest.fixture
def member(member_context: BrowserContext) -> Iterator[tuple[Page, Watch]]:
    """A new page, watched on its own, in the logged-in profile."""
    page = member_context.new_page()
    watch = Watch(page)
    yield page, watch
    assert watch.csp_violations == []
    page.close()


@pytest.mark.parametrize(("path", "status"), PUBLIC, ids=[p for p, _ in PUBLIC])
def test_axe_finds_nothing_serious_on_public_pages(page: Page, watch, path: str, status: int):
    response = page.goto(path)
    assert response.status == status
    assert_accessible(page, f"public-{slug(path)}")
    assert watch.unexpected_errors(status) == []


@pytest.mark.parametrize(("path", "status"), MEMBER, ids=[p for p, _ in MEMBER])
def test_axe_finds_nothing_serious_on_member_pages(member, path: str, status: int):
    page, watch = member
    response = page.goto(path)
    assert response.status == status
    expect(page.get_by_role("banner")).to_contain_text("Logged in as grace")
    assert_accessible(page, f"member-{slug(path)}")
    assert watch.unexpected_errors(status) == []


def test_register_errors_are_announced_next_to_their_fields(page: Page, watch) -> None:
    page.goto("/register")
    page.get_by_label("Username").fill("no spaces allowed")
    page.get_by_label("Password", exact=True).fill("too short")
    page.get_by_label("Repeat the password").fill("something else")
    page.get_by_role("button", name="Create account").click()
    expect(page.locator(".error")).to_have_count(3)
    username = page.get_by_label("Username")
    expect(username).to_have_attribute("aria-invalid", "true")
    # The hint and the error are both read out with the field.
    expect(username).to_have_attribute("aria-describedby", "username-hint username-error")
    expect(username).to_have_accessible_description(
        "3 to 32 characters: letters, digits, dot, underscore or hyphen. "
        "Use 3 to 32 characters: letters, digits, dot, underscore or hyphen."
    )
    assert_accessible(page, "register-errors")
    assert watch.unexpected_errors(422) == []


def test_failed_login_error_is_tied_to_the_password_field(page: Page, watch) -> None:
    page.goto("/login")
    page.get_by_label("Username").fill("nobody")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").last.click()
    expect(page.get_by_label("Password")).to_have_accessible_description(
        "Invalid username or password."
    )
    assert_accessible(page, "login-failed")


def test_account_errors_are_tied_to_fields_and_nothing_is_saved(member) -> None:
    page, watch = member
    page.goto("/account-details")
    page.get_by_label("Full name").fill("Grace Hopper")
    page.get_by_label("Email").fill("not an address")
    page.get_by_label("Phone").fill("call me maybe")
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_label("Email")).to_have_accessible_description(
        "Enter an email address such as name@example.org."
    )
    expect(page.get_by_label("Phone")).to_have_accessible_description(
        "Use digits, spaces and + - ( ) only."
    )
    assert_accessible(page, "account-errors")
    page.goto("/account-details")
    expect(page.get_by_label("Full name")).to_have_value("")  # the valid field was not kept either
    assert watch.unexpected_errors(422) == []


def test_change_password_errors_are_tied_to_fields(member) -> None:
    page, watch = member
    page.goto("/change-password")
    page.get_by_label("Current password").fill("not my password at all, honest")
    page.get_by_label("New password", exact=True).fill("short")
    page.get_by_label("Repeat the new password").fill("other")
    page.get_by_role("button", name="Change password").click()
    expect(page.locator(".error")).to_have_count(2)
    assert_accessible(page, "change-password-errors")
    assert watch.unexpected_errors(422) == []


def test_axe_finds_nothing_serious_on_the_400_page_of_a_forged_post(page: Page, watch) -> None:
    page.goto("/login")
    drop_csrf_token(page, "main form.card")  # the password form (the passkey button has its own)
    page.get_by_label("Username").fill("grace")
    page.get_by_label("Password").fill(PASSWORD)
    with page.expect_response(lambda r: "/login" in r.url and r.request.method == "POST") as post:
        page.get_by_role("button", name="Log in").last.click()
    assert post.value.status == 400
    expect(page.get_by_role("banner")).not_to_contain_text("Logged in as")
    assert_accessible(page, "error-400")
    assert watch.unexpected_errors(400) == []


@pytest.fixture(scope="module")
def limited_server(browser: Browser, tmp_path_factory) -> Iterator[Gunicorn]:
    """A second server whose login limit is two attempts, to reach the 429 page."""
    env = {"FLASK_LOGIN_RATE_LIMIT_IP": "2 per minute"}
    with Gunicorn(tmp_path_factory.mktemp("limited"), env=env) as running:
        yield running


def test_axe_finds_nothing_serious_on_the_429_page(browser: Browser, limited_server) -> None:
    ctx = new_context(browser, limited_server.url)
    watch = Watch(ctx)
    page = ctx.new_page()
    statuses = []
    for _ in range(3):
        page.goto("/login")
        page.get_by_label("Username").fill("grace")
        page.get_by_label("Password").fill("wrong " + PASSWORD)
        with page.expect_response(lambda r: r.request.method == "POST") as post:
            page.get_by_role("button", name="Log in").last.click()
        statuses.append(post.value.status)
    assert statuses == [200, 200, 429]
    expect(page.get_by_role("heading", level=1)).to_have_text("Too many attempts")
    assert_accessible(page, "error-429")
    assert watch.csp_violations == []
    assert watch.unexpected_errors(429) == []
    ctx.close()
