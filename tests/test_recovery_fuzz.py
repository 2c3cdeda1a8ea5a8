"""Hypothesis: any string as a reset or verification token: never a 5xx, never a change.

One app per test, with alice holding a live reset link and bob a live
verification link; every example sends a token that is not one of those
(any text, or the real one truncated, extended or with one character
changed) to both routes, by GET and by POST, and checks that the stored
bytes did not move. At the end the real links still work: nothing an
attacker sent used them up.
"""

from __future__ import annotations

from urllib.parse import quote

from hypothesis import assume, given
from hypothesis import strategies as st
from test_recovery import (
    NEW_PASSWORD,
    change_email,
    confirm,
    last_to,
    link_of,
    outbox,
    path_of,
    reset_link,
    use_link,
    verified_user,
)
from test_two_factor import two_factor_app

from helpers import AuthActions, csrf_token, stored_bytes

ROUTES = ("/reset-password/", "/verify-email/")
TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."


def _mutations(real: str):
    """Tokens near a real one: cut short, made longer, or one character replaced."""
    cut = st.integers(0, len(real) - 1).map(lambda n: real[:n])
    longer = st.text(TOKEN_CHARS, min_size=1, max_size=5).map(lambda extra: real + extra)
    replaced = st.tuples(st.integers(0, len(real) - 1), st.sampled_from(TOKEN_CHARS)).map(
        lambda pair: real[: pair[0]] + pair[1] + real[pair[0] + 1 :]
    )
    return st.one_of(cut, longer, replaced)


def test_no_token_but_the_real_one_changes_anything(tmp_path, monkeypatch) -> None:
    app = two_factor_app(tmp_path, monkeypatch)
    client = app.test_client()
    verified_user(app, client, "alice", "alice@example.org")
    reset = path_of(reset_link(app, client)).rsplit("/", 1)[1]
    verified_user(app, client, "bob", "bob@example.org")
    AuthActions(client).login("bob")
    change_email(app, client, "bob@new.example")
    AuthActions(client).logout()
    verify = path_of(link_of(last_to(app, "bob@new.example"))).rsplit("/", 1)[1]
    outbox(app)
    csrf = csrf_token(client, "/forgot-password")
    before = stored_bytes(app)

    @given(
        token=st.one_of(
            st.text(max_size=200),
            st.text(TOKEN_CHARS, max_size=120),
            _mutations(reset),
            _mutations(verify),
        ),
    )
    def check(token: str) -> None:
        assume(token not in (reset, verify))
        quoted = quote(token.encode("utf-8", "surrogatepass"), safe="")
        for route in ROUTES:
            url = route + quoted
            got = client.get(url)
            assert got.status_code < 500, (url, got.status_code)
            posted = client.post(
                url,
                data={"password": NEW_PASSWORD, "confirm": NEW_PASSWORD, "csrf_token": csrf},
            )
            assert posted.status_code < 500, (url, posted.status_code)
            assert posted.status_code in (400, 404, 405), (url, posted.status_code)
        assert stored_bytes(app) == before

    check()
    # Nothing above used up or voided the real links.
    assert use_link(client, "/reset-password/" + reset).status_code == 303
    assert confirm(client, "/verify-email/" + verify).status_code == 200
