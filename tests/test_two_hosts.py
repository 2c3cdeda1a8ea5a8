"""Two hosts for real: two gunicorn servers on one PostgreSQL and one Redis, as README deploys them.

Each "host" has its own data folder, photo folder, instance folder and port;
they share only what the README's multi-host section says to share: the
database URL, the Redis URL, the public URL and the key files (copied from
the first host's instance folder, as an operator copies them).
"""

from __future__ import annotations

import io
import re
import shutil

import pytest
import requests

from helpers import CSRF_RE, PASSWORD, namespaced_url
from images import png
from servers import Gunicorn, Redis, redis_server_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(redis_server_path() is None, reason="redis-server is not installed"),
]

LOGINS_PER_USER = 4


def _token(http: requests.Session, url: str) -> str:
    match = CSRF_RE.search(http.get(url, timeout=30).text)
    return match.group(1) or match.group(2)


def _post(
    http: requests.Session, url: str, data: dict, page: str | None = None, **kwargs
) -> requests.Response:
    """POST a form with the CSRF token of ``page`` (the form's own URL by default)."""
    data = {**data, "csrf_token": _token(http, page or url)}
    return http.post(url, data=data, allow_redirects=False, timeout=30, **kwargs)


def _logged_in_as(http: requests.Session, base: str) -> bool:
    return http.get(base + "/account-details", allow_redirects=False, timeout=30).status_code == 200


def _on(host: Gunicorn, cookie: str) -> requests.Session:
    """A browser that presents ``cookie`` to ``host`` (a load balancer may send it to either)."""
    http = requests.Session()
    http.cookies.set("session", cookie, domain="127.0.0.1", path="/")
    return http


def test_two_hosts_share_accounts_photos_logouts_and_login_limits(postgres_server, tmp_path):
    shared = {
        "FLASK_DATABASE_URL": namespaced_url(postgres_server.url(), str(tmp_path)),
        "FLASK_PUBLIC_URL": "http://localhost:8000",  # the one public name both hosts serve
        "FLASK_LOGIN_RATE_LIMIT_USER": f"{LOGINS_PER_USER} per minute",
        "FLASK_LOGIN_RATE_LIMIT_IP": "200 per minute",
        "FLASK_REGISTER_RATE_LIMIT_IP": "200 per minute",
    }
    with Redis(tmp_path / "redis") as redis:
        shared["FLASK_RATELIMIT_STORAGE_URI"] = redis.uri
        with Gunicorn(tmp_path / "a", env=shared) as a:
            assert requests.get(a.url + "/", timeout=30).status_code == 200  # the app is up
            for name in ("secret_keys.json", "mfa_keys.json"):  # made by host A at start-up
                (tmp_path / "b" / "instance").mkdir(parents=True, exist_ok=True)
                shutil.copy2(tmp_path / "a" / "instance" / name, tmp_path / "b" / "instance" / name)
            with Gunicorn(tmp_path / "b", env=shared) as b:
                _check_both(a, b)
    for host in ("a", "b"):  # nothing went to the hosts' own folders
        assert not list((tmp_path / host / "photos").glob("*"))
        assert not (tmp_path / host / "data" / "users.jsonl").exists()


def _check_both(a: Gunicorn, b: Gunicorn) -> None:
    # Register on A, log in on B.
    on_a = requests.Session()
    account = {"username": "alice", "password": PASSWORD, "confirm": PASSWORD}
    assert _post(on_a, a.url + "/register", account).status_code == 302
    on_b = requests.Session()
    login = {"username": "alice", "password": PASSWORD}
    assert _post(on_b, b.url + "/login", login).status_code == 302
    assert _logged_in_as(on_b, b.url)

    # A photo uploaded through A is served by B, byte for byte, with the same headers.
    assert _post(on_a, a.url + "/login", login).status_code == 302
    upload = _post(
        on_a,
        a.url + "/account-details",
        {"full_name": "Alice", "email": "", "phone": "", "bio": ""},
        files={"photo": ("me.png", io.BytesIO(png()), "image/png")},
    )
    assert upload.status_code == 303, upload.text[:500]
    page = on_b.get(b.url + "/account-details", timeout=30).text
    name = re.search(r"/public/images/profile/([0-9a-f]{32}\.webp)", page).group(1)
    from_a = requests.get(f"{a.url}/public/images/profile/{name}", timeout=30)
    from_b = requests.get(f"{b.url}/public/images/profile/{name}", timeout=30)
    assert from_a.status_code == from_b.status_code == 200
    assert from_b.content == from_a.content and from_b.content[8:12] == b"WEBP"
    for header in ("Content-Type", "ETag", "Last-Modified", "Cache-Control", "Content-Length"):
        assert from_a.headers[header] == from_b.headers[header], header
    again = requests.get(
        f"{b.url}/public/images/profile/{name}",
        headers={"If-None-Match": from_a.headers["ETag"]},
        timeout=30,
    )
    assert again.status_code == 304  # a cache filled by one host revalidates on the other

    # Logging out on B ends the session that A's cookie carries.
    cookie = on_a.cookies["session"]
    assert _logged_in_as(_on(a, cookie), a.url)
    same_browser_on_b = _on(b, cookie)
    assert _logged_in_as(same_browser_on_b, b.url)
    assert _post(same_browser_on_b, b.url + "/logout", {}, page=b.url + "/").status_code in (
        302,
        303,
    )
    assert not _logged_in_as(_on(a, cookie), a.url)

    # The per-username login limit counts the attempts made on both hosts.
    wrong = {"username": "alice", "password": "not the password at all"}
    statuses = []
    for host in (a, b) * (LOGINS_PER_USER // 2):
        statuses.append(_post(requests.Session(), host.url + "/login", wrong).status_code)
    assert statuses == [200] * LOGINS_PER_USER  # each host alone saw only half
    for host in (a, b):
        refused = _post(requests.Session(), host.url + "/login", login)
        assert refused.status_code == 429, host.url
