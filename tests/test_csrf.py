"""CSRF: every POST route refuses a forged request with 400, and nothing changes.

Each route gets a request that would succeed with the right token (a valid
registration, the right password, real details), sent three ways: with no
token, with a wrong token, and with a valid token taken from another session
(what an attacker gets by loading the form in their own browser). The reply
must be the 400 page, the data and photo folders must be byte-for-byte as
before, and the victim's session cookie must be unchanged.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from PIL import Image

from helpers import OTHER_PASSWORD, PASSWORD, AuthActions, csrf_token, make_app, stored_bytes

SESSION_COOKIE = "session"


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 90, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def session_cookie(client) -> str | None:
    cookie = client.get_cookie(SESSION_COOKIE)
    return cookie.value if cookie else None


def logged_in_as_alice(client) -> bool:
    return client.get("/account-details").status_code == 200


@dataclass
class Route:
    """A POST route, the form that would succeed there, and how to check it did not."""

    path: str
    fields: dict[str, object]
    victim_logged_in: bool
    # After the refused request: the victim is (still) logged in, or not.
    expect_logged_in: bool
    multipart: bool = False


ROUTES = [
    Route(
        "/register",
        {"username": "mallory", "password": OTHER_PASSWORD, "confirm": OTHER_PASSWORD},
        victim_logged_in=False,
        expect_logged_in=False,
    ),
    Route(
        "/login",
        {"username": "alice", "password": PASSWORD},
        victim_logged_in=False,
        expect_logged_in=False,  # login CSRF: the attacker's account must not be forced on
    ),
    Route("/logout", {}, victim_logged_in=True, expect_logged_in=True),
    Route(
        "/account-details",
        {"full_name": "Mallory", "email": "mallory@example.org", "bio": "pwned"},
        victim_logged_in=True,
        expect_logged_in=True,
        multipart=True,
    ),
    Route("/account-details/remove-photo", {}, victim_logged_in=True, expect_logged_in=True),
    Route("/logout-others", {}, victim_logged_in=True, expect_logged_in=True),
    Route(
        "/change-password",
        {"current_password": PASSWORD, "new_password": OTHER_PASSWORD, "confirm": OTHER_PASSWORD},
        victim_logged_in=True,
        expect_logged_in=True,
    ),
    Route("/delete-account", {"password": PASSWORD}, victim_logged_in=True, expect_logged_in=True),
]


def no_token(victim, attacker) -> dict[str, str]:
    return {}


def wrong_token(victim, attacker) -> dict[str, str]:
    # The victim's own token with the first character of its signature changed.
    # (Not the last: base64's last character has padding bits, and two
    # characters that differ only there decode to the same, valid, signature.)
    payload, _, signature = csrf_token(victim, "/register").rpartition(".")
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
    return {"csrf_token": f"{payload}.{flipped}"}


def other_sessions_token(victim, attacker) -> dict[str, str]:
    # Validly signed, but bound to the attacker's session, not the victim's.
    return {"csrf_token": csrf_token(attacker, "/register")}


TOKENS: dict[str, Callable] = {
    "no token": no_token,
    "wrong token": wrong_token,
    "another session's token": other_sessions_token,
}


@pytest.fixture
def world(tmp_path):
    """alice registered with a photo and a second session; a victim browser and an attacker's."""
    app = make_app(tmp_path)
    victim = app.test_client()
    alice = AuthActions(victim)
    assert alice.register().status_code == 302
    other_device = app.test_client()
    assert AuthActions(other_device).login().status_code == 302
    return app, victim, other_device, app.test_client()


def add_photo(client) -> None:
    response = client.post(
        "/account-details",
        data={
            "csrf_token": csrf_token(client, "/account-details"),
            "photo": (io.BytesIO(png_bytes()), "a.png"),
        },
        content_type="multipart/form-data",
    )
    assert response.status_code == 303
    client.get("/account-details")  # show the flash, so the session holds no pending message


@pytest.mark.parametrize("route", ROUTES, ids=[r.path for r in ROUTES])
@pytest.mark.parametrize("token", TOKENS.values(), ids=TOKENS.keys())
def test_forged_post_is_refused_and_changes_nothing(world, route, token):
    app, victim, other_device, attacker = world
    if route.victim_logged_in:
        assert AuthActions(victim).login().status_code == 302
        add_photo(victim)
    else:
        victim.get("/")  # an anonymous visitor with a session of their own
    form = {**route.fields, **token(victim, attacker)}
    if route.multipart:
        form["photo"] = (io.BytesIO(png_bytes()), "evil.png")
    before, cookie_before = stored_bytes(app), session_cookie(victim)

    response = victim.post(
        route.path,
        data=form,
        content_type="multipart/form-data" if route.multipart else None,
    )

    assert response.status_code == 400
    assert "security token" in response.get_data(as_text=True)
    assert stored_bytes(app) == before
    assert session_cookie(victim) == cookie_before
    assert logged_in_as_alice(victim) is route.expect_logged_in
    # alice's other device keeps its session: nothing was logged out or deleted.
    assert logged_in_as_alice(other_device)


def test_token_from_before_login_is_refused_after_login(world):
    # Login starts a fresh session, and with it a fresh token: a token planted
    # or read before login is worthless afterwards.
    app, victim, _, _ = world
    stale = csrf_token(victim, "/login")
    assert AuthActions(victim).login().status_code == 302
    before = stored_bytes(app)
    response = victim.post(
        "/account-details",
        data={"csrf_token": stale, "full_name": "Mallory"},
        content_type="multipart/form-data",
    )
    assert response.status_code == 400
    assert stored_bytes(app) == before


def test_https_post_from_another_site_is_refused_by_the_referrer_check(tmp_path):
    # Over https Flask-WTF also requires a same-origin Referer: a token leaked
    # to another site cannot be replayed from a page there.
    app = make_app(tmp_path, FORCE_HTTPS=True, PUBLIC_URL="https://localhost")
    client = app.test_client()
    token = csrf_token(client, "/register")
    form = {"username": "mallory", "password": PASSWORD, "confirm": PASSWORD, "csrf_token": token}
    before = stored_bytes(app)
    response = client.post(
        "/register", data=form, headers={"Referer": "https://evil.example/csrf.html"}
    )
    assert response.status_code == 400
    assert stored_bytes(app) == before
    same_site = client.post(
        "/register", data=form, headers={"Referer": "https://localhost/register"}
    )
    assert same_site.status_code == 302
