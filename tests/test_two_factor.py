"""The second factor through the real handlers: enrol, log in with a code, recover, re-authenticate.

A fake clock (``time.time`` replaced for the whole app: sessions, codes,
Fernet and the limiter all read it) moves the test from one 30-second step
to the next without waiting.
"""

from __future__ import annotations

import json
import logging
import re
from html import unescape
from pathlib import Path

import pytest
from flask import session

from helpers import (
    CSRF_RE,
    OTHER_PASSWORD,
    PASSWORD,
    AuthActions,
    Clock,
    csrf_token,
    make_app,
    stored_bytes,
)
from secure_app import mfa, reauth
from secure_app.security import limiter
from secure_app.store import get_store
from secure_app.two_factor import CODE_FAILED

SECRET_RE = re.compile(r'<code id="totp-secret">([A-Z2-7 ]+)</code>')
ENROLMENT_RE = re.compile(r'name="enrolment" type="hidden" value="([^"]+)"')
CODES_RE = re.compile(r'<code class="recovery-code">([A-Z0-9-]+)</code>')


def two_factor_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **config: object):
    """An app whose keys (secret and MFA) live in ``tmp_path/instance``, not in the repo."""
    monkeypatch.setenv("FLASK_INSTANCE_PATH", str(tmp_path / "instance"))
    app = make_app(tmp_path, **config)
    if config.get("RATELIMIT_ENABLED"):
        # One limiter per process, and every test starts at the same fake time:
        # counts from another test's app would still be in its window.
        with app.app_context():
            limiter.reset()
    return app


@pytest.fixture
def audit_events(caplog: pytest.LogCaptureFixture):
    """The audit events logged so far, parsed (the audit logger does not propagate)."""
    logger = logging.getLogger("secure_app.audit")
    caplog.set_level(logging.INFO, "secure_app.audit")
    logger.addHandler(caplog.handler)
    yield lambda: [json.loads(r.message) for r in caplog.records if r.name == logger.name]
    logger.removeHandler(caplog.handler)


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock):
    return two_factor_app(tmp_path, monkeypatch)


# -- actions -------------------------------------------------------------------------------


def post(client, path: str, data: dict | None = None, token_from: str = "/security"):
    """POST a form to ``path`` with the CSRF token of this session (read from ``token_from``)."""
    return client.post(path, data={**(data or {}), "csrf_token": csrf_token(client, token_from)})


def enrol(client, clock: Clock) -> tuple[str, list[str]]:
    """Switch TOTP on through /security/totp as a person with an app would; return key and codes."""
    page = client.get("/security/totp")
    assert page.status_code == 200, page.headers.get("Location")
    html = page.get_data(as_text=True)
    secret = SECRET_RE.search(html).group(1).replace(" ", "")
    response = client.post(
        "/security/totp",
        data={
            "code": mfa.code_at(secret, clock.step),
            "enrolment": ENROLMENT_RE.search(html).group(1),
            "csrf_token": next(g for g in CSRF_RE.search(html).groups() if g),
        },
    )
    assert response.status_code == 200
    codes = CODES_RE.findall(response.get_data(as_text=True))
    assert len(codes) == 10
    return secret, codes


def second_step(client, code: str):
    return client.post(
        "/login/two-factor",
        data={"code": code, "csrf_token": csrf_token(client, "/login")},
    )


def login_with_code(client, code: str, username: str = "alice", password: str = PASSWORD):
    first = AuthActions(client).login(username, password)
    assert first.status_code == 302
    assert first.headers["Location"] == "/login/two-factor"
    return second_step(client, code)


def who(client) -> str | None:
    """The username this client is logged in as, or None (asked of a login_required page)."""
    response = client.get("/account-details")
    if response.status_code != 200:
        return None
    return re.search(r'class="username">([^<]+)<', response.get_data(as_text=True)).group(1)


def record(app, username: str = "alice") -> dict:
    with app.app_context():
        return get_store().get(username)


def all_but_events(app, username: str = "alice") -> dict:
    """The record without what a refused code or a password step writes by design.

    A refused code is an event (events.py); a correct password names the one
    pending login that may finish (two_factor.spend_pending).
    """
    skip = ("events", "failed_logins", "pending_login")
    return {k: v for k, v in record(app, username).items() if k not in skip}


@pytest.fixture
def enrolled(app, client, clock):
    """alice with TOTP on, logged out; returns (secret, recovery codes)."""
    auth = AuthActions(client)
    assert auth.register().status_code == 302
    assert auth.login().status_code == 302
    secret, codes = enrol(client, clock)
    auth.logout()
    clock.next_step()  # the code that confirmed enrolment is spent
    return secret, codes


# -- enrolment -----------------------------------------------------------------------


def test_enrolment_page_shows_the_secret_and_an_inline_svg_qr(logged_in) -> None:
    page = logged_in.get("/security/totp")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    secret = SECRET_RE.search(html).group(1).replace(" ", "")
    assert len(secret) == 32
    assert '<svg role="img"' in html and "data:" not in html and "<script" not in html
    assert "otpauth://totp/secure_app:alice?secret=" + secret in html.replace("&amp;", "&")
    # Nothing is stored until the app's first code is right.
    assert "totp" not in record(logged_in.application)
    assert page.headers["Cache-Control"] == "no-store"


def test_a_wrong_code_stores_nothing_and_shows_the_same_key_again(logged_in, clock) -> None:
    app = logged_in.application
    html = logged_in.get("/security/totp").get_data(as_text=True)
    secret = SECRET_RE.search(html).group(1)
    before = stored_bytes(app)
    wrong = f"{(int(mfa.code_at(secret.replace(' ', ''), clock.step)) + 1) % 1_000_000:06d}"
    for code in (wrong, "", "12345", "١٢٣٤٥٦", "x" * 500):
        response = logged_in.post(
            "/security/totp",
            data={
                "code": code,
                "enrolment": ENROLMENT_RE.search(html).group(1),
                "csrf_token": csrf_token(logged_in, "/security"),
            },
        )
        assert response.status_code == 422
        assert SECRET_RE.search(response.get_data(as_text=True)).group(1) == secret
    assert stored_bytes(app) == before


def test_an_enrolment_form_for_another_user_or_too_old_is_refused(app, client, clock) -> None:
    for name in ("alice", "bob"):
        AuthActions(client).register(name)
    bob = app.test_client()
    AuthActions(bob).login("bob")
    bob_html = bob.get("/security/totp").get_data(as_text=True)
    bob_secret = SECRET_RE.search(bob_html).group(1).replace(" ", "")
    AuthActions(client).login("alice")
    before = stored_bytes(app)
    response = client.post(
        "/security/totp",
        data={
            "code": mfa.code_at(bob_secret, clock.step),
            "enrolment": ENROLMENT_RE.search(bob_html).group(1),  # bob's key, offered to alice
            "csrf_token": csrf_token(client, "/security"),
        },
    )
    assert response.status_code == 422 and stored_bytes(app) == before
    # bob's own form, answered after ten minutes: expired. Re-authenticate first (stale by now).
    clock.advance(mfa.ENROL_TTL + 1)
    post(bob, "/reauthenticate", {"password": PASSWORD}, token_from="/reauthenticate")
    before = stored_bytes(app)
    response = bob.post(
        "/security/totp",
        data={
            "code": mfa.code_at(bob_secret, clock.step),
            "enrolment": ENROLMENT_RE.search(bob_html).group(1),
            "csrf_token": csrf_token(bob, "/security"),
        },
    )
    assert response.status_code == 422 and "expired" in response.get_data(as_text=True)
    assert stored_bytes(app) == before


def test_enrolment_stores_an_encrypted_secret_and_hashed_codes_only(app, enrolled) -> None:
    secret, codes = enrolled
    stored = record(app)
    assert stored["totp"]["last_step"] > 0 and len(stored["recovery_codes"]) == 10
    raw = b"".join(stored_bytes(app).values())
    assert secret.encode() not in raw
    for code in codes:
        assert code.encode() not in raw and code.replace("-", "").encode() not in raw


# -- logging in with the second factor --------------------------------------------------


def test_password_alone_logs_nobody_in_for_a_user_with_a_factor(app, client, enrolled) -> None:
    response = AuthActions(client).login()
    assert response.headers["Location"] == "/login/two-factor"
    with client.session_transaction() as cookie:
        assert "uid" not in cookie and "sid" not in cookie
        assert set(cookie["pending_2fa"]) == {"u", "h", "p", "t", "n"}
        assert PASSWORD not in json.dumps(dict(cookie))
        assert record(app)["password_hash"] not in json.dumps(dict(cookie))
    for page in ("/account-details", "/security", "/security/totp", "/change-password"):
        location = client.get(page).headers.get("Location", "")
        assert location.startswith("/login?next="), page
    assert record(app)["sessions"] == {}


def test_password_then_code_logs_in_with_a_new_session(app, client, clock, enrolled) -> None:
    secret, _ = enrolled
    response = login_with_code(client, mfa.code_at(secret, clock.step))
    assert response.status_code == 302 and response.headers["Location"] == "/account-details"
    assert who(client) == "alice"
    assert len(record(app)["sessions"]) == 1
    with client.session_transaction() as cookie:
        assert cookie["auth_at"] == int(clock.now) and "pending_2fa" not in cookie


def test_next_is_kept_through_the_second_step_but_never_off_site(client, clock, enrolled) -> None:
    secret, _ = enrolled
    AuthActions(client).login(next="/security")
    response = second_step(client, mfa.code_at(secret, clock.step))
    assert response.headers["Location"] == "/security"
    client.post("/logout", data={"csrf_token": csrf_token(client, "/security")})
    clock.next_step()
    AuthActions(client).login(next="//evil.example/")
    response = second_step(client, mfa.code_at(secret, clock.step))
    assert response.headers["Location"] == "/account-details"


def test_a_code_is_accepted_once_even_by_another_process(app, tmp_path, clock, enrolled) -> None:
    secret, _ = enrolled
    code = mfa.code_at(secret, clock.step)
    first = app.test_client()
    assert login_with_code(first, code).status_code == 302
    # The same code at once, from another browser and from another app process.
    other_process = make_app(tmp_path)
    for client in (app.test_client(), other_process.test_client()):
        before = all_but_events(app)
        response = login_with_code(client, code)
        assert response.status_code == 422
        assert who(client) is None
        assert all_but_events(app) == before
        assert record(app)["events"][-1]["k"] == "two_factor_failure"
    clock.next_step()
    assert login_with_code(app.test_client(), mfa.code_at(secret, clock.step)).status_code == 302


def test_the_code_that_confirmed_enrolment_cannot_log_in(app, client, clock) -> None:
    auth = AuthActions(client)
    auth.register()
    auth.login()
    secret, _ = enrol(client, clock)
    auth.logout()
    response = login_with_code(client, mfa.code_at(secret, clock.step))
    assert response.status_code == 422 and who(client) is None


@pytest.mark.parametrize("offset", [-1, 1, -2, 2])
def test_codes_of_other_steps_are_refused(client, clock, enrolled, offset) -> None:
    secret, _ = enrolled
    clock.next_step()
    clock.advance(14)
    response = login_with_code(client, mfa.code_at(secret, clock.step + offset))
    assert response.status_code == 422 and who(client) is None


def test_a_recovery_code_works_once_in_any_case_and_grouping(app, client, clock, enrolled) -> None:
    _, codes = enrolled
    typed = codes[3].replace("-", " ").lower()
    assert login_with_code(client, typed).status_code == 302
    assert who(client) == "alice"
    assert len(record(app)["recovery_codes"]) == 9
    assert "9</strong> unused recovery codes" in client.get("/security").get_data(as_text=True)
    again = app.test_client()
    before = all_but_events(app)
    assert login_with_code(again, codes[3]).status_code == 422
    assert who(again) is None and all_but_events(app) == before
    assert login_with_code(again, codes[4].replace("-", "")).status_code == 302


def test_a_pending_login_expires_after_five_minutes(app, client, clock, enrolled) -> None:
    secret, _ = enrolled
    AuthActions(client).login()
    clock.advance(301)
    before = stored_bytes(app)
    response = second_step(client, mfa.code_at(secret, clock.step))
    assert response.status_code == 303 and response.headers["Location"] == "/login"
    assert who(client) is None and stored_bytes(app) == before
    with client.session_transaction() as cookie:
        assert "pending_2fa" not in cookie


def test_a_new_password_login_replaces_the_pending_one(app, client, clock, enrolled) -> None:
    secret, _ = enrolled
    AuthActions(client).register("bob", OTHER_PASSWORD)
    AuthActions(client).login()  # alice: pending
    assert AuthActions(client).login("bob", OTHER_PASSWORD).headers["Location"] == (
        "/account-details"
    )
    assert who(client) == "bob"
    # alice's code, sent now, finds no pending login for alice.
    response = second_step(client, mfa.code_at(secret, clock.step))
    assert response.headers["Location"] == "/login"
    assert who(client) == "bob"


def test_a_password_change_kills_a_pending_login(app, client, clock, enrolled) -> None:
    secret, codes = enrolled
    AuthActions(client).login()  # pending, bound to this password check
    owner = app.test_client()
    assert login_with_code(owner, codes[0]).status_code == 302
    assert AuthActions(owner).change_password().status_code == 302
    clock.next_step()
    before = stored_bytes(app)
    response = second_step(client, mfa.code_at(secret, clock.step))
    assert response.headers["Location"] == "/login"
    assert who(client) is None and stored_bytes(app) == before


def test_a_forged_or_foreign_pending_state_is_refused(app, client, clock, enrolled) -> None:
    secret, _ = enrolled
    AuthActions(client).register("mallory", OTHER_PASSWORD)
    forgeries = [
        {"u": "alice", "h": "0" * 64, "t": int(clock.now), "n": ""},  # no password check
        {"u": "alice", "h": ["x"], "t": int(clock.now), "n": ""},
        {"u": "alice", "t": int(clock.now)},
        {"u": "alice", "h": "0" * 64, "t": int(clock.now) + 3600, "n": ""},
        "alice",
    ]
    for forged in forgeries:
        with client.session_transaction() as cookie:
            cookie["pending_2fa"] = forged
        before = stored_bytes(app)
        response = second_step(client, mfa.code_at(secret, clock.step))
        assert response.status_code == 303, forged
        assert who(client) is None and stored_bytes(app) == before
    # mallory's own pending state (she has no factor) cannot become alice's.
    mallory = app.test_client()
    AuthActions(mallory).login("mallory", OTHER_PASSWORD)
    with mallory.session_transaction() as cookie:
        assert "pending_2fa" not in cookie


def test_a_session_cookie_from_before_the_second_step_is_dead(app, client, clock, enrolled) -> None:
    secret, codes = enrolled
    assert login_with_code(client, codes[0]).status_code == 302
    old_cookie = client.get_cookie("session").value
    clock.next_step()
    assert login_with_code(client, mfa.code_at(secret, clock.step)).status_code == 302
    thief = app.test_client()
    thief.set_cookie("session", old_cookie)
    assert who(thief) is None
    assert who(client) == "alice"
    assert len(record(app)["sessions"]) == 1


def test_failures_are_audited_and_count_toward_the_username_limit(
    tmp_path, monkeypatch, clock, audit_events
) -> None:
    app = two_factor_app(
        tmp_path, monkeypatch, RATELIMIT_ENABLED=True, LOGIN_RATE_LIMIT_USER="3 per minute"
    )
    client = app.test_client()
    auth = AuthActions(client)
    auth.register()
    auth.login()
    secret, _ = enrol(client, clock)
    auth.logout()
    clock.next_step()
    attacker = app.test_client()
    AuthActions(attacker).login()
    for _ in range(3):
        assert second_step(attacker, "000000").status_code == 422
    # The fourth try is refused before the code is looked at, even the right one.
    response = second_step(attacker, mfa.code_at(secret, clock.step))
    assert response.status_code == 429 and who(attacker) is None
    failures = [e for e in audit_events() if e["event"] == "two_factor_failure"]
    assert len(failures) == 3 and {e["username"] for e in failures} == {"alice"}
    # The same bucket as the password's per-username limit: /login for alice is held too.
    assert AuthActions(app.test_client()).login().status_code == 429


# -- re-authentication --------------------------------------------------------------------


def test_factor_changes_need_a_fresh_authentication(app, logged_in, clock) -> None:
    clock.advance(app.config["REAUTH_WINDOW"])  # fresh to the second: REAUTH_WINDOW is included
    assert logged_in.get("/security/totp").status_code == 200
    clock.advance(1)
    response = logged_in.get("/security/totp")
    assert response.status_code == 303
    assert response.headers["Location"] == "/reauthenticate?next=/security/totp"
    for path in ("/security/totp/disable", "/security/recovery-codes"):
        before = stored_bytes(app)
        response = post(logged_in, path)
        assert response.status_code == 303, path
        assert response.headers["Location"].startswith("/reauthenticate?next=")
        assert stored_bytes(app) == before


def test_reauthenticate_with_the_password_comes_back_with_a_new_session(
    app, logged_in, clock
) -> None:
    clock.advance(600)
    old_cookie = logged_in.get_cookie("session").value
    wrong = post(
        logged_in,
        "/reauthenticate?next=/security/totp",
        {"password": OTHER_PASSWORD},
        token_from="/reauthenticate",
    )
    assert wrong.status_code == 422
    assert logged_in.get("/security/totp").status_code == 303
    response = post(
        logged_in,
        "/reauthenticate?next=/security/totp",
        {"password": PASSWORD},
        token_from="/reauthenticate",
    )
    assert response.status_code == 303 and response.headers["Location"] == "/security/totp"
    assert logged_in.get("/security/totp").status_code == 200
    thief = app.test_client()
    thief.set_cookie("session", old_cookie)
    assert who(thief) is None  # re-authentication ended the session id from before it


def test_reauthenticate_refuses_an_off_site_next(logged_in, clock) -> None:
    clock.advance(600)
    for target in ("//evil.example", "https://evil.example/", "/\\evil.example"):
        response = post(
            logged_in,
            "/reauthenticate?next=" + target,
            {"password": PASSWORD},
            token_from="/reauthenticate",
        )
        assert response.headers["Location"] == "/security"


def test_reauthenticate_with_a_code_uses_it_up(app, client, clock, enrolled) -> None:
    secret, codes = enrolled
    assert login_with_code(client, codes[0]).status_code == 302
    clock.advance(400)
    code = mfa.code_at(secret, clock.step)
    response = post(client, "/reauthenticate", {"code": code}, token_from="/reauthenticate")
    assert response.status_code == 303 and client.get("/security/totp").status_code == 200
    with client.session_transaction() as cookie:
        cookie["auth_at"] = 0  # stale again, still within the same 30-second step
    before = stored_bytes(app)
    again = post(client, "/reauthenticate", {"code": code}, token_from="/reauthenticate")
    assert again.status_code == 422 and stored_bytes(app) == before
    other = app.test_client()
    assert login_with_code(other, code).status_code == 422  # nor for a login


def test_reauthentication_is_rate_limited_per_user(tmp_path, monkeypatch, clock) -> None:
    app = two_factor_app(
        tmp_path,
        monkeypatch,
        RATELIMIT_ENABLED=True,
        CHANGE_PASSWORD_RATE_LIMIT_USER="2 per minute",
    )
    client = app.test_client()
    AuthActions(client).register()
    AuthActions(client).login()
    for _ in range(2):
        assert (
            post(client, "/reauthenticate", {"password": "x" * 20}, "/reauthenticate").status_code
            == 422
        )
    refused = post(client, "/reauthenticate", {"password": PASSWORD}, "/reauthenticate")
    assert refused.status_code == 429


def test_freshness_lasts_reauth_window_seconds_from_an_int_time_only(app) -> None:
    window = app.config["REAUTH_WINDOW"]
    with app.test_request_context():
        session["auth_at"] = 1000
        assert reauth.is_fresh(1000) and reauth.is_fresh(1000 + window)
        assert not reauth.is_fresh(1001 + window)
        assert not reauth.is_fresh(999)  # a time after now is no authentication
        # Not an int time as this app writes it: stale, never an error, even when asked at
        # the very time it would name (True counts as 1 in arithmetic).
        for value, now in ((1000.0, 1000), ("1000", 1000), (None, 1000), (True, 1)):
            session["auth_at"] = value
            assert not reauth.is_fresh(now)
        del session["auth_at"]
        assert not reauth.is_fresh(1000)


def test_a_stale_session_is_told_why_it_must_confirm(app, logged_in, clock) -> None:
    clock.advance(app.config["REAUTH_WINDOW"] + 1)
    response = logged_in.get("/security/totp")
    assert flashes(logged_in, response.headers["Location"]) == [
        ("flash-info", "Please confirm it is you before changing your sign-in settings.")
    ]


def stale_post(client, path: str, referer: str | None = None):
    """POST the form at ``path`` as a browser would, with this Referer (None: none sent)."""
    headers = {"Referer": referer} if referer is not None else {}
    token = csrf_token(client, "/security")
    return client.post(path, data={"csrf_token": token}, headers=headers)


@pytest.mark.parametrize(
    ("referer", "back_to"),
    [
        ("http://localhost/account-details?tab=photo", "/account-details?tab%3Dphoto"),
        ("http://localhost/security", "/security"),
        (None, "/security"),
        ("http://evil.example/account-details", "/security"),  # another site's page
        ("http://localhost//evil.example/x", "/security"),  # a path that is a host
        ("not a url", "/security"),
    ],
)
def test_a_stale_post_comes_back_to_the_page_that_held_the_form(
    app, logged_in, clock, referer, back_to
) -> None:
    clock.advance(app.config["REAUTH_WINDOW"] + 1)
    response = stale_post(logged_in, "/security/recovery-codes", referer)
    assert response.status_code == 303
    assert response.headers["Location"] == "/reauthenticate?next=" + back_to


def test_a_stale_post_to_a_page_that_has_a_get_comes_back_to_that_page(
    app, logged_in, clock
) -> None:
    clock.advance(app.config["REAUTH_WINDOW"] + 1)
    response = stale_post(logged_in, "/security/totp", "http://localhost/account-details")
    assert response.status_code == 303
    assert response.headers["Location"] == "/reauthenticate?next=/security/totp"


def test_the_reauthentication_page_offers_a_code_only_with_an_app_and_keeps_next(
    app, client, clock, enrolled
) -> None:
    _, codes = enrolled
    assert login_with_code(client, codes[0]).status_code == 302
    page = client.get("/reauthenticate?next=/security/totp")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert 'action="/reauthenticate?next=/security/totp"' in html
    assert 'name="password"' in html and 'name="code"' in html
    bob = app.test_client()
    AuthActions(bob).register("bob", OTHER_PASSWORD)
    AuthActions(bob).login("bob", OTHER_PASSWORD)
    html = bob.get("/reauthenticate").get_data(as_text=True)
    assert 'action="/reauthenticate?next=/security"' in html
    assert 'name="password"' in html and 'name="code"' not in html


def error_at(html: str, name: str) -> str | None:
    """The error message shown at form field ``name``, or None."""
    found = re.search(rf'<p class="error" id="{name}-error">([^<]*)</p>', html)
    return found.group(1) if found else None


REAUTH_ATTEMPTS = {
    # what is sent: (response status, audit event, its method, the field that shows the error)
    "wrong password": ({"password": OTHER_PASSWORD}, 422, "reauth_failure", "password", "password"),
    "wrong code": ({"code": "000000"}, 422, "reauth_failure", "code", "code"),
    "overlong password": ({"password": "x" * 129}, 422, "reauth_failure", "form", "password"),
    "password": ({"password": PASSWORD}, 303, "reauth_success", "password", None),
    "totp": ({"code": "the app's code"}, 303, "reauth_success", "totp", None),
    "recovery code": ({"code": "a recovery code"}, 303, "reauth_success", "recovery", None),
}


@pytest.mark.parametrize("attempt", REAUTH_ATTEMPTS)
def test_each_reauthentication_is_audited_with_its_method_and_refusals_say_where(
    app, client, clock, enrolled, audit_events, attempt
) -> None:
    secret, codes = enrolled
    assert login_with_code(client, codes[0]).status_code == 302
    clock.advance(app.config["REAUTH_WINDOW"] + 1)
    clock.next_step()
    data, status, event, method, field = REAUTH_ATTEMPTS[attempt]
    known_now = {"the app's code": mfa.code_at(secret, clock.step), "a recovery code": codes[1]}
    data = {k: known_now.get(v, v) for k, v in data.items()}
    response = post(client, "/reauthenticate", data, token_from="/reauthenticate")
    assert response.status_code == status
    last = audit_events()[-1]
    assert (last["event"], last["username"], last["method"]) == (event, "alice", method)
    html = response.get_data(as_text=True)
    for name in ("password", "code"):
        assert error_at(html, name) == (reauth.FAILED if name == field else None)
    fresh = client.get("/security/totp").status_code == 200
    assert fresh is (status == 303)


def test_the_password_alone_reauthenticates_a_user_with_an_app(
    app, client, clock, enrolled
) -> None:
    _, codes = enrolled
    assert login_with_code(client, codes[0]).status_code == 302
    # Without the code field (a script), and with it left empty (a browser).
    for data in ({"password": PASSWORD}, {"password": PASSWORD, "code": ""}):
        clock.advance(app.config["REAUTH_WINDOW"] + 1)
        response = post(
            client, "/reauthenticate?next=/security/totp", data, token_from="/reauthenticate"
        )
        assert response.status_code == 303 and response.headers["Location"] == "/security/totp"


def test_a_recovery_code_used_to_reauthenticate_is_mailed_and_listed(app, client, clock) -> None:
    from test_recovery import outbox, verified_user  # test_recovery imports this module

    verified_user(app, client, "alice", "alice@example.org")
    AuthActions(client).login()
    secret, codes = enrol(client, clock)
    clock.advance(app.config["REAUTH_WINDOW"] + 1)
    clock.next_step()
    sent = len(outbox(app))
    response = post(client, "/reauthenticate", {"code": codes[0]}, token_from="/reauthenticate")
    assert response.status_code == 303
    (notice,) = outbox(app)[sent:]
    assert notice["To"] == "alice@example.org"
    assert notice["Subject"] == "Security notice: a recovery code was used to sign in"
    page = client.get("/security").get_data(as_text=True)
    assert "Recovery code used" in page[page.index('id="recent-activity"') :]
    # The password and the app's code are no news to the owner: no mail.
    sent = len(outbox(app))
    for how in ("code", "password"):
        clock.advance(app.config["REAUTH_WINDOW"] + 1)
        data = {how: mfa.code_at(secret, clock.step) if how == "code" else PASSWORD}
        response = post(client, "/reauthenticate", data, token_from="/reauthenticate")
        assert response.status_code == 303
    assert len(outbox(app)) == sent


def test_reauthenticating_keeps_the_other_browsers_logged_in(app, clock) -> None:
    laptop, phone = app.test_client(), app.test_client()
    AuthActions(laptop).register()
    AuthActions(laptop).login()
    AuthActions(phone).login()
    clock.advance(app.config["REAUTH_WINDOW"] + 1)
    response = post(laptop, "/reauthenticate", {"password": PASSWORD}, token_from="/reauthenticate")
    assert response.status_code == 303
    assert who(laptop) == who(phone) == "alice"
    assert len(record(app)["sessions"]) == 2


def test_the_idle_timeout_counts_from_the_reauthentication(app, logged_in, clock) -> None:
    # Less than a minute after the last request: the cookie's "seen" was not refreshed
    # by it (auth.py), so only the re-authentication can restart the idle clock.
    clock.advance(59)
    response = post(
        logged_in, "/reauthenticate", {"password": PASSWORD}, token_from="/reauthenticate"
    )
    assert response.status_code == 303
    clock.advance(app.config["SESSION_IDLE_TIMEOUT"])
    assert who(logged_in) == "alice"


# -- recovery codes, disabling ---------------------------------------------------------------


def test_regenerating_voids_the_old_set(app, client, clock, enrolled) -> None:
    secret, codes = enrolled
    assert login_with_code(client, mfa.code_at(secret, clock.step)).status_code == 302
    response = post(client, "/security/recovery-codes")
    assert response.status_code == 200
    new_codes = CODES_RE.findall(response.get_data(as_text=True))
    assert len(new_codes) == 10 and not set(new_codes) & set(codes)
    other = app.test_client()
    assert login_with_code(other, codes[1]).status_code == 422
    assert login_with_code(other, new_codes[1]).status_code == 302


def test_disabling_deletes_the_secret_and_every_code_at_once(app, client, clock, enrolled) -> None:
    secret, codes = enrolled
    assert login_with_code(client, mfa.code_at(secret, clock.step)).status_code == 302
    response = post(client, "/security/totp/disable")
    assert response.status_code == 303 and response.headers["Location"] == "/security"
    stored = record(app)
    assert "totp" not in stored and "recovery_codes" not in stored
    # The password alone logs in again; the old codes are nothing now.
    other = app.test_client()
    assert AuthActions(other).login().headers["Location"] == "/account-details"
    assert "Off:" in other.get("/security").get_data(as_text=True)
    third = app.test_client()
    AuthActions(third).login()
    with third.session_transaction() as cookie:
        assert "pending_2fa" not in cookie


def test_a_stale_disable_goes_to_reauthentication_and_back_to_the_form(
    app, client, clock, enrolled
) -> None:
    _, codes = enrolled
    assert login_with_code(client, codes[0]).status_code == 302
    clock.advance(301)
    token = csrf_token(client, "/security")  # this GET refreshes "last active" (sessions.py)
    before = stored_bytes(app)
    response = client.post(
        "/security/totp/disable",
        data={"csrf_token": token},
        headers={"Referer": "http://localhost/security"},
    )
    assert response.headers["Location"] == "/reauthenticate?next=/security"
    assert stored_bytes(app) == before
    assert "totp" in record(app)


# -- the security page, the gate, the operator ----------------------------------------------------


def test_security_page_lists_factors_and_the_ways_to_change_them(client, clock, enrolled) -> None:
    _, codes = enrolled
    login_with_code(client, codes[0])
    html = client.get("/security").get_data(as_text=True)
    assert "9</strong> unused recovery codes" in html
    for action in ("/security/recovery-codes", "/security/totp/disable", "/logout-others"):
        assert f'action="{action}"' in html
    assert 'href="/change-password"' in html


def test_security_page_needs_a_login(client) -> None:
    assert client.get("/security").headers["Location"] == "/login?next=/security"


def test_required_two_factor_sends_users_without_one_to_enrolment(
    tmp_path, monkeypatch, clock
) -> None:
    app = two_factor_app(tmp_path, monkeypatch, REQUIRE_TWO_FACTOR=True)
    client = app.test_client()
    auth = AuthActions(client)
    auth.register()  # anonymous pages stay open
    assert auth.login().status_code == 302
    for page in ("/", "/second", "/account-details", "/change-password"):
        response = client.get(page)
        assert response.status_code == 303, page
        assert response.headers["Location"] == "/security/totp"
    # The security page stays open: a passkey is the other way to enrol.
    assert 'id="add-passkey"' in client.get("/security").get_data(as_text=True)
    before = stored_bytes(app)
    response = client.post(
        "/account-details",
        data={"full_name": "Mallory", "csrf_token": csrf_token(client, "/security/totp")},
    )
    assert response.status_code == 303 and stored_bytes(app) == before
    assert client.get("/public/css/site.css").status_code == 200
    assert client.get("/no-such-page").status_code == 404
    _, codes = enrol(client, clock)
    assert client.get("/account-details").status_code == 200
    # Logging out stays possible for someone who will not enrol.
    other = app.test_client()
    AuthActions(other).register("bob", OTHER_PASSWORD)
    AuthActions(other).login("bob", OTHER_PASSWORD)
    response = other.post("/logout", data={"csrf_token": csrf_token(other, "/security/totp")})
    assert response.status_code == 302 and who(other) is None


def test_reset_two_factor_command(app, client, clock, enrolled, audit_events) -> None:
    secret, codes = enrolled
    assert login_with_code(client, codes[0]).status_code == 302
    result = app.test_cli_runner().invoke(args=["reset-two-factor", "ALICE"])
    assert result.exit_code == 0, result.output
    stored = record(app)
    assert "totp" not in stored and "recovery_codes" not in stored and stored["sessions"] == {}
    assert who(client) is None  # every session ended
    assert [e["username"] for e in audit_events() if e["event"] == "two_factor_reset"] == ["alice"]
    assert AuthActions(client).login().headers["Location"] == "/account-details"
    missing = app.test_cli_runner().invoke(args=["reset-two-factor", "nobody"])
    assert missing.exit_code != 0 and "no user" in missing.output.lower()


def test_rotate_mfa_key_command_locks_nobody_out(app, clock, enrolled, tmp_path) -> None:
    secret, _ = enrolled
    result = app.test_cli_runner().invoke(args=["rotate-mfa-key"])
    assert result.exit_code == 0, result.output
    assert "1" in result.output
    assert login_with_code(app.test_client(), mfa.code_at(secret, clock.step)).status_code == 302


# -- the pending login: each check on its own ------------------------------------------------


def flashes(client, page: str = "/login") -> list[tuple[str, str]]:
    """The messages ``page`` shows next, with their category."""
    html = client.get(page).get_data(as_text=True)
    found = re.findall(r'<p class="flash (flash-\w+)">([^<]*)</p>', html)
    return [(category, unescape(message)) for category, message in found]


def test_a_pending_login_lives_five_minutes_to_the_second(app, client, clock, enrolled) -> None:
    secret, _ = enrolled
    AuthActions(client).login()
    clock.advance(300)
    assert second_step(client, mfa.code_at(secret, clock.step)).status_code == 302
    assert who(client) == "alice"


def test_an_expired_pending_login_tells_the_user_why(app, client, clock, enrolled) -> None:
    secret, _ = enrolled
    AuthActions(client).login()
    clock.advance(301)
    assert second_step(client, mfa.code_at(secret, clock.step)).headers["Location"] == "/login"
    assert flashes(client) == [("flash-info", "Your sign-in took too long. Please log in again.")]


def test_the_second_step_without_a_pending_login_just_goes_to_login(client, enrolled) -> None:
    response = client.get("/login/two-factor")
    assert response.status_code == 303 and response.headers["Location"] == "/login"
    assert flashes(client) == []


def test_password_step_and_refusal_are_audited(app, client, clock, enrolled, audit_events) -> None:
    secret, codes = enrolled
    owner = app.test_client()
    assert login_with_code(owner, codes[0]).status_code == 302
    AuthActions(client).login()
    assert {"event": "two_factor_asked", "username": "alice"}.items() <= audit_events()[-1].items()
    assert AuthActions(owner).change_password().status_code == 302
    clock.next_step()
    second_step(client, mfa.code_at(secret, clock.step))
    refused = [e for e in audit_events() if e["event"] == "two_factor_refused"]
    assert len(refused) == 1
    assert refused[0]["username"] == "alice" and refused[0]["reason"] == "account changed"


def test_a_password_change_alone_kills_a_pending_login(app, client, clock, enrolled) -> None:
    # The owner is logged in before the pending login starts, so it is not replaced
    # by another password login: only the new password hash tells it apart.
    secret, codes = enrolled
    owner = app.test_client()
    assert login_with_code(owner, codes[0]).status_code == 302
    AuthActions(client).login()
    assert AuthActions(owner).change_password().status_code == 302
    clock.next_step()
    before = stored_bytes(app)
    response = second_step(client, mfa.code_at(secret, clock.step))
    assert response.headers["Location"] == "/login"
    assert who(client) is None and stored_bytes(app) == before
    assert flashes(client) == [("flash-info", "Please log in again.")]


def test_turning_the_factor_off_ends_a_pending_login(app, client, clock, enrolled) -> None:
    secret, codes = enrolled
    owner = app.test_client()
    assert login_with_code(owner, codes[0]).status_code == 302
    AuthActions(client).login()
    assert post(owner, "/security/totp/disable").status_code == 303
    before = stored_bytes(app)
    response = second_step(client, codes[1])
    assert response.status_code == 303 and response.headers["Location"] == "/login"
    assert who(client) is None and stored_bytes(app) == before


def test_a_second_password_login_elsewhere_voids_the_first_pending(
    app, client, clock, enrolled
) -> None:
    secret, _ = enrolled
    AuthActions(client).login()
    other = app.test_client()
    AuthActions(other).login()  # the same user, same password: only the nonce differs
    before = stored_bytes(app)
    response = second_step(client, mfa.code_at(secret, clock.step))
    assert response.headers["Location"] == "/login"
    assert who(client) is None and stored_bytes(app) == before
    assert second_step(other, mfa.code_at(secret, clock.step)).status_code == 302


def test_a_pending_login_is_spent_only_with_its_change(app) -> None:
    from secure_app import two_factor

    state = {"p": "nonce"}
    digest = two_factor._nonce_digest("nonce")
    record = {two_factor.PENDING_FIELD: digest}
    assert two_factor.spend_pending(state, lambda r: False)(record) is False
    assert record == {two_factor.PENDING_FIELD: digest}  # the code was raced: still pending
    assert two_factor.spend_pending(state, lambda r: None)(record) is True
    assert record == {}
    assert two_factor.spend_pending(state, lambda r: True)(record) is False  # spent once


def test_a_forged_pending_username_is_refused_under_the_rate_limit(
    tmp_path, monkeypatch, clock
) -> None:
    app = two_factor_app(tmp_path, monkeypatch, RATELIMIT_ENABLED=True)
    client = app.test_client()
    for forged in (None, {"u": 5, "h": "0" * 64, "p": "x", "t": int(clock.now), "n": ""}):
        with client.session_transaction() as cookie:
            if forged is None:
                cookie.pop("pending_2fa", None)
            else:
                cookie["pending_2fa"] = forged
        response = second_step(client, "123456")
        assert response.status_code == 303 and response.headers["Location"] == "/login"


def test_turning_totp_off_is_an_event_on_the_security_page(app, client, clock, enrolled) -> None:
    secret, _ = enrolled
    assert login_with_code(client, mfa.code_at(secret, clock.step)).status_code == 302
    post(client, "/security/totp/disable")
    assert "Authenticator app turned off" in client.get("/security").get_data(as_text=True)


def test_deleting_the_account_ends_a_pending_login(app, client, clock, enrolled) -> None:
    secret, codes = enrolled
    owner = app.test_client()
    assert login_with_code(owner, codes[0]).status_code == 302
    AuthActions(client).login()
    token = csrf_token(owner, "/account-details")
    owner.post("/delete-account", data={"password": PASSWORD, "csrf_token": token})
    assert record(app) is None
    clock.next_step()
    response = second_step(client, mfa.code_at(secret, clock.step))
    assert response.status_code == 303 and response.headers["Location"] == "/login"
    assert who(client) is None and record(app) is None


# -- what the factor handlers say, mail, audit and record ------------------------------------

ADDRESS = "alice@example.org"
CHANGED_MEANWHILE = ("flash-error", "Your sign-in settings changed meanwhile. Please look again.")


def verified_address(app, username: str = "alice") -> str:
    """Give ``username`` a verified address (set-up only: recovery.py has the real flow)."""
    with app.app_context():
        get_store().update(username, lambda r: r.update(email=ADDRESS, email_verified=ADDRESS))
    return ADDRESS


def notices(app, address: str = ADDRESS) -> list[str]:
    """The subjects of the mails sent to ``address`` so far, oldest first."""
    from test_recovery import outbox  # test_recovery imports this module

    return [m["Subject"] for m in outbox(app) if m["To"] == address]


def named(audit_events, *names: str) -> list[tuple[str, str | None]]:
    """The audit events called one of ``names``, as (event, username)."""
    return [(e["event"], e["username"]) for e in audit_events() if e["event"] in names]


def in_two_browsers(app, codes: list[str]) -> tuple:
    """alice logged in (freshly) in two browsers, each with a recovery code."""
    first, second = app.test_client(), app.test_client()
    assert login_with_code(first, codes[0]).status_code == 302
    assert login_with_code(second, codes[1]).status_code == 302
    return first, second


def code_error(response) -> str | None:
    """The error the page shows under the code field, or None."""
    found = re.search(
        r'<p class="error" id="code-error">([^<]*)</p>', response.get_data(as_text=True)
    )
    return unescape(found.group(1)) if found else None


def test_turning_totp_off_says_so_mails_the_owner_and_is_audited(
    app, client, clock, enrolled, audit_events
) -> None:
    _, codes = enrolled
    verified_address(app)
    assert login_with_code(client, codes[0]).status_code == 302
    response = post(client, "/security/totp/disable")
    assert response.status_code == 303 and response.headers["Location"] == "/security"
    assert flashes(client, "/security") == [
        (
            "flash-message",
            "Two-step sign-in is off. Your app's codes and your recovery codes no longer work.",
        )
    ]
    assert named(audit_events, "totp_disabled") == [("totp_disabled", "alice")]
    assert notices(app)[-1] == "Security notice: two-step sign-in was turned off"


def test_turning_totp_off_when_it_is_off_says_so_and_changes_nothing(
    app, logged_in, audit_events
) -> None:
    verified_address(app)
    before = stored_bytes(app)
    response = post(logged_in, "/security/totp/disable")
    assert response.status_code == 303 and response.headers["Location"] == "/security"
    assert flashes(logged_in, "/security") == [("flash-info", "Two-step sign-in was already off.")]
    assert stored_bytes(app) == before
    assert named(audit_events, "totp_disabled") == [] and notices(app) == []


def test_two_tabs_turning_totp_off_at_once_do_it_once(
    app, clock, enrolled, audit_events, monkeypatch
) -> None:
    from test_races import _before_first_update

    _, codes = enrolled
    verified_address(app)
    tab, other = in_two_browsers(app, codes)
    token = csrf_token(tab, "/security")  # tab loaded alice with TOTP on
    done = _before_first_update(
        monkeypatch, app, lambda: post(other, "/security/totp/disable").status_code
    )
    response = tab.post("/security/totp/disable", data={"csrf_token": token})
    assert done == [303]
    assert response.status_code == 303 and response.headers["Location"] == "/security"
    assert flashes(tab, "/security") == [CHANGED_MEANWHILE]
    assert named(audit_events, "totp_disabled") == [("totp_disabled", "alice")]
    assert notices(app).count("Security notice: two-step sign-in was turned off") == 1


def test_new_recovery_codes_are_said_mailed_audited_and_an_event(
    app, client, clock, enrolled, audit_events
) -> None:
    _, codes = enrolled
    verified_address(app)
    assert login_with_code(client, codes[0]).status_code == 302
    response = post(client, "/security/recovery-codes")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "Here is your new set. The old codes no longer work." in html
    assert "Two-step sign-in is on." not in html
    assert named(audit_events, "recovery_codes_regenerated") == [
        ("recovery_codes_regenerated", "alice")
    ]
    assert notices(app)[-1] == (
        "Security notice: new recovery codes were made; the old ones no longer work"
    )
    assert record(app)["events"][-1]["k"] == "recovery_codes_regenerated"
    assert "New recovery codes made" in client.get("/security").get_data(as_text=True)


def test_new_recovery_codes_without_totp_are_refused_with_a_hint(
    app, logged_in, audit_events
) -> None:
    verified_address(app)
    before = stored_bytes(app)
    response = post(logged_in, "/security/recovery-codes")
    assert response.status_code == 303 and response.headers["Location"] == "/security"
    assert flashes(logged_in, "/security") == [
        ("flash-info", "Turn on two-step sign-in first: recovery codes come with it.")
    ]
    assert stored_bytes(app) == before
    assert named(audit_events, "recovery_codes_regenerated") == [] and notices(app) == []


def test_new_recovery_codes_while_another_tab_turns_totp_off_store_nothing(
    app, clock, enrolled, audit_events, monkeypatch
) -> None:
    from test_races import _before_first_update

    _, codes = enrolled
    verified_address(app)
    tab, other = in_two_browsers(app, codes)
    token = csrf_token(tab, "/security")
    done = _before_first_update(
        monkeypatch, app, lambda: post(other, "/security/totp/disable").status_code
    )
    response = tab.post("/security/recovery-codes", data={"csrf_token": token})
    assert done == [303]
    assert response.status_code == 303 and response.headers["Location"] == "/security"
    assert CODES_RE.findall(response.get_data(as_text=True)) == []
    assert flashes(tab, "/security") == [CHANGED_MEANWHILE]
    assert "recovery_codes" not in record(app)
    assert named(audit_events, "recovery_codes_regenerated") == []
    assert not any("new recovery codes" in subject for subject in notices(app))


def test_the_security_page_says_when_the_app_was_set_up(app, client, clock) -> None:
    auth = AuthActions(client)
    auth.register()
    auth.login()
    secret, _ = enrol(client, clock)  # 15 January 2027, 08:00 UTC
    auth.logout()
    clock.advance(3 * 86400)
    assert login_with_code(client, mfa.code_at(secret, clock.step)).status_code == 302
    html = client.get("/security").get_data(as_text=True)
    assert "(set up on 15 January 2027)" in html


def test_a_factor_stored_without_its_date_still_shows_the_page(app, client, clock) -> None:
    auth = AuthActions(client)
    auth.register()
    auth.login()
    enrol(client, clock)

    def undated(r: dict) -> None:
        del r["totp"]["added"]

    with app.app_context():
        get_store().update("alice", undated)
    page = client.get("/security")
    assert page.status_code == 200
    assert "(set up on 01 January 1970)" in page.get_data(as_text=True)


def test_a_recovery_code_login_says_how_many_remain_and_mails_the_owner(
    app, client, clock, enrolled, audit_events
) -> None:
    _, codes = enrolled
    verified_address(app)
    response = login_with_code(client, codes[2])
    assert response.headers["Location"] == "/account-details"
    assert flashes(client, "/account-details") == [
        ("flash-info", "You used a recovery code; 9 remain.")
    ]
    logins = [e for e in audit_events() if e["event"] == "login_success"]
    assert [(e["username"], e["second_factor"]) for e in logins[-1:]] == [("alice", "recovery")]
    assert notices(app) == ["Security notice: a recovery code was used to sign in"]
    shown = client.get("/security").get_data(as_text=True)
    assert "Signed in with your password and a recovery code" in shown


def test_an_app_code_login_is_audited_and_shown_as_such_and_mails_nothing(
    app, client, clock, enrolled, audit_events
) -> None:
    secret, _ = enrolled
    verified_address(app)
    assert login_with_code(client, mfa.code_at(secret, clock.step)).status_code == 302
    assert flashes(client, "/account-details") == []
    logins = [e for e in audit_events() if e["event"] == "login_success"]
    assert [(e["username"], e["second_factor"]) for e in logins[-1:]] == [("alice", "totp")]
    assert notices(app) == []
    shown = client.get("/security").get_data(as_text=True)
    assert "Signed in with your password and authenticator app" in shown


def test_the_second_step_asks_with_a_200_and_refuses_a_missing_code_like_a_wrong_one(
    tmp_path, monkeypatch, clock, audit_events
) -> None:
    app = two_factor_app(
        tmp_path, monkeypatch, RATELIMIT_ENABLED=True, LOGIN_RATE_LIMIT_USER="2 per minute"
    )
    client = app.test_client()
    AuthActions(client).register()
    AuthActions(client).login()
    secret, _ = enrol(client, clock)
    AuthActions(client).logout()
    clock.next_step()
    assert AuthActions(client).login().headers["Location"] == "/login/two-factor"
    page = client.get("/login/two-factor")
    assert page.status_code == 200 and CODE_FAILED not in page.get_data(as_text=True)
    for code in ("", "1" * (mfa.MAX_CODE_INPUT + 1)):  # no code, and one the form refuses
        response = second_step(client, code)
        assert response.status_code == 422
        assert CODE_FAILED in unescape(response.get_data(as_text=True))
    assert named(audit_events, "two_factor_failure") == [("two_factor_failure", "alice")] * 2
    assert [e["k"] for e in record(app)["events"][-2:]] == ["two_factor_failure"] * 2
    # Both counted against alice's login limit: the right code is refused now.
    assert second_step(client, mfa.code_at(secret, clock.step)).status_code == 429
    assert who(client) is None


def test_a_password_change_between_the_code_and_the_session_starts_the_login_over(
    app, client, clock, enrolled, monkeypatch
) -> None:
    from test_races import _in_thread

    from secure_app import auth

    secret, codes = enrolled
    owner = app.test_client()
    assert login_with_code(owner, codes[0]).status_code == 302
    AuthActions(client).login()
    real = auth.begin_session
    done: list[object] = []

    def owner_changes_the_password_first(*args: object, **kwargs: object) -> bool:
        if not done:
            done.append(None)  # once: the owner's request starts a session too
            done[0] = _in_thread(lambda: AuthActions(owner).change_password().status_code)
        return real(*args, **kwargs)

    monkeypatch.setattr(auth, "begin_session", owner_changes_the_password_first)
    response = second_step(client, mfa.code_at(secret, clock.step))
    assert done == [302]
    assert response.status_code == 303 and response.headers["Location"] == "/login"
    assert who(client) is None
    assert flashes(client) == [("flash-info", "Please log in again.")]
    assert len(record(app)["sessions"]) == 1  # the owner's, renewed by the change


def test_the_second_step_offers_both_the_code_and_the_passkey_when_both_are_set_up(
    app, client, clock
) -> None:
    from test_passkeys import SoftAuthenticator
    from test_passkeys import enrol as add_passkey

    auth = AuthActions(client)
    auth.register()
    auth.login()
    assert add_passkey(client, SoftAuthenticator()).status_code == 303
    enrol(client, clock)
    auth.logout()
    assert auth.login().headers["Location"] == "/login/two-factor"
    html = client.get("/login/two-factor").get_data(as_text=True)
    assert 'name="code"' in html and ", or use your passkey." in html
    assert re.search(r'<button type="button" id="passkey-second-factor"[^>]*>', html) is None
    assert 'id="passkey-second-factor"' in html


def test_the_enrolment_page_says_when_the_app_is_on_already(app, client, clock, enrolled) -> None:
    _, codes = enrolled
    assert login_with_code(client, codes[0]).status_code == 302
    page = client.get("/security/totp")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert "Two-step sign-in with an authenticator app is already on." in html
    assert SECRET_RE.search(html) is None and 'name="code"' not in html


def test_turning_totp_on_is_said_mailed_audited_and_an_event(
    app, logged_in, clock, audit_events
) -> None:
    verified_address(app)
    html = logged_in.get("/security/totp").get_data(as_text=True)
    secret = SECRET_RE.search(html).group(1).replace(" ", "")
    response = post(
        logged_in,
        "/security/totp",
        {"code": mfa.code_at(secret, clock.step), "enrolment": ENROLMENT_RE.search(html)[1]},
    )
    assert response.status_code == 200
    assert "Two-step sign-in is on." in response.get_data(as_text=True)
    assert len(CODES_RE.findall(response.get_data(as_text=True))) == 10
    assert named(audit_events, "totp_enabled", "totp_enrol_failure") == [("totp_enabled", "alice")]
    assert notices(app) == ["Security notice: two-step sign-in was turned on"]
    assert record(app)["events"][-1]["k"] == "totp_enabled"
    assert "Authenticator app turned on" in logged_in.get("/security").get_data(as_text=True)


def test_a_wrong_enrolment_code_says_so_and_is_audited(app, logged_in, clock, audit_events) -> None:
    html = logged_in.get("/security/totp").get_data(as_text=True)
    secret = SECRET_RE.search(html).group(1).replace(" ", "")
    wrong = f"{(int(mfa.code_at(secret, clock.step)) + 1) % 1_000_000:06d}"
    response = post(
        logged_in, "/security/totp", {"code": wrong, "enrolment": ENROLMENT_RE.search(html)[1]}
    )
    assert response.status_code == 422
    assert code_error(response) == "That code is not right. Enter the code your app shows now."
    assert named(audit_events, "totp_enrol_failure") == [("totp_enrol_failure", "alice")]


def test_an_enrolment_form_that_is_not_whole_asks_for_the_code(
    app, logged_in, clock, audit_events
) -> None:
    html = logged_in.get("/security/totp").get_data(as_text=True)
    secret = SECRET_RE.search(html).group(1).replace(" ", "")
    enrolment = ENROLMENT_RE.search(html)[1]
    before = stored_bytes(app)
    # The key's sealed form missing: the code alone cannot be checked.
    response = post(logged_in, "/security/totp", {"code": mfa.code_at(secret, clock.step)})
    assert response.status_code == 422
    assert code_error(response) == "Enter the code your app shows."
    # A code the form refuses keeps the form's own reason.
    response = post(logged_in, "/security/totp", {"code": "", "enrolment": enrolment})
    assert response.status_code == 422
    assert code_error(response) == "This field is required."
    assert stored_bytes(app) == before
    assert named(audit_events, "totp_enrol_failure") == []  # nothing was checked


def test_two_tabs_turning_totp_on_at_once_keep_the_one_that_landed_first(
    app, client, clock, audit_events, monkeypatch
) -> None:
    from test_races import _before_first_update

    auth = AuthActions(client)
    auth.register()
    auth.login()
    other = app.test_client()
    AuthActions(other).login()
    pages = [c.get("/security/totp").get_data(as_text=True) for c in (client, other)]
    secrets = [SECRET_RE.search(p).group(1).replace(" ", "") for p in pages]

    def enrol_form(page: str, secret: str, token_from) -> dict:
        return {
            "code": mfa.code_at(secret, clock.step),
            "enrolment": ENROLMENT_RE.search(page)[1],
            "csrf_token": csrf_token(token_from, "/security"),
        }

    data = enrol_form(pages[0], secrets[0], client)
    done = _before_first_update(
        monkeypatch,
        app,
        lambda: other.post("/security/totp", data=enrol_form(pages[1], secrets[1], other)),
    )
    response = client.post("/security/totp", data=data)
    assert done[0].status_code == 200  # the other tab's key is on
    assert response.status_code == 303 and response.headers["Location"] == "/security"
    assert CODES_RE.findall(response.get_data(as_text=True)) == []
    assert flashes(client, "/security") == [CHANGED_MEANWHILE]
    assert named(audit_events, "totp_enabled") == [("totp_enabled", "alice")]
    auth.logout()
    clock.next_step()
    assert (
        login_with_code(app.test_client(), mfa.code_at(secrets[0], clock.step)).status_code == 422
    )
    assert (
        login_with_code(app.test_client(), mfa.code_at(secrets[1], clock.step)).status_code == 302
    )


def test_the_gate_leaves_open_what_enrolling_and_leaving_need(tmp_path, monkeypatch, clock) -> None:
    app = two_factor_app(tmp_path, monkeypatch, REQUIRE_TWO_FACTOR=True)
    client = app.test_client()
    AuthActions(client).register()
    assert AuthActions(client).login().status_code == 302
    assert client.get("/account-details").headers["Location"] == "/security/totp"
    # Confirming it is them, and starting a passkey, are ways to enrol.
    assert client.get("/reauthenticate").status_code == 200
    passkey = post(client, "/security/passkeys/add", {"name": "Laptop"})
    assert passkey.status_code == 200 and "passkey-ceremony" in passkey.get_data(as_text=True)
    # A verification link (from a mail) still opens its page.
    from test_recovery import change_email, last_to, link_of, path_of

    change_email(app, client, ADDRESS)
    assert client.get(path_of(link_of(last_to(app, ADDRESS)))).status_code == 200


def test_a_damaged_factor_entry_is_shown_as_off_as_the_login_treats_it(app, logged_in) -> None:
    def damage(r: dict) -> None:
        r["totp"] = "not a factor"

    with app.app_context():
        get_store().update("alice", damage)
    page = logged_in.get("/security")
    assert page.status_code == 200 and "Off:" in page.get_data(as_text=True)
    # The password alone logs in, as the page says.
    assert AuthActions(app.test_client()).login().headers["Location"] == "/account-details"


def test_an_expired_enrolment_form_says_so_offers_a_new_key_and_is_audited(
    app, logged_in, clock, audit_events
) -> None:
    html = logged_in.get("/security/totp").get_data(as_text=True)
    secret = SECRET_RE.search(html).group(1)
    clock.advance(mfa.ENROL_TTL + 1)
    post(logged_in, "/reauthenticate", {"password": PASSWORD}, token_from="/reauthenticate")
    before = stored_bytes(app)
    response = post(
        logged_in,
        "/security/totp",
        {
            "code": mfa.code_at(secret.replace(" ", ""), clock.step),
            "enrolment": ENROLMENT_RE.search(html)[1],
        },
    )
    assert response.status_code == 422
    assert code_error(response) == "That set-up expired. Add this new key to your app."
    assert SECRET_RE.search(response.get_data(as_text=True)).group(1) != secret
    assert stored_bytes(app) == before
    assert named(audit_events, "totp_enrol_failure") == [("totp_enrol_failure", "alice")]
