"""The perimeter's response headers, asserted exactly, and the https and proxy rules.

Every expected value is written out here, not imported from ``security.py``:
loosening a directive there (adding a source, dropping a directive, weakening
a policy) makes a test here fail.
"""

from __future__ import annotations

import http.client
import io
import re
from pathlib import Path

import pytest
from flask import request
from PIL import Image

from helpers import PASSWORD, AuthActions, csrf_token, make_app, stored_bytes
from secure_app import security
from servers import Gunicorn

PAGE_CSP = {
    "default-src": {"'none'"},
    "script-src": {"'self'"},  # public/js/passkeys.js only, pinned by SRI where it is loaded
    "style-src": {"'self'"},
    "img-src": {"'self'"},
    "form-action": {"'self'"},
    "base-uri": {"'none'"},
    "frame-ancestors": {"'none'"},
    "object-src": {"'none'"},
}
# A photo opened on its own is a document too: it loads nothing, runs nothing.
PHOTO_CSP = {"default-src": {"'none'"}, "frame-ancestors": {"'none'"}, "sandbox": set()}
DENIED_FEATURES = {
    "accelerometer",
    "autoplay",
    "browsing-topics",
    "camera",
    "display-capture",
    "fullscreen",
    "geolocation",
    "gyroscope",
    "hid",
    "magnetometer",
    "microphone",
    "midi",
    "payment",
    "screen-wake-lock",
    "serial",
    "usb",
    "xr-spatial-tracking",
}
# Passkeys: this origin may create and use them; no other origin (no frame) may.
SELF_ONLY_FEATURES = {"publickey-credentials-create", "publickey-credentials-get"}
EVERY_RESPONSE = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
}
HSTS_MIN_AGE = 31536000


def parse_csp(header: str) -> dict[str, set[str]]:
    """Directive name to its set of sources; a directive given twice is an error."""
    policy: dict[str, set[str]] = {}
    for part in header.split(";"):
        tokens = part.split()
        if tokens:
            name = tokens[0].lower()
            assert name not in policy, f"{name} appears twice in {header!r}"
            policy[name] = set(tokens[1:])
    return policy


def parse_permissions(header: str) -> dict[str, str]:
    return dict(item.strip().split("=", 1) for item in header.split(","))


def directives(header: str | None) -> set[str]:
    return {d.strip().lower() for d in (header or "").split(",") if d.strip()}


def assert_perimeter(response, csp: dict[str, set[str]] = PAGE_CSP) -> None:
    """The headers every response carries, each with exactly the expected value."""
    headers = response.headers
    assert len(headers.getlist("Content-Security-Policy")) == 1
    assert parse_csp(headers["Content-Security-Policy"]) == csp
    assert "Content-Security-Policy-Report-Only" not in headers
    for name, value in EVERY_RESPONSE.items():
        assert headers.getlist(name) == [value], name
    permissions = parse_permissions(headers["Permissions-Policy"])
    assert set(permissions) == DENIED_FEATURES | SELF_ONLY_FEATURES
    assert {permissions[f] for f in DENIED_FEATURES} == {"()"}
    assert {permissions[f] for f in SELF_ONLY_FEATURES} == {"(self)"}
    # Nothing may invite other origins in.
    assert not any(name.lower().startswith("access-control-") for name in headers.keys())


def assert_private(response) -> None:
    """A response that depends on the session: never stored by any cache."""
    assert directives(response.headers.get("Cache-Control")) == {"no-store"}
    assert "cookie" in directives(response.headers.get("Vary"))


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


# -- public, authenticated, error, static and photo responses ---------------------


@pytest.mark.parametrize("path", ["/", "/second", "/login", "/register"])
def test_public_pages_send_the_strict_csp_and_isolation_headers(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert_perimeter(response)
    assert_private(response)
    # Plain http without FORCE_HTTPS: no HSTS promise the site cannot keep.
    assert "Strict-Transport-Security" not in response.headers


@pytest.mark.parametrize("path", ["/", "/account-details", "/change-password"])
def test_authenticated_pages_are_never_cached(logged_in, path):
    response = logged_in.get(path)
    assert response.status_code == 200
    assert b"Logged in as" in response.data
    assert_perimeter(response)
    assert_private(response)


def _raise() -> str:
    raise RuntimeError("boom")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/no-such-page", 404),
        ("POST", "/second", 405),
        ("POST", "/login", 400),  # no CSRF token
        ("GET", "/_test/raise", 500),
    ],
)
def test_error_pages_carry_the_same_headers(tmp_path, method, path, status):
    app = make_app(tmp_path, PROPAGATE_EXCEPTIONS=False)
    app.add_url_rule("/_test/raise", "raise", _raise)
    response = app.test_client().open(path, method=method)
    assert response.status_code == status
    assert_perimeter(response)
    assert_private(response)


def test_too_large_page_carries_the_same_headers(client):
    response = client.post("/login", data={"username": "x" * 200_000})
    assert response.status_code == 413
    assert_perimeter(response)
    assert_private(response)


def test_rate_limited_page_carries_the_same_headers(tmp_path):
    app = make_app(tmp_path, RATELIMIT_ENABLED=True, LOGIN_RATE_LIMIT_IP="1 per minute")
    client = app.test_client()
    form = {"username": "nobody", "password": "x" * 20, "csrf_token": csrf_token(client)}
    client.post("/login", data=form)
    response = client.post("/login", data=form)
    assert response.status_code == 429
    assert_perimeter(response)
    assert_private(response)


@pytest.mark.parametrize(
    ("path", "login"),
    [("/account-details", False), ("/change-password", False), ("/logout", True)],
)
def test_redirects_carry_the_same_headers(client, auth, path, login):
    if login:
        auth.register()
        auth.login()
        response = client.post(path, data={"csrf_token": csrf_token(client, "/account-details")})
    else:
        response = client.get(path)
    assert response.status_code in (302, 303)
    assert_perimeter(response)
    assert_private(response)


@pytest.mark.parametrize("path", ["/public/css/site.css", "/public/favicon.svg"])
def test_static_files_get_the_csp_too(client, path):
    # An SVG opened on its own is a document that could run script: the CSP
    # must reach static files as well as pages.
    response = client.get(path)
    assert response.status_code == 200
    assert_perimeter(response)
    assert "no-store" not in directives(response.headers.get("Cache-Control"))


def test_photos_get_a_sandboxed_csp_that_loads_nothing(logged_in):
    token = csrf_token(logged_in, "/account-details")
    saved = logged_in.post(
        "/account-details",
        data={
            "csrf_token": token,
            "full_name": "Alice",
            "photo": (io.BytesIO(png_bytes()), "a.png"),
        },
        content_type="multipart/form-data",
    )
    assert saved.status_code == 303
    page = logged_in.get("/account-details").get_data(as_text=True)
    src = re.search(r'<img class="profile-photo" src="([^"]+)"', page).group(1)
    response = logged_in.get(src)
    assert response.status_code == 200
    assert response.mimetype == "image/webp"
    assert_perimeter(response, csp=PHOTO_CSP)


def test_photos_are_never_served_by_the_static_route_under_another_spelling(tmp_path):
    """The photo folder lies inside the static folder: only the photo route may serve it."""
    photos = Path(__file__).resolve().parent.parent / "public" / "images" / "profile"
    app = make_app(tmp_path, PHOTO_DIR=str(photos))
    client = app.test_client()
    AuthActions(client).register()
    AuthActions(client).login()
    token = csrf_token(client, "/account-details")
    saved = client.post(
        "/account-details",
        data={"csrf_token": token, "photo": (io.BytesIO(png_bytes()), "a.png")},
        content_type="multipart/form-data",
    )
    assert saved.status_code == 303
    name = app.extensions["secure_app.store"].get("alice")["photo"]
    try:
        assert (
            client.get(f"/public/images/profile/{name}").headers["Content-Security-Policy"]
            == security.PHOTO_CSP
        )
        for spelling in (
            f"/public/images/profile/{name}/",
            f"/public/images/./profile/{name}",
            f"/public/images/profile/./{name}",
            f"/public/images/x/../profile/{name}",
            f"/public/./images/profile/{name}",
            f"/public/images//profile/{name}",
            "/public/images/profile/",
            "/public/images/profile",
        ):
            response = client.get(spelling)
            assert response.status_code in (404, 308), spelling
            if response.status_code == 308:  # Werkzeug's own slash redirect: follow it
                response = client.get(response.headers["Location"])
            assert (
                response.status_code == 404
                or response.headers["Content-Security-Policy"] == security.PHOTO_CSP
            ), spelling
    finally:
        (photos / name).unlink(missing_ok=True)


# -- https, HSTS and the session cookie under FORCE_HTTPS ------------------------------


def _remote_addr() -> str:
    return request.remote_addr or ""


def perimeter_app(tmp_path: Path, **config: object):
    """An app in production mode with a route that shows what the app believes about the client."""
    config.setdefault("PUBLIC_URL", "https://localhost")
    app = make_app(tmp_path, FORCE_HTTPS=True, **config)
    app.add_url_rule("/_test/remote-addr", "remote_addr", _remote_addr)
    return app


def test_forged_x_forwarded_proto_from_a_direct_client_is_still_redirected(tmp_path):
    client = perimeter_app(tmp_path, PROXY_HOPS=0).test_client()
    response = client.get(
        "/second?q=1", base_url="http://localhost", headers={"X-Forwarded-Proto": "https"}
    )
    assert response.status_code == 301
    assert response.headers["Location"] == "https://localhost/second?q=1"
    assert "Strict-Transport-Security" not in response.headers
    assert_perimeter(response)


def test_x_forwarded_proto_from_the_trusted_proxy_is_honoured(tmp_path):
    client = perimeter_app(tmp_path, PROXY_HOPS=1).test_client()
    response = client.get(
        "/second", base_url="http://localhost", headers={"X-Forwarded-Proto": "https"}
    )
    assert response.status_code == 200
    assert "Strict-Transport-Security" in response.headers


def test_proto_forged_before_the_trusted_proxy_is_ignored(tmp_path):
    # The client sends "https"; the one trusted proxy appends what it saw: "http".
    client = perimeter_app(tmp_path, PROXY_HOPS=1).test_client()
    response = client.get(
        "/second", base_url="http://localhost", headers={"X-Forwarded-Proto": "https, http"}
    )
    assert response.status_code == 301
    assert response.headers["Location"] == "https://localhost/second"


def test_plain_http_post_is_redirected_and_stores_nothing(tmp_path):
    app = perimeter_app(tmp_path)
    client = app.test_client()
    token = csrf_token(client, "/register")  # over https, the test client's default here
    form = {"username": "mallory", "password": PASSWORD, "confirm": PASSWORD, "csrf_token": token}
    response = client.post("/register", data=form, base_url="http://localhost")
    assert response.status_code == 308
    assert response.headers["Location"] == "https://localhost/register"
    stored = b"".join(p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert b"mallory" not in stored


def test_redirect_goes_to_the_public_url_whatever_the_request_said(tmp_path):
    client = perimeter_app(tmp_path, PUBLIC_URL="https://localhost:8443").test_client()
    response = client.get("/login?next=/second", base_url="http://localhost:8080")
    assert response.status_code == 301
    assert response.headers["Location"] == "https://localhost:8443/login?next=/second"


@pytest.mark.parametrize("hops", [0, 1])
def test_forged_x_forwarded_host_does_not_move_the_redirect(tmp_path, hops):
    """The audit's case: PROXY_HOPS=1, FORCE_HTTPS, X-Forwarded-Host: evil.example."""
    client = perimeter_app(tmp_path, PROXY_HOPS=hops).test_client()
    response = client.get(
        "/second",
        base_url="http://localhost",
        headers={"X-Forwarded-Host": "evil.example", "X-Forwarded-Port": "666"},
    )
    assert response.status_code == 301
    assert response.headers["Location"] == "https://localhost/second"


def test_forwarded_host_is_believed_only_when_the_operator_says_so_and_must_be_ours(tmp_path):
    client = perimeter_app(tmp_path, PROXY_HOPS=1, TRUST_FORWARDED_HOST=True).test_client()
    forged = client.get(
        "/second", base_url="https://localhost", headers={"X-Forwarded-Host": "evil.example"}
    )
    assert forged.status_code == 400
    assert "Location" not in forged.headers
    ours = client.get(
        "/second", base_url="https://127.0.0.1", headers={"X-Forwarded-Host": "localhost"}
    )
    assert ours.status_code == 200


@pytest.mark.parametrize(
    "host",
    ["evil.example", "localhost.evil.example", "evil.example:443", "127.0.0.1", "LOCALHOSTX"],
)
def test_production_refuses_every_other_host_and_stores_nothing(tmp_path, host):
    app = perimeter_app(tmp_path)
    client = app.test_client()
    token = csrf_token(client, "/register")
    before = stored_bytes(app)
    form = {"username": "mallory", "password": PASSWORD, "confirm": PASSWORD, "csrf_token": token}
    response = client.post("/register", data=form, headers={"Host": host})
    assert response.status_code == 400
    assert '<header class="site-header">' in response.get_data(as_text=True)
    assert stored_bytes(app) == before
    assert client.get("/second", headers={"Host": "LOCALHOST:8443"}).status_code == 200


def test_development_answers_any_host(tmp_path):
    """Without FORCE_HTTPS (make run on 127.0.0.1), no host check: the address bar decides."""
    client = make_app(tmp_path).test_client()
    assert client.get("/second", base_url="http://127.0.0.1:8000").status_code == 200


@pytest.mark.parametrize(
    "url",
    [
        "localhost",
        "ftp://localhost",
        "https://",
        "https://user:pw@localhost",
        "https://h/path",
        "https://h?q=1",
        "https://h:abc",
    ],
)
def test_a_public_url_that_is_not_an_origin_refuses_to_start(tmp_path, url):
    with pytest.raises(RuntimeError, match="FLASK_PUBLIC_URL"):
        make_app(tmp_path, PUBLIC_URL=url)


def test_force_https_with_an_http_public_url_refuses_to_start(tmp_path):
    with pytest.raises(RuntimeError, match="FLASK_PUBLIC_URL=https://"):
        make_app(tmp_path, FORCE_HTTPS=True, PUBLIC_URL="http://localhost:8000")


def test_public_url_defaults_to_localhost_on_the_served_port(tmp_path, monkeypatch):
    monkeypatch.setenv("PORT", "8123")
    assert make_app(tmp_path).config["PUBLIC_URL"] == "http://localhost:8123"
    assert make_app(tmp_path, PUBLIC_URL="https://example.org/").config["PUBLIC_URL"] == (
        "https://example.org"
    )


@pytest.mark.parametrize(
    "path", ["/%0d%0a", "/x%0aSet-Cookie:%20a=b", "/%E2%80%A8x", "/a%20b/%25", "/%00"]
)
def test_redirect_to_https_never_puts_a_decoded_path_in_location(tmp_path, path):
    """Werkzeug decodes the path; the redirect must encode it again, never a 500."""
    client = perimeter_app(tmp_path).test_client()
    response = client.get(path + "?q=%0a1", base_url="http://localhost")
    assert response.status_code == 301
    location = response.headers["Location"]
    assert location.startswith("https://localhost/")
    assert all(0x21 <= ord(ch) <= 0x7E for ch in location), location
    assert location.endswith("?q=%0a1")


def test_hsts_is_sent_only_over_https(tmp_path):
    client = perimeter_app(tmp_path).test_client()
    secure = client.get("/", base_url="https://localhost")
    assert secure.status_code == 200
    hsts = directives(secure.headers["Strict-Transport-Security"].replace(";", ","))
    ages = [int(d.split("=", 1)[1]) for d in hsts if d.startswith("max-age=")]
    assert ages and ages[0] >= HSTS_MIN_AGE
    assert "includesubdomains" in hsts
    plain = client.get("/", base_url="http://localhost")
    assert plain.status_code == 301
    assert "Strict-Transport-Security" not in plain.headers


def test_session_cookie_is_secure_and_host_prefixed_under_force_https(tmp_path):
    client = perimeter_app(tmp_path).test_client()
    response = client.get("/", base_url="https://localhost")  # the login form sets the cookie
    cookies = response.headers.getlist("Set-Cookie")
    assert len(cookies) == 1
    name, _, attributes = cookies[0].partition(";")
    assert name.split("=", 1)[0] == "__Host-session"
    flags = {a.strip().split("=", 1)[0].lower(): a.strip() for a in attributes.split(";")}
    assert {"secure", "httponly", "path", "samesite"} <= set(flags)
    assert flags["path"] == "Path=/"
    assert flags["samesite"] == "SameSite=Lax"
    # __Host- cookies must not name a Domain, so no subdomain can share them.
    assert "domain" not in flags


def test_forged_x_forwarded_for_does_not_change_the_client_address(tmp_path):
    client = perimeter_app(tmp_path, PROXY_HOPS=0).test_client()
    response = client.get(
        "/_test/remote-addr",
        base_url="https://localhost",
        headers={"X-Forwarded-For": "203.0.113.9"},
        environ_base={"REMOTE_ADDR": "192.0.2.1"},
    )
    assert response.get_data(as_text=True) == "192.0.2.1"


def test_x_forwarded_for_counts_only_the_trusted_hop(tmp_path):
    client = perimeter_app(tmp_path, PROXY_HOPS=1).test_client()
    response = client.get(
        "/_test/remote-addr",
        base_url="https://localhost",
        # The client forged the first address; the proxy appended the real one.
        headers={"X-Forwarded-For": "198.51.100.7, 203.0.113.9"},
        environ_base={"REMOTE_ADDR": "192.0.2.1"},
    )
    assert response.get_data(as_text=True) == "203.0.113.9"


@pytest.mark.parametrize("host", ["", "[::1", "example.com:abc", "evil.example@localhost"])
def test_malformed_host_header_gets_400_not_a_broken_redirect(tmp_path, host):
    client = perimeter_app(tmp_path).test_client()
    response = client.get("/", base_url="http://localhost", headers={"Host": host})
    assert response.status_code == 400
    assert "Location" not in response.headers
    assert '<header class="site-header">' in response.get_data(as_text=True)


# -- the real server: gunicorn must not decide https before the app does ------------------


@pytest.mark.slow
def test_gunicorn_does_not_believe_a_forwarded_proto_from_a_loopback_client(tmp_path):
    """gunicorn's defaults trust X-Forwarded-Proto from 127.0.0.1; gunicorn.conf.py trusts none."""
    env = {
        "FLASK_FORCE_HTTPS": "true",
        "FLASK_PROXY_HOPS": "0",
        "FLASK_PUBLIC_URL": "https://localhost",
    }
    with Gunicorn(tmp_path, env=env) as server:
        for headers in (
            {"X-Forwarded-Proto": "https"},
            {"X-Forwarded-Ssl": "on"},
            {"X-Forwarded-Protocol": "ssl"},
            {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"},
        ):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("GET", "/second", headers={"Host": "localhost", **headers})
            response = conn.getresponse()
            response.read()
            conn.close()
            assert response.status == 301, (headers, server.output()[-2000:])
            assert response.getheader("Location") == "https://localhost/second"
            assert response.getheader("Strict-Transport-Security") is None
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/second", headers={"Host": "evil.example"})
        assert conn.getresponse().status == 400  # production answers only its own name
        conn.close()


@pytest.mark.parametrize("url", ["mysql://app@127.0.0.1/secure_app", "sqlite:///users.db", "x"])
def test_a_database_url_that_is_not_postgresql_refuses_to_start(tmp_path, url):
    """Better no start than a site quietly on the text database while the operator thinks not."""
    with pytest.raises(RuntimeError, match="FLASK_DATABASE_URL"):
        make_app(tmp_path, DATABASE_URL=url)
