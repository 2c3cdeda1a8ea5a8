"""Photo files and records agree after any interleaving of saves, replacements, removals, deletions.

A Hypothesis state machine drives several users, each with two browsers,
through the real handlers. Besides requests one after another, a rule runs
one request *inside* another: at the first request's password check, or just
before its store write (after a new photo's file is written and before the
record points to it). After every step every file in the photo folder must
belong to a record, and every record's photo must exist.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from helpers import PASSWORD, AuthActions, close_apps, csrf_token, make_app, photo_names
from images import png
from secure_app import passwords
from secure_app.store import get_store

USERS = ("ann", "bob", "cyd")
TABS = (0, 1)
ACTIONS = ("upload", "save", "remove", "delete")
POINTS = ("check", "write")

users = st.sampled_from(USERS)
tabs = st.sampled_from(TABS)
actions = st.sampled_from(ACTIONS)


class PhotoLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="photo-lifecycle-"))
        self.app = make_app(self.tmp)
        self.browsers = {(u, t): self.app.test_client() for u in USERS for t in TABS}
        self.pending: tuple[str, Callable[[], None]] | None = None
        self._hook()

    # -- running one request inside another -------------------------------------------------

    def _hook(self) -> None:
        """Let ``self.pending`` run at a point inside the next request: its check or its write."""
        with self.app.app_context():
            store = get_store()
        for method in ("update", "delete"):
            setattr(store, method, self._at("write", getattr(store, method)))
        self.real_verify = passwords.verify_password
        passwords.verify_password = self._at("check", self.real_verify)

    def _at(self, point: str, real: Callable) -> Callable:
        def hooked(*args, **kwargs):
            if point == "write":
                self._fire(point)
            result = real(*args, **kwargs)
            if point == "check":
                self._fire(point)
            return result

        return hooked

    def _fire(self, point: str) -> None:
        if self.pending is None or self.pending[0] != point:
            return
        _, action = self.pending
        self.pending = None  # once; the inner request passes the same points
        errors: list[BaseException] = []

        def run() -> None:
            try:
                action()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)  # its own request context
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive()
        if errors:
            raise errors[0]

    def teardown(self) -> None:
        passwords.verify_password = self.real_verify
        close_apps()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the requests -----------------------------------------------------------------------

    def _post(self, user: str, tab: int, path: str, data: dict, **kwargs) -> None:
        browser = self.browsers[user, tab]
        token = csrf_token(browser, "/login")  # any page's form: the token is per session
        response = browser.post(path, data={**data, "csrf_token": token}, **kwargs)
        assert response.status_code < 500, (path, response.status_code)

    def _request(self, action: str, user: str, tab: int) -> Callable[[], None]:
        details = {"full_name": user.title(), "email": "", "phone": "", "bio": ""}
        if action == "upload":
            return lambda: self._post(
                user,
                tab,
                "/account-details",
                {**details, "photo": (io.BytesIO(png()), "me.png")},
                content_type="multipart/form-data",
            )
        if action == "save":
            return lambda: self._post(user, tab, "/account-details", details)
        if action == "remove":
            return lambda: self._post(user, tab, "/account-details/remove-photo", {})
        return lambda: self._post(user, tab, "/delete-account", {"password": PASSWORD})

    @initialize()
    def everyone_registered_and_logged_in_twice(self) -> None:
        for user in USERS:
            self.register_and_log_in(user)

    @rule(user=users)
    def register_and_log_in(self, user: str) -> None:
        AuthActions(self.browsers[user, 0]).register(user)  # refused if the name is taken
        for tab in TABS:
            AuthActions(self.browsers[user, tab]).login(user)

    @rule(action=actions, user=users, tab=tabs)
    def one_request(self, action: str, user: str, tab: int) -> None:
        self._request(action, user, tab)()

    @rule(
        outer=actions,
        user=users,
        tab=tabs,
        inner=actions,
        same_user=st.booleans(),  # half the time: two tabs of one user, the races that matter
        other=users,
        other_tab=tabs,
        point=st.sampled_from(POINTS),
    )
    def one_request_inside_another(
        self, outer, user, tab, inner, same_user, other, other_tab, point
    ) -> None:
        other = user if same_user else other
        self.pending = (point, self._request(inner, other, other_tab))
        self._request(outer, user, tab)()
        if self.pending is not None:  # the outer request never reached that point
            _, action = self.pending
            self.pending = None
            action()

    # -- what must hold after every step ---------------------------------------------------

    def _records(self) -> dict[str, dict]:
        with self.app.app_context():
            store = get_store()
            return {key: store.get(key) for key in store.keys()}

    @invariant()
    def every_photo_file_belongs_to_a_record(self) -> None:
        files = set(photo_names(self.app))
        owned = {r["photo"] for r in self._records().values() if r["photo"]}
        assert files <= owned, f"files no record points to: {files - owned}"

    @invariant()
    def every_records_photo_exists(self) -> None:
        files = set(photo_names(self.app))
        for key, record in self._records().items():
            if record["photo"]:
                assert record["photo"] in files, f"{key}'s photo is missing"


PhotoLifecycle.TestCase.settings = settings(stateful_step_count=25)
TestPhotoLifecycle = PhotoLifecycle.TestCase
