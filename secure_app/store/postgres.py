"""PostgreSQL for records and photos: the store for a site on several hosts.

Chosen by ``FLASK_DATABASE_URL=postgresql://...``. Two tables, created or
upgraded when the app starts (the version is kept in ``secure_app_schema``)::

    users  (username text PRIMARY KEY, record json NOT NULL)
    photos (name text PRIMARY KEY, data bytea NOT NULL, created timestamptz NOT NULL)

How the text database's promises are kept here:

* **Locked.** ``update`` and ``delete`` read the row with ``SELECT ... FOR
  UPDATE`` in one transaction: a second writer of the same row waits for the
  first one's commit and then reads what it wrote, on any host. Each change
  touches one user's row, so READ COMMITTED with the row lock is enough; no
  serialization failures to retry. ``create`` is ``INSERT ... ON CONFLICT DO
  NOTHING``: of two registrations of one name, exactly one wins.
* **Atomic.** One transaction per change. Deleting a user deletes their photo
  in the same transaction.
* **Durable.** ``COMMIT`` returns once the write-ahead log is flushed. Every
  connection sets ``synchronous_commit = on`` itself, so a server tuned for
  speed elsewhere still does not acknowledge an account change it could lose.
* **Failures.** Any database error (the server down, a connection dropped,
  no free connection within ``DATABASE_TIMEOUT``) rolls the transaction back
  and raises :class:`StoreError`, which the app answers with its 503 page.
  The pool checks a connection before lending it and opens new ones in the
  background, so the site recovers by itself when the server is back.

A record is stored as the exact JSON text the text database writes in its
line (``json``, not ``jsonb``, which would reorder keys and refuse ``\\u0000``),
so ``export-data`` / ``import-data`` move data between backends unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from . import Photo, Record, RecordGone, StoreError, StoreUncertain, photo_name

# The text database's own encoders: a record is stored as the JSON text its line holds.
from .text import _ESCAPED, _READABLE

log = logging.getLogger(__name__)

# Each entry upgrades the schema by one version; never edit one that has shipped.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE users (username text PRIMARY KEY, record json NOT NULL)",
        "CREATE TABLE photos (name text PRIMARY KEY, data bytea NOT NULL,"
        " created timestamptz NOT NULL DEFAULT clock_timestamp())",
    ),
)
# Held while the schema is checked, so that workers and hosts starting at
# once upgrade it one at a time ("sa" in ASCII, an arbitrary constant).
_MIGRATION_LOCK = 0x7361


def check_url(url: str) -> dict[str, str]:
    """The URL's connection parameters; a URL libpq cannot parse is refused without quoting it.

    libpq's own message quotes the offending part, which is often the password
    (an unencoded ``%`` or ``@`` in it): never let that reach a log.
    """
    try:
        return conninfo_to_dict(url)
    except psycopg.Error:
        raise ValueError(
            "FLASK_DATABASE_URL cannot be parsed: percent-encode special characters in the "
            "user name and password (%, @, :, /, ?, #, [, ])"
        ) from None


def _warn_if_plain_text(params: dict[str, str]) -> None:
    # libpq connects to hostaddr where one is given (host then only names the server, for TLS
    # and the password file), so both must name this machine. Neither: this machine's socket.
    names = [h for key in ("host", "hostaddr") for h in params.get(key, "").split(",") if h]
    remote = [
        h for h in names if not h.startswith("/") and h not in ("localhost", "127.0.0.1", "::1")
    ]
    if remote and params.get("sslmode") not in ("verify-full", "verify-ca"):
        log.warning(
            "FLASK_DATABASE_URL reaches %s without sslmode=verify-full: the connection may be "
            'unencrypted or its server unverified (SECURITY.md, "The database")',
            ",".join(remote),
        )


def storable(key: str) -> bool:
    """Whether PostgreSQL's ``text`` can hold ``key``: no NUL, no lone surrogate.

    Keys are usernames (``forms.USERNAME_RE``), so this never refuses a real
    one; a key that cannot be stored cannot exist, so reading it finds nothing.
    """
    if "\x00" in key:
        return False
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _storable_key(key: str) -> str:
    if not storable(key):
        raise ValueError("PostgreSQL cannot store this key (NUL or a lone surrogate)")
    return key


def _encode(record: Record) -> str:
    """The record's JSON: readable, with ``\\u`` escapes only for what UTF-8 cannot carry."""
    text = _READABLE.encode(record)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        text = _ESCAPED.encode(record)
    return text


class PostgresStore:
    """Records in the ``users`` table, photos (``self.photos``) in ``photos``.

    One per process, safe to share between threads: it holds a pool of up to
    ``pool_size`` connections, opened when it is made, to create or check the
    schema (gunicorn creates the app after forking, so each worker has its
    own; a store used across a fork opens a new pool in the child).
    """

    def __init__(self, url: str, pool_size: int = 10, timeout: float = 5.0) -> None:
        _warn_if_plain_text(check_url(url))
        self.url = url
        self.pool_size = pool_size
        self.timeout = timeout
        self.photos = PostgresPhotos(self)
        self._lock = threading.Lock()
        self._pool: ConnectionPool | None = None
        self._pid = os.getpid()
        self._schema_ready = False
        # A pool inherited across a fork: its sockets are the parent's, so it is
        # kept (never closed, never garbage-collected) and never used.
        self._inherited: list[ConnectionPool] = []
        try:
            with self._connection():
                pass  # creates or upgrades the schema now, at start-up
        except StoreError as exc:
            log.error("PostgreSQL cannot be used at start-up (%s); retrying on each request", exc)

    # -- connections ---------------------------------------------------------

    def _configure(self, conn: psycopg.Connection) -> None:
        conn.execute("SET synchronous_commit = on")
        # A server that answers but is stuck (a lock held by a migration, a
        # runaway query) ends the request with a 503 instead of holding its thread.
        wait = round(self.timeout * 1000)
        conn.execute(f"SET lock_timeout = {wait}")
        conn.execute(f"SET statement_timeout = {2 * wait}")
        conn.execute(f"SET idle_in_transaction_session_timeout = {4 * wait}")

    def _open(self) -> ConnectionPool:
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                if self._pool is not None:
                    self._inherited.append(self._pool)
                self._pool = None
            if self._pool is None:
                self._pool = ConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=self.pool_size,
                    timeout=self.timeout,
                    configure=self._configure,
                    kwargs={
                        "autocommit": True,
                        "connect_timeout": max(1, round(self.timeout)),
                        # A peer that vanished (a host or network gone) is noticed
                        # in seconds, not after the kernel's two hours.
                        "keepalives": 1,
                        "keepalives_idle": 10,
                        "keepalives_interval": 3,
                        "keepalives_count": 3,
                        "tcp_user_timeout": round(4 * self.timeout * 1000),
                    },
                    # Give up a failing reconnection soon: the next request then
                    # starts a fresh attempt at once, instead of the pool waiting
                    # out an exponential back-off after the server is back.
                    reconnect_timeout=self.timeout,
                    name="secure_app",
                    open=False,
                )
                self._pool.open(wait=False)
            return self._pool

    def _live(self, pool: ConnectionPool) -> psycopg.Connection:
        """A connection that answers, dropping dead ones (a server restart kills them all).

        psycopg_pool's own ``check`` sleeps 1, 2, 4 s between dead connections,
        so after a restart a request would time out on them while the server is
        fine again; a dead connection given back is discarded and replaced.
        """
        for _ in range(self.pool_size + 1):
            conn = pool.getconn()
            try:
                conn.execute("")
                return conn
            except psycopg.OperationalError:
                pool.putconn(conn)  # dead: the pool discards it and opens another
            except BaseException:
                pool.putconn(conn)  # never keep a connection checked out for good
                raise
        raise psycopg.OperationalError("no live connection")

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """Lend a live connection in autocommit mode; turn any database error into StoreError."""
        try:
            pool = self._open()
            conn = self._live(pool)
            try:
                if not self._schema_ready:
                    self._migrate(conn)
                yield conn
            finally:
                pool.putconn(conn)
        except psycopg.Error as exc:
            # The class name only: a message may quote the connection's parameters.
            raise StoreError(f"the database failed: {type(exc).__name__}") from exc

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        """One transaction; a failure while it commits is StoreUncertain, not StoreError."""
        committing = False
        try:
            with self._connection() as conn, conn.transaction():
                yield conn
                committing = True
        except StoreError as exc:
            if committing:
                raise StoreUncertain(f"{exc}, while committing: the change may be saved") from exc
            raise

    def _migrate(self, conn: psycopg.Connection) -> None:
        """Create or upgrade the schema; with it current, only read its version.

        Only reading when nothing is to be done lets the site run as a role
        that may not create tables (SECURITY.md, "The database").
        """
        if self._version(conn) != len(MIGRATIONS):
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS secure_app_schema (version integer NOT NULL)"
                )
                version = self._version(conn)  # again: another host may have just upgraded it
                for statements in MIGRATIONS[version:]:
                    for statement in statements:
                        conn.execute(statement)
                conn.execute("DELETE FROM secure_app_schema")
                conn.execute("INSERT INTO secure_app_schema VALUES (%s)", (len(MIGRATIONS),))
        self._schema_ready = True

    @staticmethod
    def _version(conn: psycopg.Connection) -> int:
        """The schema's recorded version; 0 for an empty database."""
        if conn.execute("SELECT to_regclass('secure_app_schema')").fetchone()[0] is None:
            return 0
        row = conn.execute("SELECT max(version) FROM secure_app_schema").fetchone()
        version = row[0] or 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"the database's schema is version {version}, newer than this code "
                f"({len(MIGRATIONS)}): upgrade the app before using this database"
            )
        return version

    # -- records -------------------------------------------------------------

    def get(self, key: str) -> Record | None:
        """Return a fresh copy of the record for ``key``, or ``None``."""
        if not storable(key):
            return None
        with self._connection() as conn:
            row = conn.execute(
                "SELECT record::text FROM users WHERE username = %s", (key,)
            ).fetchone()
        return None if row is None else json.loads(row[0])

    def __contains__(self, key: str) -> bool:
        if not storable(key):
            return False
        with self._connection() as conn:
            return (
                conn.execute("SELECT 1 FROM users WHERE username = %s", (key,)).fetchone()
                is not None
            )

    def __len__(self) -> int:
        with self._connection() as conn:
            return conn.execute("SELECT count(*) FROM users").fetchone()[0]

    def keys(self) -> list[str]:
        with self._connection() as conn:
            return [r[0] for r in conn.execute("SELECT username FROM users ORDER BY username")]

    def items(self) -> list[tuple[str, Record]]:
        """Every (key, record), in one query: for passes over all accounts (never a read each)."""
        with self._connection() as conn:
            rows = conn.execute("SELECT username, record::text FROM users ORDER BY username")
            return [(key, json.loads(text)) for key, text in rows]

    def find(self, field: str, value: str) -> list[str]:
        """The keys whose record has ``value`` in its top-level ``field``, in one query.

        The server keeps only the rows whose JSON text holds the pair as this
        module writes it; each is then decoded here to be sure. Not ``->>``:
        PostgreSQL refuses to decode a ``\\u0000`` that a user may have put in
        any field, and one such row would break the look-up for everybody.
        """
        # '"field":"value"', exactly as stored: readable, or all escaped (_encode).
        needles = [_READABLE.encode({field: value})[1:-1], _ESCAPED.encode({field: value})[1:-1]]
        if not storable(needles[0]):  # a lone surrogate: PostgreSQL text cannot carry it
            needles[0] = needles[1]
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT username, record::text FROM users"
                " WHERE strpos(record::text, %s) > 0 OR strpos(record::text, %s) > 0",
                needles,
            ).fetchall()
        return [key for key, text in rows if json.loads(text).get(field) == value]

    def create(self, key: str, record: Record) -> bool:
        """Store ``record`` under a new ``key``; return False if the key exists."""
        # A transaction of one statement: a reply lost after the commit is then
        # StoreUncertain (the page must not say "nothing was changed" of a new account).
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO users (username, record) VALUES (%s, %s)"
                " ON CONFLICT (username) DO NOTHING",
                (_storable_key(key), _encode(record)),
            )
            return cursor.rowcount == 1

    def update(self, key: str, change: Callable[[Record], Record | None]) -> Record:
        """Apply ``change`` to a copy of the record and save the result, in one transaction.

        ``change`` runs while the row is locked; it may mutate its argument and
        return ``None``, or raise to refuse (nothing is saved). Raises
        :class:`RecordGone` if there is no such record.
        """
        if not storable(key):
            raise RecordGone(key)
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT record::text FROM users WHERE username = %s FOR UPDATE", (key,)
            ).fetchone()
            if row is None:
                raise RecordGone(key)
            draft = json.loads(row[0])
            result = change(draft)
            new = draft if result is None else result
            text = _encode(new)
            if text != row[0]:
                conn.execute("UPDATE users SET record = %s WHERE username = %s", (text, key))
            return new

    def delete(self, key: str, check: Callable[[Record], object] | None = None) -> bool:
        """Remove ``key`` and its photo in one transaction; False if there is no such record.

        ``check`` sees a copy of the record while the row is locked, and may
        raise to refuse (nothing is deleted).
        """
        if not storable(key):
            return False
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT record::text FROM users WHERE username = %s FOR UPDATE", (key,)
            ).fetchone()
            if row is None:
                return False
            record = json.loads(row[0])
            if check is not None:
                check(record)
            conn.execute("DELETE FROM users WHERE username = %s", (key,))
            if isinstance(record.get("photo"), str):
                conn.execute("DELETE FROM photos WHERE name = %s", (record["photo"],))
            return True

    def compact(self) -> None:
        """Nothing to do: PostgreSQL's autovacuum reclaims dead rows."""

    def close(self) -> None:
        """Close the pool; the store opens a new one if it is used again."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.close()


class PostgresPhotos:
    """Photo bytes in the ``photos`` table, through the store's pool."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    def put(self, name: str, data: bytes) -> None:
        photo_name(name)
        with self._store._connection() as conn:
            # A name's bytes never change, so a name stored already (an import
            # run again) holds these very bytes.
            conn.execute(
                "INSERT INTO photos (name, data) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (name, data),
            )

    def get(self, name: str) -> Photo | None:
        photo_name(name)
        with self._store._connection() as conn:
            row = conn.execute(
                "SELECT data, extract(epoch FROM created)::float8 FROM photos WHERE name = %s",
                (name,),
            ).fetchone()
        return None if row is None else Photo(bytes(row[0]), row[1])

    def remove(self, name: str) -> None:
        with self._store._connection() as conn:
            conn.execute("DELETE FROM photos WHERE name = %s", (name,))

    def listing(self) -> dict[str, float]:
        with self._store._connection() as conn:
            rows = conn.execute("SELECT name, extract(epoch FROM created)::float8 FROM photos")
            return {name: modified for name, modified in rows}
