"""The text database in one process: format, healing, compaction, forgetting, locking."""

from __future__ import annotations

import errno
import json
import os
import time
import zlib
from pathlib import Path

import pytest

import secure_app.store.text as store_module
from helpers import NASTY_TEXT, file_size_limit, no_free_descriptors, record_lines
from secure_app.store import StoreError, new_user
from secure_app.store.text import COMPACT_MIN_DEAD, RESERVE, TextStore, encode_line


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(folder: Path):
    s = TextStore(folder)
    yield s
    s.close()


def lines(folder: Path) -> list[bytes]:
    return record_lines(folder / "users.jsonl")


def records_end(folder: Path) -> int:
    """Where the next line goes: the end of the last record line."""
    return sum(len(line) + 1 for line in lines(folder))


def write_after_records(folder: Path, data: bytes) -> None:
    """Write ``data`` where the next line goes, in place, as a writer that was cut short."""
    fd = os.open(folder / "users.jsonl", os.O_WRONLY)
    try:
        os.pwrite(fd, data, records_end(folder))
    finally:
        os.close(fd)


def user(name: str, **fields: object) -> dict:
    record = new_user(name, "$argon2id$fake")
    record.update(fields)
    return record


@pytest.mark.parametrize("text", NASTY_TEXT)
def test_any_text_takes_exactly_one_line_per_write(store, folder, text):
    """No user text can split a line or start one (the round trip: test_store_contract.py)."""
    record = user("alice", full_name=text, email=text, phone=text, bio=text, photo=text)
    record[text] = text
    assert store.create(text + "key", record)
    store.update(text + "key", lambda r: r.update(bio=text + "!" + text))
    assert len(lines(folder)) == 2
    assert [json.loads(line)["k"] for line in lines(folder)] == [text + "key"] * 2


def test_file_is_utf8_text_with_one_json_object_a_line(store, folder):
    store.create("zoe", user("zoe", full_name="Zoë Ñúñez", bio="first\nsecond"))
    store.update("zoe", lambda r: r.update(phone="+44 20"))
    text = (folder / "users.jsonl").read_text(encoding="utf-8")  # valid UTF-8 or this raises
    assert "Zoë Ñúñez" in text  # readable with less, not \u-escaped
    *records, reserve, end = text.split("\n")
    assert end == "" and reserve.strip(" ") == ""  # a line of spaces: room for the next lines
    rows = [json.loads(line) for line in records]
    assert [row["k"] for row in rows] == ["zoe", "zoe"]
    assert all(set(row) == {"k", "v", "c"} for row in rows)
    assert rows[-1]["v"]["phone"] == "+44 20"
    assert rows[-1]["v"]["bio"] == "first\nsecond"
    # The first write grew the file by its line and a reserve; the update went into the reserve.
    assert len(text.encode()) == len(lines(folder)[0]) + 1 + RESERVE


def test_each_line_carries_the_crc32_of_what_precedes_it(folder):
    line = encode_line("zoe", user("zoe", bio="checked"))
    body, tail = line[: -len(b',"c":"00000000"}\n')], line[-len(b',"c":"00000000"}\n') :]
    assert tail == b',"c":"%08x"}\n' % zlib.crc32(body)
    assert json.loads(line)["v"]["bio"] == "checked"


def test_lone_surrogate_is_escaped_so_the_file_stays_valid_utf8(store, folder):
    store.create("s", {"bio": "a\ud800b"})
    (folder / "users.jsonl").read_bytes().decode("utf-8")  # strict: raises on invalid UTF-8
    assert store.get("s") == {"bio": "a\ud800b"}


def seed_two(folder: Path) -> bytes:
    writer = TextStore(folder)
    writer.create("alice", user("alice", bio="kept"))
    writer.create("bob", user("bob", bio="kept too"))
    writer.close()
    return (folder / "users.jsonl").read_bytes()


def assert_healed(folder: Path, good: bytes) -> None:
    """A fresh store reads alice and bob only, and turns the torn bytes back into spaces."""
    reader = TextStore(folder)
    try:
        assert sorted(reader.keys()) == ["alice", "bob"]  # earlier records intact
        assert reader.get("alice")["bio"] == "kept"
        assert (folder / "users.jsonl").read_bytes() == good  # the torn bytes are gone
        assert reader.create("carol", user("carol"))
        assert len(lines(folder)) == 3
    finally:
        reader.close()
    assert sorted(TextStore(folder).keys()) == ["alice", "bob", "carol"]


def test_torn_last_line_is_discarded_on_open_and_cleared(folder):
    good = seed_two(folder)
    # A writer killed part-way through its single write leaves the start of a line.
    write_after_records(folder, encode_line("carol", user("carol"))[:40])
    assert_healed(folder, good)


def test_complete_record_without_its_newline_counts_as_torn(folder):
    """The newline is part of the line: a line that lacks it was never acknowledged."""
    good = seed_two(folder)
    write_after_records(folder, encode_line("mallory", user("mallory"))[:-1])
    assert_healed(folder, good)


def test_line_with_a_lost_middle_is_not_a_record_even_when_it_parses(folder):
    """A power cut can save the first and last sectors of a write but not the one between.

    The spaces of the reserved space then stand in for the lost bytes, and the
    line is still valid JSON: only the checksum tells it apart.
    """
    good = seed_two(folder)
    line = encode_line("alice", user("alice", bio="x" * 2000))
    torn = line[:512] + b" " * 512 + line[1024:]
    assert json.loads(torn)["v"]["bio"] != "x" * 2000  # JSON alone would take it
    write_after_records(folder, torn)
    assert_healed(folder, good)


def test_torn_write_that_grew_the_file_is_discarded(folder, monkeypatch):
    """Without reserved space a line is added at the end: a cut leaves a tail without newline."""
    monkeypatch.setattr(TextStore, "reserve", 0)
    good = seed_two(folder)
    assert good.endswith(b"}\n")  # no reserve: the file ends with the last record
    with open(folder / "users.jsonl", "ab") as f:
        f.write(encode_line("carol", user("carol"))[:40])
    reader = TextStore(folder)
    try:
        assert sorted(reader.keys()) == ["alice", "bob"]
        # The torn bytes became reserved space, which the next line goes into.
        assert (folder / "users.jsonl").read_bytes() == good + b" " * 39 + b"\n"
        assert reader.create("carol", user("carol"))
    finally:
        reader.close()
    assert sorted(TextStore(folder).keys()) == ["alice", "bob", "carol"]


def test_lines_after_the_last_record_that_no_write_leaves_are_moved_aside_and_saving_goes_on(
    folder, caplog
):
    """One interrupted write leaves at most one line; more came another way: keep it aside."""
    seed_two(folder)
    foreign = b'{"k":"eve","v":{}}\n{"k":"eve","v":{"bio":"by hand"}}\n'
    write_after_records(folder, foreign)
    data = (folder / "users.jsonl").read_bytes()
    tail = data[data.index(foreign) :]
    store = TextStore(folder)
    try:
        assert sorted(store.keys()) == ["alice", "bob"]
        store.update("alice", lambda r: r.update(bio="new"))  # saving is not refused
        assert store.get("alice")["bio"] == "new"
    finally:
        store.close()
    (side,) = folder.glob("users.jsonl.foreign-*")
    assert side.read_bytes() == tail  # every foreign byte kept, byte for byte
    assert side.stat().st_mode & 0o777 == 0o600
    assert foreign not in (folder / "users.jsonl").read_bytes()
    assert "moved to" in caplog.text
    again = TextStore(folder)
    try:
        assert again.get("alice")["bio"] == "new" and again.get("bob")["bio"] == "kept too"
    finally:
        again.close()


def test_a_foreign_tail_after_the_reserve_does_not_stop_logins(folder):
    """Bytes appended after the reserved space (a stray ``>>``) are set aside, not fatal."""
    seed_two(folder)
    with open(folder / "users.jsonl", "ab") as f:
        f.write(b"appended by some other program\nand a second line\n")
    store = TextStore(folder)
    try:
        assert store.create("carol", user("carol"))
    finally:
        store.close()
    (side,) = folder.glob("users.jsonl.foreign-*")
    assert side.read_bytes().endswith(b"appended by some other program\nand a second line\n")
    assert sorted(TextStore(folder).keys()) == ["alice", "bob", "carol"]


def test_statx_that_cannot_be_used_falls_back_to_stat(folder, monkeypatch):
    """Older kernels and seccomp sandboxes answer statx(2) with ENOSYS, EPERM or EINVAL."""
    import ctypes

    for code in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
        calls = []

        def refused(*args, code=code, calls=calls):
            calls.append(args)
            ctypes.set_errno(code)
            return -1

        monkeypatch.setattr(store_module, "_STATX", refused)
        writer, reader = TextStore(folder), TextStore(folder)
        try:
            writer.create(f"user{code}", user(f"user{code}"))
            assert reader.get(f"user{code}") is not None  # reads the file: _identity ran
            writer.update(f"user{code}", lambda r: r.update(bio="seen"))
            assert reader.get(f"user{code}")["bio"] == "seen"
        finally:
            writer.close()
            reader.close()
        assert calls, "the fake statx was never asked"
        assert store_module._STATX is None  # given up after the first refusal


def test_statx_errors_about_the_file_itself_are_not_hidden(folder, monkeypatch):
    import ctypes

    def denied(*args):
        ctypes.set_errno(errno.EACCES)
        return -1

    seed_two(folder)
    monkeypatch.setattr(store_module, "_STATX", denied)
    with pytest.raises(StoreError, match="Permission denied"):
        TextStore(folder).get("alice")


def test_file_in_the_format_before_checksums_is_read_and_converted_at_the_first_write(folder):
    folder.mkdir()
    earlier = [json.dumps({"k": name, "v": user(name, bio=f"{name}'s")}) for name in ("ann", "ben")]
    torn = json.dumps({"k": "cy", "v": user("cy")})[:30]  # cut short: never acknowledged
    (folder / "users.jsonl").write_text("\n".join(earlier) + "\n" + torn, encoding="utf-8")
    store = TextStore(folder)
    try:
        assert sorted(store.keys()) == ["ann", "ben"]
        assert store.get("ben")["bio"] == "ben's"
        store.update("ann", lambda r: r.update(bio="converted"))
    finally:
        store.close()
    rows = [json.loads(line) for line in lines(folder)]
    assert [row["k"] for row in rows] == ["ann", "ben", "ann"]  # converted, then updated
    assert all(set(row) == {"k", "v", "c"} for row in rows)  # every line has its checksum now
    again = TextStore(folder)
    try:
        assert again.get("ann")["bio"] == "converted" and again.get("ben")["bio"] == "ben's"
    finally:
        again.close()


def test_power_cut_in_a_write_that_grew_the_file_is_healed(folder, monkeypatch):
    """Sectors lost past the old end of the file read back as zeros, in the line or the reserve."""
    monkeypatch.setattr(TextStore, "reserve", 0)
    good = seed_two(folder)
    line = encode_line("carol", user("carol", bio="c" * 3000))
    torn = line[:512] + b"\0" * 512 + line[1024:] + b" " * 600 + b"\0" * 512 + b" " * 600 + b"\n"
    with open(folder / "users.jsonl", "ab") as f:
        f.write(torn)
    reader = TextStore(folder)
    try:
        assert sorted(reader.keys()) == ["alice", "bob"]
        reader.update("alice", lambda r: r.update(bio="saved"))  # not refused as hand-edited
        data = (folder / "users.jsonl").read_bytes()
        assert data.startswith(good) and b"\0" not in data
    finally:
        reader.close()


def test_file_replaced_while_in_use_is_noticed_and_never_written_at_the_old_place(folder):
    seed_two(folder)
    store = TextStore(folder)
    try:
        assert store.get("alice")["bio"] == "kept"  # read only: no write handle yet
        restored = folder / "restored"
        restored.write_bytes(
            encode_line("alice", user("alice", bio="from the backup")) + b" " * 99 + b"\n"
        )
        os.replace(restored, folder / "users.jsonl")  # not a compaction: no mark in the old file
        before = (folder / "users.jsonl").read_bytes()
        # The store has not looked at the path yet, but it will not write at
        # its old offset into a different file.
        with pytest.raises(StoreError, match="replaced"):
            store.update("alice", lambda r: r.update(bio="lost?"))
        assert (folder / "users.jsonl").read_bytes() == before
        # It looks at once after that, and within RECHECK seconds without it.
        assert store.get("alice")["bio"] == "from the backup"
        assert "bob" not in store
        store.update("alice", lambda r: r.update(bio="after the restore"))
    finally:
        store.close()
    assert TextStore(folder).get("alice")["bio"] == "after the restore"


def test_file_replaced_while_in_use_is_noticed_within_the_recheck_interval(folder, monkeypatch):
    monkeypatch.setattr(store_module, "RECHECK", 0.3)
    seed_two(folder)
    store = TextStore(folder)
    try:
        assert store.get("bob")["bio"] == "kept too"
        restored = folder / "restored"
        restored.write_bytes(encode_line("alice", user("alice", bio="from the backup")))
        os.replace(restored, folder / "users.jsonl")  # not a compaction: no mark in the old file
        time.sleep(0.35)
        assert "bob" not in store and store.get("alice")["bio"] == "from the backup"
    finally:
        store.close()


def test_a_lock_that_fails_for_another_reason_than_a_read_only_folder_is_an_error(
    folder, monkeypatch
):
    seed_two(folder)

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(store_module.fcntl, "flock", no_locks)
    store = TextStore(folder)
    try:
        with pytest.raises(StoreError, match="cannot lock"):
            store.get("alice")  # not read without the lock, as a read-only folder would be
    finally:
        store.close()


def test_garbage_line_in_the_middle_is_skipped_not_fatal(folder):
    folder.mkdir()
    (folder / "users.jsonl").write_bytes(
        encode_line("alice", user("alice"))
        + b'\x00\x00\xff not json {\n[1, 2]\n{"k": 5, "v": {}}\n\n'
        + b'{"k":"mallory","v":{"username":"mallory"}}\n'  # no checksum: not a record
        + encode_line("bob", user("bob"))
    )
    reader = TextStore(folder)
    try:
        assert sorted(reader.keys()) == ["alice", "bob"]
    finally:
        reader.close()


def test_update_writes_one_line_in_place_and_leaves_earlier_bytes_alone(store, folder):
    for i in range(10):
        store.create(f"user{i}", user(f"user{i}"))
    before = (folder / "users.jsonl").read_bytes()
    end = records_end(folder)
    inode = os.stat(folder / "users.jsonl").st_ino
    store.update("user7", lambda r: r.update(bio="new"))
    after = (folder / "users.jsonl").read_bytes()
    assert os.stat(folder / "users.jsonl").st_ino == inode  # not a rewrite
    assert len(after) == len(before)  # written into the reserved space: the file did not grow
    assert after[:end] == before[:end]
    assert lines(folder)[-1] == encode_line("user7", store.get("user7"))[:-1]
    assert len(lines(folder)) == 11


def test_file_grows_by_a_fresh_reserve_when_the_reserve_is_used_up(store, folder):
    store.create("alice", user("alice"))
    size = os.path.getsize(folder / "users.jsonl")
    big = "y" * (RESERVE + 100)
    store.update("alice", lambda r: r.update(bio=big))
    assert os.path.getsize(folder / "users.jsonl") == records_end(folder) + RESERVE > size
    assert TextStore(folder).get("alice")["bio"] == big


def test_save_that_fits_the_reserve_succeeds_on_a_full_disk_and_one_that_does_not_is_refused(
    store, folder
):
    store.create("alice", user("alice", bio="old"))
    size = os.path.getsize(folder / "users.jsonl")
    with file_size_limit(size):  # not one byte more on this disk
        store.update("alice", lambda r: r.update(bio="fits"))
        before = (folder / "users.jsonl").read_bytes()
        with pytest.raises(StoreError):
            store.update("alice", lambda r: r.update(bio="z" * RESERVE))
    assert (folder / "users.jsonl").read_bytes() == before  # the part written was taken back
    assert store.get("alice")["bio"] == "fits"
    assert TextStore(folder).get("alice")["bio"] == "fits"


def test_delete_forgets_every_version_at_once(store, folder):
    store.create("alice", user("alice", bio="secret-v0"))
    for i in range(1, 5):
        store.update("alice", lambda r, i=i: r.update(bio=f"secret-v{i}"))
    store.create("bob", user("bob", bio="stays"))
    other = TextStore(folder)
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


def test_delete_that_cannot_sync_the_folder_afterwards_still_counts_as_done(
    store, folder, monkeypatch, caplog
):
    """Once the new file is in place the deletion is made: saying otherwise would be false."""
    store.create("alice", user("alice", bio="secret"))
    store.create("bob", user("bob"))

    def broken_sync(path: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(store_module, "_fsync_dir", broken_sync)
    assert store.delete("alice") is True
    assert b"secret" not in (folder / "users.jsonl").read_bytes()
    assert "alice" not in TextStore(folder)
    assert "could not sync" in caplog.text


def test_compaction_by_another_handle_is_noticed(folder):
    a, b = TextStore(folder), TextStore(folder)
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
        again = TextStore(folder)
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
    fresh = TextStore(folder)
    try:
        fresh.update("alice", lambda r: r.update(bio="x"))
        assert not stale.exists()
    finally:
        fresh.close()


# -- read_records: the read-only reader that import-data uses -----------------------------------


def test_read_records_takes_the_last_good_line_of_each_key_and_changes_nothing(folder):
    folder.mkdir()
    path = folder / "users.jsonl"
    path.write_bytes(
        encode_line("alice", user("alice", bio="first"))
        + b"not a record, skipped\n"
        + encode_line("bob", user("bob", full_name="Bob Two Words"))
        + encode_line("alice", user("alice", bio="second"))
        + b" " * 20
        + b"\n"
        + encode_line("carol", user("carol"))[:40]  # a torn write: never acknowledged
    )
    before = path.read_bytes()
    records = store_module.read_records(path)
    assert sorted(records) == ["alice", "bob"]
    assert records["alice"]["bio"] == "second"
    assert records["bob"]["full_name"] == "Bob Two Words"
    assert path.read_bytes() == before  # not healed: a reader never writes
    assert sorted(p.name for p in folder.iterdir()) == ["users.jsonl"]  # no lock, no side file


def test_read_records_skips_a_line_without_its_checksum_as_the_store_does(folder):
    """A line added by hand is not a record: import-data must not load what the site would not."""
    folder.mkdir()
    path = folder / "users.jsonl"
    path.write_bytes(
        encode_line("alice", user("alice"))
        + b'{"k":"mallory","v":{"username":"mallory","password_hash":"$argon2id$mine"}}\n'
    )
    assert sorted(store_module.read_records(path)) == ["alice"]
    store = TextStore(folder)
    try:
        assert store.keys() == ["alice"]
    finally:
        store.close()


def test_read_records_reads_a_file_in_the_format_before_checksums(folder):
    folder.mkdir()
    path = folder / "users.jsonl"
    rows = [json.dumps({"k": name, "v": user(name, bio=f"{name} b")}) for name in ("ann", "ben")]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    records = store_module.read_records(path)
    assert sorted(records) == ["ann", "ben"] and records["ben"]["bio"] == "ben b"


def test_read_records_follows_no_symlink(folder):
    folder.mkdir()
    secret = folder / "elsewhere.jsonl"
    secret.write_bytes(encode_line("alice", user("alice")))
    (folder / "users.jsonl").symlink_to(secret)
    with pytest.raises(OSError) as refused:
        store_module.read_records(folder / "users.jsonl")
    assert refused.value.errno == errno.ELOOP


def test_read_records_refuses_a_fifo_without_waiting_for_a_writer(folder):
    folder.mkdir()
    path = folder / "users.jsonl"
    os.mkfifo(path)  # opening it for reading would wait for a writer
    with pytest.raises(OSError) as refused:
        store_module.read_records(path)
    assert refused.value.errno == errno.EINVAL
    assert refused.value.strerror == f"{path} is not a regular file"


def test_delete_in_a_process_out_of_file_descriptors_is_refused_and_changes_nothing(
    store, folder, caplog
):
    """A StoreError (a 503 page, "nothing was changed"), not any OSError (a 500)."""
    store.create("alice", user("alice"))
    store.create("bob", user("bob"))
    before = (folder / "users.jsonl").read_bytes()
    with no_free_descriptors(), pytest.raises(StoreError, match="cannot rewrite the database: "):
        store.delete("alice")
    assert (folder / "users.jsonl").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["users.jsonl", "users.lock"]
    assert f"could not look for copies left in {folder}" in caplog.text
    assert store.get("alice") is not None
    assert store.delete("alice")  # once descriptors are free again
