"""Form routes take web forms only: every other body is a 415 that changes nothing (issue 13).

Flask-WTF reads a JSON body as the form (``request.get_json()``) and takes
the CSRF token from ``X-CSRFToken``, so a JSON body reached every field rule
with dicts, lists, numbers and lone surrogates that no rule was written for:
a 5 MiB dict stored as a full name, 500s on login, guesses that skipped the
per-user limit. Each attack below carries a valid CSRF token in the body and
in the header, from a logged-in client whose photo and second session mean
that any route that acted would change the stored bytes.
"""

from __future__ import annotations

import io
import json

import pytest
from argon2 import PasswordHasher

import images
from helpers import PASSWORD, AuthActions, csrf_token, make_app, route_urls, stored_bytes

FIVE_MIB = 5 * 1024 * 1024
WRONG = "definitely not the right passphrase"
PROFILE_FIELDS = ("full_name", "email", "phone", "bio")


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


def _fields(token: str) -> dict[str, object]:
    """Plausible values for every route's fields, so the body is worth acting on if read."""
    return {
        "csrf_token": token,
        "username": "alice",
        "password": PASSWORD,
        "confirm": PASSWORD,
        "current_password": PASSWORD,
        "new_password": "tangerine walrus gallops beneath quiet harbour",
        "full_name": "Mallory",
        "bio": "sent as something else than a form",
    }


def _multipart_mixed(token: str) -> bytes:
    parts = [
        f'--B\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in _fields(token).items()
    ]
    return ("".join(parts) + "--B--\r\n").encode()


def _urlencoded(token: str, encoding: str) -> bytes:
    text = "&".join(f"{k}={v}" for k, v in _fields(token).items()).replace(" ", "+")
    return (text + "&full_name=Zo\u00eb").encode(encoding)


# (id, Content-Type or None, body made from the CSRF token): the audit's exact
# payloads first, then every other kind of body a client can send.
BODIES = [
    ("json-string", "application/json", lambda t: b'"abc"'),
    ("json-number", "application/json", lambda t: b"123"),
    ("json-true", "application/json", lambda t: b"true"),
    ("json-null", "application/json", lambda t: b"null"),
    (
        "json-password-dict",
        "application/json",
        lambda t: _json({"csrf_token": t, "username": "alice", "password": {"a": 1}}),
    ),
    ("json-lone-surrogate", "application/json", lambda t: b'"\\ud800"'),
    (
        "json-surrogate-fields",
        "application/json",
        lambda t: _json({k: "\ud800" for k in _fields(t)} | {"csrf_token": t}),
    ),
    ("json-deep-array", "application/json", lambda t: b"[" * 10_000 + b"]" * 10_000),
    (
        "json-deep-object",
        "application/json",
        lambda t: b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    ),
    (
        "json-5mib-full-name",
        "application/json",
        lambda t: _json({"csrf_token": t, "full_name": {"x": "A" * FIVE_MIB}}),
    ),
    (
        "json-duplicate-keys",
        "application/json",
        lambda t: b'{"full_name": "a", "full_name": {"x": 1}, "csrf_token": "' + t.encode() + b'"}',
    ),
    ("json-valid-fields", "application/json; charset=utf-8", lambda t: _json(_fields(t))),
    (
        "text-plain",
        "text/plain",
        lambda t: "\r\n".join(f"{k}={v}" for k, v in _fields(t).items()).encode(),
    ),
    (
        "application-xml",
        "application/xml",
        lambda t: (
            b"<form>"
            + b"".join(f"<{k}>{v}</{k}>".encode() for k, v in _fields(t).items())
            + b"</form>"
        ),
    ),
    ("multipart-mixed", "multipart/mixed; boundary=B", _multipart_mixed),
    ("octet-stream", "application/octet-stream", lambda t: _urlencoded(t, "utf-8")),
    ("no-content-type", None, lambda t: _urlencoded(t, "utf-8")),
    # Werkzeug decodes every form as UTF-8 whatever it declares, so a body in
    # another charset would be misread (and stored as mojibake): refused too.
    (
        "urlencoded-utf-16",
        "application/x-www-form-urlencoded; charset=utf-16",
        lambda t: _urlencoded(t, "utf-16"),
    ),
    (
        "urlencoded-latin-1",
        "application/x-www-form-urlencoded; charset=latin-1",
        lambda t: _urlencoded(t, "latin-1"),
    ),
]


def site(tmp_path, **config: object):
    """A client logged in as alice, with a photo and a second session: any acting route writes."""
    app = make_app(tmp_path, **config)
    client = app.test_client()
    auth = AuthActions(client)
    assert auth.register().status_code == 302
    assert auth.login().status_code == 302
    token = csrf_token(client, "/account-details")
    photo = {"photo": (io.BytesIO(images.png()), "me.png"), "csrf_token": token}
    assert client.post("/account-details", data=photo).status_code == 303
    assert AuthActions(app.test_client()).login().status_code == 302
    return app, client, csrf_token(client, "/account-details")


def profile(app) -> dict[str, object]:
    record = app.extensions["secure_app.store"].get("alice")
    return {field: record.get(field) for field in PROFILE_FIELDS}


def assert_profile_is_text(app) -> None:
    """Every stored profile field is a str, whatever was sent (no dict, list or number)."""
    kinds = {field: type(value).__name__ for field, value in profile(app).items()}
    assert kinds == dict.fromkeys(PROFILE_FIELDS, "str"), kinds


def _post_routes() -> list[str]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        return route_urls(make_app(Path(folder)), "POST")


POST_ROUTES = _post_routes()


def test_every_known_form_route_is_covered():
    """The enumeration finds the routes of today (and later ones join by themselves)."""
    assert {
        "/register",
        "/login",
        "/logout",
        "/logout-others",
        "/account-details",
        "/account-details/remove-photo",
        "/change-password",
        "/delete-account",
    } <= set(POST_ROUTES)


@pytest.mark.parametrize("route", POST_ROUTES)
@pytest.mark.parametrize(
    ("content_type", "make_body"), [b[1:] for b in BODIES], ids=[b[0] for b in BODIES]
)
def test_a_body_that_is_not_a_web_form_is_refused_with_415_and_stores_nothing(
    tmp_path, route, content_type, make_body
):
    app, client, token = site(tmp_path)
    before = stored_bytes(app)
    response = client.post(
        route, data=make_body(token), content_type=content_type, headers={"X-CSRFToken": token}
    )
    assert response.status_code == 415, response.status_code
    assert stored_bytes(app) == before
    assert_profile_is_text(app)
    page = response.get_data(as_text=True)
    assert 'class="site-header"' in page and "Traceback" not in page  # the site's error page
    assert client.get("/account-details").status_code == 200  # still logged in, page renders


def test_the_audits_5_mib_json_full_name_never_grows_the_data_file(tmp_path):
    """Twenty saves of a 5 MiB dict once grew the data file from 12 to 132 MiB."""
    app, client, token = site(tmp_path)
    before = stored_bytes(app)
    body = {"csrf_token": token, "full_name": {"x": "A" * FIVE_MIB}}
    for _ in range(3):
        response = client.post("/account-details", json=body, headers={"X-CSRFToken": token})
        assert response.status_code == 415
    assert stored_bytes(app) == before
    assert profile(app)["full_name"] == ""


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=UTF-8",
        "multipart/form-data",
    ],
)
def test_web_forms_are_still_accepted_and_stored_as_text(tmp_path, content_type):
    """The control: what a browser sends is still saved, so the 415 is not a blanket refusal."""
    app, client, token = site(tmp_path)
    data = {"csrf_token": token, "full_name": "Zoë Ångström", "phone": "+1 (555) 0100"}
    response = client.post("/account-details", data=data, content_type=content_type)
    assert response.status_code == 303
    assert profile(app) == {
        "full_name": "Zoë Ångström",
        "email": "",
        "phone": "+1 (555) 0100",
        "bio": "",
    }
    assert_profile_is_text(app)


@pytest.mark.parametrize("field", PROFILE_FIELDS)
def test_a_file_sent_in_a_text_field_is_never_stored_and_never_a_5xx(tmp_path, field):
    """A multipart part with a filename lands in ``request.files``: no text field takes it."""
    app, client, token = site(tmp_path)
    before = profile(app)
    data = {"csrf_token": token, field: (io.BytesIO(b"x" * 300_000), "notes.txt")}
    response = client.post("/account-details", data=data, content_type="multipart/form-data")
    assert response.status_code < 500
    assert_profile_is_text(app)
    assert profile(app)[field] == before[field]
    assert client.get("/account-details").status_code == 200


@pytest.mark.parametrize("route", POST_ROUTES)
@pytest.mark.parametrize("token_in", ["nowhere", "header", "body"])
def test_a_multipart_part_without_a_name_is_never_a_5xx(tmp_path, route, token_in):
    """Werkzeug files a part with no ``name`` under the key None; CSRF and the forms meet it."""
    app, client, token = site(tmp_path)
    before = stored_bytes(app)
    token_part = f'--B\r\nContent-Disposition: form-data; name="csrf_token"\r\n\r\n{token}\r\n'
    body = (token_part if token_in == "body" else "") + (
        "--B\r\nContent-Disposition: form-data\r\n\r\nMallory\r\n--B--\r\n"
    )
    headers = {"X-CSRFToken": token} if token_in == "header" else {}
    response = client.post(
        route, data=body, content_type="multipart/form-data; boundary=B", headers=headers
    )
    assert response.status_code < 500
    if token_in == "nowhere":
        assert response.status_code == 400
        assert stored_bytes(app) == before
    assert_profile_is_text(app)


@pytest.mark.parametrize("route", POST_ROUTES)
def test_a_multipart_text_part_over_the_form_memory_limit_is_413(tmp_path, route):
    """Only a file part may be large: text parts keep to MAX_FORM_MEMORY_SIZE, uploads too."""
    app, client, token = site(tmp_path)
    before = stored_bytes(app)
    big = "b" * (app.config["MAX_FORM_MEMORY_SIZE"] + 1)
    data = {"csrf_token": token, "bio": big, "full_name": "Mallory"}
    response = client.post(route, data=data, content_type="multipart/form-data")
    assert response.status_code == 413
    assert stored_bytes(app) == before


@pytest.mark.parametrize("route", POST_ROUTES)
def test_a_multipart_body_with_too_many_parts_is_413(tmp_path, route):
    app, client, token = site(tmp_path)
    before = stored_bytes(app)
    data = {"csrf_token": token, "full_name": "Mallory"}
    data |= {f"extra{i}": "x" for i in range(app.config["MAX_FORM_PARTS"])}
    response = client.post(route, data=data, content_type="multipart/form-data")
    assert response.status_code == 413
    assert stored_bytes(app) == before


def test_json_login_guesses_never_reach_the_password_check_nor_skip_the_user_limit(
    tmp_path, monkeypatch
):
    """Guesses sent as JSON were keyed to the shared junk-name bucket, not to alice's.

    Every Argon2 verification against alice's hash is counted (the real
    verify runs): at most LOGIN_RATE_LIMIT_USER of them, however the
    guesses are sent, and the next form-encoded guess meets the 429.
    """
    app = make_app(
        tmp_path,
        RATELIMIT_ENABLED=True,
        LOGIN_RATE_LIMIT_IP="100 per minute",
        LOGIN_RATE_LIMIT_USER="5 per minute",
        REGISTER_RATE_LIMIT_IP="100 per minute",
    )
    assert AuthActions(app.test_client()).register().status_code == 302
    alice_hash = app.extensions["secure_app.store"].get("alice")["password_hash"]
    checked: list[str] = []
    real_verify = PasswordHasher.verify

    def counting_verify(self, hash, password):  # noqa: A002  (argon2's own parameter name)
        checked.append(hash)
        return real_verify(self, hash, password)

    monkeypatch.setattr(PasswordHasher, "verify", counting_verify)
    client = app.test_client()
    token = csrf_token(client, "/login")
    guess = {"csrf_token": token, "username": "alice", "password": WRONG}
    json_answers = [
        client.post("/login", json=guess, headers={"X-CSRFToken": token}).status_code
        for _ in range(5)
    ]
    checks_by_json = checked.count(alice_hash)
    form_answers = [client.post("/login", data=guess).status_code for _ in range(6)]
    assert checked.count(alice_hash) <= 5, (
        f"{checked.count(alice_hash)} guesses at alice's password in one minute "
        f"(JSON answers {json_answers}, form answers {form_answers})"
    )
    assert json_answers == [415] * 5
    assert checks_by_json == 0
    assert form_answers == [200] * 5 + [429]
