"""Hypothesis against every form through the real handlers: register, login, account, password.

Each field gets arbitrary text (control characters, newlines, RTL marks,
emoji, very long), markup, or is left out or sent twice. Properties: never a
5xx; invalid input shows a message and leaves the data file byte for byte as
it was; valid input is stored exactly and rendered escaped.
"""

from __future__ import annotations

import io
import unicodedata
from html.parser import HTMLParser
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from test_account import parse
from werkzeug.datastructures import MultiDict

import images
from helpers import PASSWORD, AuthActions, csrf_token, make_app, stored_records
from secure_app import passwords
from secure_app.auth import LOGIN_FAILED
from secure_app.forms import USERNAME_RE

PAYLOADS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "'; DROP TABLE users; --",
    "{{ 7*7 }}",
    "\u202eevil\u202c",
    "\u200f\u200e",  # RTL and LTR marks
    "\r\n",
    "\x00",
    "👩‍👩‍👧‍👦",
    "Zoë Ångström",
    '{"k":"admin","v":{}}\n',  # a line of the data file, smuggled in
]
TEXT = st.one_of(
    st.text(),
    st.text(min_size=90, max_size=1100),
    st.sampled_from(PAYLOADS),
    st.builds(
        lambda a, b, c: a + b + c,
        st.text(max_size=20),
        st.sampled_from(PAYLOADS),
        st.text(max_size=20),
    ),
)
# A field is left out (None), sent once (str) or sent several times (list).
FIELD = st.one_of(st.none(), TEXT, st.lists(TEXT, min_size=2, max_size=3))
STRONG = st.sampled_from([PASSWORD, "tangerine walrus gallops beneath quiet harbour"])
# Values that pass each account rule: drawn half the time, so the success path
# is exercised as often as the refusals (one_of alone would rarely pick them).
VALID_ACCOUNT = {
    "full_name": st.one_of(
        st.text(st.characters(exclude_categories=("Cc", "Cf", "Cs", "Zl", "Zp")), max_size=100),
        st.sampled_from([p for p in PAYLOADS if p.isprintable()]),
    ),
    "email": st.one_of(
        st.just(""), st.sampled_from(["alice@example.org", "o'brien+tag@example.co.uk"])
    ),
    "phone": st.from_regex(r"[0-9 +\-()]{0,32}", fullmatch=True),
    "bio": st.one_of(st.text(max_size=1000), st.sampled_from(PAYLOADS)),
}


def form(token: str, **fields: str | list[str] | None) -> MultiDict:
    data = MultiDict([("csrf_token", token)])
    for name, value in fields.items():
        for item in [] if value is None else [value] if isinstance(value, str) else value:
            data.add(name, item)
    return data


def spoil(data: st.DataObject, **valid: str) -> dict[str, str | list[str] | None]:
    """Replace some of a valid submission's fields (maybe none) with fuzzed ones.

    Breaking one field at a time finds a missing rule far sooner than fuzzing
    every field at once, where some other field is almost always invalid too.
    """
    one_at_a_time = st.sampled_from([set(), *({k} for k in valid)])
    broken = data.draw(
        st.one_of(one_at_a_time, st.sets(st.sampled_from(sorted(valid)))), label="broken fields"
    )
    return {k: data.draw(FIELD, label=k) if k in broken else v for k, v in valid.items()}


def first(value: str | list[str] | None) -> str | None:
    return value[0] if isinstance(value, list) else value


def site(tmp_path: Path):
    """An app with a logged-in client as ``alice``, reused across examples."""
    app = make_app(tmp_path)
    client = app.test_client()
    auth = AuthActions(client)
    assert auth.register().status_code == 302
    assert auth.login().status_code == 302
    return app, client


class Markup(HTMLParser):
    """Collect the tags and attribute names that a browser would see."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attributes: set[str] = set()

    def handle_starttag(self, tag, attrs):
        named = dict(attrs)
        if tag == "script" and (named.get("src") or "").startswith("/public/js/passkeys.js?"):
            return  # the site's one script (passkeys), pinned by SRI: test_templates.py
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)


def assert_escaped(page: str) -> None:
    """No input became markup: no script but the site's own file, no event handler."""
    markup = Markup()
    markup.feed(page)
    assert "script" not in markup.tags
    assert not [name for name in markup.attributes if name.startswith("on")]


def has_no_control(value: str) -> bool:
    return not any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in value)


def expected_valid(field: str, value: str) -> bool | None:
    """The field rule of DESIGN.md; None where only the email library can judge."""
    if field == "full_name":
        return len(value) <= 100 and has_no_control(value)
    if field == "phone":
        return len(value) <= 32 and all(ch in "0123456789 +-()" for ch in value)
    if field == "bio":
        return len(value) <= 1000
    return True if value == "" else None


def test_account_form_stores_valid_text_exactly_and_refuses_the_rest(tmp_path):
    app, client = site(tmp_path)
    store = app.extensions["secure_app.store"]
    token = csrf_token(client, "/account-details")
    names = ("full_name", "email", "phone", "bio")
    # With a photo the page also puts full_name in the <img> alt attribute.
    photo = {"photo": (io.BytesIO(images.png()), "me.png"), "csrf_token": token}
    assert client.post("/account-details", data=photo).status_code == 303

    @given(data=st.data())
    def submit(data) -> None:
        sent = spoil(data, **{n: data.draw(VALID_ACCOUNT[n], label=n) for n in names})
        before, old = stored_records(app), store.get("alice")
        response = client.post("/account-details", data=form(token, **sent))
        assert response.status_code in (303, 413, 422), response.status_code
        # A missing field keeps its stored value; a repeated one counts once.
        wanted = {n: old[n] if sent[n] is None else first(sent[n]) for n in names}
        verdicts = [expected_valid(n, wanted[n]) for n in names]
        if all(verdicts):
            assert response.status_code == 303
        if response.status_code == 303:
            assert False not in verdicts
            new = store.get("alice")
            assert {n: new[n] for n in names} == wanted
            page = client.get("/account-details").get_data(as_text=True)
            values = parse(page).values
            assert {n: values[n] for n in names} == wanted  # escaped, so it reads back exactly
            assert_escaped(page)
        else:
            assert stored_records(app) == before
            if response.status_code == 422:
                assert False in verdicts or verdicts[1] is None  # None: the email's verdict
                page = response.get_data(as_text=True)
                assert 'class="error"' in page
                assert_escaped(page)

    submit()


def test_register_form_creates_only_valid_accounts_and_never_5xx(tmp_path):
    app = make_app(tmp_path)
    client = app.test_client()
    store = app.extensions["secure_app.store"]
    token = csrf_token(client, "/register")
    good_name = st.from_regex(r"[A-Za-z0-9._-]{3,32}", fullmatch=True)

    @given(data=st.data())
    def submit(data) -> None:
        password = data.draw(STRONG)
        username, password, confirm = spoil(
            data, username=data.draw(good_name), password=password, confirm=password
        ).values()
        name = (first(username) or "").lower()
        secret = first(password) or ""
        taken = name in store
        before = stored_records(app)
        response = client.post(
            "/register", data=form(token, username=username, password=password, confirm=confirm)
        )
        assert response.status_code in (302, 413, 422), response.status_code
        valid = (
            USERNAME_RE.match(name)
            and secret == first(confirm)
            and secret.strip()
            and passwords.policy_problem(secret, name) is None
        )
        if valid and not taken:
            assert response.status_code == 302
        if response.status_code == 302:
            assert valid and not taken
            with app.app_context():
                assert passwords.verify_password(store.get(name)["password_hash"], secret)
            assert store.get(name)["username"] == name
        else:
            assert (stored_records(app)) == before
            if response.status_code == 422:
                page = response.get_data(as_text=True)
                assert 'class="error"' in page
                assert_escaped(page)
                assert parse(page).values.get("username", "") == name

    submit()


def test_login_form_admits_only_the_right_password_and_never_5xx(tmp_path):
    app = make_app(tmp_path)
    client = app.test_client()
    assert AuthActions(client).register().status_code == 302
    usernames = st.one_of(FIELD, st.sampled_from(["alice", "ALICE", "alice\u200b", "ALİCE"]))

    @given(data=st.data())
    def submit(data) -> None:
        username, password = spoil(
            data, username=data.draw(st.sampled_from(["alice", "ALICE"])), password=PASSWORD
        ).values()
        if data.draw(st.booleans()):  # look-alikes of the right name
            username = data.draw(usernames, label="username")
        before = stored_records(app)
        # Log out, and take a fresh token: a login starts a new session (no fixation).
        with client.session_transaction() as session:
            session.clear()
        token = csrf_token(client, "/login")
        response = client.post("/login", data=form(token, username=username, password=password))
        assert response.status_code in (200, 302, 413), response.status_code
        name = (first(username) or "").lower()
        right = name == "alice" and first(password) == PASSWORD
        assert (response.status_code == 302) == right
        if right:
            with client.session_transaction() as session:
                assert session["uid"] == "alice"
        else:
            assert stored_records(app) == before  # a failed login writes nothing
            if response.status_code == 200:
                page = response.get_data(as_text=True)
                assert LOGIN_FAILED in page
                assert_escaped(page)
                assert parse(page).values.get("username", "") == name

    submit()


def test_change_password_form_changes_only_on_valid_input_and_never_5xx(tmp_path):
    app, client = site(tmp_path)
    store = app.extensions["secure_app.store"]
    token = csrf_token(client, "/change-password")
    current = [PASSWORD]  # changes whenever an example succeeds

    @given(data=st.data())
    def submit(data) -> None:
        new = data.draw(STRONG)
        old, new, confirm = spoil(data, current=current[0], new=new, confirm=new).values()
        before = stored_records(app)
        response = client.post(
            "/change-password",
            data=form(token, current_password=old, new_password=new, confirm=confirm),
        )
        assert response.status_code in (302, 413, 422), response.status_code
        secret = first(new) or ""
        valid = (
            first(old) == current[0]
            and secret == first(confirm)
            and secret.strip()
            and passwords.policy_problem(secret, "alice") is None
        )
        assert (response.status_code == 302) == bool(valid)
        if valid:
            current[0] = secret
            with app.app_context():
                assert passwords.verify_password(store.get("alice")["password_hash"], secret)
            # This session got a new id and stays logged in.
            assert client.get("/account-details").status_code == 200
        else:
            assert stored_records(app) == before
            if response.status_code == 422:
                page = response.get_data(as_text=True)
                assert 'class="error"' in page
                assert_escaped(page)

    submit()
