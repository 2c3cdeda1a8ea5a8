"""Found by the live attack on the second factor: a copied pending login, a reauth race.

A pending login lived only in the signed cookie, so a copy finished a second
login, even after the browser had logged in or a newer password login had
"replaced" it. And a re-authentication that started before "log out
everywhere else" brought back the session that had just been ended.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_races import _during_first_verify
from test_two_factor import (
    PASSWORD,
    Clock,
    enrol,
    login_with_code,
    post,
    record,
    second_step,
    two_factor_app,
    who,
)

from helpers import AuthActions, csrf_token
from secure_app import mfa


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock):
    return two_factor_app(tmp_path, monkeypatch)


@pytest.fixture
def secret(app, clock) -> str:
    client = app.test_client()
    AuthActions(client).register()
    AuthActions(client).login()
    key, _ = enrol(client, clock)
    AuthActions(client).logout()
    clock.next_step()  # the enrolment spent this step's code
    return key.replace(" ", "")


def _copy_cookie(source, target) -> None:
    with source.session_transaction() as cookie:
        values = dict(cookie)
    with target.session_transaction() as cookie:
        cookie.update(values)


def test_a_copied_pending_login_cannot_finish_a_second_login(app, clock, secret):
    browser, thief = app.test_client(), app.test_client()
    assert AuthActions(browser).login().headers["Location"] == "/login/two-factor"
    _copy_cookie(browser, thief)
    assert second_step(browser, mfa.code_at(secret, clock.step)).status_code == 302
    assert who(browser) == "alice"
    sessions_before = set(record(app)["sessions"])
    clock.next_step()  # a fresh, valid code: only the pending login can refuse it
    refused = second_step(thief, mfa.code_at(secret, clock.step))
    assert refused.status_code in (303, 422)
    assert who(thief) is None
    assert set(record(app)["sessions"]) == sessions_before


def test_a_newer_password_login_anywhere_replaces_the_pending_one(app, clock, secret):
    first, second = app.test_client(), app.test_client()
    AuthActions(first).login()
    AuthActions(second).login()  # another browser, the same password: the newer one counts
    refused = second_step(first, mfa.code_at(secret, clock.step))
    assert refused.status_code in (303, 422)
    assert who(first) is None
    assert second_step(second, mfa.code_at(secret, clock.step)).status_code == 302
    assert who(second) == "alice"


def test_reauthentication_racing_log_out_everywhere_else_does_not_revive_its_session(
    app, clock, secret, monkeypatch
):
    laptop, phone = app.test_client(), app.test_client()
    assert login_with_code(laptop, mfa.code_at(secret, clock.step)).status_code == 302
    clock.next_step()
    assert login_with_code(phone, mfa.code_at(secret, clock.step)).status_code == 302
    clock.advance(app.config["REAUTH_WINDOW"] + 60)  # both stale
    clock.next_step()
    # The phone confirms it is the owner and logs out everywhere else...
    assert post(
        phone,
        "/reauthenticate",
        {"code": mfa.code_at(secret, clock.step)},
        token_from="/reauthenticate",
    ).status_code in (302, 303)

    def log_out_the_laptop() -> int:
        return post(phone, "/logout-others").status_code

    # ...exactly while the laptop's re-authentication is checking its password.
    done = _during_first_verify(monkeypatch, log_out_the_laptop)
    late = post(laptop, "/reauthenticate", {"password": PASSWORD}, token_from="/reauthenticate")
    assert late.status_code == 422  # refused, not a server error
    assert done and done[0] in (302, 303)
    assert who(laptop) is None
    assert who(phone) == "alice"
    assert len(record(app)["sessions"]) == 1


def test_reauthentication_racing_end_session_does_not_revive_the_ended_session(
    app, clock, monkeypatch
):
    """Found by the live attack on the security page: the same race, one session ended."""
    from test_security_page import end, shown_ids

    laptop, phone = app.test_client(), app.test_client()
    AuthActions(laptop).register()
    assert AuthActions(laptop).login().status_code == 302
    assert AuthActions(phone).login().status_code == 302
    (laptop_id,) = shown_ids(phone)  # the other session, as the phone's page shows it

    def end_the_laptop() -> int:
        return end(phone, laptop_id).status_code

    clock.advance(app.config["REAUTH_WINDOW"] + 60)
    post(phone, "/reauthenticate", {"password": PASSWORD}, token_from="/reauthenticate")
    done = _during_first_verify(monkeypatch, end_the_laptop)
    post(laptop, "/reauthenticate", {"password": PASSWORD}, token_from="/reauthenticate")
    assert done and done[0] == 303
    assert who(laptop) is None
    assert who(phone) == "alice"
    assert len(record(app)["sessions"]) == 1


def test_an_enrolment_in_flight_does_not_land_after_its_session_was_ended(app, clock, monkeypatch):
    """Found by the review: a thief's TOTP enrolment must not outlive "log out everywhere else"."""
    from test_races import _before_first_update
    from test_two_factor import CSRF_RE, ENROLMENT_RE, SECRET_RE

    thief, owner = app.test_client(), app.test_client()
    AuthActions(thief).register()
    assert AuthActions(thief).login().status_code == 302
    assert AuthActions(owner).login().status_code == 302
    html = thief.get("/security/totp").get_data(as_text=True)
    secret = SECRET_RE.search(html).group(1).replace(" ", "")
    done = _before_first_update(monkeypatch, app, lambda: post(owner, "/logout-others").status_code)
    thief.post(
        "/security/totp",
        data={
            "code": mfa.code_at(secret, clock.step),
            "enrolment": ENROLMENT_RE.search(html).group(1),
            "csrf_token": next(g for g in CSRF_RE.search(html).groups() if g),
        },
    )
    assert done and done[0] in (302, 303)  # the owner logged out everywhere else
    assert not mfa.has_factor(record(app))  # and the thief's factor did not land after it
    assert who(thief) is None and who(owner) == "alice"


def test_a_recovery_code_used_to_reauthenticate_is_an_event(app, clock):
    client = app.test_client()
    AuthActions(client).register()
    AuthActions(client).login()
    _, codes = enrol(client, clock)
    clock.advance(app.config["REAUTH_WINDOW"] + 1)
    response = post(client, "/reauthenticate", {"code": codes[0]}, token_from="/reauthenticate")
    assert response.status_code == 303
    assert record(app)["events"][-1]["k"] == "recovery_code_used"
    assert mfa.recovery_left(record(app)) == 9


def test_one_code_used_by_two_reauthentications_at_once_lets_only_one_in(
    app, clock, secret, monkeypatch
):
    from test_races import _before_first_update

    laptop, phone = app.test_client(), app.test_client()
    assert login_with_code(laptop, mfa.code_at(secret, clock.step)).status_code == 302
    clock.next_step()
    assert login_with_code(phone, mfa.code_at(secret, clock.step)).status_code == 302
    clock.advance(app.config["REAUTH_WINDOW"] + 1)  # both stale
    clock.next_step()
    code = mfa.code_at(secret, clock.step)
    token = csrf_token(laptop, "/reauthenticate")

    def phone_uses_the_code() -> int:
        return post(phone, "/reauthenticate", {"code": code}, "/reauthenticate").status_code

    # The laptop has checked the code and is about to write; the phone spends it first.
    done = _before_first_update(monkeypatch, app, phone_uses_the_code)
    late = laptop.post("/reauthenticate", data={"code": code, "csrf_token": token})
    assert done == [303] and late.status_code == 422
    assert phone.get("/security/totp").status_code == 200
    assert laptop.get("/security/totp").status_code == 303  # still stale
    assert who(laptop) == "alice"  # refused, not logged out
