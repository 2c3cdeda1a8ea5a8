"""Shared fixtures (flaskr's four, plus a logged-in client) and the Hypothesis profiles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from helpers import AuthActions, Clock, make_app

# ci: quick and the same examples on every run, so a red CI run is a real
# regression, not a new random draw; thorough: random and many more examples,
# for looking for new bugs (HYPOTHESIS_PROFILE=thorough make test).
settings.register_profile(
    "ci",
    max_examples=40,
    derandomize=True,
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


@pytest.fixture
def app(tmp_path: Path):
    return make_app(tmp_path)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def auth(client) -> AuthActions:
    return AuthActions(client)


@pytest.fixture
def logged_in(client, auth):
    """A client logged in as ``alice``."""
    assert auth.register().status_code == 302
    assert auth.login().status_code == 302
    return client


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """A fake ``time.time`` for the whole process, moved only by the test."""
    fake = Clock()
    monkeypatch.setattr("time.time", fake)
    return fake
