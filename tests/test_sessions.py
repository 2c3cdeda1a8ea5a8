"""Sessions the server ends: logout, other devices, timeouts, the cookie's MAC, key rotation."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import time

import pytest
from flask import Response
from flask.json.tag import TaggedJSONSerializer
from itsdangerous import BadSignature, Serializer, Signer, URLSafeTimedSerializer
from PIL import Image

from helpers import (
    OTHER_PASSWORD,
    PASSWORD,
    AuthActions,
    csrf_token,
    make_app,
    photo_names,
    stored_bytes,
)
from secure_app import create_app, sessions
from secure_app.auth import SESSION_EXPIRED
from secure_app.config import KEYS_FILE
from secure_app.store import get_store

COOKIE = "session"


def _cookie(client) -> str:
    cookie = client.get_cookie(COOKIE)
    assert cookie is not None, "no session cookie"
    return cookie.value


def _client_with(app, cookie: str):
    """A new browser that presents a copied session cookie."""
    other = app.test_client()
    other.set_cookie(COOKIE, cookie)
    return other


def _is_logged_in(client) -> bool:
    response = client.get("/account-details")
    assert response.status_code in (200, 302)
    return response.status_code == 200


def _login(app, username: str = "alice", password: str = PASSWORD):
    """A new browser logged in as ``username``."""
    client = app.test_client()
    assert AuthActions(client).login(username, password).status_code == 302
    return client


def _decode(app, cookie: str) -> dict:
    return app.session_interface.get_signing_serializer(app).loads(cookie)


def _record(app, username: str = "alice"):
    with app.app_context():
        return get_store().get(username)


def _post(client, path: str, data: dict, form_page: str = "/account-details"):
    return client.post(path, data={**data, "csrf_token": csrf_token(client, form_page)})


# -- login and logout --------------------------------------------------------------------


def test_cookie_saved_before_logout_is_worthless_after_it(app, logged_in, auth):
    stolen = _cookie(logged_in)
    assert _is_logged_in(_client_with(app, stolen))
    auth.logout()
    replay = _client_with(app, stolen)
    assert not _is_logged_in(replay)
    assert "Logged in as" not in replay.get("/").get_data(as_text=True)
    assert _record(app)["sessions"] == {}


def test_pre_login_cookie_grants_nothing_after_login(app, client, auth):
    auth.register()
    before_token = csrf_token(client, "/login")
    before = _cookie(client)
    assert auth.login().status_code == 302
    after = _cookie(client)
    assert after != before
    # Nothing from the anonymous session survives: not even its CSRF token.
    assert _decode(app, after).get("csrf_token") != _decode(app, before)["csrf_token"]
    assert before_token not in client.get("/account-details").get_data(as_text=True)
    assert not _is_logged_in(_client_with(app, before))


def test_each_login_gets_a_new_random_session_id(app, client, auth):
    auth.register()
    auth.login()
    first = _decode(app, _cookie(client))["sid"]
    auth.login()
    second = _decode(app, _cookie(client))["sid"]
    assert first != second
    assert len(first) >= 43  # 256 bits, URL-safe base64
    # The data file keeps only digests: a leaked file holds no usable session id.
    digests = _record(app)["sessions"]
    assert hashlib.sha256(second.encode()).hexdigest() in digests
    assert all(first not in d and second not in d for d in digests)


def test_logging_in_again_ends_the_previous_session_of_this_browser(app, client, auth):
    auth.register()
    auth.register("bob", OTHER_PASSWORD)
    auth.login()
    old = _cookie(client)
    assert auth.login("bob", OTHER_PASSWORD).status_code == 302
    assert not _is_logged_in(_client_with(app, old))
    assert _record(app, "alice")["sessions"] == {}
    assert _is_logged_in(client)


def test_second_session_survives_logout_of_the_first(app, client, auth):
    auth.register()
    laptop = _login(app)
    phone = _login(app)
    AuthActions(laptop).logout()
    assert not _is_logged_in(laptop)
    assert _is_logged_in(phone)


def test_logout_everywhere_else_ends_other_sessions_and_keeps_this_one(app, client, auth):
    auth.register()
    here = _login(app)
    elsewhere = [_login(app), _login(app)]
    response = _post(here, "/logout-others", {})
    assert response.status_code == 302
    assert _is_logged_in(here)
    assert not any(_is_logged_in(c) for c in elsewhere)
    assert len(_record(app)["sessions"]) == 1


def test_logout_everywhere_else_needs_csrf_token(app, client, auth):
    auth.register()
    here, elsewhere = _login(app), _login(app)
    assert here.post("/logout-others").status_code == 400
    assert _is_logged_in(elsewhere)


def _change_password(client, current: str, new: str, confirm: str | None = None):
    data = {"current_password": current, "new_password": new, "confirm": confirm or new}
    return _post(client, "/change-password", data, "/change-password")


def test_password_change_ends_other_sessions_and_renews_this_one(app, client, auth):
    auth.register()
    here, elsewhere = _login(app), _login(app)
    old_cookie_here = _cookie(here)
    response = _change_password(here, PASSWORD, OTHER_PASSWORD)
    assert response.status_code == 302
    assert _is_logged_in(here)
    assert not _is_logged_in(elsewhere)
    # A copy of this browser's cookie taken before the change is dead too.
    assert not _is_logged_in(_client_with(app, old_cookie_here))
    fresh = app.test_client()
    assert AuthActions(fresh).login("alice", PASSWORD).status_code == 200
    assert AuthActions(fresh).login("alice", OTHER_PASSWORD).status_code == 302


def test_password_change_with_wrong_current_password_changes_nothing(app, client, auth):
    auth.register()
    here, elsewhere = _login(app), _login(app)
    before = _record(app)
    response = _change_password(here, "not my password at all, sorry", OTHER_PASSWORD)
    assert response.status_code == 422
    assert "This is not your current password." in response.get_data(as_text=True)
    after = _record(app)
    assert after["password_hash"] == before["password_hash"]
    assert after["sessions"] == before["sessions"]
    assert _is_logged_in(elsewhere)


def test_password_change_refuses_a_weak_new_password(app, logged_in):
    before = _record(app)["password_hash"]
    response = _change_password(logged_in, PASSWORD, "alicealicealice1")
    assert response.status_code == 422
    assert "too easy to guess" in response.get_data(as_text=True)
    assert _record(app)["password_hash"] == before


def test_password_change_without_csrf_token_is_refused(app, logged_in):
    before = _record(app)["password_hash"]
    data = {"current_password": PASSWORD, "new_password": OTHER_PASSWORD, "confirm": OTHER_PASSWORD}
    assert logged_in.post("/change-password", data=data).status_code == 400
    assert _record(app)["password_hash"] == before


def test_change_password_needs_login(client):
    response = client.get("/change-password")
    assert response.status_code == 302
    assert response.headers["Location"] == "/login?next=/change-password"


# -- how many sessions a user may hold ---------------------------------------------------------


# The cap's eviction order and its default of 20 are in test_security_page.py.


def test_a_cap_below_one_still_lets_the_latest_login_in(tmp_path, clock):
    app = make_app(tmp_path, MAX_SESSIONS_PER_USER=0)
    AuthActions(app.test_client()).register()
    first = _login(app)
    clock.advance(1)
    second = _login(app)
    assert (_is_logged_in(first), _is_logged_in(second)) == (False, True)


def test_outside_a_request_the_cap_is_the_module_default():
    record: dict = {}
    sids = [sessions.start(record, 1000 + i, 3600) for i in range(21)]
    assert sessions.count(record) == sessions.MAX_SESSIONS_PER_USER
    assert sessions.check({"sid": sids[0], "seen": 1020}, record, 1020, 60, 3600) == "ended"
    assert sessions.check({"sid": sids[1], "seen": 1020}, record, 1020, 60, 3600) == "live"


def test_a_login_prunes_sessions_past_the_lifetime_and_keeps_those_at_it():
    record: dict = {}
    at_limit = sessions.start(record, 1000, 3600, cap=5)
    too_old = sessions.start(record, 999, 3600, cap=5)
    sessions.start(record, 4600, 3600, cap=5)  # 3600 s after the first, 3601 after the second
    assert sessions.count(record) == 2
    assert sessions.check({"sid": at_limit, "seen": 4600}, record, 4600, 60, 3600) == "live"
    assert sessions.check({"sid": too_old, "seen": 4600}, record, 4600, 60, 3600) == "ended"


def test_a_new_session_entry_records_login_time_device_and_address():
    record: dict = {}
    sessions.start(record, 1000, 3600, device="Firefox 128 on Linux", ip="203.0.113.7")
    sessions.start(record, 1001, 3600, device="x" * 100)
    first, second = record["sessions"].values()
    assert first == {"t": 1000, "s": 1000, "ua": "Firefox 128 on Linux", "ip": "203.0.113.7"}
    assert second == {"t": 1001, "s": 1001, "ua": "x" * sessions.MAX_DEVICE, "ip": None}
    sessions.start(record, 1002, 3600)
    assert list(record["sessions"].values())[2]["ua"] == sessions.UNKNOWN_DEVICE


def test_the_record_keeps_a_digest_of_the_session_id_never_the_id():
    record: dict = {}
    sid = sessions.start(record, 1000, 3600)
    assert list(record["sessions"]) == [hashlib.sha256(sid.encode()).hexdigest()]
    assert sid not in json.dumps(record)
    assert len(base64.urlsafe_b64decode(sid + "=")) == 32  # 256 random bits


def test_in_a_request_a_device_address_and_cap_given_are_used_over_the_requests(app):
    agent = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
    environ = {"HTTP_USER_AGENT": agent, "REMOTE_ADDR": "203.0.113.9"}
    record: dict = {}
    with app.test_request_context(environ_base=environ):
        for t in (1000, 1001, 1002):
            sessions.start(record, t, 3600, device="CLI", ip="192.0.2.5", cap=2)
    assert [(e["t"], e["ua"], e["ip"]) for e in record["sessions"].values()] == [
        (1001, "CLI", "192.0.2.5"),
        (1002, "CLI", "192.0.2.5"),
    ]


def test_a_login_in_a_request_records_the_browser_and_the_address(app):
    AuthActions(app.test_client()).register()
    browser = app.test_client()
    agent = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
    browser.environ_base.update(HTTP_USER_AGENT=agent, REMOTE_ADDR="203.0.113.9")
    assert AuthActions(browser).login().status_code == 302
    (entry,) = _record(app)["sessions"].values()
    assert (entry["ua"], entry["ip"]) == ("Firefox 128 on Linux", "203.0.113.9")


# -- the record's session entries, function by function -------------------------------------


def _record_with(*logins: int) -> tuple[dict, list[str]]:
    record: dict = {}
    return record, [sessions.start(record, t, 3600, device="d", cap=9) for t in logins]


def test_ending_a_session_that_is_already_gone_is_not_an_error():
    """It may have ended meanwhile (another tab, the cap): the write must still go through."""
    record, (sid,) = _record_with(1000)
    sessions.end(record, "never-issued")
    sessions.end(record, sid)
    sessions.end(record, sid)
    assert sessions.count(record) == 0
    empty: dict = {}  # a record with no session at all: every helper leaves it alone
    sessions.end(empty, sid)
    sessions.touch(empty, sid, 1000, None)
    assert sessions.end_public(empty, sessions.public_id_of(sid), "other") is None
    assert sessions.end_others(empty, sid) == 0


def test_ending_the_others_keeps_this_one_and_counts_the_rest():
    record, (a, b, c) = _record_with(1000, 1001, 1002)
    assert sessions.end_others(record, b) == 2
    assert sessions.check({"sid": b, "seen": 1002}, record, 1002, 60, 3600) == "live"
    assert sessions.count(record) == 1
    assert sessions.end_others(record, b) == 0


def test_a_session_is_ended_by_its_public_id_but_never_the_one_asking():
    record, (mine, other) = _record_with(1000, 1001)
    assert sessions.end_public(record, sessions.public_id_of(mine), mine) is None
    assert sessions.end_public(record, "f" * 32, mine) is None
    assert sessions.end_public(record, sessions.public_id_of(other).upper(), mine) is None
    assert sessions.count(record) == 2
    ended = sessions.end_public(record, sessions.public_id_of(other), mine)
    assert ended == {"t": 1001, "s": 1001, "ua": "d", "ip": None}
    assert sessions.count(record) == 1
    assert sessions.end_public(record, sessions.public_id_of(other), mine) is None


def test_a_public_id_is_32_hex_digits_and_neither_the_id_nor_its_digest():
    record, (sid,) = _record_with(1000)
    (digest,) = record["sessions"]
    shown = sessions.public_id_of(sid)
    assert shown == sessions.public_id(digest)
    assert sessions.PUBLIC_ID_RE.fullmatch(shown)
    assert shown not in (sid, digest) and shown not in digest
    assert sessions.public_id_of(sid + "x") != shown


def test_a_session_stored_as_a_plain_login_time_is_read_and_ended_like_any_other():
    record = {"sessions": {}}
    sid = sessions.start(record, 1000, 3600, cap=5)
    (digest,) = record["sessions"]
    record["sessions"][digest] = 1000  # the form of records from before
    assert sessions.check({"sid": sid, "seen": 1000}, record, 1000, 60, 3600) == "live"
    assert sessions.activity_due(record, sid, 1000 + sessions.ACTIVE_REFRESH)
    sessions.touch(record, sid, 1500, "192.0.2.1")
    assert record["sessions"][digest] == {"t": 1000, "s": 1500, "ip": "192.0.2.1"}
    record["sessions"][digest] = True  # not a login time: not a session
    assert sessions.check({"sid": sid, "seen": 1000}, record, 1000, 60, 3600) == "ended"


def test_a_record_without_a_sessions_mapping_has_no_live_session():
    """An imported record may lack "sessions" (transfer.py accepts that): nothing is live."""
    record = {"username": "alice"}
    sid = sessions.start({}, 1000, 3600)
    assert sessions.check({"sid": sid, "seen": 1000}, record, 1000, 60, 3600) == "ended"
    assert not sessions.activity_due(record, sid, 99_999)
    assert sessions.listing(record, sid, 1000, 3600) == []
    assert sessions.count(record) == 0


def test_an_entry_holding_only_its_login_time_counts_it_as_its_last_activity():
    """_entry takes any mapping with an integer login time (an imported or hand-made record)."""
    record, (sid,) = _record_with(1000)
    (digest,) = record["sessions"]
    record["sessions"][digest] = {"t": 1000}
    assert not sessions.activity_due(record, sid, 1000 + sessions.ACTIVE_REFRESH - 1)
    assert sessions.activity_due(record, sid, 1000 + sessions.ACTIVE_REFRESH)
    (row,) = sessions.listing(record, sid, 1200, 3600)
    assert (row["started"], row["active"]) == (1000, 1000)


@pytest.mark.parametrize(
    ("sid", "seen"),
    [("live", None), (None, 1000), (7, 1000), ("live", "1000"), ("live", 1000.0), (None, None)],
    ids=["no seen", "no sid", "sid not text", "seen text", "seen float", "neither"],
)
def test_a_cookie_needs_a_text_id_and_a_whole_seen_time_or_it_is_ended(sid, seen):
    record, (live,) = _record_with(1000)
    cookie = {"sid": live if sid == "live" else sid, "seen": seen}
    assert sessions.check(cookie, record, 1000, 60, 3600) == "ended"


def test_a_cookie_for_a_deleted_account_is_ended():
    _, (sid,) = _record_with(1000)
    assert sessions.check({"sid": sid, "seen": 1000}, None, 1000, 60, 3600) == "ended"


def test_a_session_is_live_at_exactly_the_idle_timeout_and_expired_a_second_later():
    record, (sid,) = _record_with(1000)
    cookie = {"sid": sid, "seen": 1100}
    assert sessions.check(cookie, record, 1160, 60, 3600) == "live"
    assert sessions.check(cookie, record, 1161, 60, 3600) == "expired"


def test_activity_is_due_once_it_is_active_refresh_old():
    record, (sid,) = _record_with(1000)
    assert not sessions.activity_due(record, sid, 1000 + sessions.ACTIVE_REFRESH - 1)
    assert sessions.activity_due(record, sid, 1000 + sessions.ACTIVE_REFRESH)
    sessions.touch(record, sid, 1400, None)
    assert not sessions.activity_due(record, sid, 1400 + sessions.ACTIVE_REFRESH - 1)
    assert sessions.activity_due(record, sid, 1400 + sessions.ACTIVE_REFRESH)
    assert not sessions.activity_due(record, "never-issued", 99_999)


def test_a_refresh_without_an_address_keeps_the_last_one():
    record, (sid,) = _record_with(1000)
    sessions.touch(record, sid, 1300, "192.0.2.1")
    sessions.touch(record, sid, 1600, None)
    (entry,) = record["sessions"].values()
    assert (entry["s"], entry["ip"], entry["t"]) == (1600, "192.0.2.1", 1000)


def test_the_listing_puts_this_session_first_then_the_most_recently_active():
    record, (old, mine, recent) = _record_with(1000, 1001, 1002)
    sessions.touch(record, old, 1500, "192.0.2.1")
    rows = sessions.listing(record, mine, 1600, 3600)
    assert [r["id"] for r in rows] == [sessions.public_id_of(s) for s in (mine, old, recent)]
    assert [r["current"] for r in rows] == [True, False, False]
    assert rows[1] == {
        "id": sessions.public_id_of(old),
        "current": False,
        "started": 1000,
        "active": 1500,
        "device": "d",
        "ip": "192.0.2.1",
    }
    # Past the lifetime a session is not listed; with no cookie id, none is "current".
    assert [r["started"] for r in sessions.listing(record, None, 4601, 3600)] == [1002, 1001]


def test_the_listing_names_an_unknown_device_and_never_shows_activity_before_the_login():
    record, (sid,) = _record_with(1000)
    (digest,) = record["sessions"]
    record["sessions"][digest] = {"t": 1000, "s": 900, "ua": ""}
    (row,) = sessions.listing(record, sid, 1000, 3600)
    assert (row["device"], row["active"], row["ip"]) == (sessions.UNKNOWN_DEVICE, 1000, None)


@pytest.mark.parametrize(
    ("header", "summary"),
    [
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0",
            "Firefox 128 on Windows",
        ),
        ("curl/8.5.0", "curl 8"),
        ("Wget", "Wget"),  # a browser without a version is named alone
        # ua-parser's "Other" is its name for "unknown": never shown as a product.
        ("Other/1.0 CFNetwork/1.0 Darwin/20", "Unknown browser on iOS"),
        ("HbbTV/1.4.1 (; Other; 2015;)", "HbbTV 1"),
        ("", sessions.UNKNOWN_DEVICE),
        ("   ", sessions.UNKNOWN_DEVICE),
        (None, sessions.UNKNOWN_DEVICE),
        ("x" * 8000, sessions.UNKNOWN_DEVICE),
    ],
)
def test_a_user_agent_is_summarised_as_browser_version_and_system(header, summary):
    assert sessions.describe_agent(header) == summary


def test_only_the_first_512_characters_of_a_user_agent_are_parsed():
    """ua-parser's rules are regular expressions: an 8 KiB header must not feed them."""
    linux = "Mozilla/5.0 (X11; Linux x86_64) "
    firefox = "Firefox/128.0"
    fits = linux + " " * (sessions.MAX_AGENT_INPUT - len(linux) - len(firefox))
    assert sessions.describe_agent(fits + firefox) == "Firefox 128 on Linux"
    assert sessions.describe_agent(fits + " " + firefox) == "Unknown browser on Linux"


def test_an_agent_with_a_system_but_no_known_browser_is_an_unknown_browser_on_it():
    header = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) SomethingNew/1.0"
    assert sessions.describe_agent(header) == "Unknown browser on Windows"


@pytest.mark.parametrize(
    ("value", "clean"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:DB8::1", "2001:db8::1"),
        ("203.0.113.7, 10.0.0.1", None),
        ("<script>", None),
        ("1" * 46, None),
        # The longest text form of an address, 45 characters, is kept (compressed).
        ("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", "ffff:" * 7 + "ffff"),
        # A zone may hold any text: only the address is kept, and past 45 characters nothing.
        ("fe80::1%eth0", "fe80::1"),
        ("fe80::1%<b>Call +1 555 0100", "fe80::1"),
        ("fe80::1%" + "e" * 37, "fe80::1"),
        ("fe80::1%" + "e" * 38, None),
        (None, None),
        (12, None),
    ],
)
def test_only_an_address_is_stored_as_the_address(value, clean):
    assert sessions.clean_ip(value) == clean


# -- deletion ------------------------------------------------------------------------------


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 40, 90)).save(buffer, "PNG")
    return buffer.getvalue()


def _upload_photo(app, client) -> str:
    token = csrf_token(client, "/account-details")
    response = client.post(
        "/account-details",
        data={
            "full_name": "Alice Liddell",
            "email": "alice@example.org",
            "phone": "",
            "bio": "",
            "photo": (io.BytesIO(_png()), "me.png"),
            "csrf_token": token,
        },
        content_type="multipart/form-data",
    )
    assert response.status_code == 303
    name = _record(app)["photo"]
    assert photo_names(app) == [name]
    return name


def test_delete_account_removes_record_photo_and_every_session(app, logged_in):
    photo = _upload_photo(app, logged_in)
    elsewhere = _login(app)
    response = _post(logged_in, "/delete-account", {"password": PASSWORD})
    assert response.status_code == 302
    assert response.headers["Clear-Site-Data"] == '"cookies", "storage"'
    assert _record(app) is None
    assert photo not in photo_names(app)
    assert not _is_logged_in(logged_in)
    assert not _is_logged_in(elsewhere)
    assert b"Alice Liddell" not in b"".join(stored_bytes(app).values())


def test_delete_account_with_wrong_password_deletes_nothing(app, logged_in):
    photo = _upload_photo(app, logged_in)
    before = _record(app)
    response = _post(logged_in, "/delete-account", {"password": OTHER_PASSWORD})
    assert response.status_code == 303
    page = logged_in.get(response.headers["Location"]).get_data(as_text=True)
    assert "Your account was not deleted" in page
    assert _record(app) == before
    assert photo_names(app) == [photo]


def test_delete_account_without_csrf_token_deletes_nothing(app, logged_in):
    assert logged_in.post("/delete-account", data={"password": PASSWORD}).status_code == 400
    assert _record(app) is not None


# -- timeouts --------------------------------------------------------------------------------

IDLE, LIFETIME = 60, 300


@pytest.fixture
def short_app(tmp_path):
    """Short timeouts, so the tests can show the configured values are the ones enforced."""
    return make_app(tmp_path, SESSION_IDLE_TIMEOUT=IDLE, PERMANENT_SESSION_LIFETIME=LIFETIME)


def _registered_login(app):
    AuthActions(app.test_client()).register()
    return _login(app)


def _age_cookie(client, seconds: int) -> None:
    """Move the signed ``seen`` timestamp back, through the app's own session interface."""
    with client.session_transaction() as session:
        session["seen"] -= seconds


def _age_login(app, seconds: int) -> None:
    """Move every login time of alice back in the server's record."""
    with app.app_context():

        def older(record):
            for entry in record["sessions"].values():
                entry["t"] -= seconds  # the login time; "s" (last active) is display only

        get_store().update("alice", older)


def test_idle_session_expires_on_the_server_and_lands_on_login(short_app):
    client = _registered_login(short_app)
    _age_cookie(client, IDLE + 2)
    response = client.get("/account-details")
    assert response.status_code == 302
    assert response.headers["Location"] == "/login?next=/account-details"
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert SESSION_EXPIRED in page
    assert not _is_logged_in(client)


def test_session_used_within_the_idle_timeout_stays_live(short_app):
    client = _registered_login(short_app)
    _age_cookie(client, IDLE - 5)
    assert _is_logged_in(client)
    # The request refreshed "seen", so another idle stretch of the same length is fine.
    _age_cookie(client, IDLE - 5)
    assert _is_logged_in(client)


def test_busy_session_still_ends_at_the_absolute_lifetime(short_app):
    client = _registered_login(short_app)
    assert _is_logged_in(client)  # seen is fresh: this is not an idle timeout
    _age_login(short_app, LIFETIME + 2)
    response = client.get("/second")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login?next=")
    assert SESSION_EXPIRED in client.get("/login").get_data(as_text=True)
    assert not _is_logged_in(client)


def _set_cookie_headers(response) -> list[str]:
    return [h for h in response.headers.getlist("Set-Cookie") if h.startswith(COOKIE + "=")]


def test_request_within_the_refresh_interval_does_not_reissue_the_cookie(app, logged_in):
    """``seen`` is refreshed once it is SEEN_REFRESH (60 s) old, not on every request.

    A new ``seen`` means a newly signed cookie in the response: refreshed to
    the second, nearly every page view re-signed and re-sent the cookie.
    """
    assert sessions.seen_refresh(app.config["SESSION_IDLE_TIMEOUT"]) == sessions.SEEN_REFRESH
    assert logged_in.get("/account-details").status_code == 200  # the page's CSRF value is made
    _age_cookie(logged_in, 10)
    before = _decode(app, _cookie(logged_in))["seen"]
    response = logged_in.get("/account-details")
    assert response.status_code == 200
    assert _set_cookie_headers(response) == []  # 10 s old: the same cookie stays
    assert _decode(app, _cookie(logged_in))["seen"] == before
    _age_cookie(logged_in, sessions.SEEN_REFRESH)
    response = logged_in.get("/account-details")
    assert len(_set_cookie_headers(response)) == 1  # 70 s old: refreshed to now
    assert _decode(app, _cookie(logged_in))["seen"] >= int(time.time()) - 1


def test_idle_timeout_counts_from_the_signed_seen_even_when_it_was_not_refreshed(app, logged_in):
    """The idle timeout still ends the session: at most SEEN_REFRESH early, never late."""
    idle = app.config["SESSION_IDLE_TIMEOUT"]
    assert logged_in.get("/account-details").status_code == 200
    _age_cookie(logged_in, 30)
    assert _is_logged_in(logged_in)  # within the refresh interval: seen stays 30 s old
    _age_cookie(logged_in, idle - 29)  # the last request was idle - 29 s ago, seen idle + 1 s
    response = logged_in.get("/account-details")
    assert response.status_code == 302
    assert response.headers["Location"] == "/login?next=/account-details"
    assert SESSION_EXPIRED in logged_in.get("/login").get_data(as_text=True)
    assert not _is_logged_in(logged_in)


def test_session_in_use_every_few_minutes_outlives_the_idle_timeout(app, logged_in):
    idle = app.config["SESSION_IDLE_TIMEOUT"]
    for _ in range(3 * idle // 600):  # three idle timeouts, a request every ten minutes
        _age_cookie(logged_in, 600)
        assert _is_logged_in(logged_in)


def test_refresh_interval_stays_a_small_part_of_short_idle_timeouts():
    assert sessions.seen_refresh(1800) == 60
    assert sessions.seen_refresh(60) == 2
    assert sessions.seen_refresh(10) == 1  # never 0: an unchanged seen is not re-signed
    assert sessions.seen_refresh(89) == 2  # whole seconds, rounded down


def test_expired_session_cannot_post_forms(short_app):
    client = _registered_login(short_app)
    token = csrf_token(client, "/account-details")
    _age_cookie(client, IDLE + 2)
    response = client.post("/account-details", data={"full_name": "Mallory", "csrf_token": token})
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login")
    assert _record(short_app)["full_name"] == ""


# -- the cookie --------------------------------------------------------------------------------


def _resign(app, payload: dict, digest) -> str:
    serializer = URLSafeTimedSerializer(
        app.secret_key,
        salt=app.session_interface.salt,
        serializer=TaggedJSONSerializer(),
        signer_kwargs={"key_derivation": "hmac", "digest_method": digest},
    )
    return serializer.dumps(payload)


def test_cookie_resigned_with_sha1_under_the_same_key_is_refused(app, logged_in):
    payload = _decode(app, _cookie(logged_in))
    with_sha256 = _resign(app, payload, hashlib.sha256)
    assert _is_logged_in(_client_with(app, with_sha256))  # the same payload, the right MAC
    with_sha1 = _resign(app, payload, hashlib.sha1)
    assert not _is_logged_in(_client_with(app, with_sha1))


def test_cookie_with_a_forged_signature_is_refused(app, logged_in):
    cookie = _cookie(logged_in)
    body, _, signature = cookie.rpartition(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    assert not _is_logged_in(_client_with(app, f"{body}.{flipped}"))


def test_keys_changed_on_a_running_app_take_effect_at_once(app, logged_in):
    cookie = _cookie(logged_in)
    old = app.secret_key
    app.secret_key = "a-key-this-app-never-had-" + "k" * 32
    assert not _is_logged_in(_client_with(app, cookie))
    app.config["SECRET_KEY_FALLBACKS"] = [old]
    assert _is_logged_in(_client_with(app, cookie))


def test_a_warm_app_builds_no_signer_and_derives_no_key_per_request(app, logged_in, monkeypatch):
    """Flask builds the serializer, and itsdangerous a signer and its key (one more HMAC),
    on every request; here each is made once per set of keys."""
    _age_cookie(logged_in, sessions.SEEN_REFRESH)
    assert _is_logged_in(logged_in)  # read one cookie and signed a new one: all made now
    made = []
    derive, make_signer = Signer.derive_key, Serializer.make_signer

    def spy_derive(signer, secret_key=None):
        if isinstance(signer, sessions._OnceDerivedSigner):
            made.append("key")
        return derive(signer, secret_key)

    def spy_make_signer(serializer, salt=None):
        if isinstance(serializer, sessions.OnceSerializer):
            made.append("signer")
        return make_signer(serializer, salt)

    monkeypatch.setattr(Signer, "derive_key", spy_derive)
    monkeypatch.setattr(Serializer, "make_signer", spy_make_signer)
    for _ in range(3):
        _age_cookie(logged_in, sessions.SEEN_REFRESH)  # so each response signs a new cookie
        assert _is_logged_in(logged_in)
    assert made == []


def test_the_session_serializer_signs_with_the_salt_each_call_names():
    """It keeps a signer per salt; each call still gets its own salt's, as itsdangerous' does."""
    once = sessions.OnceSerializer("k" * 32, salt="session")
    for salt in (None, "other", None, "other"):
        reference = URLSafeTimedSerializer("k" * 32, salt=salt or "session")
        assert reference.loads(once.dumps({"n": 1}, salt=salt)) == {"n": 1}
        assert once.loads(reference.dumps({"n": 2}), salt=salt) == {"n": 2}
    with pytest.raises(BadSignature):
        once.loads(once.dumps({"n": 3}, salt="other"))


@pytest.mark.parametrize(
    ("permanent", "refresh", "sent"),
    [(True, True, True), (True, False, False), (False, True, False)],
)
def test_an_unchanged_session_is_sent_again_only_when_flask_would(
    tmp_path, permanent, refresh, sent
):
    """Nothing here makes a session permanent, but the shortcut for unchanged sessions must
    keep Flask's rule: a permanent one is renewed on each request (SESSION_REFRESH_EACH_REQUEST)."""
    app = make_app(tmp_path, SESSION_REFRESH_EACH_REQUEST=refresh)
    interface = app.session_interface
    with app.test_request_context():
        unchanged = interface.session_class({"uid": "alice", "_permanent": permanent})
        response = app.response_class()
        interface.save_session(app, unchanged, response)
    assert len(_set_cookie_headers(response)) == (1 if sent else 0)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (None, "Cookie"),
        ("Cookie", "Cookie"),
        ("Accept-Encoding", "Accept-Encoding, Cookie"),
        ("Accept-Encoding, Cookie", "Accept-Encoding, Cookie"),
    ],
)
def test_vary_names_the_cookie_once_and_keeps_what_was_there(before, after):
    response = Response()
    if before is not None:
        response.headers["Vary"] = before
    sessions.vary_on_cookie(response)
    assert response.headers.getlist("Vary") == [after]


def test_cookie_holds_only_ids_and_timestamps(app, logged_in):
    token = csrf_token(logged_in, "/account-details")
    logged_in.post(
        "/account-details",
        data={
            "full_name": "Alice Liddell",
            "email": "alice@example.org",
            "phone": "+44 20 7946 0000",
            "bio": "Down the rabbit hole",
            "csrf_token": token,
        },
    )
    logged_in.get("/account-details")
    payload = _decode(app, _cookie(logged_in))
    assert set(payload) <= {"uid", "sid", "seen", "auth_at", "csrf_token", "_flashes"}
    text = json.dumps(payload)
    for private in ("Liddell", "alice@example.org", "7946", "rabbit", "argon2"):
        assert private not in text


def test_session_cookie_is_httponly_and_samesite(client, auth):
    auth.register()
    response = auth.login()
    cookie = next(h for h in response.headers.getlist("Set-Cookie") if h.startswith("session="))
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie or "SameSite=Strict" in cookie


def test_session_cookie_is_secure_with_host_prefix_under_force_https(tmp_path):
    app = make_app(tmp_path, FORCE_HTTPS=True, PUBLIC_URL="https://localhost")
    client = app.test_client()
    response = client.get("/login", base_url="https://localhost")
    cookie = next(h for h in response.headers.getlist("Set-Cookie") if "session=" in h)
    assert cookie.startswith("__Host-session=")
    assert "Secure" in cookie and "Path=/" in cookie and "Domain" not in cookie


def test_logout_sends_clear_site_data(logged_in, auth):
    response = auth.logout()
    assert response.headers["Clear-Site-Data"] == '"cookies", "storage"'


@pytest.mark.parametrize("path", ["/account-details", "/change-password", "/"])
def test_authenticated_pages_are_not_stored_by_caches(logged_in, path):
    response = logged_in.get(path)
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"


# -- secret keys -----------------------------------------------------------------------------


@pytest.fixture
def key_env(tmp_path, monkeypatch):
    """Apps that keep their keys in a temporary instance folder, as ``make run`` does."""
    monkeypatch.delenv("FLASK_SECRET_KEY", raising=False)
    monkeypatch.setenv("FLASK_INSTANCE_PATH", str(tmp_path / "instance"))

    def new_app():
        return create_app(
            {
                "TESTING": True,
                "DATA_DIR": str(tmp_path / "data"),
                "PHOTO_DIR": str(tmp_path / "photos"),
                "RATELIMIT_ENABLED": False,
            }
        )

    return new_app


def _rotate(app) -> None:
    result = app.test_cli_runner().invoke(args=["rotate-secret-key"])
    assert result.exit_code == 0, result.output
    assert "stay valid until the next rotation" in result.output


def test_secret_key_is_generated_into_the_instance_folder_with_mode_0600(key_env, tmp_path):
    app = key_env()
    path = tmp_path / "instance" / KEYS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keys = json.loads(path.read_text())
    assert app.secret_key == keys["current"]
    assert len(bytes.fromhex(keys["current"])) == 32
    # A second start (another worker, a restart) uses the same key.
    assert key_env().secret_key == app.secret_key


def test_session_survives_one_rotation_and_dies_at_the_next(key_env):
    first = key_env()
    AuthActions(first.test_client()).register()
    cookie = _cookie(_login(first))

    _rotate(first)
    second = key_env()  # the server restarts
    assert second.secret_key != first.secret_key
    assert second.config["SECRET_KEY_FALLBACKS"] == [first.secret_key]
    assert _is_logged_in(_client_with(second, cookie))

    _rotate(second)
    third = key_env()
    assert first.secret_key not in [third.secret_key, *third.config["SECRET_KEY_FALLBACKS"]]
    assert not _is_logged_in(_client_with(third, cookie))
    # Sessions signed with the key that is now the fallback still work.
    assert _is_logged_in(_client_with(third, _cookie(_login(second))))


def test_rotated_key_file_stays_mode_0600(key_env, tmp_path):
    app = key_env()
    _rotate(app)
    path = tmp_path / "instance" / KEYS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]


def test_flask_secret_key_overrides_the_key_file(key_env, monkeypatch):
    monkeypatch.setenv("FLASK_SECRET_KEY", "from-the-environment-" + "k" * 32)
    assert key_env().secret_key == "from-the-environment-" + "k" * 32


@pytest.mark.parametrize("content", ["{not json", '{"fallbacks": []}', '{"current": 7}', "[]"])
def test_damaged_key_file_stops_start_up_with_a_clear_message(key_env, tmp_path, content):
    key_env()
    (tmp_path / "instance" / KEYS_FILE).write_text(content)
    with pytest.raises(RuntimeError, match="is not a valid key file"):
        key_env()
