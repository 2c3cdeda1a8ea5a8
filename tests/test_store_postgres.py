"""What only the PostgreSQL backend has: its schema, its roles, photos deleted with their record.

The promises both backends share are in test_store_contract.py (and the state
machine, processes and faults files), run on both.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import psycopg
import pytest

from helpers import AuthActions, make_app, namespaced_url
from images import png
from secure_app.store import StoreError, StoreUncertain, new_user, postgres
from secure_app.store.postgres import MIGRATIONS, PostgresStore
from servers import Postgres


@pytest.fixture
def url(postgres_server, tmp_path) -> str:
    return namespaced_url(postgres_server.url(), str(tmp_path))


@pytest.fixture
def site(url, tmp_path):
    """An app on PostgreSQL with alice registered and logged in: (app, client, auth)."""
    app = make_app(tmp_path, DATABASE_URL=url)
    client = app.test_client()
    auth = AuthActions(client)
    assert auth.register().status_code == 302
    assert auth.login().status_code == 302
    return app, client, auth


def tables(url: str) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        names = conn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema() ORDER BY table_name"
        ).fetchall()
        versions = conn.execute("SELECT version FROM secure_app_schema").fetchall()
    return [*names, *versions]


def test_schema_is_created_at_start_with_its_version_and_a_restart_changes_nothing(url, recwarn):
    first = PostgresStore(url)  # creates the tables in its constructor: at start-up
    assert tables(url) == [
        ("photos",),
        ("secure_app_schema",),
        ("users",),
        (len(MIGRATIONS),),
    ]
    first.create("alice", new_user("alice", "$argon2id$h"))
    first.close()
    again = PostgresStore(url)
    assert tables(url) == [("photos",), ("secure_app_schema",), ("users",), (len(MIGRATIONS),)]
    assert again.get("alice")["username"] == "alice"
    again.close()
    assert [str(w.message) for w in recwarn] == []  # no deprecated driver default either


def test_hosts_starting_at_once_on_an_empty_database_create_one_schema(url, caplog):
    errors: list[BaseException] = []
    stores: list[PostgresStore] = []
    barrier = threading.Barrier(6)

    def start() -> None:
        barrier.wait()
        try:
            store = PostgresStore(url)
            stores.append(store)
            store.keys()  # raises if its start-up did not leave a usable schema
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert "cannot be used at start-up" not in caplog.text  # each started cleanly, none retried
    assert tables(url)[-1:] == [(len(MIGRATIONS),)] and len(tables(url)) == 4
    for store in stores:
        store.close()


def test_a_host_that_waited_for_another_hosts_upgrade_finds_it_done_and_runs_nothing(url, caplog):
    """Two hosts read the old version, then queue for the upgrade's lock: whoever comes second
    reads the version again and finds nothing left to do."""
    name = url.rsplit("%3D", 1)[1]  # the test's schema: finds these two stores' sessions
    stores: list[PostgresStore] = []
    with psycopg.connect(url, autocommit=True) as upgrading:  # as another host would hold it
        upgrading.execute("SELECT pg_advisory_lock(%s)", (postgres._MIGRATION_LOCK,))
        hosts = [
            threading.Thread(
                target=lambda: stores.append(PostgresStore(f"{url}&application_name={name}"))
            )
            for _ in range(2)
        ]
        for host in hosts:
            host.start()
        queued = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = %s AND wait_event_type = 'Lock'"
        )
        deadline = time.monotonic() + 5
        while upgrading.execute(queued, (name,)).fetchone()[0] < 2:
            assert time.monotonic() < deadline, "the hosts never queued for the lock"
            time.sleep(0.01)
        upgrading.execute("SELECT pg_advisory_unlock(%s)", (postgres._MIGRATION_LOCK,))
    for host in hosts:
        host.join()
    assert "cannot be used at start-up" not in caplog.text
    assert tables(url) == [("photos",), ("secure_app_schema",), ("users",), (len(MIGRATIONS),)]
    for store in stores:
        assert store.keys() == []
        store.close()


def test_a_schema_newer_than_the_code_is_refused_at_start_while_running_hosts_serve_on(url):
    """A rolling upgrade: one host of the new release upgrades the schema (README, SECURITY.md);
    hosts still on this code, checked at their start, serve until they are replaced."""
    running = PostgresStore(url)
    running.create("alice", new_user("alice", "$argon2id$h"))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE secure_app_schema SET version = %s", (len(MIGRATIONS) + 1,))
    assert running.get("alice")["username"] == "alice"
    running.close()
    store = PostgresStore(url, timeout=1)
    with pytest.raises(StoreError, match="newer than this code"):
        store.get("alice")
    store.close()


def test_the_site_runs_as_a_role_that_may_read_and_write_rows_and_nothing_more(
    postgres_server, tmp_path
):
    """SECURITY.md's least-privilege set-up: the owner migrates, the web role only uses rows."""
    owner_url = namespaced_url(postgres_server.url(), str(tmp_path))
    PostgresStore(owner_url).close()  # the schema made by the owning role (a deploy step)
    schema = owner_url.rsplit("%3D", 1)[1]
    role = "web_" + schema  # one role per test: the server may outlive this run (mutation runs)
    postgres_server.admin(
        f"CREATE ROLE {role} LOGIN PASSWORD 'web-only-password'",
        f"GRANT USAGE ON SCHEMA {schema} TO {role}",
        f"GRANT SELECT ON {schema}.secure_app_schema TO {role}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.users, {schema}.photos TO {role}",
        database="secure_app",
    )
    owner = f"{postgres_server.user}:{Postgres.PASSWORD}@"
    web_url = owner_url.replace(owner, f"{role}:web-only-password@")
    app = make_app(tmp_path, DATABASE_URL=web_url)
    client = app.test_client()
    auth = AuthActions(client)
    assert auth.register().status_code == 302
    assert auth.login().status_code == 302
    assert auth.upload_photo(png()).status_code == 303
    assert client.get("/account-details").status_code == 200
    with psycopg.connect(web_url, autocommit=True) as conn:
        for ddl in ("DROP TABLE users", "ALTER TABLE users ADD COLUMN x int", "CREATE TABLE x ()"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(ddl)


def test_every_connection_commits_durably_and_gives_up_on_a_stuck_server_in_time(url):
    """A role, database or URL may turn synchronous_commit off for speed: the store turns it
    back on. Its limits follow DATABASE_TIMEOUT: a lock 1x, a statement 2x, an idle
    transaction 4x."""
    tuned_for_speed = url + "%20-csynchronous_commit%3Doff"
    with psycopg.connect(tuned_for_speed) as plain:
        assert plain.execute("SHOW synchronous_commit").fetchone()[0] == "off"
    store = PostgresStore(tuned_for_speed, timeout=1.5)
    names = [
        "synchronous_commit",
        "lock_timeout",
        "statement_timeout",
        "idle_in_transaction_session_timeout",
    ]
    with store._connection() as conn:
        settings = [conn.execute(f"SHOW {name}").fetchone()[0] for name in names]
    assert settings == ["on", "1500ms", "3s", "6s"]
    store.close()


def test_every_connection_notices_a_vanished_server_within_seconds(url):
    """TCP keepalives after 10 s idle, every 3 s, 3 probes; unacknowledged data given up after
    4x DATABASE_TIMEOUT: a host or network gone ends the request, not the kernel's two hours."""
    store = PostgresStore(url, timeout=1.5)
    with store._connection() as conn, socket.socket(fileno=os.dup(conn.fileno())) as sock:
        options = [
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        ]
    assert options == [1, 10, 3, 3, 6000]
    store.close()


def test_pooled_connections_the_server_ended_are_replaced_and_the_request_served(url):
    """After a server restart or a cut every pooled connection is dead: a request drops them all
    and gets a new one, without an error (how soon, against a real restart: test_store_faults)."""
    store = PostgresStore(url, pool_size=3, timeout=2)
    store.create("alice", new_user("alice", "$argon2id$h"))
    with store._connection() as a, store._connection() as b, store._connection() as c:
        pids = [conn.info.backend_pid for conn in (a, b, c)]  # the pool's three, now idle
    with psycopg.connect(url, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM unnest(%s::int[]) AS pid", (pids,)
        ).fetchall()
    assert ended == [(True,)] * 3
    assert store.get("alice")["username"] == "alice"
    store.close()


class Interrupted(BaseException):
    """Stands for KeyboardInterrupt or SystemExit, raised in a thread whatever it was doing."""


def test_an_interrupt_while_a_connection_is_checked_gives_it_back_to_the_pool(url, monkeypatch):
    """A connection kept out of the pool for good would leave one fewer for every request."""
    store = PostgresStore(url, pool_size=1, timeout=3)
    execute = psycopg.Connection.execute

    def interrupted(conn, query, *args, **kwargs):
        if query == "":  # the store's check that a connection is alive
            raise Interrupted
        return execute(conn, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "execute", interrupted)
    with pytest.raises(Interrupted):
        store.get("alice")
    monkeypatch.undo()
    assert store.get("alice") is None  # the pool's only connection was given back
    store.close()


def test_a_database_that_refused_the_store_serves_its_next_request_once_it_accepts(url, tmp_path):
    """No waiting out the pool's back-off (1, 2, 4... s): a failed reconnection gives up after
    DATABASE_TIMEOUT, so the next request tries afresh. The password file stands for a server
    that refuses, then accepts (libpq reads it at each attempt)."""
    PostgresStore(url).close()  # the schema, made first: no start-up waits on the upgrade lock
    passfile = tmp_path / "pgpass"
    passfile.write_text("")
    passfile.chmod(0o600)
    refused = url.replace(f":{Postgres.PASSWORD}@", "@") + f"&passfile={quote(str(passfile))}"
    store = PostgresStore(refused, pool_size=1, timeout=0.2)
    deadline = time.monotonic() + 3
    while store._pool.get_stats()["pool_size"]:  # a connection still being tried
        assert time.monotonic() < deadline, "the pool kept retrying long past DATABASE_TIMEOUT"
        time.sleep(0.01)
    passfile.write_text(f"*:*:*:*:{Postgres.PASSWORD}\n")
    assert store.get("alice") is None
    store.close()


def test_a_database_down_at_start_up_is_logged_and_each_request_waits_only_the_timeout(caplog):
    started = time.monotonic()
    store = PostgresStore("postgresql://app:pw@127.0.0.1:1/db", timeout=0.2)  # a closed port
    assert time.monotonic() - started < 2
    logged = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert (
        "secure_app.store.postgres",
        "ERROR",
        "PostgreSQL cannot be used at start-up (the database failed: PoolTimeout);"
        " retrying on each request",
    ) in logged
    # psycopg_pool's own lines name the pool, so an operator knows whose connections fail.
    assert all("'secure_app'" in message for name, _, message in logged if name == "psycopg.pool")
    assert any(name == "psycopg.pool" for name, _, _ in logged)
    started = time.monotonic()
    with pytest.raises(StoreError, match="the database failed"):
        store.get("alice")
    assert time.monotonic() - started < 2
    store.close()


def test_a_request_waiting_inside_a_transaction_holds_up_no_other_request(url):
    store = PostgresStore(url, timeout=3)
    store.create("alice", new_user("alice", "$argon2id$h"))
    store.create("bob", new_user("bob", "$argon2id$h"))
    inside, release = threading.Event(), threading.Event()

    def slow(record: dict) -> None:
        inside.set()
        release.wait(10)

    writer = threading.Thread(target=store.update, args=("alice", slow))
    writer.start()
    try:
        assert inside.wait(5)
        assert store.get("bob")["username"] == "bob"  # on another connection, not after a wait
    finally:
        release.set()
        writer.join()
    store.close()


def test_deleting_a_user_deletes_their_photo_in_the_same_transaction(url):
    store = PostgresStore(url)
    store.photos.put("ab" * 16 + ".webp", b"photo bytes")
    store.create("alice", {**new_user("alice", "$argon2id$h"), "photo": "ab" * 16 + ".webp"})

    def refuse(record: dict) -> None:
        raise PermissionError("password changed")

    with pytest.raises(PermissionError):
        store.delete("alice", refuse)
    assert store.photos.get("ab" * 16 + ".webp").data == b"photo bytes"  # refused: both stay
    assert store.delete("alice")
    assert store.photos.get("ab" * 16 + ".webp") is None and store.get("alice") is None
    store.close()


def test_on_postgres_nothing_is_written_to_the_data_or_photo_folders(site):
    app, _, auth = site
    assert auth.upload_photo(png()).status_code == 303
    for key in ("DATA_DIR", "PHOTO_DIR"):
        folder = Path(app.config[key])
        assert not folder.exists() or not any(folder.rglob("*")), key


def test_prune_photos_removes_old_rows_no_record_points_to(site, url):
    app, client, auth = site
    assert auth.upload_photo(png()).status_code == 303
    store = app.extensions["secure_app.store"]
    kept = store.get("alice")["photo"]
    orphan, fresh = "ab" * 16 + ".webp", "cd" * 16 + ".webp"
    for name in (orphan, fresh):
        store.photos.put(name, b"x")
    with psycopg.connect(url, autocommit=True) as conn:  # as if stored two hours ago
        conn.execute(
            "UPDATE photos SET created = created - interval '2 hours' WHERE name IN (%s, %s)",
            (kept, orphan),
        )
    runner = app.test_cli_runner()
    dry = runner.invoke(args=["prune-photos", "--dry-run"])
    assert dry.exit_code == 0 and f"would remove {orphan}" in dry.output
    assert len(store.photos.listing()) == 3
    result = runner.invoke(args=["prune-photos"])
    assert result.exit_code == 0, result.output
    assert "Removed 1 photo(s)" in result.output
    assert sorted(store.photos.listing()) == sorted([kept, fresh])
    assert client.get("/public/images/profile/" + kept).status_code == 200
    assert client.get("/public/images/profile/" + orphan).status_code == 404


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:Zq%Kp9-live-secret@db.internal/secure_app",  # an unencoded %
        "postgresql://app:live-secret@[db.internal/secure_app",  # a typo in the host
    ],
)
def test_a_url_libpq_cannot_parse_refuses_to_start_without_quoting_the_password(
    tmp_path, url, caplog
):
    with pytest.raises(ValueError) as refused:
        make_app(tmp_path, DATABASE_URL=url)
    assert str(refused.value) == (
        "FLASK_DATABASE_URL cannot be parsed: percent-encode special characters in the "
        "user name and password (%, @, :, /, ?, #, [, ])"
    )
    assert "secret" not in str(refused.value) and "secret" not in caplog.text


def test_a_remote_database_without_verify_full_is_warned_about(url, caplog):
    PostgresStore(url).close()  # loopback: nothing to warn about
    assert "sslmode" not in caplog.text
    # Another address than this machine's usual names (loopback all the same: nothing
    # leaves the machine; the port is closed, so it fails at once).
    remote = "postgresql://app:pw@127.0.0.2:1/secure_app?sslmode=prefer"
    PostgresStore(remote, timeout=0.2).close()
    assert "without sslmode=verify-full" in caplog.text and "pw@" not in caplog.text


PLAIN_TEXT_WARNING = (
    "FLASK_DATABASE_URL reaches {} without sslmode=verify-full: the connection may be "
    'unencrypted or its server unverified (SECURITY.md, "The database")'
)


# Every port is 1, closed: each store fails to connect at once. 127.0.0.2 stands for a remote
# host (loopback all the same, so nothing leaves the machine) as it is not one of the usual names.
@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("postgresql://app:pw@/db?port=1", None),  # no host: libpq's default socket
        ("postgresql://app:pw@/db?host=/tmp/no-such-socket-dir&port=1", None),
        ("postgresql://app:pw@localhost:1/db", None),
        ("postgresql://app:pw@127.0.0.1:1/db", None),
        ("postgresql://app:pw@[::1]:1/db", None),
        ("postgresql://app:pw@localhost:1,[::1]:1/db", None),
        ("postgresql://app:pw@/db?hostaddr=127.0.0.1&port=1", None),
        ("postgresql://app:pw@127.0.0.2:1/db?sslmode=verify-full", None),
        ("postgresql://app:pw@127.0.0.2:1/db?sslmode=verify-ca", None),
        ("postgresql://app:pw@127.0.0.2:1/db", "127.0.0.2"),  # libpq's default, prefer
        ("postgresql://app:pw@127.0.0.2:1/db?sslmode=require", "127.0.0.2"),
        ("postgresql://app:pw@localhost:1,127.0.0.2:1/db", "127.0.0.2"),
        ("postgresql://app:pw@127.0.0.2:1,127.0.0.3:1/db", "127.0.0.2,127.0.0.3"),
        ("postgresql://app:pw@/db?hostaddr=127.0.0.2&port=1", "127.0.0.2"),
        # libpq connects to hostaddr; host then only names the server (for TLS, the pgpass file)
        ("postgresql://app:pw@localhost:1/db?hostaddr=127.0.0.2", "127.0.0.2"),
    ],
)
def test_plain_text_is_warned_about_for_every_host_that_is_not_this_machine(url, warned, caplog):
    started = time.monotonic()
    PostgresStore(url, timeout=0.1).close()
    assert time.monotonic() - started < 2  # start-up waits DATABASE_TIMEOUT for it, no more
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "secure_app.store.postgres" and r.levelno == logging.WARNING
    ]
    assert warnings == ([] if warned is None else [PLAIN_TEXT_WARNING.format(warned)])


def test_find_is_exact_and_one_users_nul_bio_breaks_no_one_elses_lookup(url):
    store = PostgresStore(url)
    store.create("alice", {**new_user("alice", "$h"), "webauthn_user": "h-alice"})
    store.create(
        "mallory", {**new_user("mallory", "$h"), "bio": "\x00", "note": '"webauthn_user":"h-alice"'}
    )
    store.create("zoe", {**new_user("zoe", "$h"), "bio": "lone \ud800", "webauthn_user": "h-zoe"})
    assert store.find("webauthn_user", "h-alice") == ["alice"]  # the look-alike text is no match
    assert store.find("webauthn_user", "h-zoe") == ["zoe"]
    assert store.find("webauthn_user", "h-nobody") == []
    store.close()


def test_find_leaves_the_filtering_to_the_database_and_decodes_only_the_matches(url, monkeypatch):
    """A look-up (a passkey login, an address's recovery) must not read back every account."""
    store = PostgresStore(url)
    for lone, suffix in (("", "r"), ("\ud800", "e")):  # written readable, then all escaped
        store.create(f"match-{suffix}", {"webauthn_user": "hé-1", "bio": lone})
        store.create(f"longer-{suffix}", {"webauthn_user": "hé-10", "bio": lone})
        store.create(f"other-field-{suffix}", {"xwebauthn_user": "hé-1", "bio": lone})
        store.create(f"other-value-{suffix}", {"webauthn_user": "x", "bio": lone})
    decoded: list[str] = []

    def loads(text: str) -> object:
        decoded.append(text)
        return json.loads(text)

    monkeypatch.setattr(postgres, "json", SimpleNamespace(loads=loads))
    assert sorted(store.find("webauthn_user", "hé-1")) == ["match-e", "match-r"]
    assert len(decoded) == 2
    store.close()


def test_an_uncertain_save_keeps_the_new_photo_and_says_the_outcome_is_unknown(site, monkeypatch):
    """The COMMIT went through but its answer was lost: the record names the new photo."""
    app, client, auth = site
    store = app.extensions["secure_app.store"]
    real_update = store.update

    def committed_then_lost(key, change):
        real_update(key, change)
        raise StoreUncertain("the database failed: OperationalError, while committing")

    monkeypatch.setattr(store, "update", committed_then_lost)
    response = auth.upload_photo(png())
    page = response.get_data(as_text=True)
    assert response.status_code == 503
    assert "cannot tell whether it was saved" in page and "nothing was changed" not in page
    monkeypatch.undo()
    name = store.get("alice")["photo"]
    assert name and client.get(f"/public/images/profile/{name}").status_code == 200
