"""A state machine over recovery: ask for a reset, use a link, change the password or the email,
verify, let time pass; checked against a plain model of which links should work.

Every action goes through the real handlers (and the mail outbox); the model
is a few dictionaries. After every step the stored records must agree with
the model: the password that works, the verified and the typed address.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from test_recovery import NEW_PASSWORD, body, change_email, confirm, link_of, outbox, path_of

from helpers import (
    OTHER_PASSWORD,
    PASSWORD,
    AuthActions,
    Clock,
    close_apps,
    csrf_token,
    fake_time,
    make_app,
)
from secure_app import mail, passwords
from secure_app.store import get_store

USERS = ("alice", "bob")
ADDRESSES = ("a@example.org", "b@example.org", "shared@example.org")
NEW_PASSWORDS = (PASSWORD, OTHER_PASSWORD, NEW_PASSWORD, "mossy anchor tumbles past violet dunes")
RESET_TIMEOUT = 900
VERIFY_TIMEOUT = 86400


class RecoveryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="recovery-machine-"))
        self.undo = contextlib.ExitStack()
        # The whole app, the mail thread included, reads this clock.
        self.clock = self.undo.enter_context(fake_time(Clock()))
        self.app = make_app(
            self.tmp,
            PASSWORD_RESET_TIMEOUT=RESET_TIMEOUT,
            EMAIL_VERIFY_TIMEOUT=VERIFY_TIMEOUT,
        )
        self.client = self.app.test_client()
        self.seen = 0  # messages already read from the outbox
        self.password = dict.fromkeys(USERS, PASSWORD)
        self.verified: dict[str, str | None] = dict.fromkeys(USERS)
        self.typed = dict.fromkeys(USERS, "")
        # The one link of each kind that should work now: (token, expires[, address]).
        self.reset_live: dict[str, tuple | None] = dict.fromkeys(USERS)
        self.verify_live: dict[str, tuple | None] = dict.fromkeys(USERS)
        self.reset_links: list[tuple[str, str]] = []  # every (user, token) ever mailed
        self.verify_links: list[tuple[str, str]] = []
        # Both start with a verified address (through the real flow), so that
        # resets happen from the first step.
        for user, address in zip(USERS, ADDRESSES, strict=False):
            assert AuthActions(self.client).register(user).status_code == 302
            self.login(user)
            assert change_email(self.app, self.client, address) == "pending"
            self.logout()
            assert confirm(self.client, link_of(self.new_messages()[-1])).status_code == 200
            self.verified[user] = self.typed[user] = address

    def teardown(self) -> None:
        mail.flush(10, self.app)  # nothing left writing into the folder removed below
        self.undo.close()
        close_apps()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers --

    def new_messages(self) -> list:
        messages = outbox(self.app)
        fresh, self.seen = messages[self.seen :], len(messages)
        return fresh

    def now(self) -> int:
        return int(self.clock.now)

    def login(self, user: str) -> None:
        assert AuthActions(self.client).login(user, self.password[user]).status_code == 302

    def logout(self) -> None:
        AuthActions(self.client).logout()

    # -- rules --

    @rule(address=st.sampled_from(ADDRESSES))
    def request_reset(self, address: str) -> None:
        token = csrf_token(self.client, "/forgot-password")
        response = self.client.post(
            "/forgot-password", data={"email": address, "csrf_token": token}
        )
        assert response.status_code == 200
        expected = {u for u in USERS if self.verified[u] == address}
        mailed = {}
        for msg in self.new_messages():
            user = body(msg).split(",", 1)[0].removeprefix("Hello ")
            assert msg["To"] == self.verified[user] and msg["Subject"] == "Reset your password"
            mailed[user] = path_of(link_of(msg)).rsplit("/", 1)[1]
        assert set(mailed) == expected
        for user, link_token in mailed.items():
            self.reset_live[user] = (link_token, self.now() + RESET_TIMEOUT)
            self.reset_links.append((user, link_token))

    @precondition(lambda self: self.reset_links)
    @rule(data=st.data(), new=st.sampled_from(NEW_PASSWORDS))
    def use_reset_link(self, data: st.DataObject, new: str) -> None:
        user, link_token = data.draw(st.sampled_from(self.reset_links))
        live = self.reset_live[user]
        works = live is not None and live[0] == link_token and self.now() <= live[1]
        response = self.client.post(
            f"/reset-password/{link_token}",
            data={
                "password": new,
                "confirm": new,
                "csrf_token": csrf_token(self.client, "/forgot-password"),
            },
        )
        assert response.status_code == (303 if works else 404)
        event(f"reset link {'works' if works else 'refused'}")
        if works:
            self.password[user] = new
            self.reset_live[user] = None
            self.new_messages()  # the notice

    @rule(user=st.sampled_from(USERS), new=st.sampled_from(NEW_PASSWORDS))
    def change_password(self, user: str, new: str) -> None:
        self.login(user)
        response = self.client.post(
            "/change-password",
            data={
                "current_password": self.password[user],
                "new_password": new,
                "confirm": new,
                "csrf_token": csrf_token(self.client, "/change-password"),
            },
        )
        assert response.status_code == 302
        self.logout()
        self.password[user] = new
        self.reset_live[user] = None  # bound to the password hash
        self.new_messages()

    @rule(user=st.sampled_from(USERS), address=st.sampled_from((*ADDRESSES, "")))
    def change_email(self, user: str, address: str) -> None:
        self.login(user)
        outcome = change_email(self.app, self.client, address)
        self.logout()
        self.typed[user] = address
        self.verify_live[user] = None
        mails = self.new_messages()
        if not address:
            assert outcome == "removed"
            self.verified[user] = None
            self.reset_live[user] = None  # it went to an address no longer verified
        elif address == self.verified[user]:
            assert outcome == "verified"
        else:
            assert outcome == "pending"
            [msg] = [m for m in mails if m["Subject"] == "Confirm your email address"]
            assert msg["To"] == address
            link_token = path_of(link_of(msg)).rsplit("/", 1)[1]
            self.verify_live[user] = (link_token, self.now() + VERIFY_TIMEOUT, address)
            self.verify_links.append((user, link_token))

    @precondition(lambda self: self.verify_links)
    @rule(data=st.data())
    def verify(self, data: st.DataObject) -> None:
        user, link_token = data.draw(st.sampled_from(self.verify_links))
        live = self.verify_live[user]
        works = live is not None and live[0] == link_token and self.now() <= live[1]
        response = self.client.post(
            f"/verify-email/{link_token}",
            data={"csrf_token": csrf_token(self.client, "/forgot-password")},
        )
        assert response.status_code == (200 if works else 404)
        event(f"verification link {'works' if works else 'refused'}")
        if works:
            self.verified[user] = live[2]
            self.verify_live[user] = None
            self.reset_live[user] = None  # it went to the address verified before

    @rule(seconds=st.sampled_from([1, 60, 299, 899, 901, 3600, 86399, 86401]))
    def let_time_pass(self, seconds: int) -> None:
        self.clock.advance(seconds)

    # -- the model and the store agree --

    @invariant()
    def records_agree(self) -> None:
        with self.app.app_context():
            for user in USERS:
                record = get_store().get(user)
                assert record.get("email_verified") == self.verified[user]
                assert (record.get("email") or "") == self.typed[user]
                assert passwords.verify_password(record["password_hash"], self.password[user])


RecoveryMachine.TestCase.settings = settings(settings.default, stateful_step_count=25)
TestRecovery = RecoveryMachine.TestCase
