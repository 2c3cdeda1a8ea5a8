"""Honest failures: a full disk, a read-only folder or a database that is gone keeps the old data.

The text database's tests run twice:

* ``tmpfs``: the data folder is a real, tiny tmpfs (``mount -t tmpfs -o
  size=...``), filled up for ENOSPC and remounted read-only for EROFS. This
  needs root and a working ``mount``; without them it is skipped with the
  reason, and the injected run below still runs.
* ``injected``: the store's write path (``secure_app.store.text._pwrite_all``)
  raises the ``OSError`` itself, after writing half of the bytes for ENOSPC,
  as a disk that fills up part-way through a write does.

A save that fits in the space the data file has reserved succeeds on a full
disk (``test_store.py`` proves it); the saves here are bigger than the reserve,
or the reserve is used up first.

PostgreSQL's faults are a server that stops (the store raises StoreError, the
pages answer 503, and both recover by themselves when it is back) and a
connection cut inside a transaction (nothing acknowledged is lost); they run on
a server of their own, since they stop it.
"""

from __future__ import annotations

import errno
import functools
import os
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

import secure_app.store.text as store_module
from helpers import PASSWORD, AuthActions, csrf_token, make_app, namespaced_url, open_store
from secure_app.store import StoreError, StoreUncertain, new_user
from secure_app.store.postgres import PostgresStore
from secure_app.store.text import TextStore, encode_line
from servers import Postgres, require_postgres

FS_SIZE = 512 * 1024


@functools.cache
def mount_works() -> bool:
    if os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory() as probe:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe]).returncode
        if ok == 0:
            subprocess.run(["umount", probe], check=True)
        return ok == 0


class FaultyFolder:
    """A data folder that can be made full or read-only, for real or by injection."""

    def __init__(self, root: Path, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path = root / "data"
        self.how = how
        self._monkeypatch = monkeypatch
        self.path.mkdir()
        if how == "tmpfs":
            run("mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0700", "tmpfs", self.path)

    def fill(self, leave: int = 2 * 4096) -> None:
        """Make the next write fail with ENOSPC, part-way through a line of more than ``leave``."""
        if self.how == "injected":

            def half_then_full(fd: int, data: bytes, offset: int) -> None:
                os.pwrite(fd, data[: len(data) // 2], offset)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            self._monkeypatch.setattr(store_module, "_pwrite_all", half_then_full)
            return
        fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            size = 0
            while True:
                try:
                    size += os.write(fd, b"\0" * 4096)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
            os.ftruncate(fd, max(0, size - leave))
        finally:
            os.close(fd)

    def make_read_only(self, *stores: TextStore) -> None:
        """Make the folder read-only: the stores are closed first, as by a restart."""
        for store in stores:
            store.close()  # Linux refuses a read-only remount while a file is open for writing
        if self.how == "injected":

            def read_only(fd: int, data: bytes, offset: int) -> None:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))

            self._monkeypatch.setattr(store_module, "_pwrite_all", read_only)
            return
        run("mount", "-o", "remount,ro", self.path)

    def restore(self) -> None:
        self._monkeypatch.undo()
        if self.how == "tmpfs":
            run("mount", "-o", "remount,rw", self.path)
            (self.path / "filler").unlink(missing_ok=True)

    def close(self) -> None:
        self._monkeypatch.undo()
        if self.how == "tmpfs":
            run("umount", "-l", self.path)


def run(*args: object) -> None:
    subprocess.run([str(a) for a in args], check=True)


@pytest.fixture(params=["tmpfs", "injected"])
def faulty(request, tmp_path: Path):
    if request.param == "tmpfs" and not mount_works():
        pytest.skip("a real tmpfs needs root and mount; the injected run covers this case")
    with pytest.MonkeyPatch.context() as monkeypatch:
        folder = FaultyFolder(tmp_path, request.param, monkeypatch)
        try:
            yield folder
        finally:
            folder.close()


def seed(store: TextStore) -> bytes:
    store.create("alice", new_user("alice", "$argon2id$fake") | {"bio": "old bio"})
    store.create("bob", new_user("bob", "$argon2id$fake") | {"bio": "bob's"})
    return (store.path).read_bytes()


def assert_unchanged(folder: Path, before: bytes) -> None:
    assert (folder / "users.jsonl").read_bytes() == before
    assert not list(folder.glob(".users.jsonl.*.tmp"))
    fresh = TextStore(folder)
    try:
        assert fresh.get("alice")["bio"] == "old bio"
        assert fresh.get("bob")["bio"] == "bob's"
    finally:
        fresh.close()


def test_full_disk_refuses_an_update_and_keeps_the_old_record(faulty):
    store = TextStore(faulty.path)
    before = seed(store)
    faulty.fill()
    with pytest.raises(StoreError):
        store.update("alice", lambda r: r.update(bio="new " * 20000))
    assert_unchanged(faulty.path, before)  # the part that was written is taken back at once
    assert store.get("alice")["bio"] == "old bio"
    faulty.restore()  # space again: the same store saves, and it lasts
    store.update("alice", lambda r: r.update(bio="new"))
    store.close()
    assert TextStore(faulty.path).get("alice")["bio"] == "new"


def test_full_disk_refuses_delete_and_compaction_and_loses_nothing(faulty):
    store = TextStore(faulty.path)
    before = seed(store)
    faulty.fill(leave=0)  # no room for the fresh copy that either would write
    with pytest.raises(StoreError):
        store.delete("alice")
    with pytest.raises(StoreError):
        store.compact()
    assert "alice" in store
    assert_unchanged(faulty.path, before)
    store.close()


def test_read_only_folder_refuses_an_update_and_still_reads(faulty):
    store = TextStore(faulty.path)
    before = seed(store)
    faulty.make_read_only(store)
    with pytest.raises(StoreError):
        store.update("alice", lambda r: r.update(bio="new"))
    with pytest.raises(StoreError):
        store.create("carol", new_user("carol", "$argon2id$fake"))
    assert_unchanged(faulty.path, before)
    assert store.get("alice")["bio"] == "old bio"
    assert "carol" not in store
    store.close()


def tear_after_records(folder: Path) -> bytes:
    """Leave the start of a line after the last record, as a writer killed mid-write does."""
    data = (folder / "users.jsonl").read_bytes()
    end = len(data.rstrip(b" \n")) + 1  # the reserve follows the last record's newline
    fd = os.open(folder / "users.jsonl", os.O_WRONLY)
    try:
        os.pwrite(fd, encode_line("carol", new_user("carol", "$argon2id$fake"))[:40], end)
    finally:
        os.close(fd)
    return (folder / "users.jsonl").read_bytes()


def test_a_torn_write_a_read_only_folder_keeps_is_logged_reads_go_on_and_saves_are_refused(
    faulty, caplog
):
    store = TextStore(faulty.path)
    seed(store)
    torn = tear_after_records(faulty.path)
    faulty.make_read_only(store)
    reader = TextStore(faulty.path)
    try:
        assert reader.get("alice")["bio"] == "old bio"
        assert "cannot repair the database: Read-only file system" in caplog.messages
        with pytest.raises(StoreError, match="^cannot repair the database: Read-only file sys"):
            reader.update("bob", lambda r: r.update(bio="new"))
        assert reader.get("bob")["bio"] == "bob's"
    finally:
        reader.close()
    assert (faulty.path / "users.jsonl").read_bytes() == torn  # nothing lost, nothing half-done


def test_a_read_only_folder_without_a_lock_file_is_read_without_the_lock(tmp_path, caplog):
    """Nobody can write there, so reading needs no lock; repairs wait for one."""
    if not mount_works():
        pytest.skip("a read-only folder without a lock file needs a real read-only mount (root)")
    with pytest.MonkeyPatch.context() as monkeypatch:
        folder = FaultyFolder(tmp_path, "tmpfs", monkeypatch)
        try:
            store = TextStore(folder.path)
            seed(store)
            torn = tear_after_records(folder.path)
            store.close()
            (folder.path / "users.lock").unlink()
            folder.make_read_only()
            reader = TextStore(folder.path)
            try:
                assert sorted(reader.keys()) == ["alice", "bob"]
                assert reader.get("alice")["bio"] == "old bio"
                with pytest.raises(StoreError, match="^cannot lock the database: Read-only"):
                    reader.update("alice", lambda r: r.update(bio="new"))
            finally:
                reader.close()
            assert "cannot repair" not in caplog.text  # not tried without the lock
            assert (folder.path / "users.jsonl").read_bytes() == torn
            assert not (folder.path / "users.lock").exists()
        finally:
            folder.close()


@pytest.mark.text_database  # the fault is in the data folder
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_account_details_save_that_fails_gives_503_and_changes_nothing(
    faulty, tmp_path, fault, monkeypatch
):
    app = make_app(tmp_path, DATA_DIR=str(faulty.path))
    client = app.test_client()
    auth = AuthActions(client)
    assert auth.register("alice", PASSWORD).status_code == 302
    assert auth.login("alice", PASSWORD).status_code == 302
    token = csrf_token(client, "/account-details")
    app_store = app.extensions["secure_app.store"]
    monkeypatch.setattr(TextStore, "reserve", 0)
    app_store.compact()  # no reserved space left: the save has to grow the file
    record = app_store.get("alice")
    before = (faulty.path / "users.jsonl").read_bytes()

    if fault == "full":
        faulty.fill(leave=0)  # and the new line is longer than a page, so no slack can hold it
    else:
        faulty.make_read_only(app_store)
    response = client.post(
        "/account-details",
        data={
            "csrf_token": token,
            "full_name": "Mallory Changed",
            "email": "changed@example.org",
            "phone": "+1 555 0100",
            "bio": "\U0001d54f" * 1000,  # 4,000 bytes of UTF-8
        },
    )
    page = response.get_data(as_text=True)
    assert response.status_code == 503
    assert "nothing was changed" in page
    assert "Traceback" not in page and "StoreError" not in page
    assert (faulty.path / "users.jsonl").read_bytes() == before
    assert app_store.get("alice") == record
    fresh = TextStore(faulty.path)
    try:
        assert fresh.get("alice") == record
    finally:
        fresh.close()
    # The account page still shows the saved details.
    assert client.get("/account-details").status_code == 200


# -- PostgreSQL: the server stops, a connection drops ---------------------------------------


@pytest.fixture(scope="module")
def own_postgres():
    """A server of these tests' own: they stop it, which the shared one must never be."""
    require_postgres()
    with Postgres() as server:
        yield server


def until(check, timeout: float = 30.0):
    """Retry ``check`` until it stops raising StoreError; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.slow
def test_postgres_stopped_raises_store_error_and_the_same_store_recovers_when_it_is_back(
    own_postgres, tmp_path, caplog
):
    store = PostgresStore(namespaced_url(own_postgres.url(), str(tmp_path)), timeout=1)
    assert store.create("alice", new_user("alice", "$argon2id$h"))
    store.update("alice", lambda r: r.update(bio="acknowledged"))
    own_postgres.stop()
    try:
        for attempt in (
            lambda: store.get("alice"),
            lambda: store.update("alice", lambda r: r.update(bio="lost")),
            lambda: store.create("bob", new_user("bob", "$argon2id$h")),
            lambda: store.delete("alice"),
            lambda: store.photos.get("ab" * 16 + ".webp"),
        ):
            started = time.monotonic()
            with pytest.raises(StoreError) as refused:
                attempt()
            assert time.monotonic() - started < 5  # bounded by DATABASE_TIMEOUT, not hung
            assert Postgres.PASSWORD not in str(refused.value)
    finally:
        own_postgres.start()
    assert until(lambda: store.get("alice"))["bio"] == "acknowledged"  # no restart of the app
    assert Postgres.PASSWORD not in caplog.text
    assert store.get("bob") is None
    store.close()


@pytest.mark.slow
def test_connection_dropped_inside_a_transaction_loses_nothing_acknowledged(own_postgres, tmp_path):
    url = namespaced_url(own_postgres.url(), str(tmp_path))
    store = PostgresStore(url, timeout=2)
    store.create("counter", {"n": 0})
    for _ in range(5):
        store.update("counter", lambda r: r.update(n=r["n"] + 1))

    def cut_my_connection(record: dict) -> None:
        record["n"] = 1000
        # Another session of the same role may end this one: as a crash or a
        # network cut does, between the row lock and the commit.
        with psycopg.connect(own_postgres.url(), autocommit=True) as killer:
            killer.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE usename = 'secure_app' AND pid <> pg_backend_pid()"
            )

    with pytest.raises(StoreError):
        store.update("counter", cut_my_connection)
    assert until(lambda: store.get("counter")) == {"n": 5}
    store.update("counter", lambda r: r.update(n=r["n"] + 1))  # the pool carries on
    assert open_store(url).get("counter") == {"n": 6}
    store.close()


@pytest.mark.slow
def test_pages_answer_503_while_postgres_is_down_and_recover_without_a_restart(
    own_postgres, tmp_path
):
    app = make_app(
        tmp_path,
        DATABASE_URL=namespaced_url(own_postgres.url(), str(tmp_path)),
        DATABASE_TIMEOUT=1,
    )
    client = app.test_client()
    auth = AuthActions(client)
    assert auth.register().status_code == 302
    assert auth.login().status_code == 302
    assert client.get("/account-details").status_code == 200
    own_postgres.stop()
    try:
        for path in ("/account-details", "/security", "/"):
            down = client.get(path)
            assert down.status_code == 503, path
            page = down.get_data(as_text=True)
            assert "Traceback" not in page and "psycopg" not in page
            assert "<html" in page.lower()  # the site's own error page
    finally:
        own_postgres.start()
    deadline = time.monotonic() + 30
    while client.get("/account-details").status_code != 200:
        assert time.monotonic() < deadline, "the site did not recover by itself"
        time.sleep(0.2)
    assert "alice" in client.get("/account-details").get_data(as_text=True)


@pytest.mark.slow
def test_after_a_restart_the_first_request_is_served_not_timed_out_on_dead_connections(
    own_postgres, tmp_path
):
    """Every pooled connection dies with the server; they are dropped at once, not waited on."""
    store = PostgresStore(namespaced_url(own_postgres.url(), str(tmp_path)), pool_size=4, timeout=5)
    store.create("alice", new_user("alice", "$argon2id$h"))
    with ThreadPoolExecutor(4) as pool:  # fill the pool with four open connections
        list(pool.map(lambda _: store.update("alice", lambda r: time.sleep(0.2)), range(4)))
    own_postgres.stop()
    own_postgres.start()
    started = time.monotonic()
    assert store.get("alice")["username"] == "alice"  # the first try, no StoreError
    assert time.monotonic() - started < 2  # psycopg_pool's own check would back off 1+2+4 s
    store.close()


@pytest.mark.slow
def test_a_connection_lost_while_committing_is_reported_as_uncertain(own_postgres, tmp_path):
    url = namespaced_url(own_postgres.url(), str(tmp_path))
    store = PostgresStore(url, timeout=2)
    store.create("counter", {"n": 0})
    with pytest.raises(StoreUncertain, match="may be saved"):
        with store._transaction() as conn:
            conn.execute("UPDATE users SET record = '{\"n\": 1}' WHERE username = 'counter'")
            with psycopg.connect(url, autocommit=True) as killer:  # the COMMIT goes out next
                killer.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
    assert until(lambda: store.get("counter")) == {"n": 0}  # here the server had not committed
    store.close()


@pytest.mark.slow
def test_a_lock_held_elsewhere_ends_the_request_with_store_error_not_a_hung_thread(
    own_postgres, tmp_path
):
    url = namespaced_url(own_postgres.url(), str(tmp_path))
    store = PostgresStore(url, timeout=1)
    store.create("alice", new_user("alice", "$argon2id$h"))
    with psycopg.connect(url) as holder:  # e.g. a migration's ALTER TABLE, or VACUUM FULL
        holder.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(StoreError):
            store.update("alice", lambda r: r.update(bio="waits"))
        assert time.monotonic() - started < 4  # lock_timeout, then the 503 page
        holder.rollback()
    assert store.get("alice")["bio"] == ""
    store.close()


@pytest.mark.slow
def test_commands_answer_in_one_line_while_postgres_is_down(own_postgres, tmp_path):
    app = make_app(
        tmp_path,
        DATABASE_URL=namespaced_url(own_postgres.url(), str(tmp_path)),
        DATABASE_TIMEOUT=1,
    )
    runner = app.test_cli_runner()
    own_postgres.stop()
    try:
        for args in (
            ["create-user", "alice"],
            ["prune-photos"],
            ["reset-two-factor", "alice"],
            ["export-data", str(tmp_path / "out")],
        ):
            result = runner.invoke(args=args, input=f"{PASSWORD}\n{PASSWORD}\n")
            assert result.exit_code == 1, (args, result.output)
            assert "Stopped there" in result.output and "Is the database up?" in result.output
            assert result.exception is None or isinstance(result.exception, SystemExit)
    finally:
        own_postgres.start()
