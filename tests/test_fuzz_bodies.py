"""Hypothesis against every route, method, Content-Type and body shape (issue 13, finding 4).

``test_fuzz_forms.py`` fuzzes the fields of real forms; this fuzzes the
envelope: JSON scalars, arrays, 10,000 levels of nesting, lone surrogates
(``\\ud800`` escapes in JSON, raw bytes in forms), duplicate keys, huge
numbers, wrong and unknown charsets, invalid UTF-8, files in text fields;
sent by an anonymous or a logged-in client, with a valid, wrong or no CSRF
token, in the body, the ``X-CSRFToken`` header or both. Properties: never a
5xx; a POST body to a form route that is not a UTF-8 web form is a 415;
nothing is stored unless the request was a web form with a valid token,
and then every stored profile field is a str and the account page renders.
"""

from __future__ import annotations

import json
from urllib.parse import quote_plus

from argon2 import PasswordHasher
from hypothesis import given, settings
from hypothesis import strategies as st
from test_content_types import PROFILE_FIELDS, WRONG
from test_fuzz_forms import PAYLOADS
from werkzeug.http import parse_options_header

from helpers import PASSWORD, AuthActions, csrf_token, make_app, route_urls, stored_bytes

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
FIELD_NAMES = (
    "csrf_token",
    "username",
    "password",
    "confirm",
    "current_password",
    "new_password",
    *PROFILE_FIELDS,
    "photo",
    "session_id",
    "code",
)
SURROGATES = ("\ud800", "\udfff", "a\udc80b", "\ud83d")  # lone halves, no pair
# Invalid UTF-8: a stray continuation byte, an overlong NUL, a surrogate as
# CESU-8 writes it, a truncated sequence, bytes no UTF-8 ever has.
BAD_UTF8 = (
    b"\x80",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xe2\x82",
    b"\xff\xfe",
    b"\xf8\x88\x80\x80\x80",
)
CHARSETS = (
    "utf-8",
    "UTF-8",
    "utf8",
    "utf-16",
    "utf-16-le",
    "latin-1",
    "iso-8859-1",
    "x-klingon",
    "",
)
OTHER_TYPES = (
    "application/json",
    "application/json; charset=utf-16",
    "application/merge-patch+json",
    "text/plain",
    "text/html",
    "application/xml",
    "text/xml",
    "multipart/mixed; boundary=B",
    "multipart/form-data",  # no boundary
    "application/octet-stream",
    *(f"application/x-www-form-urlencoded; charset={charset}" for charset in CHARSETS),
    "APPLICATION/X-WWW-FORM-URLENCODED",
    "application/x-www-form-urlencoded;;;",
    "*/*",
    "form",
    "",
    None,
)


class Body(bytes):
    """A request body whose repr stays short in a Hypothesis report (10,000 levels are long)."""

    def __repr__(self) -> str:
        raw = bytes(self)
        if len(raw) <= 400:
            return repr(raw)
        return f"{raw[:200]!r} + <{len(raw) - 260} bytes> + {raw[-60:]!r}"

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        printer.text(repr(self))


TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(PAYLOADS + list(SURROGATES)),
    st.builds(lambda a, s: a + s, st.text(max_size=10), st.sampled_from(SURROGATES)),
)
# Numbers as JSON text: past Python's 4300-digit int limit, past a double, NaN.
HUGE_NUMBERS = st.sampled_from(
    ["1" * 5000, "-" + "9" * 5000, "1e99999", "-1.5e-99999", "NaN", "-Infinity", str(10**400)]
)
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.just(10**400), TEXT)
# json.dumps escapes a lone surrogate as \\udXXX: valid JSON text, invalid Unicode.
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), TEXT), inner, max_size=4),
    ),
    max_leaves=8,
)


@st.composite
def json_body(draw, token: str | None) -> bytes:
    """A JSON text: any value, a form-like object, deep nesting, duplicate keys or huge numbers."""
    shape = draw(st.sampled_from(["value", "form", "deep", "duplicates", "number"]))
    if shape == "value":
        return Body(json.dumps(draw(JSON_VALUE)).encode())
    if shape == "deep":
        depth = draw(st.sampled_from([1000, 10_000]))
        if draw(st.booleans()):
            return Body(b"[" * depth + b"]" * depth)
        return Body(b'{"full_name":' * depth + b"1" + b"}" * depth)
    if shape == "number":
        number = draw(HUGE_NUMBERS)
        if draw(st.booleans()):
            return Body(number.encode())
        field = json.dumps(draw(st.sampled_from(FIELD_NAMES)))
        return Body(f'{{"csrf_token": {json.dumps(token)}, {field}: {number}}}'.encode())
    fields = draw(st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUE, max_size=5))
    if token is not None:
        fields["csrf_token"] = token
    members = [f"{json.dumps(k)}:{json.dumps(v)}" for k, v in fields.items()]
    if shape == "duplicates" and members:
        # The second copy of a key: which one wins is the parser's choice.
        members += [f"{json.dumps(k)}:{json.dumps(draw(JSON_VALUE))}" for k in fields]
    return Body(("{" + ",".join(members) + "}").encode())


def encode(text: str, encoding: str) -> bytes:
    # surrogatepass: a lone surrogate goes out as the raw bytes a careless client sends.
    return text.encode(encoding, "surrogatepass" if encoding.startswith("utf") else "replace")


@st.composite
def form_pairs(draw, token: str | None) -> list[tuple[str, str]]:
    # Profile fields a third of the time: they are the ones a save stores.
    names = st.one_of(st.sampled_from(PROFILE_FIELDS), st.sampled_from(FIELD_NAMES), TEXT)
    pairs = draw(st.lists(st.tuples(names, TEXT), max_size=6))
    if token is not None:
        pairs.insert(draw(st.integers(0, len(pairs))), ("csrf_token", token))
    return pairs


@st.composite
def urlencoded_body(draw, token: str | None) -> bytes:
    """``k=v&...`` in some encoding, perhaps with raw invalid UTF-8 spliced in."""
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1"]))
    quote = draw(st.booleans())
    parts = []
    for name, value in draw(form_pairs(token)):
        if quote:
            parts.append(
                quote_plus(name, errors="surrogatepass")
                + "="
                + quote_plus(value, errors="surrogatepass")
            )
        else:
            parts.append(f"{name}={value}")
    body = encode("&".join(parts), encoding)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.sampled_from(BAD_UTF8)) + body[at:]
    return Body(body)


@st.composite
def multipart_body(draw, token: str | None) -> bytes:
    """A ``multipart/form-data`` body with boundary ``B``: files in text fields, nameless parts."""
    chunks = []
    for name, value in draw(form_pairs(token)):
        header = f'Content-Disposition: form-data; name="{name}"'
        if name != "csrf_token":
            header = draw(
                st.sampled_from(
                    [
                        header,
                        header,
                        header + '; filename="notes.txt"',  # a file where text is expected
                        "Content-Disposition: form-data",  # no name at all
                        'Content-Disposition: form-data; filename="x"',
                    ]
                )
            )
        charset = draw(st.one_of(st.none(), st.sampled_from(CHARSETS)))
        if charset is not None:
            header += f"\r\nContent-Type: text/plain; charset={charset}"
        data = encode(value, "utf-8")
        if name != "csrf_token" and draw(st.integers(0, 3)) == 0:
            data += draw(st.sampled_from(BAD_UTF8))  # the token stays intact: it is not fuzzed
        chunks.append(b"--B\r\n" + encode(header, "utf-8") + b"\r\n\r\n" + data + b"\r\n")
    return Body(b"".join(chunks) + b"--B--\r\n")


SHAPES = {
    "json": (json_body, "application/json"),
    "urlencoded": (urlencoded_body, "application/x-www-form-urlencoded"),
    "multipart": (multipart_body, "multipart/form-data; boundary=B"),
}


def form_typed(content_type: str | None, body: bytes) -> bool:
    """Whether the server must read this body as a web form: its type, in UTF-8, or no body."""
    if not content_type or not content_type.split(";")[0].strip():
        return body == b""
    mimetype, params = parse_options_header(content_type)
    charset = params.get("charset", "utf-8").lower()
    return mimetype.lower() in FORM_TYPES and charset in ("utf-8", "utf8")


class Site:
    """One app for every example: alice, a logged-in client and an anonymous one."""

    def __init__(self, tmp_path) -> None:
        self.app = make_app(tmp_path)
        self.store = self.app.extensions["secure_app.store"]
        self.user = self.app.test_client()
        self.anonymous = self.app.test_client()
        self.routes = {m: route_urls(self.app, m) for m in METHODS}
        self.post_routes = set(self.routes["POST"])
        self.every_route = sorted({url for urls in self.routes.values() for url in urls})

    def reset(self) -> None:
        """Give every example the same start: alice with empty details, logged in on ``user``.

        Each example must not depend on the last one (Hypothesis replays and
        shrinks them one by one), so what an earlier one stored is undone here.
        """
        if self.store.get("alice") is None:
            assert AuthActions(self.app.test_client()).register().status_code == 302
        self.store.update("alice", lambda r: r.update(dict.fromkeys(PROFILE_FIELDS, "")))
        with self.user.session_transaction() as session:
            logged_in = session.get("uid") == "alice"
        if not logged_in or self.user.get("/account-details").status_code != 200:
            assert AuthActions(self.user).login().status_code == 302
        with self.anonymous.session_transaction() as session:
            session.pop("uid", None)

    def check_after(self, may_store: bool, before: dict[str, bytes]) -> None:
        """Nothing stored unless allowed; alice's fields are text; her page renders."""
        if not may_store:
            assert stored_bytes(self.app) == before, "a refused request changed the stored data"
        record = self.store.get("alice")
        if record is not None:
            kinds = {f: type(record.get(f, "")).__name__ for f in PROFILE_FIELDS}
            assert kinds == dict.fromkeys(PROFILE_FIELDS, "str"), kinds
        page = self.user.get("/account-details")
        assert page.status_code in (200, 302), page.status_code  # 302: logged out meanwhile


def send(
    site: Site,
    data,
    *,
    route: str,
    method: str,
    shape: str,
    json_only: bool = False,
    placement: str | None = None,
    logged_in: bool | None = None,
):
    """Draw a client, a token placement, a body and a Content-Type; send it; check the rules."""
    if logged_in is None:
        logged_in = data.draw(st.booleans(), label="logged in")
    client = site.user if logged_in else site.anonymous
    token = csrf_token(client, "/login")
    placement = placement or data.draw(
        st.sampled_from(["both", "body", "header", "none", "wrong-header", "wrong-body"]),
        label="token",
    )
    in_body = {"both": token, "body": token, "wrong-body": token[::-1]}.get(placement)
    in_header = {"both": token, "header": token, "wrong-header": token[::-1]}.get(placement)
    make_body, natural_type = SHAPES[shape]
    body = data.draw(make_body(in_body), label="body")
    content_type = natural_type
    if not json_only and data.draw(st.booleans(), label="other content type"):
        content_type = data.draw(st.sampled_from(OTHER_TYPES), label="content type")
        if content_type and content_type.startswith("multipart/form-data") and shape == "multipart":
            content_type += "; boundary=B"
    headers = {"X-CSRFToken": in_header} if in_header else {}
    before = stored_bytes(site.app)
    response = client.open(
        route, method=method, data=body, content_type=content_type, headers=headers
    )
    assert response.status_code < 500, response.status_code
    is_form = form_typed(content_type, body)
    posted = method == "POST" and route in site.post_routes
    token_valid = placement in ("both", "header") or (placement == "body" and shape != "json")
    site.check_after(posted and is_form and token_valid, before)
    if posted and not is_form:
        assert response.status_code == 415, response.status_code


def test_any_route_method_and_body_never_5xx_and_stores_only_real_forms(tmp_path):
    site = Site(tmp_path)

    @settings(report_multiple_bugs=False)  # shrink one failure, not each kind of 500
    @given(data=st.data())
    def request(data) -> None:
        site.reset()
        route = data.draw(st.sampled_from(site.every_route), label="route")
        methods = [m for m in METHODS if route in site.routes[m]]
        method = data.draw(
            st.one_of(st.sampled_from(methods), st.sampled_from(METHODS)), label="method"
        )
        shape = data.draw(st.sampled_from(sorted(SHAPES)), label="shape")
        send(site, data, route=route, method=method, shape=shape)

    request()


def test_json_bodies_to_form_routes_are_415_and_store_nothing(tmp_path):
    """The audit's door: any JSON text, with a valid token, to any form route."""
    site = Site(tmp_path)

    @settings(report_multiple_bugs=False)  # shrink one failure, not each kind of 500
    @given(data=st.data())
    def request(data) -> None:
        site.reset()
        route = data.draw(st.sampled_from(sorted(site.post_routes)), label="route")
        send(site, data, route=route, method="POST", shape="json", json_only=True)

    request()


def test_odd_bytes_in_web_forms_to_the_account_page_store_only_text(tmp_path):
    """Form types with invalid UTF-8, surrogates, charsets and files in text fields, token valid.

    The account page is where profile fields are stored, so it gets all 40 examples.
    """
    site = Site(tmp_path)

    @settings(report_multiple_bugs=False)  # shrink one failure, not each kind of 500
    @given(data=st.data())
    def request(data) -> None:
        site.reset()
        shape = data.draw(st.sampled_from(["urlencoded", "multipart"]), label="shape")
        send(
            site,
            data,
            route="/account-details",
            method="POST",
            shape=shape,
            placement="both",
            logged_in=True,
        )

    request()


def test_login_answers_json_guesses_without_a_password_check(tmp_path, monkeypatch):
    """No JSON body reaches Argon2, whatever its shape (the per-user limit's key reads forms)."""
    site = Site(tmp_path)
    checked: list[str] = []
    real_verify = PasswordHasher.verify

    def counting_verify(self, hash, password):  # noqa: A002  (argon2's own parameter name)
        checked.append(hash)
        return real_verify(self, hash, password)

    monkeypatch.setattr(PasswordHasher, "verify", counting_verify)

    @settings(report_multiple_bugs=False)
    @given(password=st.one_of(st.just(WRONG), st.just(PASSWORD), JSON_VALUE))
    def guess(password) -> None:
        client = site.anonymous
        token = csrf_token(client, "/login")
        body = {"csrf_token": token, "username": "alice", "password": password}
        checked.clear()
        response = client.post(
            "/login",
            data=json.dumps(body),
            content_type="application/json",
            headers={"X-CSRFToken": token},
        )
        assert response.status_code == 415
        assert checked == []

    site.reset()
    guess()
