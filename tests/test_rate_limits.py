"""Login, registration and re-authentication limits: who is counted, what is refused, and when.

Flask-Limiter's ``limiter`` is one object per process, so each test here builds
exactly one app with limits on (building another app would reconfigure it).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import requests

import images
from helpers import OTHER_PASSWORD, PASSWORD, AuthActions, csrf_token, make_app, stored_bytes
from secure_app import create_app
from secure_app.store import get_store
from servers import Gunicorn

WRONG = "definitely not the right passphrase"


def limited_app(tmp_path, **limits):
    config = {
        "LOGIN_RATE_LIMIT_IP": "100 per minute",
        "LOGIN_RATE_LIMIT_USER": "100 per minute",
        "REGISTER_RATE_LIMIT_IP": "100 per minute",
        "CHANGE_PASSWORD_RATE_LIMIT_USER": "100 per minute",
        **limits,
    }
    return make_app(tmp_path, RATELIMIT_ENABLED=True, **config)


def _login(client, username: str, password: str, address: str | None = None):
    headers = {"X-Forwarded-For": address} if address else {}
    token = csrf_token(client, "/login")
    return client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": token},
        headers=headers,
    )


def _sessions(app, username: str = "alice") -> dict:
    with app.app_context():
        return get_store().get(username)["sessions"]


def _register_alice(app) -> None:
    assert AuthActions(app.test_client()).register().status_code == 302


def test_user_limit_counts_failures_from_many_forged_addresses(tmp_path):
    """Behind one trusted proxy every attempt has its own address; the username still counts."""
    app = limited_app(tmp_path, PROXY_HOPS=1, LOGIN_RATE_LIMIT_USER="3 per minute")
    _register_alice(app)
    client = app.test_client()
    for i in range(3):
        assert _login(client, "alice", WRONG, f"198.51.100.{i}").status_code == 200
    refused = _login(client, "ALICE", PASSWORD, "203.0.113.77")
    assert refused.status_code == 429
    assert _sessions(app) == {}
    assert client.get("/account-details").status_code == 302


def test_right_password_is_refused_while_the_user_limit_holds(tmp_path):
    app = limited_app(tmp_path, LOGIN_RATE_LIMIT_USER="2 per minute")
    _register_alice(app)
    attacker, owner = app.test_client(), app.test_client()
    for _ in range(2):
        assert _login(attacker, "alice", WRONG).status_code == 200
    for client in (attacker, owner):
        assert _login(client, "alice", PASSWORD).status_code == 429
    assert _sessions(app) == {}


def test_user_limit_counts_only_failed_logins(tmp_path):
    """The owner logging in again and again is never locked out by the failure limit."""
    app = limited_app(tmp_path, LOGIN_RATE_LIMIT_USER="2 per minute")
    _register_alice(app)
    client = app.test_client()
    for _ in range(4):
        assert _login(client, "alice", PASSWORD).status_code == 302
    assert _login(client, "alice", WRONG).status_code == 200


def test_user_limit_does_not_touch_other_usernames(tmp_path):
    app = limited_app(tmp_path, LOGIN_RATE_LIMIT_USER="2 per minute")
    _register_alice(app)
    AuthActions(app.test_client()).register("bob", OTHER_PASSWORD)
    client = app.test_client()
    for _ in range(2):
        _login(client, "alice", WRONG)
    assert _login(client, "alice", PASSWORD).status_code == 429
    assert _login(client, "bob", OTHER_PASSWORD).status_code == 302


def test_junk_usernames_share_one_bounded_limiter_key(tmp_path):
    """Names that cannot exist do not each get their own counter (storage flooding)."""
    app = limited_app(tmp_path, LOGIN_RATE_LIMIT_USER="3 per minute")
    client = app.test_client()
    for junk in ("a", "<script>", "x" * 300):
        assert _login(client, junk, WRONG).status_code == 200
    assert _login(client, "y" * 40, WRONG).status_code == 429


def test_address_limit_counts_attempts_across_many_usernames(tmp_path):
    app = limited_app(tmp_path, LOGIN_RATE_LIMIT_IP="5 per minute")
    _register_alice(app)
    client = app.test_client()
    for i in range(5):
        assert _login(client, f"user{i}", WRONG).status_code == 200
    assert _login(client, "alice", PASSWORD).status_code == 429
    assert _sessions(app) == {}


def test_forged_x_forwarded_for_is_ignored_without_trusted_proxies(tmp_path):
    app = limited_app(tmp_path, LOGIN_RATE_LIMIT_IP="3 per minute")  # PROXY_HOPS=0
    _register_alice(app)
    client = app.test_client()
    for i in range(3):
        _login(client, f"user{i}", WRONG, f"198.51.100.{i}")
    assert _login(client, "alice", PASSWORD, "203.0.113.9").status_code == 429


def test_x_forwarded_for_is_honoured_behind_one_trusted_proxy(tmp_path):
    app = limited_app(tmp_path, PROXY_HOPS=1, LOGIN_RATE_LIMIT_IP="3 per minute")
    _register_alice(app)
    client = app.test_client()
    for i in range(3):
        _login(client, f"user{i}", "wrong " + WRONG, "198.51.100.1")
    assert _login(client, "alice", PASSWORD, "198.51.100.1").status_code == 429
    # The proxy says this is another client: it has its own allowance.
    assert _login(client, "alice", PASSWORD, "198.51.100.2").status_code == 302


def test_429_page_is_in_the_layout_and_says_when_to_retry(tmp_path):
    app = limited_app(tmp_path, LOGIN_RATE_LIMIT_USER="1 per minute")
    client = app.test_client()
    _login(client, "alice", WRONG)
    response = _login(client, "alice", WRONG)
    assert response.status_code == 429
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    page = response.get_data(as_text=True)
    said = re.search(r"try again in (\d+) seconds?", page)
    assert said, page
    assert abs(int(said.group(1)) - retry_after) <= 1
    assert 'class="site-header"' in page and 'class="site-footer"' in page
    assert "Traceback" not in page


def test_retry_after_is_sent_only_with_429(tmp_path):
    app = limited_app(tmp_path, LOGIN_RATE_LIMIT_USER="3 per minute")
    client = app.test_client()
    response = _login(client, "alice", WRONG)
    assert response.status_code == 200
    assert "Retry-After" not in response.headers
    assert not any(h.lower().startswith("x-ratelimit") for h in response.headers.keys())


def test_register_limit_refuses_and_stores_nothing(tmp_path):
    app = limited_app(tmp_path, REGISTER_RATE_LIMIT_IP="2 per hour")
    auth = AuthActions(app.test_client())
    assert auth.register("user1", PASSWORD).status_code == 302
    assert auth.register("user2", PASSWORD).status_code == 302
    refused = auth.register("user3", PASSWORD)
    assert refused.status_code == 429
    assert "Retry-After" in refused.headers
    with app.app_context():
        assert get_store().get("user3") is None
    # Showing the form is not an attempt.
    assert app.test_client().get("/register").status_code == 200


def _logged_in(app):
    client = app.test_client()
    assert _login(client, "alice", PASSWORD).status_code == 302
    return client


def _change(client, current: str):
    token = csrf_token(client, "/change-password")
    data = {
        "current_password": current,
        "new_password": OTHER_PASSWORD,
        "confirm": OTHER_PASSWORD,
        "csrf_token": token,
    }
    return client.post("/change-password", data=data)


def test_change_password_limit_stops_guessing_the_current_password(tmp_path):
    """A stolen session cannot be used to guess the password at full speed."""
    app = limited_app(tmp_path, CHANGE_PASSWORD_RATE_LIMIT_USER="2 per minute")
    _register_alice(app)
    client = _logged_in(app)
    with app.app_context():
        before = get_store().get("alice")["password_hash"]
    for _ in range(2):
        assert _change(client, WRONG).status_code == 422
    assert _change(client, PASSWORD).status_code == 429
    # The same allowance covers deletion, which also checks the password.
    token = csrf_token(client, "/account-details")
    deleted = client.post("/delete-account", data={"password": PASSWORD, "csrf_token": token})
    assert deleted.status_code == 429
    with app.app_context():
        assert get_store().get("alice")["password_hash"] == before


def test_change_password_limit_is_per_user_across_sessions(tmp_path):
    app = limited_app(tmp_path, CHANGE_PASSWORD_RATE_LIMIT_USER="2 per minute")
    _register_alice(app)
    first, second = _logged_in(app), _logged_in(app)
    for _ in range(2):
        _change(first, WRONG)
    assert _change(second, PASSWORD).status_code == 429


def _app_limited_by_env(tmp_path, **limits: str):
    """An app that takes RATELIMIT_ENABLED from the environment (make_app pins it off)."""
    config = {
        "TESTING": True,
        "SECRET_KEY": "test-secret-key-" + "x" * 32,
        "DATA_DIR": str(tmp_path / "data"),
        "PHOTO_DIR": str(tmp_path / "photos"),
        **limits,
    }
    return create_app(config)


def test_ratelimit_enabled_false_turns_every_limit_off(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASK_RATELIMIT_ENABLED", "false")
    app = _app_limited_by_env(
        tmp_path,
        LOGIN_RATE_LIMIT_IP="1 per minute",
        LOGIN_RATE_LIMIT_USER="1 per minute",
        REGISTER_RATE_LIMIT_IP="1 per hour",
        CHANGE_PASSWORD_RATE_LIMIT_USER="1 per minute",
    )
    assert app.config["RATELIMIT_ENABLED"] is False
    auth = AuthActions(app.test_client())
    for name in ("alice", "bob", "carol"):
        assert auth.register(name, PASSWORD).status_code == 302
    client = app.test_client()
    for _ in range(3):
        assert _login(client, "alice", WRONG).status_code == 200
    assert _login(client, "alice", PASSWORD).status_code == 302
    for _ in range(3):
        assert _change(client, WRONG).status_code == 422


@pytest.mark.parametrize("value", ["true", "false"])
def test_ratelimit_enabled_env_value_reaches_the_limiter(tmp_path, monkeypatch, value):
    """The same tight limit refuses the second login only when limits are on."""
    monkeypatch.setenv("FLASK_RATELIMIT_ENABLED", value)
    app = _app_limited_by_env(
        tmp_path,
        LOGIN_RATE_LIMIT_IP="1 per minute",
    )
    client = app.test_client()
    _login(client, "alice", WRONG)
    expected = 429 if value == "true" else 200
    assert _login(client, "alice", WRONG).status_code == expected


@pytest.mark.slow  # a real gunicorn
@pytest.mark.parametrize("key", ["RATELIMIT_DEFAULT", "RATELIMIT_APPLICATION"])
def test_app_wide_limit_set_by_the_operator_still_covers_every_page(tmp_path, key):
    """Flask-Limiter's every-request check is skipped only while no app-wide limit exists.

    A default or application limit (``FLASK_RATELIMIT_DEFAULT``,
    ``FLASK_RATELIMIT_APPLICATION``) is applied by that check, on routes
    without a decorator too. A real gunicorn in its own process, because the
    limiter keeps such limits for the life of the process.
    """
    with Gunicorn(tmp_path, env={f"FLASK_{key}": "2 per minute"}) as server:
        statuses = [requests.get(server.url + "/second", timeout=10).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def _save_details(client, photo: bytes | None, full_name: str = "Alice"):
    token = csrf_token(client, "/account-details")
    data = {"csrf_token": token, "full_name": full_name}
    if photo is not None:
        data["photo"] = (io.BytesIO(photo), "me.png")
    return client.post("/account-details", data=data, content_type="multipart/form-data")


def test_photo_uploads_are_limited_per_user_and_a_refused_one_stores_nothing(tmp_path):
    """Decoding is the costliest request a user can make: FLASK_UPLOAD_RATE_LIMIT_USER bounds it."""
    app = limited_app(tmp_path, UPLOAD_RATE_LIMIT_USER="2 per minute")
    _register_alice(app)
    AuthActions(app.test_client()).register("bob")
    first, second = _logged_in(app), _logged_in(app)  # two sessions of one user share it
    assert _save_details(first, images.png()).status_code == 303
    assert _save_details(second, b"not an image at all").status_code == 422  # refused ones count
    before = stored_bytes(app)
    refused = _save_details(first, images.png(), full_name="Changed")
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) > 0
    assert stored_bytes(app) == before
    # Saving the details without a photo is not an upload, and still works.
    assert _save_details(second, None, full_name="Changed").status_code == 303
    # Another user has an allowance of their own.
    bob = app.test_client()
    assert _login(bob, "bob", PASSWORD).status_code == 302
    assert _save_details(bob, images.png()).status_code == 303


def test_a_second_photo_part_cannot_slip_past_the_upload_limit(tmp_path):
    """An empty first "photo" part looked like "no photo" to the limiter; the second was decoded."""
    app = limited_app(tmp_path, UPLOAD_RATE_LIMIT_USER="1 per minute")
    _register_alice(app)
    client = _logged_in(app)
    assert _save_details(client, images.png()).status_code == 303
    before = stored_bytes(app)
    token = csrf_token(client, "/account-details")
    data = {
        "csrf_token": token,
        "full_name": "Alice",
        "photo": [(io.BytesIO(b""), ""), (io.BytesIO(images.png()), "me.png")],
    }
    response = client.post("/account-details", data=data, content_type="multipart/form-data")
    assert response.status_code == 400
    assert stored_bytes(app) == before


def test_email_changes_are_limited_per_user_so_nobody_floods_an_address(tmp_path):
    """Each new address is mailed a link: one account must not make the site mail it 15 times."""
    from secure_app import mail

    app = limited_app(tmp_path, EMAIL_CHANGE_RATE_LIMIT_USER="2 per hour")
    _register_alice(app)
    client = _logged_in(app)

    def save(email: str, full_name: str = "Alice"):
        token = csrf_token(client, "/account-details")
        data = {"csrf_token": token, "full_name": full_name, "email": email}
        return client.post("/account-details", data=data)

    assert save("victim@example.org").status_code == 303
    assert save("mine@example.org").status_code == 303
    before = stored_bytes(app)
    refused = save("victim@example.org")
    assert refused.status_code == 429
    assert stored_bytes(app) == before
    assert mail.flush(10, app)
    outbox = Path(app.config["MAIL_FILE_PATH"])
    to_victim = [p for p in outbox.glob("*.eml") if b"To: victim@example.org" in p.read_bytes()]
    assert len(to_victim) == 1
    # Saving the other details, the address unchanged, is not an email change.
    assert save("mine@example.org", full_name="Alice L.").status_code == 303
