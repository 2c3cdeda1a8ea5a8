"""The audit trail: one JSON line per security event, with who and from where, never a secret."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest
from test_uploads import PLACES

import images
from helpers import OTHER_PASSWORD, PASSWORD, AuthActions, csrf_token, make_app
from secure_app import uploads
from secure_app.store import get_store

AUDIT = "secure_app.audit"


@pytest.fixture
def audit_log(caplog):
    """The audit lines of this test, parsed; also checks each is exactly one JSON line."""
    caplog.set_level(logging.INFO, logger=AUDIT)
    # The audit logger does not propagate (audit.py says why): listen on it directly.
    logging.getLogger(AUDIT).addHandler(caplog.handler)
    yield lines_of(caplog)
    logging.getLogger(AUDIT).removeHandler(caplog.handler)


def lines_of(caplog):
    """Return a function that parses the audit lines caplog has seen so far."""

    def lines() -> list[dict]:
        parsed = []
        for record in caplog.records:
            if record.name != AUDIT:
                continue
            message = record.getMessage()
            assert "\n" not in message and "\r" not in message
            parsed.append(json.loads(message))
        return parsed

    return lines


def _events(lines: list[dict], name: str) -> list[dict]:
    return [line for line in lines if line["event"] == name]


def _assert_no_secrets(text: str, *secrets: str) -> None:
    for secret in (PASSWORD, OTHER_PASSWORD, "$argon2", *secrets):
        assert secret not in text


def test_each_security_event_writes_one_json_line(app, client, auth, audit_log, caplog, capsys):
    auth.register()
    auth.login("alice", OTHER_PASSWORD)  # failure
    auth.login()  # success
    cookie = client.get_cookie("session").value
    token = csrf_token(client, "/account-details")
    client.post(
        "/account-details",
        data={"photo": (io.BytesIO(b"not an image at all"), "cat.png"), "csrf_token": token},
        content_type="multipart/form-data",
    )
    token = csrf_token(client, "/change-password")
    client.post(
        "/change-password",
        data={
            "current_password": PASSWORD,
            "new_password": OTHER_PASSWORD,
            "confirm": OTHER_PASSWORD,
            "csrf_token": token,
        },
    )
    auth.logout()
    auth.login("alice", OTHER_PASSWORD)
    token = csrf_token(client, "/account-details")
    client.post("/delete-account", data={"password": OTHER_PASSWORD, "csrf_token": token})

    lines = audit_log()
    for name in (
        "register",
        "login_failure",
        "login_success",
        "upload_refused",
        "password_change",
        "logout",
        "account_deleted",
    ):
        found = _events(lines, name)
        assert found, f"no audit line for {name}"
        for line in found:
            assert line["username"] == "alice"
            assert line["ip"] == "127.0.0.1"
            assert line["time"].endswith("Z") and "T" in line["time"]
    _assert_no_secrets(caplog.text + capsys.readouterr().err, cookie, token)


def test_limit_hit_is_audited_with_the_username(tmp_path, audit_log):
    app = make_app(tmp_path, RATELIMIT_ENABLED=True, LOGIN_RATE_LIMIT_USER="1 per minute")
    client = app.test_client()
    for _ in range(2):
        token = csrf_token(client, "/login")
        client.post("/login", data={"username": "Alice", "password": PASSWORD, "csrf_token": token})
    hits = _events(audit_log(), "rate_limited")
    assert len(hits) == 1
    assert hits[0]["username"] == "alice"
    assert hits[0]["ip"] == "127.0.0.1"
    assert "1 per 1 minute" in hits[0]["limit"]


def test_newline_in_username_cannot_forge_a_log_line(client, auth, audit_log, caplog):
    forged = 'eve\n{"event": "login_success", "username": "admin"}'
    auth.login(forged, PASSWORD)
    lines = audit_log()
    assert [line["event"] for line in lines] == ["login_failure"]
    assert lines[0]["username"] == forged.lower()
    assert not any(r.getMessage().startswith('{"event"') for r in caplog.records)


def test_junk_username_is_bounded_in_the_log(client, auth, audit_log):
    auth.login("x" * 5000, PASSWORD)
    (line,) = audit_log()
    assert line["event"] == "login_failure"
    assert len(line["username"]) <= 64


def test_failed_login_logs_neither_password_nor_token(client, auth, audit_log, caplog, capsys):
    auth.register()
    token = csrf_token(client, "/login")
    client.post(
        "/login", data={"username": "alice", "password": OTHER_PASSWORD, "csrf_token": token}
    )
    assert _events(audit_log(), "login_failure")
    _assert_no_secrets(caplog.text + capsys.readouterr().err, token)


def test_audit_lines_go_to_stderr_by_default(tmp_path):
    """A fresh process, as gunicorn starts one: the line must reach stderr, not stdout."""
    code = (
        "from secure_app import create_app, audit\n"
        f"app = create_app({{'SECRET_KEY': 'k' * 32, 'DATA_DIR': {str(tmp_path)!r},"
        " 'RATELIMIT_ENABLED': False})\n"
        "with app.test_request_context('/login', environ_base={'REMOTE_ADDR': '192.0.2.7'}):\n"
        "    audit.event('login_failure', 'bob')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == ""
    line = json.loads(result.stderr.strip().splitlines()[-1])
    assert line["event"] == "login_failure"
    assert line["username"] == "bob" and line["ip"] == "192.0.2.7"


def test_each_event_is_one_json_line_after_flask_attaches_its_handler(tmp_path):
    """Flask adds a text handler to the app's logger on first use; audit lines must not go there."""
    code = (
        "from secure_app import create_app, audit\n"
        f"app = create_app({{'SECRET_KEY': 'k' * 32, 'DATA_DIR': {str(tmp_path)!r},"
        " 'RATELIMIT_ENABLED': False})\n"
        "app.logger.error('something failed')  # what a 500 does: Flask attaches its handler\n"
        "with app.test_request_context('/login', environ_base={'REMOTE_ADDR': '192.0.2.7'}):\n"
        "    audit.event('login_failure', 'bob')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [line for line in result.stderr.splitlines() if "login_failure" in line]
    assert len(lines) == 1, result.stderr
    assert json.loads(lines[0])["username"] == "bob"


def test_a_token_in_the_path_never_reaches_the_log(client, audit_log, caplog, capsys):
    """A refused POST to a reset link is audited by its route, not by its live token."""
    token = "YWxpY2U.live-token-that-must-not-be-logged-0123456789abcdef"
    response = client.post(f"/reset-password/{token}", data={"password": "x", "confirm": "x"})
    assert response.status_code == 400  # no CSRF token
    (line,) = _events(audit_log(), "csrf_refused")
    assert line["path"] == "/reset-password/<token>"
    assert "live-token" not in caplog.text + capsys.readouterr().err


def test_refusals_and_ending_other_sessions_are_audited(app, client, auth, audit_log):
    auth.register()
    auth.login()
    token = csrf_token(client, "/change-password")
    client.post(
        "/change-password",
        data={
            "current_password": OTHER_PASSWORD,
            "new_password": OTHER_PASSWORD,
            "confirm": OTHER_PASSWORD,
            "csrf_token": token,
        },
    )
    token = csrf_token(client, "/account-details")
    client.post("/delete-account", data={"password": OTHER_PASSWORD, "csrf_token": token})
    client.post("/logout-others", data={"csrf_token": token})
    client.post("/login", data={"username": "", "password": "", "csrf_token": token})
    lines = audit_log()
    for name in ("password_change_refused", "account_delete_refused", "logout_others"):
        (line,) = _events(lines, name)
        assert line["username"] == "alice"
    # A login form that is not even valid is a failure too, with no username to name.
    assert _events(lines, "login_failure")[-1]["username"] is None


def test_a_login_that_lost_a_race_to_a_password_change_is_audited_as_such(
    app, client, auth, audit_log, monkeypatch
):
    """The password was right when checked: audited with the reason, and no failed guess
    for the owner's sign-in notice. A plain wrong password is audited with no reason."""
    from test_races import _change_password, _during_first_verify

    auth.register()
    owner = app.test_client()
    assert AuthActions(owner).login().status_code == 302
    auth.login("alice", OTHER_PASSWORD).close()  # a plain failure, written once it has gone
    changed = _during_first_verify(monkeypatch, lambda: _change_password(owner).status_code)
    response = auth.login()
    response.close()
    assert changed == [302] and response.status_code == 200
    plain, raced = [line for line in audit_log() if line["event"] == "login_failure"]
    assert plain["username"] == "alice" and "reason" not in plain
    assert raced["username"] == "alice"
    assert raced["reason"] == "password changed during the check"
    with app.app_context():
        record = get_store().get("alice")
    assert [e["k"] for e in record["events"]].count("login_failure") == 1  # the plain one only


def test_a_refused_and_a_busy_photo_are_audited_with_the_user_and_the_reason(
    app, logged_in, audit_log
):
    def send_photo(body: bytes):
        token = csrf_token(logged_in, "/account-details")
        return logged_in.post(
            "/account-details",
            data={"photo": (io.BytesIO(body), "me.png"), "csrf_token": token},
            content_type="multipart/form-data",
        )

    assert send_photo(b"not an image at all").status_code == 422
    (refused,) = _events(audit_log(), "upload_refused")
    unreadable = "This file is not a JPEG, PNG or WebP image that can be read completely."
    assert (refused["username"], refused["reason"]) == ("alice", unreadable)
    for _ in range(PLACES):  # every decode place held, as by uploads still decoding
        assert uploads._admitted.acquire(timeout=10)
    try:
        assert send_photo(images.png()).status_code == 503
    finally:
        for _ in range(PLACES):
            uploads._admitted.release()
    (busy,) = _events(audit_log(), "upload_busy")
    assert busy["username"] == "alice" and busy["path"] == "/account-details"
