"""Register, log in, log out; one failure message for every failure; no open redirect via next."""

from __future__ import annotations

import re

import pytest

from helpers import CSRF_RE, OTHER_PASSWORD, PASSWORD, csrf_token
from secure_app.auth import LOGIN_FAILED, safe_next
from secure_app.store import get_store


def _stored(app, username: str):
    with app.app_context():
        return get_store().get(username)


def test_register_creates_the_account_and_sends_to_login(app, client, auth):
    response = auth.register("alice", PASSWORD)
    assert response.status_code == 302
    assert response.headers["Location"] == "/login"
    record = _stored(app, "alice")
    assert record["username"] == "alice"
    assert record["password_hash"].startswith("$argon2id$")
    assert PASSWORD not in record["password_hash"]


def test_register_refuses_a_taken_username_case_insensitively(app, client, auth):
    auth.register("alice", PASSWORD)
    response = auth.register("ALICE", OTHER_PASSWORD)
    assert response.status_code == 422
    assert "This username is taken" in response.get_data(as_text=True)
    # The first account is untouched: the second password does not open it.
    assert auth.login("alice", OTHER_PASSWORD).status_code == 200
    assert auth.login("alice", PASSWORD).status_code == 302


def test_register_refuses_confirm_mismatch_and_stores_nothing(app, client):
    token = csrf_token(client, "/register")
    response = client.post(
        "/register",
        data={
            "username": "alice",
            "password": PASSWORD,
            "confirm": OTHER_PASSWORD,
            "csrf_token": token,
        },
    )
    assert response.status_code == 422
    assert "Does not match." in response.get_data(as_text=True)
    assert _stored(app, "alice") is None


@pytest.mark.parametrize("username", ["ab", "a" * 33, "alice smith", "alice<b>", "ålice", ""])
def test_register_refuses_malformed_usernames(app, client, username):
    token = csrf_token(client, "/register")
    response = client.post(
        "/register",
        data={"username": username, "password": PASSWORD, "confirm": PASSWORD, "csrf_token": token},
    )
    assert response.status_code == 422
    with app.app_context():
        assert len(get_store()) == 0


def test_register_without_csrf_token_is_refused_and_stores_nothing(app, client):
    response = client.post(
        "/register", data={"username": "alice", "password": PASSWORD, "confirm": PASSWORD}
    )
    assert response.status_code == 400
    assert _stored(app, "alice") is None


def test_login_with_uppercase_username_reaches_the_account(client, auth):
    auth.register("alice", PASSWORD)
    response = auth.login("Alice", PASSWORD)
    assert response.status_code == 302
    assert response.headers["Location"] == "/account-details"
    page = client.get("/account-details").get_data(as_text=True)
    assert 'Logged in as <strong class="username">alice</strong>' in page


def test_login_page_and_every_page_show_who_is_logged_in(logged_in):
    for path in ("/", "/second", "/account-details", "/change-password"):
        page = logged_in.get(path).get_data(as_text=True)
        assert 'Logged in as <strong class="username">alice</strong>' in page, path


def test_login_without_csrf_token_is_refused(client, auth):
    auth.register()
    response = client.post("/login", data={"username": "alice", "password": PASSWORD})
    assert response.status_code == 400
    assert client.get("/account-details").status_code == 302


def test_logout_ends_the_login(logged_in, auth):
    response = auth.logout()
    assert response.status_code == 302
    assert response.headers["Location"] == "/?notice=logged-out"
    assert logged_in.get("/account-details").status_code == 302
    page = logged_in.get(response.headers["Location"]).get_data(as_text=True)
    assert "Logged in as" not in page
    assert "You have been logged out." in page


def test_notice_shows_only_fixed_texts(client):
    """The notice parameter picks a fixed message; it can never inject text."""
    page = client.get("/?notice=<script>alert(1)</script>").get_data(as_text=True)
    assert "alert(1)" not in page
    assert "flash-info" not in page


def test_logout_without_csrf_token_is_refused_and_keeps_the_session(logged_in):
    assert logged_in.post("/logout").status_code == 400
    assert logged_in.get("/account-details").status_code == 200


def test_logout_by_get_is_not_allowed(logged_in):
    assert logged_in.get("/logout").status_code == 405
    assert logged_in.get("/account-details").status_code == 200


def _without_token(page: str) -> str:
    return CSRF_RE.sub("csrf", page)


def test_unknown_user_and_wrong_password_get_identical_responses(client, auth):
    """No username enumeration: same status, same page, same message."""
    unknown = auth.login("alice", OTHER_PASSWORD)  # alice does not exist yet
    auth.register("alice", PASSWORD)
    client.get("/login")  # show the "account is ready" message so it is not on the next page
    wrong = auth.login("alice", OTHER_PASSWORD)
    assert unknown.status_code == wrong.status_code == 200
    assert LOGIN_FAILED in unknown.get_data(as_text=True)
    assert _without_token(unknown.get_data(as_text=True)) == _without_token(
        wrong.get_data(as_text=True)
    )
    assert client.get("/account-details").status_code == 302


@pytest.mark.parametrize(
    ("username", "password"),
    [("a", PASSWORD), ("x" * 500, PASSWORD), ("alice", "short"), ("alice", "p" * 5000)],
)
def test_malformed_login_gets_the_same_generic_message(client, auth, username, password):
    auth.register("alice", PASSWORD)
    response = auth.login(username, password)
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert page.count(LOGIN_FAILED) == 1
    # No message that tells the format rules apart from a wrong password.
    assert "Use 3 to 32 characters" not in page
    assert client.get("/account-details").status_code == 302


def test_password_is_never_echoed_back_into_the_login_page(client, auth):
    auth.register("alice", PASSWORD)
    page = auth.login("alice", OTHER_PASSWORD).get_data(as_text=True)
    assert OTHER_PASSWORD not in page


def test_login_required_sends_anonymous_users_to_login_with_next(client):
    response = client.get("/account-details?tab=1")
    assert response.status_code == 302
    assert response.headers["Location"] == "/login?next=/account-details?tab%3D1"


def test_login_honours_a_local_next_path(client, auth):
    auth.register()
    response = auth.login(next="/second?x=1")
    assert response.status_code == 302
    assert response.headers["Location"] == "/second?x=1"


OFF_SITE_NEXT = [
    "//evil.example",
    "///evil.example",
    "////evil.example/x",
    "/\\evil.example",
    "\\\\evil.example",
    "/\t/evil.example",
    "/\n/evil.example",
    "https://evil.example/",
    "http:evil.example",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "data:text/html,hi",
    "evil.example",
    " /\\evil.example",
    "/\u3002evil.example",
]
# The same targets as they arrive in a query string: once and twice percent-encoded.
ENCODED_NEXT = [
    "%2F%2Fevil.example",
    "/%2Fevil.example",
    "%2F%5Cevil.example",
    "/%5Cevil.example",
    "/%09/evil.example",
    "%252F%252Fevil.example",
    "https%3A%2F%2Fevil.example",
    "javascript%3Aalert(1)",
]


@pytest.mark.parametrize("target", OFF_SITE_NEXT)
def test_safe_next_refuses_off_site_targets(target):
    assert safe_next(target) is None


@pytest.mark.parametrize("raw", ENCODED_NEXT + [t.replace("\t", "%09") for t in OFF_SITE_NEXT])
def test_login_ignores_off_site_next_and_goes_to_the_account(client, auth, raw):
    """An open redirect after login would hand a phishing page the user's trust."""
    auth.register()
    token = csrf_token(client, "/login")
    response = client.post(
        f"/login?next={raw}",
        data={"username": "alice", "password": PASSWORD, "csrf_token": token},
    )
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location == "/account-details"


@pytest.mark.parametrize("raw", ["//evil.example", "/%5Cevil.example", "https://evil.example"])
def test_login_form_does_not_carry_an_off_site_next(client, raw):
    page = client.get(f"/login?next={raw}").get_data(as_text=True)
    action = re.search(r'<form method="post" action="([^"]*)"', page).group(1)
    assert action == "/login"
