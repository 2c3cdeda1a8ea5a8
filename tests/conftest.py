"""Shared fixtures: an app on a temporary data folder, its clients, and login helpers."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from secure_app import create_app

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

PASSWORD = "correct horse battery staple glacier"
OTHER_PASSWORD = "violet umbrella marches quietly north"
CSRF_RE = re.compile(
    r'name="csrf_token" type="hidden" value="([^"]+)"|name="csrf_token" value="([^"]+)"'
)


def make_app(tmp_path: Path, **overrides: object):
    """Build an app whose data, photos and keys all live under ``tmp_path``."""
    config = {
        "TESTING": True,
        "SECRET_KEY": "test-secret-key-" + "x" * 32,
        "DATA_DIR": str(tmp_path / "data"),
        "PHOTO_DIR": str(tmp_path / "photos"),
        "RATELIMIT_ENABLED": False,
    }
    config.update(overrides)
    return create_app(config)


@pytest.fixture
def app(tmp_path: Path):
    return make_app(tmp_path)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


def csrf_token(client, path: str = "/login") -> str:
    """Fetch ``path`` and return the CSRF token of its first form."""
    page = client.get(path).get_data(as_text=True)
    match = CSRF_RE.search(page)
    assert match, f"no csrf_token on {path}"
    return match.group(1) or match.group(2)


class AuthActions:
    """Register, log in and log out through the real forms, CSRF token included."""

    def __init__(self, client) -> None:
        self._client = client

    def register(self, username: str = "alice", password: str = PASSWORD):
        token = csrf_token(self._client, "/register")
        return self._client.post(
            "/register",
            data={
                "username": username,
                "password": password,
                "confirm": password,
                "csrf_token": token,
            },
        )

    def login(self, username: str = "alice", password: str = PASSWORD, next: str | None = None):
        token = csrf_token(self._client, "/login")
        url = "/login" if next is None else f"/login?next={next}"
        return self._client.post(
            url, data={"username": username, "password": password, "csrf_token": token}
        )

    def logout(self):
        token = csrf_token(self._client, "/account-details")
        return self._client.post("/logout", data={"csrf_token": token})


@pytest.fixture
def auth(client) -> AuthActions:
    return AuthActions(client)


@pytest.fixture
def logged_in(client, auth):
    """A client logged in as ``alice``."""
    assert auth.register().status_code == 302
    assert auth.login().status_code == 302
    return client
