"""Helpers the test modules import: app factory for tests, CSRF token scraping, login actions.

They live here, not in conftest.py: ``tests/browser/conftest.py`` is also a
module named ``conftest``, so ``from conftest import ...`` would pick either.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import resource
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from flask import Flask
from jinja2 import BytecodeCache
from jinja2.bccache import Bucket

from secure_app import create_app, mfa
from secure_app.store import Records

PASSWORD = "correct horse battery staple glacier"
OTHER_PASSWORD = "violet umbrella marches quietly north"
# Text that has broken stores before: line breaks, quotes, JSON and SQL look-alikes, every
# script, separators, control characters, lone surrogates, and length.
NASTY_TEXT = [
    "plain",
    "",
    "line one\nline two\r\nline three\rend",
    'quote " backslash \\ brace } bracket ]',
    '"}\n{"k":"mallory","v":{"username":"mallory","password_hash":"x"}}\n',
    "'); DROP TABLE users; --",
    "Zoë Ñúñez, 李小龙, Ωμέγα, עברית, العربية",
    "emoji 🧑‍💻🏳️‍🌈 and astral 𝕏",
    "separators \u2028 \u2029 \u0085 \x0b \x0c \x1c",
    "nul \x00 and bell \x07 and del \x7f",
    "lone surrogate \ud800 and \udfff",
    "x" * 5000,
]
CSRF_RE = re.compile(
    r'name="csrf_token" type="hidden" value="([^"]+)"|name="csrf_token" value="([^"]+)"'
)


# The PostgreSQL server the suite runs against, when it does
# (SECURE_APP_TEST_DATABASE=postgres): set by tests/conftest.py.
POSTGRES_URL: str | None = None
# Every app make_app built in the current test: conftest.py closes their
# stores after it, so no test leaves a connection pool behind.
OPEN_APPS: list[Flask] = []
_SCHEMAS: set[str] = set()


class SharedTemplateCache(BytecodeCache):
    """Compiled templates kept in memory and shared by every app the tests build.

    Each test builds its own app, and each app's Jinja environment would otherwise lex,
    parse and compile every template it renders again: over a third of the suite's time.
    Jinja's own bytecode cache skips that; a bucket is keyed by the template's name and
    checked against its source's checksum, so an edited template is compiled afresh.
    """

    def __init__(self) -> None:
        self._compiled: dict[str, bytes] = {}

    def load_bytecode(self, bucket: Bucket) -> None:
        if bucket.key in self._compiled:
            bucket.bytecode_from_string(self._compiled[bucket.key])

    def dump_bytecode(self, bucket: Bucket) -> None:
        self._compiled[bucket.key] = bucket.bytecode_to_string()


TEMPLATE_CACHE = SharedTemplateCache()


def namespaced_url(server_url: str, name: str) -> str:
    """A URL on ``server_url`` whose tables live in their own schema, created if new.

    One schema per test folder (not per app): two apps built on one
    ``tmp_path`` share their data, as two processes on one data folder do.
    """
    import psycopg

    schema = "t_" + hashlib.sha256(name.encode()).hexdigest()[:24]
    if (server_url, schema) not in _SCHEMAS:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        _SCHEMAS.add((server_url, schema))
    return f"{server_url}?options=-csearch_path%3D{schema}"


# Argon2id at its smallest cost: the same code, the same hash format and the same checks, for
# a thousandth of the work (the real cost, 19 MiB and two passes, was a third of the suite's
# time). Tests of the cost itself, and of a change of cost, ask for real_argon2=True.
FAST_ARGON2 = {"ARGON2_MEMORY_COST": 64, "ARGON2_TIME_COST": 1}


def make_app(tmp_path: Path, *, real_argon2: bool = False, **overrides: object) -> Flask:
    """Build an app whose data, photos and keys all live under ``tmp_path``.

    When the suite runs against PostgreSQL, records and photos live in a
    schema of their own instead, named after ``tmp_path``.
    """
    config = {
        "TESTING": True,
        "SECRET_KEY": "test-secret-key-" + "x" * 32,
        "DATA_DIR": str(tmp_path / "data"),
        "PHOTO_DIR": str(tmp_path / "photos"),
        "RATELIMIT_ENABLED": False,
        **({} if real_argon2 else FAST_ARGON2),
    }
    if POSTGRES_URL is not None:
        config["DATABASE_URL"] = namespaced_url(POSTGRES_URL, str(tmp_path))
    config.update(overrides)
    app = create_app(config)
    app.jinja_env.bytecode_cache = TEMPLATE_CACHE
    OPEN_APPS.append(app)
    return app


def close_apps() -> None:
    """Close the store of every app make_app built so far: a test or a state machine's
    example that builds apps calls it when done, so no connection pool outlives them."""
    while OPEN_APPS:
        OPEN_APPS.pop().extensions["secure_app.store"].close()


def open_store(spec: str) -> Records:
    """A store handle on a text database folder or a postgresql:// URL: another process's view."""
    if spec.startswith("postgresql://"):
        from secure_app.store.postgres import PostgresStore

        return PostgresStore(spec)
    from secure_app.store.text import TextStore

    return TextStore(spec)


def database_rows(url: str) -> dict[str, bytes]:
    """Every record and photo in a PostgreSQL store, as stored_bytes shows files."""
    import psycopg

    rows: dict[str, bytes] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('users')").fetchone()[0] is None:
            return rows
        for key, text in conn.execute("SELECT username, record::text FROM users"):
            rows[f"postgres:users/{key}"] = text.encode("utf-8", "surrogatepass")
        for name, data in conn.execute("SELECT name, data FROM photos"):
            rows[f"postgres:photos/{name}"] = bytes(data)
    return rows


def stored_records(app: Flask) -> dict[str, bytes]:
    """The records as stored, byte for byte: the data file, or the rows. Equal means unchanged."""
    if app.config.get("DATABASE_URL"):
        rows = database_rows(app.config["DATABASE_URL"])
        return {key: value for key, value in rows.items() if key.startswith("postgres:users/")}
    path = Path(app.config["DATA_DIR"]) / "users.jsonl"
    return {"users.jsonl": path.read_bytes()} if path.exists() else {}


def stored_bytes(app: Flask) -> dict[str, bytes]:
    """Every file and row the app keeps (data and photos), to prove a refused request changed none.

    Mail is written by a background thread: wait for it first, so that a
    message still being written is not taken for a change (or missed).
    """
    from secure_app import mail

    assert mail.flush(10, app), "the mail queue did not drain"
    files = database_rows(app.config["DATABASE_URL"]) if app.config.get("DATABASE_URL") else {}
    for key in ("DATA_DIR", "PHOTO_DIR"):
        root = Path(app.config[key])
        if root.exists():
            files.update({str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()})
    return files


def photo_names(app: Flask) -> list[str]:
    """Every photo the app's backend holds (files in the folder, or rows), sorted."""
    return sorted(app.extensions["secure_app.photos"].listing())


def photo_bytes(app: Flask, name: str) -> bytes:
    return app.extensions["secure_app.photos"].get(name).data


def csrf_token(client, path: str = "/login") -> str:
    """Fetch ``path`` and return the CSRF token of its first form."""
    page = client.get(path).get_data(as_text=True)
    match = CSRF_RE.search(page)
    assert match, f"no csrf_token on {path}"
    return match.group(1) or match.group(2)


def route_urls(app: Flask, method: str) -> list[str]:
    """One URL for every route of ``app`` that answers ``method``, its arguments filled in.

    Read from ``app.url_map``, so a test over these covers routes added later too.
    """
    urls = []
    for rule in app.url_map.iter_rules():
        if method not in (rule.methods or ()):
            continue
        for sample in ("sample", 1):  # a string fits most converters, 1 fits int and path
            try:
                built = rule.build(dict.fromkeys(rule.arguments, sample))
            except ValueError:
                continue
            if built is not None:
                urls.append(built[1])
                break
    return urls


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

    def change_password(self, current: str = PASSWORD, new: str = OTHER_PASSWORD):
        token = csrf_token(self._client, "/change-password")
        data = {"current_password": current, "new_password": new, "confirm": new}
        return self._client.post("/change-password", data={**data, "csrf_token": token})

    def upload_photo(self, image: bytes, full_name: str = "Alice"):
        """Save the account details with ``image`` as the photo."""
        token = csrf_token(self._client, "/account-details")
        data = {"full_name": full_name, "email": "", "phone": "", "bio": "", "csrf_token": token}
        return self._client.post(
            "/account-details",
            data={**data, "photo": (io.BytesIO(image), "me.png")},
            content_type="multipart/form-data",
        )


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Make every write past ``limit`` bytes of a file fail with EFBIG, as a full disk would.

    Writes inside a file's existing bytes still succeed, as on a real full disk.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@contextlib.contextmanager
def no_free_descriptors() -> Iterator[None]:
    """Make every new open fail with EMFILE, as in a process at its open-file limit.

    Descriptors already open keep working.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(map(int, os.listdir("/proc/self/fd"))), hard))
    held = []
    try:
        while True:  # fill the free numbers below the limit
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def record_lines(path: Path) -> list[bytes]:
    """The record lines of a data file; asserts that only reserved space (spaces) follows them."""
    data = path.read_bytes()
    assert data.endswith(b"\n")
    rows = data.split(b"\n")[:-1]
    if rows and not rows[-1].strip(b" "):
        rows.pop()  # the reserved space after the last record
    assert all(row.strip() for row in rows), "a blank line among the records"
    return rows


# Where a fake clock starts: 10 s into a 30-second TOTP step.
START = 1_800_000_010


class Clock:
    """A stand-in for ``time.time`` that moves only when told (the ``clock`` fixture)."""

    def __init__(self, now: float = START) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def next_step(self) -> None:
        """Move to 1 s into the next 30-second step."""
        self.now = (int(self.now) // mfa.STEP + 1) * mfa.STEP + 1

    @property
    def step(self) -> int:
        return mfa.step_at(self.now)


@contextlib.contextmanager
def fake_time(clock: Clock) -> Iterator[Clock]:
    """Make ``clock`` the whole process's ``time.time`` until exit (the ``clock`` fixture's job).

    For Hypothesis state machines, which cannot take pytest fixtures: enter it
    into an ``ExitStack`` that the machine's ``teardown`` closes.
    """
    real = time.time
    time.time = clock
    try:
        yield clock
    finally:
        time.time = real


@contextlib.contextmanager
def environ(**values: str | None) -> Iterator[None]:
    """Set environment variables (None: unset them) until exit, then put back what was there."""
    before = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
