"""Shared fixtures (flaskr's four, plus a logged-in client) and the Hypothesis profiles."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

import helpers
from helpers import AuthActions, Clock, make_app, namespaced_url
from servers import Postgres, require_postgres

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


# Under `make mutation`, mutmut runs each mutant's tests in a forked worker, from the
# folder that holds its measurements (mutmut-stats.json); the workers note there which
# test killed a mutant of which function, so that the next mutant of that function tries
# those tests first. Outcomes do not depend on the order (a mutant is killed when any of
# its tests fails, and the tests are independent); only the time to the first failure does.
# MUTATION_TEST_ORDER=duration keeps to quickest first (bench/mutation_order.py compares).
MUTMUT_STATS = Path("mutmut-stats.json")
MUTMUT_KILLS = Path("mutmut-kills.txt")


def _mutated_function() -> str | None:
    """The function whose mutant this process tests, under ``make mutation``; else None."""
    name = os.environ.get("MUTANT_UNDER_TEST", "")
    if "__mutmut_" not in name or not MUTMUT_STATS.exists():
        return None
    return name.rpartition("__mutmut_")[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``make mutation``, run first the tests likeliest to kill this mutant soonest.

    mutmut stops at the first failing test (``-x``). First come the tests that killed
    other mutants of the same function (most kills first), then the rest, quickest first
    by the durations mutmut measured on the unmutated code. A normal run keeps its order.
    """
    function = _mutated_function()
    if function is None:
        return
    took = json.loads(MUTMUT_STATS.read_text()).get("duration_by_test", {})
    kills: Counter[str] = Counter()
    if MUTMUT_KILLS.exists() and os.environ.get("MUTATION_TEST_ORDER") != "duration":
        for line in MUTMUT_KILLS.read_text().splitlines():
            killed_in, _, test = line.partition(" ")
            if killed_in == function:
                kills[test] += 1
    items.sort(key=lambda item: (-kills[item.nodeid], took.get(item.nodeid, float("inf"))))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Under ``make mutation``, note the test that killed this mutant (see above)."""
    function = _mutated_function()
    if function is None or not report.failed:
        return
    # One short append per kill: O_APPEND keeps lines whole between parallel workers.
    fd = os.open(MUTMUT_KILLS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{function} {report.nodeid}\n".encode())
    finally:
        os.close(fd)


# `make test` runs the suite once on the text database, then its HTTP part
# once more with every app on PostgreSQL (SECURE_APP_TEST_DATABASE=postgres).
ON_POSTGRES = os.environ.get("SECURE_APP_TEST_DATABASE") == "postgres"


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL for the whole run, started on first use and stopped at the end.

    Where the package is missing the tests that need it are skipped, except
    in CI, where a missing server is a failure, not a reason to pass.
    """
    require_postgres()
    if os.environ.get("SECURE_APP_TEST_POSTGRES"):  # one started by scripts/mutation.py
        server = Postgres.attached(os.environ["SECURE_APP_TEST_POSTGRES"])
        yield server
        server.release()
        return
    with Postgres() as server:
        yield server


@pytest.fixture(scope="session", autouse=ON_POSTGRES)
def _apps_on_postgres(request):
    """Under SECURE_APP_TEST_DATABASE=postgres, every make_app() stores in PostgreSQL."""
    if not ON_POSTGRES:
        yield
        return
    server = request.getfixturevalue("postgres_server")
    helpers.POSTGRES_URL = server.url()
    yield
    helpers.POSTGRES_URL = None


@pytest.fixture(autouse=True)
def _close_stores():
    """Close every app's store after each test: no connection pool outlives its test."""
    yield
    helpers.close_apps()


class Backend:
    """One store backend for the store tests: handles on the same data, and a raw view of it."""

    def __init__(self, name: str, spec: str) -> None:
        self.name = name
        self.spec = spec  # a text database folder, or a postgresql:// URL
        self._opened: list = []

    def open(self):
        """A new handle on the same data, as another worker or host has."""
        store = helpers.open_store(self.spec)
        self._opened.append(store)
        return store

    def snapshot(self) -> dict[str, bytes]:
        """Everything stored, byte for byte: equal before and after means nothing was written."""
        if self.name == "postgres":
            return helpers.database_rows(self.spec)
        path = Path(self.spec) / "users.jsonl"
        return {"users.jsonl": path.read_bytes()} if path.exists() else {}

    def close(self) -> None:
        for store in self._opened:
            store.close()


@pytest.fixture(params=["text", "postgres"])
def backend(request, tmp_path: Path):
    """Each store test runs once on the text database and once on PostgreSQL."""
    if request.param == "postgres":
        server = request.getfixturevalue("postgres_server")
        spec = namespaced_url(server.url(), str(tmp_path))
    else:
        spec = str(tmp_path / "data")
    chosen = Backend(request.param, spec)
    yield chosen
    chosen.close()


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
