"""Error pages: every status in the layout, no traceback, and a 413 for each size limit."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from flask import abort, g, request
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from helpers import PASSWORD, csrf_token, make_app, stored_bytes
from secure_app.store import StoreError

SECRET_DETAIL = "internal-detail-7f3a /srv/secret/path"
LEAKS = ("Traceback", "werkzeug", "Werkzeug Debugger", "RuntimeError", SECRET_DETAIL)


def _crash() -> str:
    raise RuntimeError(SECRET_DETAIL)


def _store_down() -> str:
    raise StoreError(SECRET_DETAIL)


def _forbidden() -> str:
    abort(403)


class _BrokenUser:
    """A user whose every attribute fails: the layout cannot render."""

    def __getattr__(self, name: str) -> object:
        raise RuntimeError(SECRET_DETAIL)


def _crash_with_broken_layout() -> str:
    g.user = _BrokenUser()
    raise RuntimeError(SECRET_DETAIL)


def add_test_routes(app) -> None:
    """Routes that fail on purpose; they exist only in the test app."""
    app.add_url_rule("/_test/crash", "crash", _crash)
    app.add_url_rule("/_test/store-down", "store_down", _store_down)
    app.add_url_rule("/_test/forbidden", "forbidden", _forbidden)
    app.add_url_rule("/_test/broken-layout", "broken_layout", _crash_with_broken_layout)


@pytest.fixture
def app(tmp_path: Path):
    # Production behaviour for unhandled errors: a page, not an exception in the test.
    app = make_app(tmp_path, PROPAGATE_EXCEPTIONS=False)
    add_test_routes(app)
    return app


def assert_layout_page(response, code: int) -> str:
    """The status page is a child of _base.html and shows nothing internal."""
    assert response.status_code == code
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert '<header class="site-header">' in page
    assert '<footer class="site-footer">' in page
    assert "/public/css/site.css" in page
    assert f"Error {code}" in page
    for leak in LEAKS:
        assert leak not in page
    return page


# -- each status page -----------------------------------------------------------


def test_400_for_a_post_without_csrf_token(client):
    page = assert_layout_page(client.post("/login", data={"username": "alice"}), 400)
    assert "security token" in page


def test_403_page(client):
    assert_layout_page(client.get("/_test/forbidden"), 403)


@pytest.mark.parametrize("path", ["/no-such-page", "/%ff%fe", "/..%2f..%2fetc/passwd", "/x" * 2000])
def test_404_for_unknown_and_malformed_paths(client, path):
    assert_layout_page(client.get(path), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/", {"GET", "HEAD", "OPTIONS"}),
        ("DELETE", "/second", {"GET", "HEAD", "OPTIONS"}),
        ("GET", "/logout", {"POST", "OPTIONS"}),
        ("PUT", "/login", {"GET", "HEAD", "POST", "OPTIONS"}),
    ],
)
def test_405_page_names_the_allowed_methods(client, method, path, allowed):
    response = client.open(path, method=method)
    assert_layout_page(response, 405)
    assert {m.strip() for m in response.headers["Allow"].split(",")} == allowed


def test_429_page_says_when_to_retry(tmp_path):
    app = make_app(tmp_path, RATELIMIT_ENABLED=True, LOGIN_RATE_LIMIT_IP="1 per minute")
    client = app.test_client()
    form = {"username": "nobody", "password": "x" * 20, "csrf_token": csrf_token(client)}
    assert client.post("/login", data=form).status_code == 200
    response = client.post("/login", data=form)
    page = assert_layout_page(response, 429)
    seconds = int(response.headers["Retry-After"])
    assert 1 <= seconds <= 60
    assert f"{seconds} second" in page


def test_500_page_is_the_layout_and_the_detail_goes_to_the_log(client, caplog):
    with caplog.at_level(logging.ERROR):
        assert_layout_page(client.get("/_test/crash"), 500)
    # The operator still gets the traceback, in the log.
    assert SECRET_DETAIL in caplog.text


FORGED = '{"event": "login_success", "username": "admin", "ip": "203.0.113.7"}'


def _crash_under_test_crash() -> None:
    if request.path.startswith("/_test/crash/"):  # any path, line breaks included
        raise RuntimeError(SECRET_DETAIL)


def test_a_crash_log_line_cannot_be_split_by_the_path(app, client, caplog):
    """Flask logs "Exception on <decoded path>": a %0a there must not start a new line."""
    app.before_request(_crash_under_test_crash)
    with caplog.at_level(logging.ERROR):
        response = client.get("/_test/crash/x%0a" + quote(FORGED) + "%0d%0ay")
    assert_layout_page(response, 500)
    (record,) = [r for r in caplog.records if "Exception on" in r.getMessage()]
    message = record.getMessage()
    assert "\n" not in message and "\r" not in message
    assert "\\n" + FORGED in message  # kept, escaped, for the operator to read


def test_500_falls_back_to_plain_text_when_the_layout_itself_fails(client):
    response = client.get("/_test/broken-layout")
    assert response.status_code == 500
    assert response.mimetype == "text/plain"
    assert response.get_data(as_text=True) == "500 Internal Server Error\n"


def test_untrusted_host_gets_a_plain_400_not_a_500(tmp_path):
    """A Host outside TRUSTED_HOSTS is refused; the layout cannot be built, yet the 400 stays."""
    app = make_app(tmp_path, TRUSTED_HOSTS=["example.org"])
    client = app.test_client()
    refused = client.get("/", headers={"Host": "evil.example"})
    assert refused.status_code == 400
    assert "Traceback" not in refused.get_data(as_text=True)
    assert client.get("/", base_url="http://example.org").status_code == 200


def test_503_when_the_store_fails_says_nothing_was_saved(client):
    page = assert_layout_page(client.get("/_test/store-down"), 503)
    assert "nothing was changed" in page


# -- 413 for each size limit --------------------------------------------------------


def account_post(client, **fields):
    """POST the account form as the browser does (multipart), with a valid CSRF token."""
    data = {"csrf_token": csrf_token(client, "/account-details"), **fields}
    return client.post("/account-details", data=data, content_type="multipart/form-data")


def test_413_when_the_body_exceeds_max_content_length(app, logged_in):
    before = stored_bytes(app)
    limit = app.config["MAX_CONTENT_LENGTH"]
    photo = (io.BytesIO(b"\x89PNG" + b"\0" * limit), "big.png")
    response = account_post(logged_in, full_name="Mallory", photo=photo)
    assert_layout_page(response, 413)
    assert stored_bytes(app) == before


def test_413_when_one_text_field_exceeds_max_form_memory_size(app, logged_in):
    before = stored_bytes(app)
    response = account_post(logged_in, bio="b" * (app.config["MAX_FORM_MEMORY_SIZE"] + 1))
    assert_layout_page(response, 413)
    assert stored_bytes(app) == before


def test_413_when_the_form_has_more_parts_than_max_form_parts(app, logged_in):
    before = stored_bytes(app)
    extra = {f"field{i}": "x" for i in range(app.config["MAX_FORM_PARTS"])}
    response = account_post(logged_in, full_name="Mallory", **extra)
    assert_layout_page(response, 413)
    assert stored_bytes(app) == before


def test_413_when_a_form_without_a_file_sends_more_than_the_text_limit(app, client):
    # An urlencoded body is read into memory whole: only the upload form may
    # send megabytes, every other form is held to the text-field limit.
    before = stored_bytes(app)
    size = app.config["MAX_FORM_MEMORY_SIZE"] + 1
    form = {
        "username": "mallory",
        "password": PASSWORD,
        "confirm": PASSWORD,
        "csrf_token": csrf_token(client, "/register"),
        "padding": "p" * size,
    }
    response = client.post("/register", data=form)
    assert_layout_page(response, 413)
    assert stored_bytes(app) == before


def noise_png(size: int) -> bytes:
    """A real PNG of random pixels: it does not compress, so it is nearly ``size`` bytes."""
    side = int((size / 3) ** 0.5)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_largest_real_form_fits_within_the_limits(app, logged_in):
    # Every text field at its maximum in four-byte characters, and a photo of
    # almost 5 MiB: the limits must not refuse what the form allows.
    photo = noise_png(5 * 1024 * 1024 - 64 * 1024)
    assert 4.5 * 1024 * 1024 < len(photo) <= 5 * 1024 * 1024
    response = account_post(
        logged_in,
        full_name="\U0001f600" * 100,
        email="a@example.org",
        phone="+1 (555) 000-0000",
        bio="\U0001f600" * 1000,
        photo=(io.BytesIO(photo), "big.png"),
    )
    assert response.status_code == 303
    assert "\U0001f600" * 1000 in logged_in.get("/account-details").get_data(as_text=True)


# -- bad bodies never become a 5xx ------------------------------------------------------

CONTENT_TYPES = st.sampled_from(
    [
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "multipart/form-data; boundary=xyz",
        "multipart/form-data; boundary=",
        "application/json",
        "text/plain; charset=utf-16",
        "application/x-www-form-urlencoded; charset=bogus",
    ]
)


@given(
    body=st.binary(max_size=512) | st.text(max_size=256).map(str.encode),
    content_type=CONTENT_TYPES,
    path=st.sampled_from(["/login", "/register", "/logout", "/account-details"]),
)
def test_malformed_bodies_get_a_status_page_never_a_5xx(app, body, content_type, path):
    client = app.test_client()
    response = client.post(path, data=body, content_type=content_type)
    assert response.status_code in (400, 413, 415)
    assert_layout_page(response, response.status_code)


# -- the production entry point ---------------------------------------------------------

WSGI_PROBE = """
from secure_app.wsgi import app

def crash():
    raise RuntimeError("{detail}")

app.add_url_rule("/_test/crash", "crash", crash)
response = app.test_client().get("/_test/crash")
print(app.debug, app.config["DEBUG"], app.config["PROPAGATE_EXCEPTIONS"], response.status_code)
print(response.get_data(as_text=True))
"""


def test_wsgi_entry_point_forces_debug_off_even_with_flask_debug(tmp_path):
    env = {
        **os.environ,
        "FLASK_DEBUG": "1",
        "FLASK_DATA_DIR": str(tmp_path / "data"),
        "FLASK_PHOTO_DIR": str(tmp_path / "photos"),
        "FLASK_INSTANCE_PATH": str(tmp_path / "instance"),
    }
    result = subprocess.run(
        [sys.executable, "-c", WSGI_PROBE.format(detail=SECRET_DETAIL)],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    first, _, page = result.stdout.partition("\n")
    assert first == "False False False 500"
    assert '<header class="site-header">' in page
    for leak in LEAKS:
        assert leak not in page
