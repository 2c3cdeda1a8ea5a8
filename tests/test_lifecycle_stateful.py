"""One state machine over the whole account lifecycle, through the real handlers, against a model.

Three browsers (test clients) act for two usernames in any order: register, log in with the
right or a wrong password, log out, change the password, log out everywhere else, end another
session from the security page, delete the account, save details, upload and remove a photo,
verify an address and reset the password by email, enrol TOTP and finish a login with a code or
a recovery code, re-authenticate, rotate the secret key (and restart) or the TOTP key, and let a
fake clock run past the idle and absolute session timeouts. The model is a few dataclasses.

After every step: each browser is logged in exactly as the model says (and the page names that
user), every stored field is the model's, and the photo folder holds exactly one file per user
with a photo. Every response, inside helpers too, must be below 500 (``WatchedClient``).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flask import Flask
from flask.testing import FlaskClient
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from itsdangerous import BadSignature
from test_recovery import NEW_PASSWORD, body, link_of, outbox, path_of
from test_two_factor import CODES_RE, ENROLMENT_RE, SECRET_RE, post, second_step

from helpers import (
    CSRF_RE,
    OTHER_PASSWORD,
    PASSWORD,
    AuthActions,
    Clock,
    close_apps,
    csrf_token,
    environ,
    fake_time,
    make_app,
    photo_names,
)
from images import jpeg, png
from secure_app import mail, mfa, passwords, sessions, two_factor
from secure_app.security import limiter


def photo_files(app: Flask) -> set[str]:
    """Every photo the app keeps: files in ``PHOTO_DIR``, or rows on PostgreSQL."""
    return set(photo_names(app))


USERS = ("alice", "bob")
BROWSERS = ("A", "B", "C")
POOL = (PASSWORD, OTHER_PASSWORD, NEW_PASSWORD, "mossy anchor tumbles past violet dunes")
IDLE = 600
LIFETIME = 1000
REAUTH_WINDOW = 300
RESET_TIMEOUT = 900
SHARED = "shared@example.org"  # an address more than one account may verify
VERIFY_TIMEOUT = 86400
# ``seen`` in the cookie is refreshed only when it is this old (sessions.seen_refresh), so a
# session idle for between SAFE_IDLE and IDLE seconds may or may not have ended: the clock
# never moves by such an amount in one go (the invariant's requests keep ``seen`` recent).
SAFE_IDLE = IDLE - sessions.seen_refresh(IDLE) - 1
CONFIG = {
    "SESSION_IDLE_TIMEOUT": IDLE,
    "PERMANENT_SESSION_LIFETIME": LIFETIME,
    "REAUTH_WINDOW": REAUTH_WINDOW,
    "PASSWORD_RESET_TIMEOUT": RESET_TIMEOUT,
    "EMAIL_VERIFY_TIMEOUT": VERIFY_TIMEOUT,
    # Out of reach: sessions that idled out stay in the record until their lifetime ends, and
    # which one the cap evicts is test_security_page.py's question, not this model's.
    "MAX_SESSIONS_PER_USER": 1000,
    # Limits on, so that every limiter decorator and key function runs on every request, but
    # far above what one run sends: the model is about accounts, and a 429 after the fifth
    # wrong password would need a model of every window (test_rate_limits.py covers them).
    "RATELIMIT_ENABLED": True,
    **{
        key: "10000 per minute"
        for key in (
            "LOGIN_RATE_LIMIT_IP",
            "LOGIN_RATE_LIMIT_USER",
            "REGISTER_RATE_LIMIT_IP",
            "CHANGE_PASSWORD_RATE_LIMIT_USER",
            "UPLOAD_RATE_LIMIT_USER",
            "EMAIL_CHANGE_RATE_LIMIT_USER",
            "FORGOT_PASSWORD_RATE_LIMIT_IP",
            "FORGOT_PASSWORD_RATE_LIMIT_EMAIL",
        )
    },
}
DETAILS = ("full_name", "phone", "bio")
# (value, valid): the invalid ones must be refused with nothing stored.
FULL_NAMES = [("", True), ("Ada Lovelace", True), ("Zoë Ørsted-Ngũgĩ", True), ("x" * 101, False)]
PHONES = [("", True), ("+41 44 123 45 67", True), ("(555) 010-9999", True), ("call me", False)]
BIOS = [
    ("", True),
    ("Line one\nline two", True),
    ("<script>alert('x')</script> & \"quotes\"", True),
    ("b" * 1001, False),
]
PHOTOS = {"png": png, "jpeg": jpeg, "junk": lambda: b"GIF89a not really an image"}

browsers = st.sampled_from(BROWSERS)
users = st.sampled_from(USERS)


class WatchedClient(FlaskClient):
    """A test client that fails on any 5xx and tells the machine about every response."""

    after: Callable[[], None] | None = None

    def open(self, *args, **kwargs):
        response = super().open(*args, **kwargs)
        assert response.status_code < 500, (args[:1], response.status_code)
        if self.after is not None:
            self.after()
        return response


@dataclass
class User:
    """What the model knows about one account."""

    password: str
    details: dict[str, str] = field(default_factory=lambda: dict.fromkeys(DETAILS, ""))
    email: str = ""
    verified: str | None = None
    verify_link: tuple[str, int, str] | None = None  # (token, expires, address)
    reset_link: tuple[str, int, str] | None = None  # (token, expires, address it went to)
    secret: str | None = None
    last_step: int = -1
    codes: set[str] = field(default_factory=set)  # unused recovery codes, normalised
    photo: bool = False
    pending: int | None = None  # the one pending login (its nonce) that may finish


@dataclass
class Browser:
    """What the model knows about one browser."""

    user: str | None = None  # logged in as
    started: int = 0  # when its session began (the absolute timeout counts from it)
    auth_at: int = 0  # when it last authenticated (re-authentication window)
    pending: tuple[str, int, int] | None = None  # (user, since, nonce): password done, code next


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.undo = contextlib.ExitStack()
        try:
            self.tmp = Path(
                self.undo.enter_context(
                    tempfile.TemporaryDirectory(
                        prefix="lifecycle-machine-", ignore_cleanup_errors=True
                    )
                )
            )
            self.clock = self.undo.enter_context(fake_time(Clock()))
            # The secret key comes from the instance folder, as in production, so that
            # rotate-secret-key has a key file to rotate and a restart reads it.
            instance = str(self.tmp / "instance")
            self.undo.enter_context(environ(FLASK_INSTANCE_PATH=instance, FLASK_SECRET_KEY=None))
            self.generation = 0  # how many times the secret key was rotated
            self.cookie = dict.fromkeys(BROWSERS)  # each browser's session cookie, as last seen
            self.signed_in = dict.fromkeys(BROWSERS, 0)  # the generation that signed it
            self.app = self.start_app()
            self.clients = {name: self.new_client(name) for name in BROWSERS}
        except BaseException:
            self.undo.close()
            raise
        self.users: dict[str, User] = {}
        self.browsers = {name: Browser() for name in BROWSERS}
        self.mail_read = 0
        self.links: list[tuple[str, str, str]] = []  # every (kind, user, token) mailed
        self.spent: list[str] = []  # codes used or replaced, to try again
        self.nonces = itertools.count()

    def teardown(self) -> None:
        mail.flush(10, self.app)  # nothing left writing into the folder removed next
        self.undo.close()
        close_apps()

    # -- the app, its restart and the browsers ------------------------------------------------

    def start_app(self) -> Flask:
        """Build the app from its folders and key files, as a (re)start of the server does."""
        app = make_app(self.tmp, SECRET_KEY=None, **CONFIG)
        app.test_client_class = WatchedClient
        with app.app_context():
            limiter.reset()  # one limiter per process: no counts from an earlier run
        return app

    def new_client(self, name: str) -> WatchedClient:
        client = self.app.test_client()
        if self.cookie[name] is not None:
            client.set_cookie("session", self.cookie[name])
        client.after = lambda: self.note_cookie(name, client)
        return client

    def note_cookie(self, name: str, client: WatchedClient) -> None:
        """A new cookie value means the app (re)signed it, with the key current now."""
        cookie = client.get_cookie("session")
        value = cookie.value if cookie is not None else None
        if value != self.cookie[name]:
            self.cookie[name] = value
            self.signed_in[name] = self.generation

    def sid(self, name: str) -> str | None:
        """The session id in a browser's cookie, read without sending or re-signing anything."""
        if self.cookie[name] is None:
            return None
        serializer = self.app.session_interface.get_signing_serializer(self.app)
        try:
            return serializer.loads(self.cookie[name]).get("sid")
        except BadSignature:
            return None

    # -- helpers ----------------------------------------------------------------------------

    def now(self) -> int:
        return int(self.clock.now)

    def advance(self, seconds: int) -> None:
        """Move the clock; sessions past the idle or the absolute timeout end in the model."""
        assert not SAFE_IDLE < seconds <= IDLE, "the model cannot tell whether that idled out"
        self.clock.advance(seconds)
        for name, b in self.browsers.items():
            if b.user and (seconds > IDLE or self.now() - b.started > LIFETIME):
                event("a session timed out")
                b.user = None
                # Its next page view says so and sends it to log in again; the rule that
                # moved the clock may go on to use this browser's forms.
                self.assert_login_required(self.clients[name].get("/second"))

    def user_of(self, name: str) -> User | None:
        b = self.browsers[name]
        return self.users.get(b.user) if b.user else None

    def fresh(self, name: str) -> bool:
        b = self.browsers[name]
        return b.user is not None and 0 <= self.now() - b.auth_at <= REAUTH_WINDOW

    def start_session(self, name: str, user: str) -> None:
        """Model a new session in this browser (login, second step, re-authentication)."""
        self.browsers[name] = Browser(user=user, started=self.now(), auth_at=self.now())

    def end_sessions(self, user: str, keep: str | None = None) -> None:
        """Every browser of ``user`` but ``keep`` is logged out."""
        for name, b in self.browsers.items():
            if b.user == user and name != keep:
                b.user = None

    def new_mail(self, subject: str) -> list:
        """The messages with ``subject`` written since the last look (other mail is notices)."""
        messages = outbox(self.app)
        fresh, self.mail_read = messages[self.mail_read :], len(messages)
        return [m for m in fresh if m["Subject"] == subject]

    def address(self, user: str, which: str) -> str:
        return {"own": f"{user}@example.org", "shared": SHARED, "none": ""}[which]

    def verdict(self, u: User | None, code: str) -> str | None:
        """The model's verdict on a code for user ``u``: "totp", "recovery" or None."""
        if u is None or u.secret is None:
            return None
        if code == mfa.code_at(u.secret, self.clock.step):
            return "totp" if self.clock.step > u.last_step else None
        return "recovery" if code.replace("-", "").upper() in u.codes else None

    def use(self, u: User, code: str, verdict: str) -> None:
        if verdict == "totp":
            u.last_step = self.clock.step
        else:
            u.codes.discard(code.replace("-", "").upper())
        self.spent.append(code)

    def pick_code(self, data: st.DataObject, u: User | None) -> str:
        kinds = ["totp", "totp", "recovery", "recovery", "last totp", "spent", "junk"]
        kind = data.draw(st.sampled_from(kinds))
        if kind == "totp" and u is not None and u.secret:
            return mfa.code_at(u.secret, self.clock.step)
        if kind == "last totp" and u is not None and u.secret:
            return mfa.code_at(u.secret, u.last_step)  # a replay, in its own step or later
        if kind == "recovery" and u is not None and u.codes:
            code = data.draw(st.sampled_from(sorted(u.codes)))
            return data.draw(
                st.sampled_from([code, code.lower(), "-".join(re.findall("....", code))])
            )
        if kind == "spent" and self.spent:
            return data.draw(st.sampled_from(self.spent))
        return "000000"

    def send_details(self, name: str, **extra: object):
        """POST the account form with the model's details and address, plus ``extra``."""
        u = self.user_of(name)
        fields = {**u.details, "email": u.email} if u else {"full_name": "x"}
        client = self.clients[name]
        data = {**fields, **extra, "csrf_token": csrf_token(client, "/login")}
        return client.post("/account-details", data=data, content_type="multipart/form-data")

    def assert_login_required(self, response) -> None:
        assert response.status_code == 302, response.status_code
        assert response.headers["Location"].startswith("/login"), response.headers["Location"]

    def assert_reauth(self, response) -> None:
        assert response.status_code == 303, response.status_code
        assert response.headers["Location"].startswith("/reauthenticate")

    def guarded(self, name: str, response, *, fresh: bool = False) -> bool:
        """Check the refusal a browser gets when it is not logged in (or not fresh enough).

        Returns True when the browser may act, so the caller checks the outcome.
        """
        if self.browsers[name].user is None:
            self.assert_login_required(response)
            return False
        if fresh and not self.fresh(name):
            self.assert_reauth(response)
            event("sent to re-authenticate")
            return False
        return True

    # -- setting up ---------------------------------------------------------------------------

    @initialize(totp=st.booleans())
    def two_users_and_alice_verified(self, totp: bool) -> None:
        """alice logged in on A with a verified address (half the runs with TOTP), bob registered.

        So that resets by email, photo replacements and second steps happen from the first step.
        """
        for user in USERS:
            self.register("C", user, PASSWORD)
        self.log_in("A", "alice", right=True, then_code=False)
        self.set_email("A", "own")
        [(_, user, token)] = [link for link in self.links if link[0] == "verify"]
        self.verify_email_as("B", user, token)
        self.upload_photo("A", "png")  # so that any upload of alice's replaces a photo
        if totp:
            self.enrol_totp("A")

    # -- accounts -----------------------------------------------------------------------------

    @rule(name=browsers, user=users, password=st.sampled_from(POOL))
    def register(self, name: str, user: str, password: str) -> None:
        response = AuthActions(self.clients[name]).register(user, password)
        if user in self.users:
            assert response.status_code == 422  # taken
            return
        assert response.status_code == 302
        self.users[user] = User(password=password)

    @rule(
        name=browsers,
        user=users,
        right=st.sampled_from([True, True, False]),
        then_code=st.booleans(),
        data=st.data(),
    )
    def log_in(
        self, name: str, user: str, right: bool, then_code: bool, data: st.DataObject | None = None
    ) -> None:
        """Log in; with ``then_code``, send a code right after a correct password (TOTP on)."""
        u = self.users.get(user)
        if right and u is not None:
            password = u.password
        else:
            password = next(p for p in POOL if u is None or p != u.password)
        response = AuthActions(self.clients[name]).login(user, password)
        if u is None or not right:
            assert response.status_code == 200  # the form again; nothing changes
            return
        assert response.status_code == 302
        if u.secret:
            assert response.headers["Location"] == "/login/two-factor"
            nonce = next(self.nonces)
            self.browsers[name] = Browser(pending=(user, self.now(), nonce))
            u.pending = nonce  # a newer password login replaces any other one pending
            if then_code and data is not None:
                self.send_code(name, self.pick_code(data, u))
        else:
            assert response.headers["Location"] == "/account-details"
            self.start_session(name, user)

    @rule(name=browsers, data=st.data(), next_step=st.sampled_from([False, True]))
    def second_step(self, name: str, data: st.DataObject, next_step: bool) -> None:
        if next_step:
            self.next_step()
        pending = self.browsers[name].pending
        self.send_code(name, self.pick_code(data, self.users.get(pending[0]) if pending else None))

    def next_step(self) -> None:
        """Move to 1 s into the next 30-second step: one whose TOTP code is not spent yet."""
        self.advance(mfa.STEP - self.now() % mfa.STEP + 1)

    def send_code(self, name: str, code: str) -> None:
        """The second step of a login, with ``code``."""
        b = self.browsers[name]
        response = second_step(self.clients[name], code)
        if b.pending is None:
            assert response.status_code == 303  # nothing to finish: back to the login page
            return
        user, since, nonce = b.pending
        u = self.users.get(user)
        if (
            u is None
            or u.secret is None
            or u.pending != nonce
            or self.now() - since > two_factor.PENDING_TTL
        ):
            assert response.status_code == 303, response.status_code
            event("second step: the pending login is gone")
            b.pending = None
            return
        verdict = self.verdict(u, code)
        if verdict is None:
            assert response.status_code == 422, code
            return
        assert response.status_code == 302, (code, response.status_code)
        event(f"second step: logged in with {verdict}")
        self.use(u, code, verdict)
        u.pending = None
        self.start_session(name, user)

    @rule()
    def every_browser_signs_in(self) -> None:
        """Each browser not logged in signs in, with its second step: a busy site in one step.

        Hypothesis draws the first rule (no arguments, first by name) most often: this one
        keeps sessions alive to act on, after rotations, resets and deletions.
        """
        for name, user in zip(BROWSERS, ("alice", "bob", "alice"), strict=True):
            if self.browsers[name].user is None and user in self.users:
                self.log_in(name, user, right=True, then_code=False)
                u = self.users[user]
                if self.browsers[name].pending and u.secret:
                    # This step's code is spent: it must be refused again; then a recovery
                    # code, or wait for the next step.
                    if self.clock.step <= u.last_step:
                        self.send_code(name, mfa.code_at(u.secret, u.last_step))
                    if self.clock.step <= u.last_step and u.codes:
                        self.send_code(name, min(u.codes))
                        continue
                    if self.clock.step <= u.last_step:
                        self.next_step()
                    self.send_code(name, mfa.code_at(u.secret, self.clock.step))

    @rule(name=browsers)
    def log_out(self, name: str) -> None:
        response = post(self.clients[name], "/logout", token_from="/login")
        assert response.status_code == 302
        self.browsers[name] = Browser()

    @rule(name=browsers, right=st.sampled_from([True, True, False]), new=st.sampled_from(POOL))
    def change_password(self, name: str, right: bool, new: str) -> None:
        u = self.user_of(name)
        current = u.password if u and right else "not the password at all, sorry"
        data = {"current_password": current, "new_password": new, "confirm": new}
        response = post(self.clients[name], "/change-password", data, "/login")
        if not self.guarded(name, response):
            return
        if not right:
            assert response.status_code == 422
            return
        assert response.status_code == 302
        user = self.browsers[name].user
        u.password, u.pending, u.reset_link = new, None, None
        self.end_sessions(user, keep=name)
        self.browsers[name].started = self.now()  # a new session id, started now

    @rule(name=browsers)
    def log_out_others(self, name: str) -> None:
        response = post(self.clients[name], "/logout-others", token_from="/login")
        if not self.guarded(name, response, fresh=True):
            return
        assert response.status_code == 302
        assert response.headers["Location"] == "/security"
        user = self.browsers[name].user
        if any(b.user == user for other, b in self.browsers.items() if other != name):
            event("logged out another browser")
        self.end_sessions(user, keep=name)

    @rule(name=browsers, whose=st.sampled_from(["same user", "any"]), other=browsers)
    def end_session(self, name: str, whose: str, other: str) -> None:
        """End another browser's session; "same user" picks one of this user's, if any."""
        user = self.browsers[name].user
        mine = [n for n, b in self.browsers.items() if n != name and user and b.user == user]
        target = mine[0] if whose == "same user" and mine else other
        client = self.clients[name]
        sid = self.sid(target)
        shown = sessions.public_id_of(sid) if sid else "f" * 32
        page = client.get("/security")
        if page.status_code == 200:
            html = page.get_data(as_text=True)
            if target != name and self.browsers[target].user == user:
                assert shown in html, "a live session is missing from the security page"
            token = next(g for g in CSRF_RE.search(html).groups() if g)
        else:
            token = csrf_token(client, "/login")
        response = client.post(
            "/security/sessions/end", data={"session_id": shown, "csrf_token": token}
        )
        if not self.guarded(name, response, fresh=True):
            return
        assert response.status_code == 303
        assert response.headers["Location"] == "/security"
        if target != name and self.browsers[target].user == user:
            event("ended another session from the security page")
            self.browsers[target].user = None

    @rule(name=browsers, right=st.sampled_from([True, True, False]))
    def delete_account(self, name: str, right: bool) -> None:
        u = self.user_of(name)
        password = u.password if u and right else "not the password at all, sorry"
        response = post(self.clients[name], "/delete-account", {"password": password}, "/login")
        if not self.guarded(name, response):
            return
        if not right:
            assert response.status_code == 303
            assert response.headers["Location"] == "/account-details"
            return
        assert response.status_code == 302
        event("account deleted")
        user = self.browsers[name].user
        del self.users[user]
        self.end_sessions(user)

    # -- details and photo ----------------------------------------------------------------

    @rule(
        name=browsers,
        full_name=st.sampled_from(FULL_NAMES),
        phone=st.sampled_from(PHONES),
        bio=st.sampled_from(BIOS),
    )
    def save_details(self, name: str, full_name, phone, bio) -> None:
        values = {"full_name": full_name[0], "phone": phone[0], "bio": bio[0]}
        response = self.send_details(name, **values)
        if not self.guarded(name, response):
            return
        if not (full_name[1] and phone[1] and bio[1]):
            assert response.status_code == 422
            return
        assert response.status_code == 303
        self.user_of(name).details = values

    @rule(name=browsers, kind=st.sampled_from(sorted(PHOTOS)))
    def upload_photo(self, name: str, kind: str) -> None:
        photo = (io.BytesIO(PHOTOS[kind]()), f"me.{kind}")
        response = self.send_details(name, photo=photo)
        if not self.guarded(name, response):
            return
        if kind == "junk":
            assert response.status_code == 422
            return
        assert response.status_code == 303
        self.user_of(name).photo = True

    @rule(name=browsers)
    def remove_photo(self, name: str) -> None:
        response = post(self.clients[name], "/account-details/remove-photo", token_from="/login")
        if not self.guarded(name, response):
            return
        assert response.status_code == 303
        self.user_of(name).photo = False

    # -- email: verify, forget, reset -------------------------------------------------------

    @rule(name=browsers, which=st.sampled_from(["own", "shared", "none"]))
    def set_email(self, name: str, which: str) -> None:
        user = self.browsers[name].user
        address = self.address(user or "nobody", which)
        u = self.user_of(name)
        changes = u is not None and address != u.email
        response = self.send_details(name, email=address)
        if not self.guarded(name, response, fresh=changes):
            return
        assert response.status_code == 303
        assert response.headers["Location"] == "/account-details"
        if not changes:
            return
        u.email, u.verify_link = address, None
        if not address:
            u.verified = None
        elif address != u.verified:
            [msg] = self.new_mail("Confirm your email address")
            assert msg["To"] == address
            token = path_of(link_of(msg)).rsplit("/", 1)[1]
            u.verify_link = (token, self.now() + VERIFY_TIMEOUT, address)
            self.links.append(("verify", user, token))

    @precondition(lambda self: any(kind == "verify" for kind, _, _ in self.links))
    @rule(name=browsers, data=st.data())
    def verify_email(self, name: str, data: st.DataObject) -> None:
        links = [(user, token) for kind, user, token in self.links if kind == "verify"]
        self.verify_email_as(name, *data.draw(st.sampled_from(links)))

    def verify_email_as(self, name: str, user: str, token: str) -> None:
        client = self.clients[name]
        token_from = csrf_token(client, "/forgot-password")
        response = client.post(f"/verify-email/{token}", data={"csrf_token": token_from})
        u = self.users.get(user)
        link = u.verify_link if u else None
        works = (
            link is not None and link[0] == token and self.now() <= link[1] and u.email == link[2]
        )
        assert response.status_code == (200 if works else 404)
        if works:
            event("address verified")
            u.verified, u.verify_link = link[2], None

    @rule(
        name=browsers,
        address=st.sampled_from(
            ["a verified one", *(f"{u}@example.org" for u in USERS), SHARED, "nobody@example.org"]
        ),
        then_set=st.sampled_from([*POOL, None]),
    )
    def forgot_password(self, name: str, address: str, then_set: str | None) -> None:
        """Ask for a reset link; with ``then_set``, set that password with a link just mailed."""
        if address == "a verified one":
            verified = sorted(u.verified for u in self.users.values() if u.verified)
            address = verified[0] if verified else "nobody@example.org"
        response = post(
            self.clients[name], "/forgot-password", {"email": address}, "/forgot-password"
        )
        assert response.status_code == 200  # the same page, known address or not
        mailed = {}
        for msg in self.new_mail("Reset your password"):
            to = body(msg).split(",", 1)[0].removeprefix("Hello ")
            assert msg["To"] == self.users[to].verified
            mailed[to] = path_of(link_of(msg)).rsplit("/", 1)[1]
        assert set(mailed) == {u for u, m in self.users.items() if m.verified == address}
        for to, token in mailed.items():
            self.users[to].reset_link = (token, self.now() + RESET_TIMEOUT, address)
            self.links.append(("reset", to, token))
        if then_set is not None and mailed:
            self.reset_with(name, *sorted(mailed.items())[0], then_set)

    @precondition(lambda self: any(kind == "reset" for kind, _, _ in self.links))
    @rule(name=browsers, data=st.data(), new=st.sampled_from(POOL))
    def use_reset_link(self, name: str, data: st.DataObject, new: str) -> None:
        links = [(user, token) for kind, user, token in self.links if kind == "reset"]
        self.reset_with(name, *data.draw(st.sampled_from(links)), new)

    def reset_with(self, name: str, user: str, token: str, new: str) -> None:
        response = post(
            self.clients[name],
            f"/reset-password/{token}",
            {"password": new, "confirm": new},
            "/forgot-password",
        )
        u = self.users.get(user)
        link = u.reset_link if u else None
        works = (
            link is not None
            and link[0] == token
            and self.now() <= link[1]
            and link[2] == u.verified
        )
        assert response.status_code == (303 if works else 404)
        if works:
            event("password reset by email")
            u.password, u.pending, u.reset_link = new, None, None
            self.end_sessions(user)  # every device logs in again; the factor stays

    # -- the second factor and re-authentication ------------------------------------------

    @rule(name=browsers)
    def enrol_totp(self, name: str) -> None:
        client = self.clients[name]
        page = client.get("/security/totp")
        if not self.guarded(name, page, fresh=True):
            return
        u = self.user_of(name)
        assert page.status_code == 200
        html = page.get_data(as_text=True)
        if u.secret:
            assert "already on" in html
            return
        secret = SECRET_RE.search(html).group(1).replace(" ", "")
        code = mfa.code_at(secret, self.clock.step)
        data = {
            "code": code,
            "enrolment": ENROLMENT_RE.search(html).group(1),
            "csrf_token": next(g for g in CSRF_RE.search(html).groups() if g),
        }
        response = client.post("/security/totp", data=data)
        assert response.status_code == 200
        event("TOTP enrolled")
        codes = CODES_RE.findall(response.get_data(as_text=True))
        assert len(codes) == mfa.RECOVERY_COUNT
        u.secret, u.last_step = secret, self.clock.step
        u.codes = {c.replace("-", "") for c in codes}
        self.spent.append(code)  # the code that confirmed enrolment is spent

    @rule(name=browsers)
    def disable_totp(self, name: str) -> None:
        response = post(self.clients[name], "/security/totp/disable", token_from="/login")
        if not self.guarded(name, response, fresh=True):
            return
        assert response.status_code == 303
        assert response.headers["Location"] == "/security"
        u = self.user_of(name)
        if u.secret:
            event("TOTP disabled")
            self.spent += sorted(u.codes)[:2]
            u.secret, u.last_step, u.codes = None, -1, set()

    @rule(name=browsers)
    def regenerate_codes(self, name: str) -> None:
        response = post(self.clients[name], "/security/recovery-codes", token_from="/login")
        if not self.guarded(name, response, fresh=True):
            return
        u = self.user_of(name)
        if not u.secret:
            assert response.status_code == 303
            return
        assert response.status_code == 200
        codes = CODES_RE.findall(response.get_data(as_text=True))
        self.spent += sorted(u.codes)[:2]
        u.codes = {c.replace("-", "") for c in codes}

    @rule(
        name=browsers,
        data=st.data(),
        how=st.sampled_from(["password", "code", "wrong password"]),
        next_step=st.sampled_from([False, True]),
    )
    def reauthenticate(self, name: str, data: st.DataObject, how: str, next_step: bool) -> None:
        if next_step:
            self.advance(mfa.STEP - self.now() % mfa.STEP + 1)
        u = self.user_of(name)
        if how == "code":
            code = self.pick_code(data, u)
            verdict = self.verdict(u, code)
            form = {"code": code}
        else:
            right = how == "password" and u is not None
            form = {"password": u.password if right else "not the password at all, sorry"}
            verdict = "password" if right else None
        response = post(self.clients[name], "/reauthenticate", form, "/login")
        if not self.guarded(name, response):
            return
        if verdict is None:
            assert response.status_code == 422
            return
        assert response.status_code == 303
        event(f"re-authenticated with {verdict}")
        if verdict != "password":
            self.use(u, code, verdict)
        self.start_session(name, self.browsers[name].user)  # a new session id, fresh

    @rule(
        name=browsers,
        action=st.sampled_from(
            ["log out others", "end a session", "enrol", "disable", "new codes", "set email"]
        ),
    )
    def come_back_later(self, name: str, action: str) -> None:
        """Past the re-authentication window, try a change that needs a fresh authentication."""
        self.advance(REAUTH_WINDOW + 1)
        if action == "log out others":
            self.log_out_others(name)
        elif action == "end a session":
            self.end_session(name, "same user", name)
        elif action == "enrol":
            self.enrol_totp(name)
        elif action == "disable":
            self.disable_totp(name)
        elif action == "new codes":
            self.regenerate_codes(name)
        else:
            self.set_email(name, "shared")

    # -- keys and time ----------------------------------------------------------------------

    @rule(key=st.sampled_from(["secret", "totp"]))
    def rotate_key(self, key: str) -> None:
        """Rotate the session key and restart, or the key of TOTP secrets (no restart).

        After a restart, cookies signed two keys ago are no longer read; every TOTP code
        works as before.
        """
        command = "rotate-secret-key" if key == "secret" else "rotate-mfa-key"
        result = self.app.test_cli_runner().invoke(args=[command])
        assert result.exit_code == 0, result.output
        if key == "totp":
            assert "No key opens" not in result.output
            return
        mail.flush(10, self.app)
        self.app = self.start_app()
        self.clients = {name: self.new_client(name) for name in BROWSERS}
        self.generation += 1
        for name, b in self.browsers.items():
            if self.signed_in[name] < self.generation - 1 and (b.user or b.pending):
                event("a cookie outlived its key")
                self.browsers[name] = Browser()

    # Hypothesis favours the first values: the ones past a timeout come first.
    @rule(seconds=st.sampled_from([IDLE + 1, 301, SAFE_IDLE, 299, 30, 29, 120, 1]))
    def clock_moves(self, seconds: int) -> None:
        self.advance(seconds)

    @rule(over=st.sampled_from([False, True]))  # the last second first: it must still work
    def to_the_absolute_timeout(self, over: bool) -> None:
        """Move the clock to the oldest session's last second of lifetime, or one past it."""
        started = [b.started for b in self.browsers.values() if b.user is not None]
        seconds = min(started, default=0) + LIFETIME - self.now() + over
        if started and 0 < seconds <= SAFE_IDLE:
            self.advance(seconds)

    # -- what must always hold ------------------------------------------------------------

    @invariant()
    def browsers_are_logged_in_exactly_as_the_model_says(self) -> None:
        for name, client in self.clients.items():
            expected = self.browsers[name].user
            response = client.get("/account-details")
            if expected is None:
                self.assert_login_required(response)
                continue
            assert response.status_code == 200, (name, expected, response.status_code)
            shown = re.search(r'class="username">([^<]+)<', response.get_data(as_text=True))
            assert shown and shown.group(1) == expected, name

    @invariant()
    def stored_records_are_the_models(self) -> None:
        store = self.app.extensions["secure_app.store"]
        assert sorted(store.keys()) == sorted(self.users)
        photos = []
        for user, u in self.users.items():
            record = store.get(user)
            with self.app.app_context():  # the hashing settings are the app's
                assert passwords.verify_password(record["password_hash"], u.password), user
            assert {f: record.get(f) for f in DETAILS} == u.details
            assert (record.get("email"), record.get("email_verified")) == (u.email, u.verified)
            assert mfa.has_totp(record) == bool(u.secret)
            if u.secret:
                assert record["totp"]["last_step"] == u.last_step
            assert mfa.recovery_left(record) == len(u.codes)
            assert bool(record.get("photo")) == u.photo
            if u.photo:
                photos.append(record["photo"])
        # Exactly one file per user with a photo, and no file besides.
        assert len(set(photos)) == len(photos)
        assert photo_files(self.app) == set(photos)


LifecycleMachine.TestCase.settings = settings(settings.default, stateful_step_count=25)
TestLifecycle = LifecycleMachine.TestCase
