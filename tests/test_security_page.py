"""The security page: every live session, ending one from another browser, recent events, limits."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest
import requests
import test_two_factor
from test_two_factor import flashes

from helpers import (
    OTHER_PASSWORD,
    PASSWORD,
    AuthActions,
    csrf_token,
    file_size_limit,
    make_app,
    record_lines,
    stored_bytes,
)
from secure_app import events, mfa, sessions
from secure_app.auth import SESSION_ENDED
from secure_app.security_page import IS_CURRENT, NOT_FOUND, _ago
from secure_app.store import get_store
from secure_app.store.text import TextStore
from servers import Gunicorn, Redis, redis_server_path

FIREFOX = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0"
SAFARI = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1"
)
WRONG = "not the password at all, sorry"
ID_RE = re.compile(r'name="session_id" value="([0-9a-f]{32})"')


class Clock:
    """``time.time`` for the whole app, moved only when told."""

    def __init__(self, now: float = 1_800_000_000) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def app(tmp_path):
    app = make_app(tmp_path)
    assert AuthActions(app.test_client()).register().status_code == 302
    return app


def browser(app, agent: str = FIREFOX, ip: str = "198.51.100.7"):
    """A new test client that sends ``agent`` and comes from ``ip``."""
    client = app.test_client()
    client.environ_base.update(HTTP_USER_AGENT=agent, REMOTE_ADDR=ip)
    return client


def logged_in(app, agent: str = FIREFOX, ip: str = "198.51.100.7", username: str = "alice"):
    client = browser(app, agent, ip)
    password = PASSWORD if username == "alice" else OTHER_PASSWORD
    assert AuthActions(client).login(username, password).status_code == 302
    return client


def is_logged_in(client) -> bool:
    return client.get("/account-details").status_code == 200


def record(app, username: str = "alice") -> dict:
    with app.app_context():
        return get_store().get(username)


def shown_ids(client) -> list[str]:
    return ID_RE.findall(client.get("/security").get_data(as_text=True))


def end(client, session_id: object, **extra: object):
    data = {"csrf_token": csrf_token(client, "/security"), **extra}
    if session_id is not None:
        data["session_id"] = session_id
    return client.post("/security/sessions/end", data=data)


def failed_login(client, username: str = "alice") -> None:
    """A wrong password; the response is closed, as a server closes it (events.py writes then)."""
    response = AuthActions(client).login(username, WRONG)
    assert response.status_code == 200
    response.close()


# -- the page ----------------------------------------------------------------------------


def test_page_lists_every_session_with_browser_address_and_this_one_marked(app):
    laptop = logged_in(app, FIREFOX, "198.51.100.7")
    logged_in(app, SAFARI, "203.0.113.9")
    html = laptop.get("/security").get_data(as_text=True)
    assert "You have 2 active sessions" in html
    assert "Firefox 128 on Windows" in html and "Mobile Safari 17 on iOS" in html
    assert "198.51.100.7" in html and "203.0.113.9" in html
    current = html.index("(this browser)")
    assert html.rfind("Firefox 128 on Windows", 0, current) > html.rfind(
        "Mobile Safari", 0, current
    )
    # One "End" form: for the other session, never for this one.
    assert len(ID_RE.findall(html)) == 1


def test_page_shows_neither_the_cookie_id_nor_its_stored_digest(app):
    laptop = logged_in(app)
    phone = logged_in(app, SAFARI)
    with phone.session_transaction() as cookie:
        sid = cookie["sid"]
    digest = hashlib.sha256(sid.encode()).hexdigest()
    html = laptop.get("/security").get_data(as_text=True)
    assert sid not in html and digest not in html
    assert shown_ids(laptop) == [sessions.public_id(digest)]


def test_the_data_file_keeps_a_short_summary_of_the_user_agent_not_the_header(app):
    header = FIREFOX + " " + "x" * 4000
    logged_in(app, header)
    data = b"".join(stored_bytes(app).values()).decode()
    assert "x" * 100 not in data and "Gecko" not in data
    devices = [s["ua"] for s in record(app)["sessions"].values()]
    assert devices == ["Firefox 128 on Windows"]


@pytest.mark.parametrize(
    ("forwarded", "kept"),
    [
        ("<script>alert(1)</script>", None),
        # Python reads any text after "%" as an IPv6 zone: only the address is kept.
        ("fe80::1%<script>Call +1 555 0100", "fe80::1"),
    ],
)
def test_a_forwarded_address_that_is_not_an_address_is_not_stored(tmp_path, forwarded, kept):
    app = make_app(tmp_path, PROXY_HOPS=1)
    AuthActions(app.test_client()).register()
    client = app.test_client()
    client.environ_base["HTTP_X_FORWARDED_FOR"] = forwarded
    AuthActions(client).login("alice", "not the password at all")  # an event for alice
    AuthActions(client).login()
    assert [s["ip"] for s in record(app)["sessions"].values()] == [kept]
    assert b"script" not in b"".join(stored_bytes(app).values())
    page = client.get("/security").get_data(as_text=True)
    assert "<script>" not in page and "555 0100" not in page


def test_account_page_links_to_the_security_page_and_lost_its_logout_others_form(app):
    html = logged_in(app).get("/account-details").get_data(as_text=True)
    assert 'href="/security"' in html
    assert 'action="/logout-others"' not in html


# -- ending one session ------------------------------------------------------------------


def test_ending_a_session_from_another_browser_kills_its_cookie_at_once(app):
    laptop = logged_in(app, FIREFOX)
    phone = logged_in(app, SAFARI, "203.0.113.9")
    with phone.session_transaction() as cookie:
        stolen = dict(cookie)  # a copy of the phone's cookie, as a thief would keep it
    (target,) = shown_ids(laptop)
    response = end(laptop, target)
    assert response.status_code == 303 and response.headers["Location"] == "/security"
    assert "Mobile Safari 17 on iOS has ended" in laptop.get("/security").get_data(as_text=True)
    assert is_logged_in(laptop)
    # The phone lands on the login page, told why.
    landed = phone.get("/account-details")
    assert landed.status_code == 302
    assert landed.headers["Location"] == "/login?next=/account-details"
    assert SESSION_ENDED in phone.get("/login").get_data(as_text=True)
    assert not is_logged_in(phone)
    # A copy of its cookie is worthless too.
    thief = browser(app)
    with thief.session_transaction() as cookie:
        cookie.update(stolen)
    assert not is_logged_in(thief)
    assert len(record(app)["sessions"]) == 1
    latest = record(app)["events"][-1]
    assert latest["k"] == "session_ended" and latest["device"] == "Mobile Safari 17 on iOS"


def test_ending_a_session_needs_a_fresh_authentication(app, monkeypatch):
    clock = Clock(time.time())
    monkeypatch.setattr(time, "time", clock)
    laptop = logged_in(app)
    phone = logged_in(app, SAFARI)
    (target,) = shown_ids(laptop)
    clock.advance(app.config["REAUTH_WINDOW"] + 1)
    token = csrf_token(laptop, "/security")
    before = stored_bytes(app)
    response = laptop.post(
        "/security/sessions/end",
        data={"csrf_token": token, "session_id": target},
        headers={"Referer": "http://localhost/security"},
    )
    assert response.status_code == 303
    assert response.headers["Location"] == "/reauthenticate?next=/security"
    assert stored_bytes(app) == before
    assert is_logged_in(phone)


def test_ending_a_session_without_the_csrf_token_is_refused(app):
    laptop = logged_in(app)
    phone = logged_in(app, SAFARI)
    (target,) = shown_ids(laptop)
    before = stored_bytes(app)
    assert laptop.post("/security/sessions/end", data={"session_id": target}).status_code == 400
    assert stored_bytes(app) == before and is_logged_in(phone)


def _others_id(app) -> str:
    """The id the security page shows bob for his own session."""
    AuthActions(app.test_client()).register("bob", OTHER_PASSWORD)
    bob = logged_in(app, SAFARI, username="bob")
    logged_in(app, FIREFOX, username="bob")
    (shown,) = shown_ids(bob)
    return shown


def _stale_id(app) -> str:
    laptop = logged_in(app)
    logged_in(app, SAFARI)
    (shown,) = shown_ids(laptop)
    assert end(laptop, shown).status_code == 303
    return shown


def _live_id(app) -> str:
    """The id of a live session of alice's, as her other browser's page shows it."""
    phone = logged_in(app, SAFARI)
    logged_in(app, FIREFOX)
    return shown_ids(phone)[0]


def _raw_digest(app) -> str:
    logged_in(app, SAFARI)
    return next(iter(record(app)["sessions"]))


BAD_IDS = {
    "forged": lambda app: "0" * 32,
    "upper-case": lambda app: _live_id(app).upper(),
    "one-longer": lambda app: _live_id(app) + "0",
    "unicode": lambda app: "é" * 32,
    "empty": lambda app: "",
    "overlong": lambda app: "a" * 5000,
    "other-users": _others_id,
    "stale": _stale_id,
    "raw-digest": _raw_digest,
}


@pytest.mark.parametrize("kind", BAD_IDS)
def test_forged_other_users_and_stale_session_ids_are_refused(app, kind):
    value = BAD_IDS[kind](app)
    here = logged_in(app)
    token = csrf_token(here, "/security")
    alive = [logged_in(app, SAFARI), logged_in(app, FIREFOX)]
    before = stored_bytes(app)
    response = here.post("/security/sessions/end", data={"csrf_token": token, "session_id": value})
    assert response.status_code == 303 and response.headers["Location"] == "/security"
    assert stored_bytes(app) == before
    assert NOT_FOUND in here.get("/security").get_data(as_text=True)
    assert all(is_logged_in(c) for c in [here, *alive])


@pytest.mark.parametrize(
    "data",
    [{}, {"session_id": ["a" * 32, "b" * 32]}, {"session_id": (b"\x00" * 32, "x.bin")}],
    ids=["missing", "twice", "a-file"],
)
def test_malformed_end_requests_are_refused_without_a_5xx(app, data):
    here = logged_in(app)
    other = logged_in(app, SAFARI)
    token = csrf_token(here, "/security")
    before = stored_bytes(app)
    response = here.post("/security/sessions/end", data={"csrf_token": token, **data})
    assert response.status_code in (303, 400)
    assert stored_bytes(app) == before and is_logged_in(other)


def test_the_session_asking_cannot_end_itself_from_the_list(app):
    here = logged_in(app)
    with here.session_transaction() as cookie:
        mine = sessions.public_id_of(cookie["sid"])
    before = stored_bytes(app)
    assert end(here, mine).status_code == 303
    assert stored_bytes(app) == before
    assert IS_CURRENT in here.get("/security").get_data(as_text=True)


def test_own_logout_shows_no_ended_elsewhere_message(app):
    client = logged_in(app)
    response = AuthActions(client).logout()
    assert response.status_code == 302
    assert client.get("/").status_code == 200
    assert SESSION_ENDED not in client.get("/login").get_data(as_text=True)


def test_logout_everywhere_else_comes_back_to_the_security_page_and_is_an_event(app):
    here = logged_in(app)
    others = [logged_in(app, SAFARI), logged_in(app)]
    response = here.post("/logout-others", data={"csrf_token": csrf_token(here, "/security")})
    assert response.headers["Location"] == "/security"
    assert not any(is_logged_in(c) for c in others)
    assert record(app)["events"][-1] == {
        "k": "sessions_ended_others",
        "t": record(app)["events"][-1]["t"],
        "ip": "198.51.100.7",
        "count": 2,
    }


def test_logout_everywhere_else_needs_a_fresh_authentication(app, monkeypatch):
    """A stolen cookie, hours old, must not be able to log the owner out everywhere (V7.5.2)."""
    clock = Clock(time.time())
    monkeypatch.setattr(time, "time", clock)
    thief = logged_in(app)
    owner = logged_in(app, SAFARI)
    clock.advance(app.config["REAUTH_WINDOW"] + 1)
    token = csrf_token(thief, "/security")
    before = stored_bytes(app)
    response = thief.post(
        "/logout-others",
        data={"csrf_token": token},
        headers={"Referer": "http://localhost/security"},
    )
    assert response.headers["Location"] == "/reauthenticate?next=/security"
    assert stored_bytes(app) == before and is_logged_in(owner)


# -- the record: old sessions, last activity, the cap -------------------------------------


def test_sessions_stored_as_plain_login_times_keep_working(app):
    """Records from before this change map each digest to an int: nobody is logged out."""
    client = logged_in(app)

    def old_form(r):
        r["sessions"] = {d: v["t"] for d, v in r["sessions"].items()}

    with app.app_context():
        get_store().update("alice", old_form)
    assert is_logged_in(client)
    assert "Unknown browser" in client.get("/security").get_data(as_text=True)
    logged_in(app, SAFARI)  # a write turns the old form into the new one
    assert all(isinstance(v, dict) for v in record(app)["sessions"].values())
    assert is_logged_in(client)


def test_last_activity_costs_a_write_only_every_few_minutes(app, monkeypatch):
    clock = Clock(time.time())
    monkeypatch.setattr(time, "time", clock)
    client = logged_in(app)
    before = stored_bytes(app)
    for _ in range(5):
        clock.advance(50)
        assert is_logged_in(client)
    assert stored_bytes(app) == before  # 250 s of page views: no store write
    clock.advance(sessions.ACTIVE_REFRESH - 250)
    client.environ_base["REMOTE_ADDR"] = "192.0.2.44"
    assert is_logged_in(client)
    (entry,) = record(app)["sessions"].values()
    assert entry["s"] == int(clock.now) and entry["ip"] == "192.0.2.44"
    assert entry["t"] == int(clock.now) - sessions.ACTIVE_REFRESH


def test_an_ended_session_is_not_brought_back_by_its_activity_refresh():
    rec: dict = {"sessions": {}}
    sid = sessions.start(rec, 1000, 3600, device="x", ip=None, cap=5)
    sessions.end(rec, sid)
    sessions.touch(rec, sid, 2000, "192.0.2.1")
    assert rec["sessions"] == {}


def test_a_new_login_past_the_cap_ends_the_oldest_session(tmp_path, monkeypatch):
    clock = Clock(time.time())
    monkeypatch.setattr(time, "time", clock)
    app = make_app(tmp_path, MAX_SESSIONS_PER_USER=3)
    AuthActions(app.test_client()).register()
    clients = []
    for _ in range(3):
        clients.append(logged_in(app))
        clock.advance(10)
    # The oldest was used most recently: the login time decides, not the activity.
    assert is_logged_in(clients[0])
    newest = logged_in(app, SAFARI)
    assert [is_logged_in(c) for c in clients] == [False, True, True]
    assert is_logged_in(newest)
    assert len(record(app)["sessions"]) == 3


def test_the_cap_defaults_to_twenty(tmp_path):
    app = make_app(tmp_path)
    assert app.config["MAX_SESSIONS_PER_USER"] == 20
    rec: dict = {}
    with app.test_request_context():
        for i in range(25):
            sessions.start(rec, 1000 + i, 3600)
    assert len(rec["sessions"]) == 20
    assert min(v["t"] for v in rec["sessions"].values()) == 1005


# -- recent events and the sign-in notice -----------------------------------------------


def test_events_are_listed_newest_first_with_time_and_address(app):
    client = logged_in(app, FIREFOX, "198.51.100.7")
    failed_login(browser(app, SAFARI, "203.0.113.7"))
    AuthActions(client).change_password()
    html = client.get("/security").get_data(as_text=True)
    section = html[html.index('id="recent-activity"') :]
    order = [
        section.index("Password changed"),
        section.index("Failed sign-in: wrong password"),
        section.index("Signed in with your password"),
    ]
    assert order == sorted(order)
    assert "203.0.113.7" in section


def test_a_failed_login_for_an_unknown_username_writes_nothing(app):
    before = stored_bytes(app)
    failed_login(browser(app), "nobody")
    assert stored_bytes(app) == before


def test_a_failed_login_is_written_only_after_the_response_has_gone(app):
    """The write is not part of the response time (V6.3.8): unknown and known names answer alike."""
    before = stored_bytes(app)
    response = AuthActions(browser(app)).login("alice", WRONG)
    assert response.status_code == 200
    assert stored_bytes(app) == before  # answered, nothing written yet
    response.close()  # what the server does once the last byte is sent
    assert record(app)["events"][-1]["k"] == "login_failure"


@pytest.mark.text_database  # the bound on the file; the record's bound is checked on both
def test_a_flood_of_failed_logins_never_grows_the_record_or_the_file_past_a_bound(app):
    guesser = browser(app, SAFARI, "203.0.113.7")
    data_file = Path(app.config["DATA_DIR"]) / "users.jsonl"
    sizes = []
    for i in range(3 * TextStore.compact_min_dead):
        guesser.environ_base["REMOTE_ADDR"] = f"203.0.113.{i % 250}"
        failed_login(guesser)
        sizes.append(data_file.stat().st_size)
    rec = record(app)
    assert len(rec["events"]) == events.MAX_EVENTS
    assert all(e["k"] == "login_failure" for e in rec["events"])
    assert rec["failed_logins"]["n"] == 3 * TextStore.compact_min_dead
    # Each superseded line is reclaimed by compaction: the file never holds
    # more than the dead-line allowance of full-size records, plus the reserve.
    longest = max(len(line) for line in record_lines(data_file)) + 1
    bound = (TextStore.compact_min_dead + 3) * longest + 2 * TextStore.reserve
    assert max(sizes) <= bound
    assert len(json.dumps(rec)) < 8 * 1024


def test_sign_in_shows_the_failed_attempts_since_the_last_visit(app, monkeypatch):
    clock = Clock(1_800_000_000 - 1_800_000_000 % 86400 + 14 * 3600 + 2 * 60)  # 14:02 UTC
    monkeypatch.setattr(time, "time", clock)
    logged_in(app)
    for ip in ("192.0.2.1", "192.0.2.2", "203.0.113.7"):
        failed_login(browser(app, SAFARI, ip))
    client = browser(app)
    response = AuthActions(client).login()
    html = client.get(response.headers["Location"]).get_data(as_text=True)
    assert (
        "3 failed sign-in attempts since your last visit, the last from 203.0.113.7 at 14:02 UTC."
    ) in html
    assert 'href="/security#recent-activity"' in html
    # Said once: the next sign-in has nothing to report.
    again = browser(app)
    response = AuthActions(again).login()
    assert "failed sign-in" not in again.get(response.headers["Location"]).get_data(as_text=True)
    assert "failed_logins" not in record(app)


def test_no_notice_when_nobody_failed(app):
    client = browser(app)
    response = AuthActions(client).login()
    assert "failed sign-in" not in client.get(response.headers["Location"]).get_data(as_text=True)


def test_event_details_are_bounded_and_unknown_kinds_still_shown():
    rec: dict = {}
    events.record(rec, "x" * 500, ip="not an ip", now=5, **{f"d{i}": "y" * 500 for i in range(9)})
    (entry,) = rec["events"]
    assert len(entry["k"]) == events.MAX_DETAIL and entry["ip"] is None
    assert len(entry) == 3 + events.MAX_DETAILS
    assert all(len(str(v)) <= events.MAX_DETAIL for v in entry.values())
    assert events.recent(rec)[0]["what"].startswith("X")


NOON = 1_800_000_000 - 1_800_000_000 % 86400 + 12 * 3600  # 15 January 2027, 12:00 UTC


@pytest.mark.parametrize(
    ("at", "said"),
    [
        (NOON, "15 January 2027, 12:00 UTC"),
        (NOON + 59, "15 January 2027, 12:00 UTC"),
        (NOON + 12 * 3600 - 1, "15 January 2027, 23:59 UTC"),
        (0, "01 January 1970, 00:00 UTC"),
        (None, "an unknown time"),
        (float(NOON), "an unknown time"),
        (str(NOON), "an unknown time"),
    ],
)
def test_a_time_is_said_as_day_month_year_and_utc_clock(at, said):
    assert events.when(at) == said


def test_each_event_is_worded_for_its_owner_newest_first():
    rec: dict = {}
    written = [
        ("login_success", {"method": "password"}),
        ("login_success", {"method": "totp"}),
        ("login_success", {"method": "passkey"}),
        ("login_success", {"method": "smartcard"}),  # a method this page has no words for
        ("login_failure", {}),
        ("two_factor_failure", {}),
        ("session_ended", {"device": "Mobile Safari 17 on iOS"}),
        ("session_ended", {"device": None}),  # a session stored before devices were kept
        ("sessions_ended_others", {"count": 2}),
        ("sessions_ended_others", {}),
        ("recovery_code_used", {}),
        ("some_new_kind", {}),
    ]
    for i, (kind, details) in enumerate(written):
        events.record(rec, kind, ip=f"192.0.2.{i}", now=NOON + 60 * i, **details)
    rec["events"].insert(5, "not an event")  # skipped, and the older ones still listed
    shown = [(row["what"], row["when"], row["ip"], row["failure"]) for row in events.recent(rec)]
    assert shown == [
        ("Some new kind", "15 January 2027, 12:11 UTC", "192.0.2.11", False),
        ("Recovery code used", "15 January 2027, 12:10 UTC", "192.0.2.10", False),
        ("Logged out everywhere else", "15 January 2027, 12:09 UTC", "192.0.2.9", False),
        ("Logged out everywhere else (2 ended)", "15 January 2027, 12:08 UTC", "192.0.2.8", False),
        ("Session ended from the security page", "15 January 2027, 12:07 UTC", "192.0.2.7", False),
        (
            "Session ended from the security page (Mobile Safari 17 on iOS)",
            "15 January 2027, 12:06 UTC",
            "192.0.2.6",
            False,
        ),
        ("Failed sign-in: wrong second-step code", "15 January 2027, 12:05 UTC", "192.0.2.5", True),
        ("Failed sign-in: wrong password", "15 January 2027, 12:04 UTC", "192.0.2.4", True),
        ("Signed in", "15 January 2027, 12:03 UTC", "192.0.2.3", False),
        ("Signed in with a passkey", "15 January 2027, 12:02 UTC", "192.0.2.2", False),
        (
            "Signed in with your password and authenticator app",
            "15 January 2027, 12:01 UTC",
            "192.0.2.1",
            False,
        ),
        ("Signed in with your password", "15 January 2027, 12:00 UTC", "192.0.2.0", False),
    ]


@pytest.mark.parametrize("stored", [None, "not a list", 5, {"k": "login_success"}])
def test_a_record_whose_event_list_is_not_a_list_shows_none_and_starts_a_new_one(stored):
    rec: dict = {"events": stored}
    assert events.recent(rec) == []
    events.record(rec, "password_changed", ip=None, now=NOON)
    assert [row["what"] for row in events.recent(rec)] == ["Password changed"]


def test_the_list_keeps_the_twenty_newest_events():
    rec: dict = {}
    for i in range(events.MAX_EVENTS + 5):
        events.record(rec, f"event_{i}", ip=None, now=NOON + i)
    assert len(rec["events"]) == events.MAX_EVENTS == 20
    assert [row["what"] for row in events.recent(rec)] == [f"Event {i}" for i in range(24, 4, -1)]


def test_an_event_records_when_and_from_where(app, clock):
    rec: dict = {}
    with app.test_request_context(environ_base={"REMOTE_ADDR": "203.0.113.7"}):
        events.record(rec, "password_changed")
        events.record(rec, "email_changed", now=NOON)
    events.record(rec, "two_factor_reset")  # an operator's command: no request, no address
    assert rec["events"] == [
        {"k": "password_changed", "t": int(clock.now), "ip": "203.0.113.7"},
        {"k": "email_changed", "t": NOON, "ip": "203.0.113.7"},
        {"k": "two_factor_reset", "t": int(clock.now), "ip": None},
    ]


def test_failures_are_counted_until_a_sign_in_and_a_second_step_failure_is_remembered():
    rec: dict = {}
    events.record(rec, "login_failure", ip="192.0.2.1", now=NOON)
    events.record(rec, "login_failure", ip="192.0.2.2", now=NOON + 1)
    assert rec["failed_logins"] == {"n": 2, "t": NOON + 1, "ip": "192.0.2.2", "tf": False}
    events.record(rec, "two_factor_failure", ip="192.0.2.3", now=NOON + 2)
    events.record(rec, "login_failure", ip="192.0.2.4", now=NOON + 3)
    # The wrong code came from someone who knew the password: a later wrong password keeps that.
    failed = {"n": 4, "t": NOON + 3, "ip": "192.0.2.4", "tf": True}
    assert rec["failed_logins"] == failed
    events.record(rec, "password_changed", ip=None, now=NOON + 4)  # not a failure
    assert rec["failed_logins"] == failed
    assert events.login_succeeded(rec, "totp") == failed
    assert "failed_logins" not in rec
    assert rec["events"][-1]["k"] == "login_success" and rec["events"][-1]["method"] == "totp"
    assert events.login_succeeded(rec, "password") is None  # said once


NOTICE_LINK = ' <a href="/security#recent-activity">See recent activity</a>'


@pytest.mark.parametrize(
    ("failed", "said"),
    [
        (
            {"n": 1, "t": NOON + 2 * 60, "ip": "192.0.2.1", "tf": False},
            "1 failed sign-in attempt since your last visit, the last from 192.0.2.1 at 12:02 UTC.",
        ),
        (
            {"n": 2, "t": None, "ip": None, "tf": True},
            "2 failed sign-in attempts since your last visit, the last from an unknown address"
            " at an unknown time. At least one got past your password: if that was not you,"
            " change your password now.",
        ),
        (
            {"n": 3, "t": "noon", "ip": "<b>x</b>", "tf": False},  # quoted text is escaped
            "3 failed sign-in attempts since your last visit, the last from &lt;b&gt;x&lt;/b&gt;"
            " at an unknown time.",
        ),
    ],
)
def test_the_sign_in_notice_counts_the_failures_and_says_when_from_where(app, failed, said):
    with app.test_request_context():
        assert str(events.failure_notice(failed)) == said + NOTICE_LINK


def test_a_wrong_second_step_code_is_listed_and_told_at_the_next_sign_in(
    tmp_path, monkeypatch, clock
):
    from test_two_factor import enrol, login_with_code, second_step, two_factor_app

    app = two_factor_app(tmp_path, monkeypatch)
    owner = browser(app, FIREFOX, "198.51.100.7")
    AuthActions(owner).register()
    AuthActions(owner).login()
    secret, _ = enrol(owner, clock)
    AuthActions(owner).logout()
    clock.next_step()
    thief = browser(app, SAFARI, "203.0.113.7")  # knows the password, not the code
    assert AuthActions(thief).login().headers["Location"] == "/login/two-factor"
    assert second_step(thief, "000000").status_code == 422
    clock.next_step()
    response = login_with_code(owner, mfa.code_at(secret, clock.step))
    html = owner.get(response.headers["Location"]).get_data(as_text=True)
    assert (
        "1 failed sign-in attempt since your last visit, the last from 203.0.113.7 at 08:00 UTC."
        " At least one got past your password: if that was not you, change your password now."
    ) in html
    page = owner.get("/security").get_data(as_text=True)
    assert re.search(
        r'<li class="event event-failure">Failed sign-in: wrong second-step code · '
        r"15 January 2027, 08:00 UTC · IP address 203\.0\.113\.7</li>",
        page,
    )


def test_a_failed_login_is_listed_at_the_time_it_was_made_not_written(app, clock):
    response = AuthActions(browser(app, SAFARI, "203.0.113.7")).login("alice", WRONG)
    attempted = int(clock.now)
    clock.advance(90)  # a slow client: the response is closed (and the event written) later
    response.close()
    assert record(app)["events"][-1] == {"k": "login_failure", "t": attempted, "ip": "203.0.113.7"}


def test_an_event_written_after_the_response_keeps_its_details(app, clock):
    with app.test_request_context(environ_base={"REMOTE_ADDR": "203.0.113.7"}):
        events.record_after_response("alice", "passkey_renamed", name="Work laptop")
        response = app.process_response(app.response_class("done"))
    assert record(app).get("events") is None  # nothing before the response is closed
    response.close()
    assert record(app)["events"][-1] == {
        "k": "passkey_renamed",
        "t": int(clock.now),
        "ip": "203.0.113.7",
        "name": "Work laptop",
    }


def test_an_event_written_on_its_own_goes_to_that_user_or_nowhere(app, clock):
    with app.test_request_context(environ_base={"REMOTE_ADDR": "203.0.113.7"}):
        events.record_now("alice", "passkey_renamed", name="Work laptop")
        before = stored_bytes(app)
        events.record_now("nobody", "passkey_renamed")  # no such user: nothing, no error
        assert stored_bytes(app) == before
    assert record(app)["events"][-1] == {
        "k": "passkey_renamed",
        "t": int(clock.now),
        "ip": "203.0.113.7",
        "name": "Work laptop",
    }


def _full_disk(app, monkeypatch):
    """A data file with no reserved space left, on a disk with no room to grow it."""
    monkeypatch.setattr(TextStore, "reserve", 0)
    app.extensions["secure_app.store"].compact()
    data_file = Path(app.config["DATA_DIR"]) / "users.jsonl"
    return file_size_limit(data_file.stat().st_size)


@pytest.mark.text_database  # the fault is the data file's size limit
def test_an_event_that_cannot_be_written_is_logged_and_only_the_event_is_lost(
    app, monkeypatch, caplog
):
    logged_in(app)  # alice has events: the record line below would be longer than there is room
    client = browser(app)
    token = csrf_token(client, "/login")
    with _full_disk(app, monkeypatch):
        before = stored_bytes(app)
        response = client.post(
            "/login", data={"username": "alice", "password": WRONG, "csrf_token": token}
        )
        assert response.status_code == 200  # the same answer as with room on the disk
        response.close()
        with app.test_request_context():
            events.record_now("alice", "two_factor_failure")
    assert stored_bytes(app) == before
    failures = [r for r in caplog.records if r.name == "secure_app.events"]
    assert [(r.levelname, r.getMessage()) for r in failures] == [
        ("ERROR", "could not record login_failure for a user"),
        ("ERROR", "could not record two_factor_failure for a user"),
    ]
    assert all(r.exc_info for r in failures)  # with the store's error, for the operator


def test_the_event_list_shows_stored_text_escaped(app):
    client = logged_in(app)

    def planted(r):
        r["events"] = [{"k": "session_ended", "t": NOON, "ip": None, "device": "<b>x</b>"}]

    with app.app_context():
        get_store().update("alice", planted)
    page = client.get("/security").get_data(as_text=True)
    assert "(&lt;b&gt;x&lt;/b&gt;)" in page and "<b>x</b>" not in page


# -- two gunicorn workers sharing one store ----------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(redis_server_path() is None, reason="redis-server is not installed")
def test_a_session_ended_in_one_worker_is_dead_in_every_worker(tmp_path):
    with (
        Redis(tmp_path / "redis") as redis,
        Gunicorn(
            tmp_path / "app",
            env={"FLASK_RATELIMIT_STORAGE_URI": redis.uri},
            workers=2,
            args=["--threads", "1"],
        ) as server,
    ):
        url = server.url
        laptop, cli = requests.Session(), requests.Session()
        laptop.headers["User-Agent"] = FIREFOX

        def form_token(s: requests.Session, path: str) -> str:
            html = s.get(url + path).text
            return re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', html)[1]

        data = {"username": "alice", "password": PASSWORD, "confirm": PASSWORD}
        laptop.post(url + "/register", data={**data, "csrf_token": form_token(laptop, "/register")})
        for s in (laptop, cli):
            login = {"username": "alice", "password": PASSWORD}
            s.post(url + "/login", data={**login, "csrf_token": form_token(s, "/login")})
        # Several requests, so both workers have served (and cached) the CLI's session.
        assert all(
            cli.get(url + "/account-details").url.endswith("/account-details") for _ in range(6)
        )
        page = laptop.get(url + "/security").text
        assert "Python Requests" in page
        (target,) = ID_RE.findall(page)
        token = form_token(laptop, "/security")
        ended = laptop.post(
            url + "/security/sessions/end", data={"csrf_token": token, "session_id": target}
        )
        assert "has ended" in ended.text
        # Each try with the ended cookie, as a copy would present it, to whichever worker.
        for _ in range(6):
            copy = requests.Session()
            copy.cookies.update(cli.cookies)
            answer = copy.get(url + "/account-details")
            assert answer.url.startswith(url + "/login") and SESSION_ENDED in answer.text
        assert laptop.get(url + "/account-details").url.endswith("/account-details")
        assert "Traceback" not in server.output()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "in the last 5 minutes"),
        (sessions.ACTIVE_REFRESH - 1, "in the last 5 minutes"),
        (sessions.ACTIVE_REFRESH, "about 5 minutes ago"),
        (3599, "about 59 minutes ago"),
        (3600, "about 1 hour ago"),
        (7199, "about 1 hour ago"),
        (7200, "about 2 hours ago"),
        (26 * 3600, "about 26 hours ago"),
    ],
)
def test_last_activity_is_said_no_finer_than_the_record_knows_it(seconds: int, text: str) -> None:
    assert _ago(seconds) == text


def test_each_session_says_when_it_started_and_was_last_active(app, clock):
    started = int(clock.now)
    client = logged_in(app)
    clock.advance(120)
    page = client.get("/security").get_data(as_text=True)
    shown = re.findall(r"signed in ([^<]+?) · last active ([^<]+?)</p>", page)
    assert started == 1_800_000_010
    assert shown == [("15 January 2027, 08:00 UTC", "in the last 5 minutes")]


# -- what ending a session says, and writes to the audit trail ----------------------------

audit_events = test_two_factor.audit_events  # the fixture, shared


def test_ending_a_session_says_so_as_a_success_and_audits_who_ended_it(app, audit_events):
    laptop = logged_in(app, FIREFOX)
    logged_in(app, SAFARI, "203.0.113.9")
    (target,) = shown_ids(laptop)
    assert end(laptop, target).headers["Location"] == "/security"
    said = "The session on Mobile Safari 17 on iOS has ended: it must sign in again."
    assert flashes(laptop, "/security") == [("flash-success", said)]
    ended = [e for e in audit_events() if e["event"].startswith("session_end")]
    assert [(e["event"], e["username"]) for e in ended] == [("session_ended", "alice")]


def test_a_refused_end_is_an_error_and_audited_as_refused(app, audit_events):
    here = logged_in(app)
    logged_in(app, SAFARI)
    response = end(here, "0" * 32)
    assert response.status_code == 303 and response.headers["Location"] == "/security"
    assert flashes(here, "/security") == [("flash-error", NOT_FOUND)]
    ended = [e for e in audit_events() if e["event"].startswith("session_end")]
    assert [(e["event"], e["username"]) for e in ended] == [("session_end_refused", "alice")]


def test_ending_the_current_session_is_an_error_that_goes_back_to_the_page(app, audit_events):
    here = logged_in(app)
    with here.session_transaction() as cookie:
        mine = sessions.public_id_of(cookie["sid"])
    response = end(here, mine)
    assert response.status_code == 303 and response.headers["Location"] == "/security"
    assert flashes(here, "/security") == [("flash-error", IS_CURRENT)]
    assert not [e for e in audit_events() if e["event"].startswith("session_end")]
