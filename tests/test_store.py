"""The text database in one process: format, healing, compaction, forgetting, locking."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from secure_app.store import COMPACT_MIN_DEAD, Store, new_user

NASTY_TEXT = [
    "plain",
    "",
    "line one\nline two\r\nline three\rend",
    'quote " backslash \\ brace } bracket ]',
    '"}\n{"k":"mallory","v":{"username":"mallory","password_hash":"x"}}\n',
    "Zoë Ñúñez, 李小龙, Ωμέγα, עברית, العربية",
    "emoji 🧑‍💻🏳️‍🌈 and astral 𝕏",
    "separators \u2028 \u2029 \u0085 \x0b \x0c \x1c",
    "nul \x00 and bell \x07 and del \x7f",
    "lone surrogate \ud800 and \udfff",
    "x" * 5000,
]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(folder: Path):
    s = Store(folder)
    yield s
    s.close()


def lines(folder: Path) -> list[bytes]:
    data = (folder / "users.jsonl").read_bytes()
    assert data.endswith(b"\n")
    return data.split(b"\n")[:-1]


def user(name: str, **fields: object) -> dict:
    record = new_user(name, "$argon2id$fake")
    record.update(fields)
    return record


@pytest.mark.parametrize("text", NASTY_TEXT)
def test_any_text_round_trips_in_every_field_and_across_a_restart(store, folder, text):
    record = user("alice", full_name=text, email=text, phone=text, bio=text, photo=text)
    record[text] = text  # arbitrary text as a field name too
    assert store.create(text + "key", record)
    assert store.get(text + "key") == record
    store.update(text + "key", lambda r: r.update(bio=text + "!" + text))
    record["bio"] = text + "!" + text
    again = Store(folder)  # as after a restart
    try:
        assert again.get(text + "key") == record
        assert again.keys() == [text + "key"]  # nothing smuggled in (no "mallory")
    finally:
        again.close()
    assert len(lines(folder)) == 2  # one line per write, whatever the text held


def test_file_is_utf8_text_with_one_json_object_a_line(store, folder):
    store.create("zoe", user("zoe", full_name="Zoë Ñúñez", bio="first\nsecond"))
    store.update("zoe", lambda r: r.update(phone="+44 20"))
    text = (folder / "users.jsonl").read_text(encoding="utf-8")  # valid UTF-8 or this raises
    assert "Zoë Ñúñez" in text  # readable with less, not \u-escaped
    assert text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]
    assert [row["k"] for row in rows] == ["zoe", "zoe"]
    assert rows[-1]["v"]["phone"] == "+44 20"
    assert rows[-1]["v"]["bio"] == "first\nsecond"


def test_lone_surrogate_is_escaped_so_the_file_stays_valid_utf8(store, folder):
    store.create("s", {"bio": "a\ud800b"})
    (folder / "users.jsonl").read_bytes().decode("utf-8")  # strict: raises on invalid UTF-8
    assert store.get("s") == {"bio": "a\ud800b"}


def test_torn_last_line_is_discarded_on_open_and_cut_off(folder):
    writer = Store(folder)
    writer.create("alice", user("alice", bio="kept"))
    writer.create("bob", user("bob", bio="kept too"))
    writer.close()
    good = (folder / "users.jsonl").read_bytes()
    # A writer killed part-way through its single write leaves a line without its newline.
    torn = json.dumps({"k": "carol", "v": user("carol")}).encode()[:40]
    with open(folder / "users.jsonl", "ab") as f:
        f.write(torn)

    reader = Store(folder)
    try:
        assert sorted(reader.keys()) == ["alice", "bob"]  # earlier records intact
        assert reader.get("alice")["bio"] == "kept"
        assert (folder / "users.jsonl").read_bytes() == good  # the torn bytes are gone
        assert reader.create("carol", user("carol"))
        assert all(json.loads(line) for line in lines(folder))
    finally:
        reader.close()


def test_complete_record_without_its_newline_counts_as_torn(folder):
    """The newline is the commit mark: a line that lacks it was never acknowledged."""
    writer = Store(folder)
    writer.create("alice", user("alice"))
    writer.close()
    with open(folder / "users.jsonl", "ab") as f:
        f.write(json.dumps({"k": "mallory", "v": user("mallory")}).encode())
    reader = Store(folder)
    try:
        assert "mallory" not in reader
        assert reader.create("dave", user("dave"))
        assert "mallory" not in Store(folder)
    finally:
        reader.close()


def test_garbage_line_in_the_middle_is_skipped_not_fatal(folder):
    writer = Store(folder)
    writer.create("alice", user("alice"))
    with open(folder / "users.jsonl", "ab") as f:
        f.write(b'\x00\x00\xff not json {\n[1, 2]\n{"k": 5, "v": {}}\n\n')
    writer.create("bob", user("bob"))
    writer.close()
    reader = Store(folder)
    try:
        assert sorted(reader.keys()) == ["alice", "bob"]
    finally:
        reader.close()


def test_update_appends_one_line_and_leaves_earlier_bytes_alone(store, folder):
    for i in range(50):
        store.create(f"user{i}", user(f"user{i}"))
    before = (folder / "users.jsonl").read_bytes()
    inode = os.stat(folder / "users.jsonl").st_ino
    store.update("user7", lambda r: r.update(bio="new"))
    after = (folder / "users.jsonl").read_bytes()
    assert os.stat(folder / "users.jsonl").st_ino == inode  # not a rewrite
    assert after.startswith(before)
    assert after[len(before) :].count(b"\n") == 1


def test_update_that_changes_nothing_writes_nothing(store, folder):
    store.create("alice", user("alice"))
    before = (folder / "users.jsonl").read_bytes()
    assert store.update("alice", lambda r: None) == store.get("alice")
    assert (folder / "users.jsonl").read_bytes() == before


def test_update_of_a_missing_key_raises_and_stores_nothing(store, folder):
    store.create("alice", user("alice"))
    before = (folder / "users.jsonl").read_bytes()
    with pytest.raises(KeyError):
        store.update("mallory", lambda r: r.update(bio="x"))
    assert (folder / "users.jsonl").read_bytes() == before
    assert "mallory" not in store


def test_change_that_raises_stores_nothing(store, folder):
    store.create("alice", user("alice", bio="old"))
    before = (folder / "users.jsonl").read_bytes()

    def half_done(record: dict) -> None:
        record["bio"] = "half"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.update("alice", half_done)
    assert store.get("alice")["bio"] == "old"
    assert (folder / "users.jsonl").read_bytes() == before


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


def test_delete_forgets_every_version_at_once(store, folder):
    store.create("alice", user("alice", bio="secret-v0"))
    for i in range(1, 5):
        store.update("alice", lambda r, i=i: r.update(bio=f"secret-v{i}"))
    store.create("bob", user("bob", bio="stays"))
    other = Store(folder)
    try:
        assert other.get("alice")["bio"] == "secret-v4"
        assert store.delete("alice")
        for path in folder.iterdir():  # no copy anywhere in the data folder
            assert b"secret-v" not in path.read_bytes(), path
        assert "alice" not in other and other.get("alice") is None
        assert other.get("bob")["bio"] == "stays"
        assert not store.delete("alice")
    finally:
        other.close()


def test_compaction_by_another_handle_is_noticed(folder):
    a, b = Store(folder), Store(folder)
    try:
        a.create("alice", user("alice", bio="0"))
        for i in range(1, 30):
            a.update("alice", lambda r, i=i: r.update(bio=str(i)))
        assert b.get("alice")["bio"] == "29"
        inode = os.stat(folder / "users.jsonl").st_ino
        a.compact()
        assert os.stat(folder / "users.jsonl").st_ino != inode
        assert len(lines(folder)) == 1
        b.update("alice", lambda r: r.update(bio="from b"))  # b writes to the new file
        assert a.get("alice")["bio"] == "from b"
        assert len(lines(folder)) == 2
        again = Store(folder)
        assert again.get("alice")["bio"] == "from b"
        again.close()
    finally:
        a.close()
        b.close()


def test_dead_lines_outnumbering_live_ones_trigger_compaction(store, folder):
    store.create("alice", user("alice"))
    store.create("bob", user("bob"))
    for i in range(COMPACT_MIN_DEAD + 5):
        store.update("alice", lambda r, i=i: r.update(bio=str(i)))
    assert len(lines(folder)) < COMPACT_MIN_DEAD  # rewritten, not grown without bound
    assert store.get("alice")["bio"] == str(COMPACT_MIN_DEAD + 4)
    assert store.get("bob") == user("bob") | {"created": store.get("bob")["created"]}


def test_leftover_copy_from_a_killed_compaction_is_removed(store, folder):
    store.create("alice", user("alice"))
    stale = folder / ".users.jsonl.0123456789abcdef.tmp"
    stale.write_text('{"k":"deleted","v":{"bio":"should be forgotten"}}\n')
    fresh = Store(folder)
    try:
        fresh.update("alice", lambda r: r.update(bio="x"))
        assert not stale.exists()
    finally:
        fresh.close()


def test_threads_and_handles_incrementing_at_once_lose_nothing(folder):
    handles = [Store(folder), Store(folder)]
    handles[0].create("counter", {"n": 0})
    per_thread, threads = 40, 6

    def work(store: Store) -> None:
        for _ in range(per_thread):
            store.update("counter", lambda r: r.update(n=r["n"] + 1))

    pool = [threading.Thread(target=work, args=(handles[i % 2],)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    fresh = Store(folder)
    try:
        assert fresh.get("counter") == {"n": per_thread * threads}
    finally:
        for s in [*handles, fresh]:
            s.close()


def test_store_used_across_a_fork_does_not_share_its_lock_with_the_parent(folder):
    """A flock belongs to the open file, so a child reusing the parent's handle is not excluded."""
    store = Store(folder)
    store.create("counter", {"n": 0})  # opens the lock file before the fork
    rounds = 200
    pid = os.fork()
    if pid == 0:  # child: same Store object, inherited state
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
    store.close()
