"""A state machine over the second factor, checked against a plain model of who may be logged in.

Two browsers act for alice, in any order: password logins, second steps with
right, old, other-step and recovery codes, enrolment, regenerating codes,
disabling, re-authenticating, logging out, and a fake clock moving on. After
every step each browser is logged in exactly when the model says so, and the
stored factor, last step and recovery codes are what the model expects.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from test_two_factor import (
    CODES_RE,
    ENROLMENT_RE,
    SECRET_RE,
    enrol,
    post,
    second_step,
    who,
)

from helpers import (
    OTHER_PASSWORD,
    PASSWORD,
    START,
    AuthActions,
    Clock,
    close_apps,
    csrf_token,
    environ,
    fake_time,
    make_app,
)
from secure_app import mfa
from secure_app.store import get_store

BROWSERS = st.sampled_from(["A", "B"])
PENDING_TTL = 300
REAUTH_WINDOW = 300


@dataclass
class Browser:
    """What the model knows about one browser."""

    state: str = "anonymous"  # or "pending" or "in"
    since: float = 0  # when the pending login began
    auth_at: float = 0  # when it last authenticated
    offer: tuple[str, str, float] | None = None  # (secret, sealed form value, when offered)


@dataclass
class Model:
    secret: str | None = None
    last_step: int = -1
    unused: set[str] = field(default_factory=set)
    used_codes: list[str] = field(default_factory=list)
    browsers: dict[str, Browser] = field(default_factory=dict)


class TwoFactorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="two-factor-machine-"))
        self.undo = contextlib.ExitStack()
        self.clock = self.undo.enter_context(fake_time(Clock(START)))
        self.undo.enter_context(environ(FLASK_INSTANCE_PATH=str(self.tmp / "instance")))
        # Sessions that never time out: the model is about factors, not idle timeouts.
        self.app = make_app(self.tmp, SESSION_IDLE_TIMEOUT=10**7, PERMANENT_SESSION_LIFETIME=10**7)
        self.clients = {name: self.app.test_client() for name in ("A", "B")}
        assert AuthActions(self.clients["A"]).register().status_code == 302
        self.model = Model(browsers={name: Browser() for name in self.clients})

    def teardown(self) -> None:
        self.undo.close()
        close_apps()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------

    def fresh(self, b: Browser) -> bool:
        return b.state == "in" and 0 <= self.clock.now - b.auth_at <= REAUTH_WINDOW

    def current_code(self, offset: int = 0) -> str:
        return mfa.code_at(self.model.secret or "A" * 32, self.clock.step + offset)

    def accepts(self, code: str) -> str | None:
        """The model's verdict on a code: "totp", "recovery" or None."""
        m = self.model
        if m.secret and code == mfa.code_at(m.secret, self.clock.step):
            return "totp" if self.clock.step > m.last_step else None
        if code.replace("-", "").upper() in m.unused:
            return "recovery"
        return None

    def use(self, code: str, kind: str) -> None:
        if kind == "totp":
            self.model.last_step = self.clock.step
        else:
            self.model.unused.discard(code.replace("-", "").upper())
        self.model.used_codes.append(code)

    def pick_code(self, data) -> str:
        # The codes that should work are drawn as often as all the others together.
        kind = data.draw(st.sampled_from(["current", "recovery"] * 2 + ["other", "used", "junk"]))
        if kind == "current":
            return self.current_code()
        if kind == "other":
            return self.current_code(data.draw(st.sampled_from([-1, 1])))
        if kind == "recovery" and self.model.unused:
            code = data.draw(st.sampled_from(sorted(self.model.unused)))
            return data.draw(
                st.sampled_from([code, code.lower(), "-".join(re.findall("....", code))])
            )
        if kind == "used" and self.model.used_codes:
            return data.draw(st.sampled_from(self.model.used_codes))
        return data.draw(st.text(max_size=30))

    # -- rules ------------------------------------------------------------------------------

    @initialize(enrolled=st.booleans())
    def start(self, enrolled: bool) -> None:
        """Half the runs start with TOTP already on, so the login paths get most of the steps."""
        event(f"starts with TOTP {'on' if enrolled else 'off'}")
        if not enrolled:
            return
        client = self.clients["A"]
        assert AuthActions(client).login().status_code == 302
        secret, codes = enrol(client, self.clock)
        AuthActions(client).logout()
        self.model.secret, self.model.last_step = secret, self.clock.step
        self.model.unused = {c.replace("-", "") for c in codes}

    @rule(seconds=st.integers(min_value=1, max_value=120))
    def time_passes(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @rule(name=BROWSERS, right=st.sampled_from([True, True, False]))
    def password_login(self, name: str, right: bool) -> None:
        client, b = self.clients[name], self.model.browsers[name]
        response = AuthActions(client).login(password=PASSWORD if right else OTHER_PASSWORD)
        if not right:
            assert response.status_code == 200
            return  # a failed login changes nothing, in the browser or on the server
        if self.model.secret:
            assert response.headers["Location"] == "/login/two-factor"
            for other in self.model.browsers.values():
                if other.state == "pending":  # the record names one pending login: this one
                    other.state = "anonymous"
            b.state, b.since = "pending", self.clock.now
        else:
            assert response.headers["Location"] == "/account-details"
            b.state, b.auth_at = "in", self.clock.now
        b.offer = None

    @rule(name=BROWSERS, data=st.data())
    def send_second_step(self, name: str, data) -> None:
        client, b = self.clients[name], self.model.browsers[name]
        code = self.pick_code(data)
        verdict = self.accepts(code)
        response = second_step(client, code)
        assert response.status_code < 500
        if b.state != "pending":
            assert response.status_code == 303  # nothing to finish: back to /login
            return
        if self.clock.now - b.since > PENDING_TTL or not self.model.secret:
            assert response.status_code == 303
            b.state = "anonymous"
            event("second step: pending login gone")
        elif verdict:
            assert response.status_code == 302, code
            event(f"second step: logged in with {verdict}")
            self.use(code, verdict)
            b.state, b.auth_at = "in", self.clock.now
        else:
            assert response.status_code == 422, code

    @rule(name=BROWSERS, data=st.data(), next_step=st.booleans())
    def password_then_code(self, name: str, data, next_step: bool) -> None:
        """Both steps at once: the random walk alone seldom puts them next to each other."""
        if next_step:
            self.clock.next_step()  # a step whose code is not spent yet
        self.password_login(name, True)
        self.send_second_step(name, data)

    @rule(name=BROWSERS)
    def open_enrolment(self, name: str) -> None:
        client, b = self.clients[name], self.model.browsers[name]
        response = client.get("/security/totp")
        if b.state != "in":
            assert response.status_code == 302
        elif not self.fresh(b):
            assert response.status_code == 303
        elif self.model.secret:
            assert response.status_code == 200 and "already on" in response.get_data(as_text=True)
        else:
            html = response.get_data(as_text=True)
            secret = SECRET_RE.search(html).group(1).replace(" ", "")
            b.offer = (secret, ENROLMENT_RE.search(html).group(1), self.clock.now)

    @rule(name=BROWSERS, right=st.booleans())
    def confirm_enrolment(self, name: str, right: bool) -> None:
        client, b = self.clients[name], self.model.browsers[name]
        if b.offer is None:
            return
        secret, sealed, offered = b.offer
        code = mfa.code_at(secret, self.clock.step + (0 if right else 1))
        token = csrf_token(client, "/login")
        response = client.post(
            "/security/totp", data={"code": code, "enrolment": sealed, "csrf_token": token}
        )
        assert response.status_code < 500
        ok = (
            b.state == "in"
            and self.fresh(b)
            and not self.model.secret
            and right
            and self.clock.now - offered <= mfa.ENROL_TTL
        )
        if ok:
            assert response.status_code == 200
            event("enrolled")
            codes = CODES_RE.findall(response.get_data(as_text=True))
            self.model.secret, self.model.last_step = secret, self.clock.step
            self.model.unused = {c.replace("-", "") for c in codes}
            self.model.used_codes.append(code)  # the confirming code is spent too
            b.offer = None
        else:
            assert response.status_code in (200, 302, 303, 422)
            assert response.status_code != 200 or "already on" in response.get_data(as_text=True)

    @rule(name=BROWSERS)
    def regenerate(self, name: str) -> None:
        client, b = self.clients[name], self.model.browsers[name]
        response = post(client, "/security/recovery-codes", token_from="/login")
        if b.state == "in" and self.fresh(b) and self.model.secret:
            assert response.status_code == 200
            event("regenerated")
            codes = CODES_RE.findall(response.get_data(as_text=True))
            self.model.used_codes += sorted(self.model.unused)[:2]  # old codes, to try again
            self.model.unused = {c.replace("-", "") for c in codes}
        else:
            assert response.status_code in (302, 303)

    @rule(name=BROWSERS)
    def disable(self, name: str) -> None:
        client, b = self.clients[name], self.model.browsers[name]
        response = post(client, "/security/totp/disable", token_from="/login")
        assert response.status_code in (302, 303)
        if b.state == "in" and self.fresh(b) and self.model.secret:
            event("disabled")
            self.model.used_codes += sorted(self.model.unused)[:2]
            self.model.secret, self.model.last_step, self.model.unused = None, -1, set()

    @rule(name=BROWSERS, data=st.data(), with_password=st.booleans())
    def reauthenticate(self, name: str, data, with_password: bool) -> None:
        client, b = self.clients[name], self.model.browsers[name]
        if with_password:
            password = data.draw(st.sampled_from([PASSWORD, OTHER_PASSWORD]))
            response = post(client, "/reauthenticate", {"password": password}, "/login")
            ok = password == PASSWORD
        else:
            code = self.pick_code(data)
            verdict = self.accepts(code) if self.model.secret else None
            response = post(client, "/reauthenticate", {"code": code}, "/login")
            ok = verdict is not None
        assert response.status_code < 500
        if b.state != "in":
            assert response.status_code == 302  # login required
            return
        if ok:
            assert response.status_code == 303
            event(f"re-authenticated with {'password' if with_password else verdict}")
            if not with_password:
                self.use(code, verdict)
            b.auth_at = self.clock.now
        else:
            assert response.status_code == 422

    @rule(name=BROWSERS)
    def logout(self, name: str) -> None:
        client, b = self.clients[name], self.model.browsers[name]
        client.post("/logout", data={"csrf_token": csrf_token(client, "/login")})
        b.state, b.offer = "anonymous", None

    # -- what must always hold ------------------------------------------------------------

    @invariant()
    def logged_in_exactly_as_the_model_says(self) -> None:
        for name, client in self.clients.items():
            expected = "alice" if self.model.browsers[name].state == "in" else None
            assert who(client) == expected, name

    @invariant()
    def stored_factor_matches_the_model(self) -> None:
        with self.app.app_context():
            record = get_store().get("alice")
        assert ("totp" in record) == bool(self.model.secret)
        assert mfa.recovery_left(record) == len(self.model.unused)
        if self.model.secret:
            assert record["totp"]["last_step"] == self.model.last_step


TwoFactorMachine.TestCase.settings = settings(stateful_step_count=25)
test_two_factor_machine = TwoFactorMachine.TestCase
