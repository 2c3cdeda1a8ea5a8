"""What every backend promises, on the text database and on PostgreSQL (the ``backend`` fixture).

Everything above the store relies on these and nothing else: a record reads
back exactly as written, whatever text it holds; a change that raises saves
nothing; concurrent read-modify-writes lose nothing; a deletion happens at
once, sees the record as it goes, and can be refused. ``backend.open()`` gives
another handle on the same data, as another worker or host has.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from helpers import NASTY_TEXT, database_rows, namespaced_url, open_store
from secure_app.store import RecordGone, new_user
from secure_app.store.postgres import storable
from secure_app.store.text import FolderPhotos


def user(name: str, **fields: object) -> dict:
    record = new_user(name, "$argon2id$fake")
    record.update(fields)
    return record


@pytest.fixture
def store(backend):
    return backend.open()


def key_for(backend, text: str) -> str:
    """``text`` as a key, where the backend can hold it: PostgreSQL's text type takes no NUL
    and no lone surrogate (keys are usernames, so no real key has one)."""
    return text + "key" if backend.name == "text" or storable(text) else "key"


@pytest.mark.parametrize("text", NASTY_TEXT)
def test_any_text_round_trips_in_every_field_and_across_a_restart(backend, store, text):
    key = key_for(backend, text)
    record = user("alice", full_name=text, email=text, phone=text, bio=text, photo=text)
    record[text] = text  # arbitrary text as a field name too
    assert store.create(key, record)
    assert store.get(key) == record
    store.update(key, lambda r: r.update(bio=text + "!" + text))
    record["bio"] = text + "!" + text
    again = backend.open()  # as after a restart
    assert again.get(key) == record
    assert again.keys() == [key]  # nothing smuggled in (no "mallory", no dropped table)
    assert len(again) == 1 and key in again


@pytest.mark.parametrize("key", ["nul\x00", "lone \ud800"])
def test_postgres_finds_no_key_it_cannot_hold_and_refuses_to_create_one(
    postgres_server, tmp_path, key
):
    url = namespaced_url(postgres_server.url(), str(tmp_path))
    store = open_store(url)
    store.create("alice", user("alice"))
    before = database_rows(url)
    assert store.get(key) is None and key not in store
    assert store.delete(key) is False
    with pytest.raises(RecordGone) as gone:
        store.update(key, lambda r: None)
    assert gone.value.args == (key,)  # as for any missing key
    with pytest.raises(ValueError) as refused:
        store.create(key, user("x"))
    assert str(refused.value) == "PostgreSQL cannot store this key (NUL or a lone surrogate)"
    assert database_rows(url) == before
    store.close()


def test_update_that_changes_nothing_writes_nothing(backend, store):
    store.create("alice", user("alice"))
    before = backend.snapshot()
    assert store.update("alice", lambda r: None) == store.get("alice")
    assert backend.snapshot() == before


def test_update_of_a_missing_key_raises_record_gone_and_stores_nothing(backend, store):
    store.create("alice", user("alice"))
    before = backend.snapshot()
    with pytest.raises(RecordGone) as gone:
        store.update("mallory", lambda r: r.update(bio="x"))
    assert isinstance(gone.value, KeyError)  # callers that expect a KeyError still get one
    assert gone.value.args == ("mallory",)
    assert backend.snapshot() == before
    assert "mallory" not in store


def test_update_whose_change_raises_saves_nothing(backend, store):
    store.create("alice", user("alice", bio="before"))
    before = backend.snapshot()

    def refuse(record: dict) -> None:
        record["bio"] = "half done"
        raise LookupError("refused")

    with pytest.raises(LookupError):
        store.update("alice", refuse)
    assert backend.snapshot() == before
    assert store.get("alice")["bio"] == "before"


def test_a_change_may_return_a_new_record_instead_of_mutating(store):
    store.create("alice", user("alice", bio="old"))
    assert store.update("alice", lambda r: {"replaced": True}) == {"replaced": True}
    assert store.get("alice") == {"replaced": True}


def test_create_of_an_existing_key_is_refused_and_keeps_the_original(store):
    assert store.create("alice", user("alice", bio="original"))
    assert not store.create("alice", user("alice", bio="impostor"))
    assert store.get("alice")["bio"] == "original"


def test_returned_records_are_copies_not_the_stored_state(store):
    store.create("alice", user("alice", bio="safe"))
    store.get("alice")["bio"] = "mutated"
    saved = store.update("alice", lambda r: None)
    saved["bio"] = "mutated too"
    assert store.get("alice")["bio"] == "safe"


def test_a_closed_store_may_be_closed_again_and_opens_again_when_used(store):
    store.create("alice", user("alice"))
    store.close()
    store.close()  # twice is no error: an app's teardown and a command may both close it
    assert store.get("alice")["username"] == "alice"


def test_items_lists_every_record_once_as_a_fresh_copy(store):
    store.create("alice", user("alice", bio="a"))
    store.create("bob", user("bob", bio="b"))
    store.update("alice", lambda r: r.update(bio="a2"))
    items = store.items()
    assert sorted(key for key, _ in items) == ["alice", "bob"]  # once each, whatever the updates
    assert dict(items) == {"alice": store.get("alice"), "bob": store.get("bob")}
    assert dict(items)["alice"]["bio"] == "a2"
    dict(items)["bob"]["bio"] = "mutated"
    assert store.get("bob")["bio"] == "b"


def test_delete_forgets_the_record_at_once_for_every_handle(backend, store):
    store.create("alice", user("alice", bio="secret-v0"))
    for i in range(1, 5):
        store.update("alice", lambda r, i=i: r.update(bio=f"secret-v{i}"))
    store.create("bob", user("bob", bio="stays"))
    other = backend.open()
    assert other.get("alice")["bio"] == "secret-v4"
    assert store.delete("alice")
    assert "alice" not in other and other.get("alice") is None
    assert other.get("bob")["bio"] == "stays"
    assert not any(b"secret-v" in data for data in backend.snapshot().values())
    assert not store.delete("alice")


def test_update_of_a_key_another_handle_deleted_raises_and_brings_nothing_back(backend, store):
    store.create("alice", user("alice"))
    other = backend.open()  # another process deletes it
    assert other.delete("alice")
    before = backend.snapshot()
    with pytest.raises(RecordGone):
        store.update("alice", lambda r: r.update(bio="late"))
    assert backend.snapshot() == before
    assert "alice" not in store and "alice" not in other


def test_delete_check_sees_the_record_as_it_is_deleted_not_an_earlier_read(backend, store):
    store.create("alice", user("alice", photo="old.webp"))
    assert store.get("alice")["photo"] == "old.webp"  # what a request loaded first
    other = backend.open()
    other.update("alice", lambda r: r.update(photo="new.webp"))  # another tab, meanwhile
    seen: list[dict] = []
    assert store.delete("alice", seen.append) is True
    assert [r["photo"] for r in seen] == ["new.webp"]
    assert "alice" not in other
    assert not any(b"new.webp" in data for data in backend.snapshot().values())


def test_delete_check_that_raises_deletes_nothing(backend, store):
    store.create("alice", user("alice"))
    record = store.get("alice")
    before = backend.snapshot()

    def refuse(record: dict) -> None:
        raise PermissionError("password changed")

    with pytest.raises(PermissionError):
        store.delete("alice", refuse)
    assert backend.snapshot() == before
    assert store.get("alice") == record


def test_delete_of_a_missing_key_returns_false_without_calling_the_check(store):
    called: list[dict] = []
    assert store.delete("nobody", called.append) is False
    assert called == []


def test_threads_and_handles_incrementing_at_once_lose_nothing(backend):
    handles = [backend.open(), backend.open()]
    handles[0].create("counter", {"n": 0})
    per_thread, threads = 40, 6

    def work(store) -> None:
        for _ in range(per_thread):
            store.update("counter", lambda r: r.update(n=r["n"] + 1))

    pool = [threading.Thread(target=work, args=(handles[i % 2],)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert backend.open().get("counter") == {"n": per_thread * threads}


def test_store_used_across_a_fork_keeps_excluding_the_parent(backend):
    """The child must not reuse the parent's lock (a flock) or connections (a socket)."""
    store = backend.open()
    store.create("counter", {"n": 0})  # opens the lock file or the pool before the fork
    rounds = 100
    pid = os.fork()
    if pid == 0:  # child: same store object, inherited state
        code = 1
        try:
            for _ in range(rounds):
                store.update("counter", lambda r: r.update(n=r["n"] + 1))
            code = 0
        finally:
            os._exit(code)
    for _ in range(rounds):
        store.update("counter", lambda r: r.update(n=r["n"] + 1))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get("counter") == {"n": 2 * rounds}


def test_find_matches_a_value_however_the_record_had_to_be_written(store):
    """A record with a lone surrogate anywhere (the value sought too) is written all escaped;
    find must see it too."""
    store.create("readable", {"webauthn_user": "hé-1", "bio": "plain"})
    store.create("escaped", {"webauthn_user": "hé-2", "bio": "lone \ud800"})
    store.create("lookalike", {"note": '"webauthn_user":"hé-1"', "webauthn_user": "x"})
    store.create("in the value", {"webauthn_user": "hé \udc00"})
    assert store.find("webauthn_user", "hé-1") == ["readable"]
    assert store.find("webauthn_user", "hé-2") == ["escaped"]
    assert store.find("webauthn_user", "hé \udc00") == ["in the value"]
    assert store.find("webauthn_user", "hé") == []


def test_find_matches_the_whole_value_of_that_field_and_nothing_else(store):
    store.create("alice", {"email": "alice@example.org", "bio": "bob@example.org"})
    store.create("bob", {"email": "bob@example.org"})
    store.create("quoted", {"email": 'say "hi"'})
    store.create("backslash", {"email": "C:\\mail"})
    assert store.find("email", "bob@example.org") == ["bob"]  # not alice, whose bio says it
    assert store.find("email", "example.org") == []  # part of a value is not the value
    assert store.find("phone", "bob@example.org") == []
    assert store.find("email", 'say "hi"') == ["quoted"]  # stored as say \"hi\"
    assert store.find("email", "C:\\mail") == ["backslash"]  # stored as C:\\mail


# -- photos --------------------------------------------------------------------------------


@pytest.fixture
def photos(backend, store):
    """The backend's photos: a folder beside the text database, or the same PostgreSQL."""
    if backend.name == "postgres":
        return store.photos
    return FolderPhotos(Path(backend.spec).parent / "photos")


NAME = "ab" * 16 + ".webp"


def test_a_photo_reads_back_as_stored_with_the_time_it_was_stored(photos):
    photos.put(NAME, b"\x00photo bytes\xff")
    stored = photos.get(NAME)
    assert stored.data == b"\x00photo bytes\xff"
    assert abs(stored.modified - time.time()) < 60
    assert photos.listing() == {NAME: stored.modified}


def test_a_removed_photo_is_gone_and_removing_a_missing_one_is_no_error(photos):
    photos.put(NAME, b"photo")
    photos.put("cd" * 16 + ".webp", b"other")
    photos.remove(NAME)
    assert photos.get(NAME) is None
    assert list(photos.listing()) == ["cd" * 16 + ".webp"]
    photos.remove(NAME)
    photos.remove("ef" * 16 + ".webp")  # never stored
    assert photos.get("ef" * 16 + ".webp") is None


@pytest.mark.parametrize(
    "name", ["../users.jsonl", "AB" * 16 + ".webp", "ab" * 16 + ".png", "x.webp", "", None]
)
def test_a_name_the_server_could_not_have_made_is_refused_and_stores_nothing(photos, name):
    with pytest.raises(ValueError, match="not a photo name"):
        photos.put(name, b"photo")
    with pytest.raises(ValueError, match="not a photo name"):
        photos.get(name)
    assert photos.listing() == {}
