"""Sessions against a plain model: which cookies are alive after any mix of logins and endings.

Several browsers (test clients) of one user log in, log out, end one
another's sessions from the security page, log out everywhere else, change
the password and fail to log in. The model is a set of live session ids.
After every step, each browser and every copy of a cookie ever issued must
be logged in exactly when the model says its id is live.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from helpers import OTHER_PASSWORD, PASSWORD, AuthActions, close_apps, csrf_token, make_app
from secure_app import events, sessions
from secure_app.store import get_store

BROWSERS = 3
WRONG = "not the password at all, sorry"
browsers = st.integers(min_value=0, max_value=BROWSERS - 1)


class SessionsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="sessions-machine-"))
        self.app = make_app(self.tmp)
        self.clients = [self.app.test_client() for _ in range(BROWSERS)]
        assert AuthActions(self.clients[0]).register().status_code == 302
        self.password = PASSWORD
        self.live: set[str] = set()  # the model: session ids that must work
        self.copies: dict[str, str] = {}  # sid -> the raw cookie that carried it

    def teardown(self) -> None:
        close_apps()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------

    def sid(self, i: int) -> str | None:
        with self.clients[i].session_transaction() as cookie:
            return cookie.get("sid")

    def keep_copy(self, i: int) -> None:
        sid = self.sid(i)
        if sid is not None:
            self.copies[sid] = self.clients[i].get_cookie("session").value

    def is_live(self, i: int) -> bool:
        return self.sid(i) in self.live

    def post(self, i: int, path: str, data: dict, page: str = "/security"):
        client = self.clients[i]
        return client.post(path, data={**data, "csrf_token": csrf_token(client, page)})

    # -- rules ----------------------------------------------------------------------

    @rule(i=browsers)
    def login(self, i: int) -> None:
        old = self.sid(i)
        assert AuthActions(self.clients[i]).login(password=self.password).status_code == 302
        self.live.discard(old)  # logging in again ends this browser's previous session
        self.live.add(self.sid(i))
        self.keep_copy(i)

    @rule(i=browsers)
    def failed_login(self, i: int) -> None:
        if self.is_live(i):
            return  # a logged-in browser has no login form in front of it
        response = AuthActions(self.clients[i]).login(password=WRONG)
        assert response.status_code == 200
        response.close()

    @rule(i=browsers)
    def logout(self, i: int) -> None:
        if not self.is_live(i):
            return
        self.live.discard(self.sid(i))
        AuthActions(self.clients[i]).logout()

    @rule(i=browsers, j=browsers)
    def end_one(self, i: int, j: int) -> None:
        if not self.is_live(i) or i == j:
            return
        target = self.sid(j)
        shown = sessions.public_id_of(target) if target else "f" * 32
        response = self.post(i, "/security/sessions/end", {"session_id": shown})
        assert response.status_code == 303
        self.live.discard(target)  # a stale or unknown id changes nothing

    @rule(i=browsers)
    def end_others(self, i: int) -> None:
        if not self.is_live(i):
            return
        self.post(i, "/logout-others", {})
        self.live = {self.sid(i)}

    @rule(i=browsers)
    def change_password(self, i: int) -> None:
        if not self.is_live(i):
            return
        new = OTHER_PASSWORD if self.password == PASSWORD else PASSWORD
        data = {"current_password": self.password, "new_password": new, "confirm": new}
        assert self.post(i, "/change-password", data, "/change-password").status_code == 302
        self.password = new
        self.live = {self.sid(i)}  # every other session ends; this browser gets a new id
        self.keep_copy(i)

    # -- what must hold -------------------------------------------------------------

    @invariant()
    def every_cookie_works_exactly_when_the_model_says(self) -> None:
        for sid, raw in self.copies.items():
            copy = self.app.test_client()
            copy.set_cookie("session", raw)
            logged_in = copy.get("/account-details").status_code == 200
            assert logged_in == (sid in self.live), sid

    @invariant()
    def the_record_holds_the_live_sessions_and_a_bounded_event_list(self) -> None:
        with self.app.app_context():
            record = get_store().get("alice")
        assert len(record["sessions"]) == len(self.live)
        assert len(record.get("events", [])) <= events.MAX_EVENTS

    @invariant()
    def each_browser_is_logged_in_exactly_when_its_session_is_live(self) -> None:
        for i, client in enumerate(self.clients):
            expected = self.is_live(i)
            assert (client.get("/account-details").status_code == 200) == expected


TestSessionsMachine = SessionsMachine.TestCase
