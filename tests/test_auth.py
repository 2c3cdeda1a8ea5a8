"""Register, log in, log out; one failure message for every failure; no open redirect via next."""

from __future__ import annotations

import re

import pytest
from flask import g, session
from test_two_factor import enrol, second_step, two_factor_app, who

from helpers import CSRF_RE, OTHER_PASSWORD, PASSWORD, AuthActions, csrf_token, make_app
from secure_app import mfa, sessions
from secure_app.auth import (
    LOGIN_FAILED,
    SESSION_ENDED,
    SESSION_EXPIRED,
    begin_session_without_password,
    for_this_session,
    safe_next,
)
from secure_app.store import RecordGone, StoreError, get_store


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
    assert (
        '<p class="error" id="username-error">This username is taken. Please choose another.</p>'
    ) in response.get_data(as_text=True)
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


def test_logging_in_again_as_the_same_user_ends_the_previous_session(app, logged_in, auth):
    """A copy of the cookie from before the second login must not outlive it."""
    with logged_in.session_transaction() as cookie:
        before = dict(cookie)
    assert auth.login().status_code == 302
    copy = app.test_client()
    with copy.session_transaction() as cookie:
        cookie.update(before)
    assert copy.get("/account-details").status_code == 302
    assert len(_stored(app, "alice")["sessions"]) == 1
    assert logged_in.get("/account-details").status_code == 200


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


def test_safe_next_keeps_a_path_of_every_printable_character_and_refuses_the_neighbours():
    """Printable ASCII is "!" (0x21) to "~" (0x7e); space, DEL and beyond are refused."""
    printable = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "\\")
    assert safe_next("/" + printable) == "/" + printable
    for edge in ("!", "~"):
        assert safe_next(f"/{edge}x{edge}") == f"/{edge}x{edge}"
    for outside in (" ", "\x7f", "\x80", "\xa0"):
        assert safe_next(f"/a{outside}b") is None


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


# -- what each handler says and where it sends the browser -----------------------------------


def test_register_page_and_success_message(app, client, auth):
    assert client.get("/register").status_code == 200
    auth.register()
    page = client.get("/login").get_data(as_text=True)
    assert '<p class="flash flash-success">Your account is ready. Please log in.</p>' in page


def test_login_page_is_a_plain_200_and_keeps_a_local_next(client):
    response = client.get("/login?next=/second")
    assert response.status_code == 200
    action = re.search(r'<form method="post" action="([^"]*)"', response.get_data(as_text=True))
    assert action.group(1) == "/login?next=/second"


def test_logout_without_a_session_changes_nothing_and_says_logged_out(app, client):
    response = client.post("/logout", data={"csrf_token": csrf_token(client, "/login")})
    assert response.status_code == 302
    assert response.headers["Location"] == "/?notice=logged-out"
    assert response.headers["Clear-Site-Data"] == '"cookies", "storage"'


def test_a_wrong_current_password_is_refused_with_a_message_and_changes_nothing(app, logged_in):
    before = _stored(app, "alice")
    response = logged_in.post(
        "/change-password",
        data={
            "current_password": OTHER_PASSWORD,
            "new_password": "tangerine walrus gallops beneath quiet harbour",
            "confirm": "tangerine walrus gallops beneath quiet harbour",
            "csrf_token": csrf_token(logged_in, "/change-password"),
        },
    )
    assert response.status_code == 422
    assert (
        '<p class="error" id="current_password-error">This is not your current password.</p>'
    ) in response.get_data(as_text=True)
    assert _stored(app, "alice") == before


def test_a_password_change_says_so_and_returns_to_the_account(app, logged_in, auth):
    assert logged_in.get("/change-password").status_code == 200
    response = auth.change_password()
    assert response.status_code == 302
    assert response.headers["Location"] == "/account-details"
    page = logged_in.get("/account-details").get_data(as_text=True)
    assert (
        '<p class="flash flash-success">'
        "Your password has been changed. Other sessions were logged out.</p>"
    ) in page
    # The owner's security page lists it.
    assert [e["k"] for e in _stored(app, "alice")["events"]][-1] == "password_changed"


def test_a_refused_deletion_says_so_and_returns_to_the_account(app, logged_in):
    response = logged_in.post(
        "/delete-account",
        data={"password": OTHER_PASSWORD, "csrf_token": csrf_token(logged_in, "/account-details")},
    )
    assert response.status_code == 303
    assert response.headers["Location"] == "/account-details"
    page = logged_in.get("/account-details").get_data(as_text=True)
    assert (
        '<p class="flash flash-error">Your account was not deleted: the password was not right.</p>'
    ) in page
    assert _stored(app, "alice") is not None


def test_a_deletion_says_so_on_the_home_page_and_forgets_the_browser(app, logged_in):
    response = logged_in.post(
        "/delete-account",
        data={"password": PASSWORD, "csrf_token": csrf_token(logged_in, "/account-details")},
    )
    assert response.status_code == 302
    assert response.headers["Location"] == "/?notice=account-deleted"
    assert response.headers["Clear-Site-Data"] == '"cookies", "storage"'
    page = logged_in.get(response.headers["Location"]).get_data(as_text=True)
    assert '<p class="flash flash-info">Your account and its data have been deleted.</p>' in page
    assert "Logged in as" not in page
    assert _stored(app, "alice") is None


def test_logging_out_the_other_sessions_says_so_on_the_security_page(app, logged_in, auth):
    other = app.test_client()
    AuthActions(other).login()
    response = logged_in.post(
        "/logout-others", data={"csrf_token": csrf_token(logged_in, "/account-details")}
    )
    assert response.status_code == 302
    assert response.headers["Location"] == "/security"
    page = logged_in.get("/security").get_data(as_text=True)
    assert '<p class="flash flash-success">Every other session has been logged out.</p>' in page
    assert other.get("/account-details").status_code == 302
    (event,) = [e for e in _stored(app, "alice")["events"] if e["k"] == "sessions_ended_others"]
    assert event["count"] == 1


def test_a_session_ended_elsewhere_is_told_once_on_the_next_page_not_on_a_file(app, auth):
    phone, laptop = app.test_client(), app.test_client()
    auth.register()
    AuthActions(phone).login()
    AuthActions(laptop).login()
    laptop.post("/logout-others", data={"csrf_token": csrf_token(laptop, "/account-details")})
    photo = app.test_client()
    photo.set_cookie("session", phone.get_cookie("session").value)
    assert photo.get("/public/images/profile/" + "a" * 32 + ".webp").status_code == 404
    with photo.session_transaction() as cookie:
        assert "_flashes" not in cookie  # a file request carries no notice
    page = phone.get("/second")
    assert page.status_code == 200
    assert f'<p class="flash flash-info">{SESSION_ENDED}</p>' in page.get_data(as_text=True)
    assert SESSION_ENDED not in phone.get("/second").get_data(as_text=True)


def test_a_form_posted_from_a_session_ended_elsewhere_lands_on_the_login_page_told_why(app, auth):
    phone, laptop = app.test_client(), app.test_client()
    auth.register()
    AuthActions(phone).login()
    AuthActions(laptop).login()
    token = csrf_token(phone, "/account-details")  # the phone's form, open before the end
    laptop.post("/logout-others", data={"csrf_token": csrf_token(laptop, "/account-details")})
    details = {"full_name": "Alice", "email": "", "phone": "", "bio": "", "csrf_token": token}
    response = phone.post("/account-details", data=details)
    assert response.status_code == 302
    assert response.headers["Location"] == "/login?next=/account-details"
    page = phone.get(response.headers["Location"]).get_data(as_text=True)
    assert f'<p class="flash flash-info">{SESSION_ENDED}</p>' in page
    assert "Logged in as" not in page
    assert _stored(app, "alice")["full_name"] == ""  # the form did not go through


def test_an_expired_session_lands_on_the_login_page_told_so(tmp_path, clock):
    app = make_app(tmp_path, SESSION_IDLE_TIMEOUT=60)
    client = app.test_client()
    AuthActions(client).register()
    AuthActions(client).login()
    clock.advance(61)
    response = client.get("/account-details?tab=1")
    assert response.status_code == 302
    assert response.headers["Location"] == "/login?next=/account-details?tab%3D1"
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert f'<p class="flash flash-info">{SESSION_EXPIRED}</p>' in page


def test_an_expired_session_posting_is_logged_out_without_a_redirect_to_login(tmp_path, clock):
    app = make_app(tmp_path, SESSION_IDLE_TIMEOUT=60)
    client = app.test_client()
    AuthActions(client).register()
    AuthActions(client).login()
    token = csrf_token(client, "/account-details")
    clock.advance(61)
    response = client.post("/logout", data={"csrf_token": token})
    # The request went on as anonymous: logout's own answer, not the login page.
    assert response.headers["Location"] == "/?notice=logged-out"
    assert client.get("/account-details").status_code == 302


def test_activity_is_written_to_the_record_every_few_minutes_only(clock, app, logged_in):
    def entry():
        (value,) = _stored(app, "alice")["sessions"].values()
        return value

    logged_in.environ_base["REMOTE_ADDR"] = "192.0.2.44"
    login_time = entry()["t"]
    clock.advance(sessions.ACTIVE_REFRESH - 1)
    logged_in.get("/second")
    assert entry()["s"] == login_time
    clock.advance(1)
    logged_in.get("/second")
    assert entry()["s"] == login_time + sessions.ACTIVE_REFRESH
    assert entry()["ip"] == "192.0.2.44"


def test_the_cookie_is_signed_again_once_seen_is_exactly_the_refresh_interval_old(
    clock, app, logged_in
):
    refresh = sessions.seen_refresh(app.config["SESSION_IDLE_TIMEOUT"])
    logged_in.get("/second")  # the page's CSRF value is made: the cookie now stays as it is
    with logged_in.session_transaction() as cookie:
        seen = cookie["seen"]
    clock.advance(refresh - 1)
    response = logged_in.get("/second")
    assert response.headers.getlist("Set-Cookie") == []
    clock.advance(1)
    response = logged_in.get("/second")
    assert len(response.headers.getlist("Set-Cookie")) == 1
    with logged_in.session_transaction() as cookie:
        assert cookie["seen"] == seen + refresh


@pytest.mark.parametrize("uid", [["alice"], {"alice": 1}, 7])
def test_a_signed_cookie_whose_user_is_not_a_name_is_anonymous_not_a_500(app, logged_in, uid):
    with logged_in.session_transaction() as cookie:
        cookie["uid"] = uid
    response = logged_in.get("/second")
    assert response.status_code == 200
    assert "Logged in as" not in response.get_data(as_text=True)
    assert logged_in.get("/account-details").status_code == 302


def test_a_write_for_this_session_applies_only_while_it_is_live_in_the_record(app, logged_in):
    """for_this_session: the change while the session is live; RecordGone once it was ended."""
    with logged_in.session_transaction() as cookie:
        live = dict(cookie)
    record = _stored(app, "alice")
    ended = {**record, "sessions": {}}
    with app.test_request_context():
        session.update(live)
        assert for_this_session()(dict(record)) is None  # no change: only the check
        changed = dict(record)
        for_this_session(lambda r: r.update(bio="written"))(changed)
        assert changed["bio"] == "written"
        untouched = dict(ended)
        with pytest.raises(RecordGone) as gone:
            for_this_session(lambda r: r.update(bio="late"))(untouched)
        assert gone.value.args == ("alice",)  # names the account, as the store's own does
        assert untouched == ended


def test_a_failed_activity_write_does_not_fail_the_page(clock, app, logged_in, monkeypatch):
    clock.advance(sessions.ACTIVE_REFRESH)
    with app.app_context():
        store = type(get_store())

    def broken(self, *args, **kwargs):
        raise StoreError("disk full")

    monkeypatch.setattr(store, "update", broken)
    response = logged_in.get("/second")
    assert response.status_code == 200
    assert 'class="username">alice<' in response.get_data(as_text=True)


def test_an_account_gone_during_a_request_logs_out_to_the_login_page(tmp_path):
    def vanished():
        raise RecordGone("alice")  # what update_own raises when the record went meanwhile

    app = make_app(tmp_path)
    app.add_url_rule("/test-vanished", view_func=vanished)
    logged_in = app.test_client()
    AuthActions(logged_in).register()
    AuthActions(logged_in).login()
    response = logged_in.get("/test-vanished")
    assert response.status_code == 303
    assert response.headers["Location"] == "/login"
    assert "Logged in as" not in logged_in.get("/").get_data(as_text=True)


# -- a password is only the first step for a user with a second factor ----------------------


@pytest.fixture
def factor_app(tmp_path, monkeypatch, clock):
    app = two_factor_app(tmp_path, monkeypatch)
    client = app.test_client()
    AuthActions(client).register()
    AuthActions(client).login()
    secret, _ = enrol(client, clock)
    AuthActions(client).logout()
    clock.next_step()
    return app, secret


def test_a_correct_password_with_a_second_factor_logs_nobody_in(factor_app, clock):
    app, secret = factor_app
    client = app.test_client()
    response = AuthActions(client).login(next="/second")
    assert response.headers["Location"] == "/login/two-factor"
    assert who(client) is None
    assert "sessions" not in _stored(app, "alice") or not _stored(app, "alice")["sessions"]
    done = second_step(client, mfa.code_at(secret, clock.step))
    assert done.headers["Location"] == "/second"
    assert who(client) == "alice"


def test_a_hash_upgrade_at_a_two_factor_login_is_stored_and_the_login_still_finishes(
    factor_app, tmp_path, monkeypatch, clock
):
    old_app, secret = factor_app
    old_hash = _stored(old_app, "alice")["password_hash"]
    app = two_factor_app(tmp_path, monkeypatch, ARGON2_TIME_COST=2)
    client = app.test_client()
    assert AuthActions(client).login().headers["Location"] == "/login/two-factor"
    new_hash = _stored(app, "alice")["password_hash"]
    assert new_hash != old_hash and ",t=2," in new_hash
    second_step(client, mfa.code_at(secret, clock.step))
    assert who(client) == "alice"


def test_an_expired_session_still_gets_files_without_a_redirect(tmp_path, clock):
    app = make_app(tmp_path, SESSION_IDLE_TIMEOUT=60)
    client = app.test_client()
    AuthActions(client).register()
    AuthActions(client).login()
    clock.advance(61)
    assert client.get("/public/css/site.css").status_code == 200  # a file: no redirect
    response = client.get("/second")
    assert response.status_code == 200  # a public page: no redirect, anonymous
    assert "Logged in as" not in response.get_data(as_text=True)


def test_a_login_under_a_raised_cost_stores_the_upgraded_hash_with_the_session(tmp_path):
    AuthActions(make_app(tmp_path).test_client()).register()
    app = make_app(tmp_path, ARGON2_TIME_COST=3)
    client = app.test_client()
    assert AuthActions(client).login().status_code == 302
    record = _stored(app, "alice")
    assert ",t=3," in record["password_hash"] and len(record["sessions"]) == 1
    assert AuthActions(app.test_client()).login().status_code == 302


def test_the_next_sign_in_tells_of_a_failed_attempt_once(app, client, auth):
    auth.register()
    failed = app.test_client()
    response = AuthActions(failed).login("alice", OTHER_PASSWORD)
    response.close()  # the failure is written once the response has gone
    page = client.get(auth.login().headers["Location"]).get_data(as_text=True)
    assert '<p class="flash flash-info">1 failed sign-in attempt since your last visit' in page
    other = app.test_client()
    page = other.get(AuthActions(other).login().headers["Location"]).get_data(as_text=True)
    assert "failed sign-in" not in page


# -- a session without a password (passkeys.py verifies the passkey, then calls this) ----------


def test_a_claimed_sign_in_starts_a_session_bound_to_the_hash_the_claim_saw(app, auth):
    auth.register()
    seen = []

    def claim(record):
        seen.append(record["password_hash"])
        return {**record, "note": "claimed"}

    with app.test_request_context():
        g.user = None
        assert begin_session_without_password("alice", claim, "passkey") is True
        assert session["uid"] == "alice" and session["sid"]
    record = _stored(app, "alice")
    assert record["note"] == "claimed" and seen == [record["password_hash"]]
    assert len(record["sessions"]) == 1
    assert record["events"][-1]["k"] == "login_success"
    assert record["events"][-1]["method"] == "passkey"


def test_a_refused_or_vanished_claim_starts_nothing(app, auth):
    auth.register()
    before = _stored(app, "alice")
    with app.test_request_context():
        g.user = None
        assert begin_session_without_password("alice", lambda r: None, "passkey") is False
        assert begin_session_without_password("nobody", lambda r: r, "passkey") is False
        assert "uid" not in session
    assert _stored(app, "alice") == before


def test_a_new_password_built_from_the_username_is_refused_on_change(app, client, auth):
    # Strong on its own (the registration tests show it); guessable from the username.
    auth.register("marmaladeskies")
    auth.login("marmaladeskies")
    before = _stored(app, "marmaladeskies")
    response = auth.change_password(new="marmaladeskies2024")
    assert response.status_code == 422
    assert "too easy to guess" in response.get_data(as_text=True)
    assert _stored(app, "marmaladeskies") == before
