"""Login limits that hold across worker processes: gunicorn with two workers on a real Redis."""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from helpers import PASSWORD
from servers import Gunicorn, Redis, free_port, redis_server_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(redis_server_path() is None, reason="redis-server is not installed"),
]

FAILURES_ALLOWED = 6  # even: the attempts below go in pairs
SERVER_ARGS = [
    # %(p)s is the worker's process id: it shows which worker served each request.
    "--access-logformat",
    "ACCESS %(p)s %(m)s %(U)s %(s)s",
    # A worker busy with one connection leaves the next to the other worker, so a
    # pair of simultaneous requests is served by both (the worker class stays gthread).
    "--worker-connections",
    "1",
]


def _fresh(method: str, url: str, **kwargs) -> requests.Response:
    """One request on its own connection, so the kernel may hand it to either worker."""
    with requests.Session() as http:
        return http.request(
            method,
            url,
            headers={"Connection": "close"},
            timeout=30,
            allow_redirects=False,
            **kwargs,
        )


def _form(server: Gunicorn, path: str) -> tuple[dict[str, str], str]:
    """The session cookie and CSRF token of ``path``'s form (the cookie is not Secure over http)."""
    response = _fresh("GET", server.url + path)
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', response.text).group(1)
    return {"session": response.cookies["session"]}, token


def _workers_that_served(server: Gunicorn, method: str, path: str, status: int) -> set[str]:
    pattern = re.compile(rf"^ACCESS <(\d+)> {method} {re.escape(path)} {status}$", re.M)
    return set(pattern.findall(server.output()))


def test_login_limit_is_counted_once_across_two_workers(tmp_path):
    with (
        Redis(tmp_path / "redis") as redis,
        Gunicorn(
            tmp_path / "site",
            env={
                "FLASK_RATELIMIT_STORAGE_URI": redis.uri,
                "FLASK_LOGIN_RATE_LIMIT_USER": f"{FAILURES_ALLOWED} per minute",
                "FLASK_LOGIN_RATE_LIMIT_IP": "200 per minute",
                "FLASK_REGISTER_RATE_LIMIT_IP": "200 per minute",
            },
            args=SERVER_ARGS,
            workers=2,
        ) as server,
    ):
        cookies, token = _form(server, "/register")
        registered = _fresh(
            "POST",
            server.url + "/register",
            cookies=cookies,
            data={
                "username": "alice",
                "password": PASSWORD,
                "confirm": PASSWORD,
                "csrf_token": token,
            },
        )
        assert registered.status_code == 302

        cookies, token = _form(server, "/login")
        wrong = {"username": "alice", "password": "not the password " * 2, "csrf_token": token}

        def pair(data: dict[str, str]) -> list[requests.Response]:
            with ThreadPoolExecutor(2) as pool:
                calls = [
                    pool.submit(_fresh, "POST", server.url + "/login", cookies=cookies, data=data)
                    for _ in range(2)
                ]
                return [call.result() for call in calls]

        statuses = [r.status_code for _ in range(FAILURES_ALLOWED // 2) for r in pair(wrong)]
        assert statuses == [200] * FAILURES_ALLOWED
        workers = _workers_that_served(server, "POST", "/login", 200)
        assert len(workers) == 2, f"one worker served every attempt: {workers}"

        # Both workers now refuse, even the right password: the count is shared.
        # (Counted per worker, each would have seen about half and let these through.)
        right = {**wrong, "password": PASSWORD}
        refused = [r for _ in range(3) for r in pair(right)]
        assert [r.status_code for r in refused] == [429] * 6
        assert all(int(r.headers["Retry-After"]) > 0 for r in refused)
        assert len(_workers_that_served(server, "POST", "/login", 429)) == 2
        # The audit trail reaches gunicorn's output as JSON lines.
        assert '"event": "rate_limited"' in server.output()


def test_unreachable_redis_at_start_up_fails_fast_with_a_clear_message(tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}"  # nothing listens there
    server = Gunicorn(tmp_path, env={"FLASK_RATELIMIT_STORAGE_URI": dead})
    try:
        server.__enter__()
    except RuntimeError:
        pass  # exited before it even listened
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("gunicorn kept running without its rate-limit storage")
    finally:
        server.stop()
    assert server.proc.returncode != 0
    output = server.output()
    assert "Rate-limit storage redis://127.0.0.1:" in output
    assert "cannot be reached" in output


def test_gunicorn_refuses_two_workers_with_per_process_memory_storage(tmp_path):
    server = Gunicorn(tmp_path, workers=2)
    server.env.pop("FLASK_RATELIMIT_STORAGE_URI", None)
    server.env.pop("FLASK_RATELIMIT_ENABLED", None)
    with pytest.raises(RuntimeError, match="exited"):
        server.__enter__()
    server.stop()
    assert server.proc.returncode != 0
    assert "several workers need a shared rate-limit storage" in server.output()
