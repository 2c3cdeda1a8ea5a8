"""Hypothesis over the ``code`` field, through the real second step and re-authentication.

Any string, wrong lengths, Unicode digits, whitespace, the codes of the
previous and next steps, codes already used, recovery codes in every case and
grouping. Properties: never a 5xx; a code is accepted exactly when a plain
model says it should be (the current step's code not used before, or an
unused recovery code), so never twice; a refused code changes no stored byte
and logs nobody in.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_two_factor import (
    ENROLMENT_RE,
    SECRET_RE,
    all_but_events,
    enrol,
    post,
    second_step,
    two_factor_app,
    who,
)
from test_two_factor import record as get_record

from helpers import START, AuthActions, Clock, close_apps, csrf_token, stored_bytes
from secure_app import mfa
from secure_app.store import get_store

UNICODE_DIGITS = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
FULL_WIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
SPACES = st.sampled_from(["", " ", "  ", "\t", "\n", "\u00a0", "\u2003", "\u200b"])


class Model:
    """What should be accepted: the last TOTP step used and the recovery codes left."""

    def __init__(self, last_step: int, recovery: list[str]) -> None:
        self.last_step = last_step
        self.unused = {c.replace("-", "") for c in recovery}
        self.used: set[str] = set()

    def accepts(self, secret: str, typed: str, now: float) -> tuple[str, str] | None:
        step = mfa.step_at(now)
        if typed.replace(" ", "") == mfa.code_at(secret, step) and step > self.last_step:
            if len(typed) <= mfa.MAX_CODE_INPUT:
                return ("totp", str(step))
        plain = typed.replace(" ", "").replace("-", "").upper()
        if typed.isascii() and plain in self.unused and len(typed) <= mfa.MAX_CODE_INPUT:
            return ("recovery", plain)
        return None

    def use(self, kind: str, value: str) -> None:
        if kind == "totp":
            self.last_step = int(value)
        else:
            self.unused.discard(value)
        self.used.add(f"{kind}:{value}")


def _variant(draw, secret: str, clock: Clock, recovery: list[str], model: Model) -> str:
    kind = draw(
        st.sampled_from(
            ["text", "digits", "current", "other-step", "unicode", "padded", "recovery", "used"]
        )
    )
    current = mfa.code_at(secret, clock.step)
    if kind == "text":
        return draw(st.text(max_size=80))
    if kind == "digits":
        return draw(st.text(alphabet="0123456789", max_size=12))
    if kind == "current":
        return current
    if kind == "other-step":
        return mfa.code_at(secret, clock.step + draw(st.sampled_from([-2, -1, 1, 2])))
    if kind == "unicode":
        return current.translate(draw(st.sampled_from([UNICODE_DIGITS, FULL_WIDTH])))
    if kind == "padded":
        return draw(SPACES) + draw(st.sampled_from([current, current[:3] + " " + current[3:]]))
    if kind == "recovery":
        code = draw(st.sampled_from(recovery))
        raw = code.replace("-", "")
        return draw(
            st.sampled_from(
                [
                    code,
                    code.lower(),
                    raw,
                    raw.lower(),
                    " ".join(raw[i : i + 4] for i in range(0, len(raw), 4)),
                    code.swapcase(),
                    "-".join(raw),
                    raw[:-1],
                    raw + "2",
                    code.replace("-", "_"),
                    "\uff21" + raw[1:],
                ]
            )
        )
    # A code accepted earlier in this run, sent again.
    if model.used:
        kind, value = draw(st.sampled_from(sorted(model.used))).split(":", 1)
        return mfa.code_at(secret, int(value)) if kind == "totp" else value
    return current


@pytest.fixture
def fresh(tmp_path, monkeypatch, clock):
    """Return a function that builds a new site with alice enrolled, for one example."""

    def build():
        close_apps()  # the last example's app: one connection pool open at a time, not 40
        clock.now = float(START)
        app = two_factor_app(Path(tempfile.mkdtemp(dir=tmp_path)), monkeypatch)
        client = app.test_client()
        auth = AuthActions(client)
        auth.register()
        auth.login()
        secret, recovery = enrol(client, clock)
        auth.logout()
        with app.app_context():
            last_step = get_store().get("alice")["totp"]["last_step"]
        return app, secret, recovery, Model(last_step, recovery)

    return build


ATTEMPTS = st.integers(min_value=1, max_value=4)


@given(data=st.data())
def test_second_step_accepts_exactly_the_right_codes_once(fresh, clock, data) -> None:
    app, secret, recovery, model = fresh()
    for _ in range(data.draw(ATTEMPTS, label="attempts")):
        clock.advance(data.draw(st.integers(0, 40), label="seconds later"))
        client = app.test_client()
        first = AuthActions(client).login()
        assert first.headers["Location"] == "/login/two-factor"
        typed = _variant(data.draw, secret, clock, recovery, model)
        expected = model.accepts(secret, typed, clock.now)
        before = all_but_events(app)  # a refused code is an event for the owner (events.py)
        response = second_step(client, typed)
        assert response.status_code < 500
        if expected:
            assert response.status_code == 302, typed
            assert who(client) == "alice"
            assert f"{expected[0]}:{expected[1]}" not in model.used  # never accepted twice
            model.use(*expected)
        else:
            assert response.status_code == 422, typed
            assert who(client) is None
            with client.session_transaction() as cookie:
                assert "uid" not in cookie and "sid" not in cookie
            assert all_but_events(app) == before
            assert get_record(app)["events"][-1]["k"] == "two_factor_failure"


@given(data=st.data())
def test_reauthentication_accepts_exactly_the_right_codes_once(fresh, clock, data) -> None:
    app, secret, recovery, model = fresh()
    client = app.test_client()
    AuthActions(client).login()
    assert second_step(client, recovery[-1]).status_code == 302
    model.use("recovery", recovery[-1].replace("-", ""))
    for _ in range(data.draw(ATTEMPTS, label="attempts")):
        clock.advance(data.draw(st.integers(0, 40), label="seconds later"))
        typed = _variant(data.draw, secret, clock, recovery, model)
        expected = model.accepts(secret, typed, clock.now)
        with client.session_transaction() as cookie:
            cookie["auth_at"] = 0  # stale: the security pages want a re-authentication
        before = stored_bytes(app)
        response = post(client, "/reauthenticate", {"code": typed}, token_from="/reauthenticate")
        assert response.status_code < 500
        fresh_now = client.get("/security/totp").status_code == 200
        if expected:
            assert response.status_code == 303 and fresh_now, typed
            assert f"{expected[0]}:{expected[1]}" not in model.used
            model.use(*expected)
        else:
            assert response.status_code == 422 and not fresh_now, typed
            assert stored_bytes(app) == before
        assert who(client) == "alice"


@given(data=st.data())
def test_enrolment_code_field_never_fails_and_enables_only_with_the_right_code(
    tmp_path, monkeypatch, clock, data
) -> None:
    app = two_factor_app(tmp_path, monkeypatch)
    client = app.test_client()
    AuthActions(client).register()  # refused after the first example: alice exists
    AuthActions(client).login()
    page = client.get("/security/totp").get_data(as_text=True)
    secret = SECRET_RE.search(page).group(1).replace(" ", "")
    right = mfa.code_at(secret, clock.step)
    code = data.draw(
        st.one_of(
            st.text(max_size=80),
            st.text(alphabet="0123456789 ", max_size=10),
            st.sampled_from([right, f" {right[:3]} {right[3:]} ", right.translate(FULL_WIDTH)]),
            st.sampled_from([-1, 1]).map(lambda k: mfa.code_at(secret, clock.step + k)),
        ),
        label="code",
    )
    response = client.post(
        "/security/totp",
        data={
            "code": code,
            "enrolment": ENROLMENT_RE.search(page).group(1),
            "csrf_token": csrf_token(client, "/security"),
        },
    )
    assert response.status_code < 500
    accepted = mfa.normalize_totp(code) == right
    assert response.status_code == (200 if accepted else 422), code
    with app.app_context():
        assert ("totp" in get_store().get("alice")) == accepted
    if accepted:  # switch it off again for the next example
        assert post(client, "/security/totp/disable").status_code == 303
    AuthActions(client).logout()
