"""The text database in one process: format, healing, compaction, forgetting, locking."""

from __future__ import annotations

import calendar
import ctypes
import errno
import json
import os
import re
import stat
import sys
import time
import zlib
from pathlib import Path

import pytest

import secure_app.store.text as store_module
from helpers import NASTY_TEXT, file_size_limit, no_free_descriptors, record_lines
from secure_app.store import StoreError, new_user
from secure_app.store.text import (
    CHUNK,
    COMPACT_MIN_DEAD,
    RESERVE,
    UPLOAD_TMP_RE,
    FolderPhotos,
    TextStore,
    encode_line,
)


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


def test_data_folder_and_files_are_private_to_the_server_user(store, folder):
    """Password hashes and personal data: the folder is 0700 and every file in it 0600."""

    def assert_private() -> None:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert sorted(p.name for p in folder.iterdir()) == ["users.jsonl", "users.lock"]
        for path in folder.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    store.create("alice", user("alice"))  # creates the folder, the lock and the data file
    store.create("bob", user("bob"))
    assert_private()
    store.delete("bob")  # the data file is replaced by a fresh copy
    assert_private()


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
    assert not list(folder.glob("users.jsonl.foreign-*"))  # discarded, not kept as foreign


def test_torn_last_line_is_discarded_on_open_and_cleared(folder, caplog):
    good = seed_two(folder)
    # A writer killed part-way through its single write leaves the start of a line.
    write_after_records(folder, encode_line("carol", user("carol"))[:40])
    assert_healed(folder, good)
    assert f"discarding a torn write at the end of {folder / 'users.jsonl'}" in caplog.messages


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
    folder, caplog, monkeypatch
):
    """One interrupted write leaves at most one line; more came another way: keep it aside."""
    monkeypatch.setenv("TZ", "EST+5")  # the side file's time is UTC whatever the server's zone
    time.tzset()
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
        monkeypatch.undo()
        time.tzset()
    (side,) = folder.glob("users.jsonl.foreign-*")
    named = re.fullmatch(r"users\.jsonl\.foreign-(\d{8}T\d{6}Z)-[0-9a-f]{8}", side.name)
    assert named, side.name
    stamp = calendar.timegm(time.strptime(named[1], "%Y%m%dT%H%M%SZ"))
    assert abs(stamp - time.time()) < 60
    assert side.read_bytes() == tail  # every foreign byte kept, byte for byte
    assert side.stat().st_mode & 0o777 == 0o600
    assert foreign not in (folder / "users.jsonl").read_bytes()
    assert (
        f"{folder / 'users.jsonl'} had {len(tail)} bytes after its last record that no"
        f" interrupted write leaves (was it edited by hand?): they were moved to {side}, and"
        " saving goes on. Look at that file; records in it were NOT loaded."
    ) in caplog.messages
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


def test_statx_that_cannot_be_used_falls_back_to_stat(folder, monkeypatch, caplog):
    """Older kernels and seccomp sandboxes answer statx(2) with ENOSYS, EPERM or EINVAL."""

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
        assert (
            f"statx(2) is not usable here ({os.strerror(code)}); using stat(2)" in caplog.messages
        )


def test_statx_errors_about_the_file_itself_are_not_hidden(folder, monkeypatch):

    def denied(*args):
        ctypes.set_errno(errno.EACCES)
        return -1

    seed_two(folder)
    monkeypatch.setattr(store_module, "RECHECK", 0.0)  # look at the path on every read
    reading = TextStore(folder)
    assert reading.get("alice") is not None
    monkeypatch.setattr(store_module, "_STATX", denied)
    with pytest.raises(StoreError, match="^cannot read the database: Permission denied$"):
        TextStore(folder).get("alice")
    with pytest.raises(StoreError, match="^cannot read the database: Permission denied$"):
        reading.get("alice")
    reading.close()


def test_identity_is_the_device_inode_and_size_that_stat_gives(tmp_path, monkeypatch):
    """statx(2), called by hand and read field by field, answers as stat(2) does."""
    statx = store_module._find_statx()
    if sys.platform != "linux":
        pytest.skip("statx(2) is Linux's; elsewhere the store uses stat(2)")
    assert statx is not None
    monkeypatch.setattr(store_module, "_STATX", statx)
    path = tmp_path / "file"
    path.write_bytes(b"x" * 70_000)
    st = os.stat(path)
    assert store_module._identity(path) == (st.st_dev, st.st_ino, 70_000)
    assert store_module._STATX is statx  # answered by statx, not by the fallback
    gone = tmp_path / "gone"
    ctypes.set_errno(0)  # so the error read is this call's own
    with pytest.raises(FileNotFoundError) as missing:
        store_module._identity(gone)
    assert missing.value.filename == str(gone)


def test_file_in_the_format_before_checksums_is_read_and_converted_at_the_first_write(folder):
    folder.mkdir()
    earlier = [json.dumps({"k": name, "v": user(name, bio=f"{name}'s")}) for name in ("ann", "ben")]
    torn = json.dumps({"k": "cy", "v": user("cy")})[:30]  # cut short: never acknowledged
    (folder / "users.jsonl").write_text("\n".join(earlier) + "\n" + torn, encoding="utf-8")
    store = TextStore(folder)
    try:
        assert sorted(store.keys()) == ["ann", "ben"]
        assert store.get("ben")["bio"] == "ben's"
        # Read, not yet converted: the torn line is already spaces, every byte of it.
        healed = "\n".join(earlier).encode() + b"\n" + b" " * (len(torn) - 1) + b"\n"
        assert (folder / "users.jsonl").read_bytes() == healed
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
    assert not list(folder.glob("users.jsonl.foreign-*"))  # one torn write: nothing to keep


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
        with pytest.raises(
            StoreError,
            match="^cannot open the database: the file was replaced while the site ran$",
        ):
            store.update("alice", lambda r: r.update(bio="lost?"))
        assert (folder / "users.jsonl").read_bytes() == before
        # It looks at once after that, and within RECHECK seconds without it.
        assert store.get("alice")["bio"] == "from the backup"
        assert "bob" not in store
        store.update("alice", lambda r: r.update(bio="after the restore"))
    finally:
        store.close()
    assert TextStore(folder).get("alice")["bio"] == "after the restore"


@pytest.mark.parametrize("padding", [0, 3 * RESERVE], ids=["smaller", "larger"])
def test_file_replaced_while_in_use_is_noticed_within_the_recheck_interval(
    folder, monkeypatch, padding
):
    monkeypatch.setattr(store_module, "RECHECK", 0.1)
    seed_two(folder)
    store = TextStore(folder)
    try:
        assert store.get("bob")["bio"] == "kept too"
        restored = folder / "restored"
        restored.write_bytes(
            encode_line("alice", user("alice", bio="from the backup")) + b" " * padding + b"\n"
        )
        os.replace(restored, folder / "users.jsonl")  # not a compaction: no mark in the old file
        time.sleep(0.15)
        assert "bob" not in store and store.get("alice")["bio"] == "from the backup"
    finally:
        store.close()


def test_data_file_deleted_while_in_use_is_noticed_and_the_next_save_starts_a_new_one(
    folder, monkeypatch
):
    monkeypatch.setattr(store_module, "RECHECK", 0.0)  # look at the path on every read
    seed_two(folder)
    store = TextStore(folder)
    try:
        assert store.get("alice") is not None
        (folder / "users.jsonl").unlink()
        assert store.get("alice") is None and len(store) == 0
        assert store.create("carol", user("carol"))
    finally:
        store.close()
    assert TextStore(folder).keys() == ["carol"]


def test_the_path_is_looked_at_once_per_recheck_interval_not_on_every_read(folder, monkeypatch):
    """A read that finds nothing new costs one pread; the path is looked at every RECHECK s."""
    seed_two(folder)
    now = [1000.0]
    monkeypatch.setattr(store_module.time, "monotonic", lambda: now[0])
    looks = []
    real = store_module._identity
    monkeypatch.setattr(store_module, "_identity", lambda path: looks.append(path) or real(path))
    store = TextStore(folder)
    try:
        assert store.get("alice")["bio"] == "kept"
        assert len(looks) == 1
        now[0] += store_module.RECHECK / 2
        for _ in range(5):
            assert store.get("bob")["bio"] == "kept too"
        assert len(looks) == 1
        now[0] = 1000.0 + store_module.RECHECK  # due, to the tick
        assert store.get("bob")["bio"] == "kept too"
        assert len(looks) == 2
        now[0] += store_module.RECHECK / 2
        for _ in range(5):
            assert store.get("bob")["bio"] == "kept too"
        assert len(looks) == 2
    finally:
        store.close()


def watch_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The offset of every ``os.pread`` from now on: where a store reads."""
    offsets: list[int] = []
    real = os.pread

    def spy(fd: int, length: int, offset: int) -> bytes:
        offsets.append(offset)
        return real(fd, length, offset)

    monkeypatch.setattr(os, "pread", spy)
    return offsets


def test_a_store_reads_only_the_bytes_it_has_not_seen(folder, monkeypatch):
    """O(1) per update: neither the writer nor another handle reads earlier lines again."""
    writer, reader = TextStore(folder), TextStore(folder)
    try:
        writer.create("user0", user("user0"))  # a new file
        with monkeypatch.context() as watched:
            reads = watch_reads(watched)
            assert writer.get("user0") is not None  # the writer knows what it wrote
            assert reads and min(reads) >= records_end(folder)
        for i in range(1, 20):
            writer.create(f"user{i}", user(f"user{i}"))
        assert reader.get("user3") is not None  # the reader reads everything once
        seen = records_end(folder)
        writer.update("user7", lambda r: r.update(bio="new"))
        with monkeypatch.context() as watched:
            reads = watch_reads(watched)
            assert reader.get("user7")["bio"] == "new"
            assert reads and min(reads) >= seen  # then only the new line
    finally:
        writer.close()
        reader.close()


def test_reading_new_bytes_goes_on_to_the_end_of_a_file_that_grew_meanwhile(tmp_path, monkeypatch):
    data = bytes(range(256)) * 800  # past the first read's 64 KiB
    (tmp_path / "grown").write_bytes(data)
    reads = watch_reads(monkeypatch)
    fd = os.open(tmp_path / "grown", os.O_RDONLY)
    real = os.pread

    def bounded(fd: int, length: int, offset: int) -> bytes:
        assert len(reads) < 10, "200 KB in 64 KiB pieces is 5 reads, not endless ones"
        return real(fd, length, offset)

    try:
        monkeypatch.setattr(os, "pread", bounded)
        assert store_module._read_to_end(fd, 10, 5) == data[10:]  # 5 bytes were expected
    finally:
        os.close(fd)


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


def with_checksum(body: bytes) -> bytes:
    """A line that carries its checksum, whatever JSON ``body`` (an object without its ``}``) is."""
    return b'%s,"c":"%08x"}\n' % (body, zlib.crc32(body))


def test_garbage_line_in_the_middle_is_skipped_not_fatal(folder, caplog):
    folder.mkdir()
    (folder / "users.jsonl").write_bytes(
        encode_line("alice", user("alice"))
        + b'\x00\x00\xff not json {\n[1, 2]\n{"k": 5, "v": {}}\n\n'
        + b'{"k":"mallory","v":{"username":"mallory"}}\n'  # no checksum: not a record
        + with_checksum(b'{"k":5,"v":{"username":"five"}')  # checksummed, but the key is no text
        + with_checksum(b'{"k":"list","v":["username"]')  # ...and this record is no object
        + encode_line("bob", user("bob"))
    )
    reader = TextStore(folder)
    try:
        assert sorted(reader.keys()) == ["alice", "bob"]
    finally:
        reader.close()
    assert (
        f"skipping a line that is not a whole record in {folder / 'users.jsonl'}" in caplog.messages
    )
    assert sorted(store_module.read_records(folder / "users.jsonl")) == ["alice", "bob"]


def test_blank_lines_around_the_records_hide_none_of_them(folder):
    folder.mkdir()
    (folder / "users.jsonl").write_bytes(b"\n" + encode_line("alice", user("alice")) + b"\n")
    store = TextStore(folder)
    try:
        assert store.keys() == ["alice"]
        store.update("alice", lambda r: r.update(bio="new"))
    finally:
        store.close()
    assert TextStore(folder).get("alice")["bio"] == "new"


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


def test_a_line_that_exactly_fills_the_reserve_is_written_in_place(store, folder):
    store.create("alice", user("alice"))
    path = folder / "users.jsonl"
    size = os.path.getsize(path)
    room = size - records_end(folder)
    filler = room - len(encode_line("alice", {**store.get("alice"), "bio": ""}))
    store.update("alice", lambda r: r.update(bio="x" * filler))
    assert os.path.getsize(path) == size  # not grown: no reserve left after it
    assert path.read_bytes().endswith(encode_line("alice", store.get("alice")))
    assert TextStore(folder).get("alice")["bio"] == "x" * filler
    store.update("alice", lambda r: r.update(bio="y"))  # no room: a fresh reserve with it
    assert os.path.getsize(path) == size + len(encode_line("alice", store.get("alice"))) + RESERVE


def test_save_that_fits_the_reserve_succeeds_on_a_full_disk_and_one_that_does_not_is_refused(
    store, folder
):
    store.create("alice", user("alice", bio="old"))
    size = os.path.getsize(folder / "users.jsonl")
    with file_size_limit(size):  # not one byte more on this disk
        store.update("alice", lambda r: r.update(bio="fits"))
        before = (folder / "users.jsonl").read_bytes()
        with pytest.raises(StoreError, match="^cannot write the database: File too large$"):
            store.update("alice", lambda r: r.update(bio="z" * RESERVE))
    assert (folder / "users.jsonl").read_bytes() == before  # the part written was taken back
    assert store.get("alice")["bio"] == "fits"
    assert TextStore(folder).get("alice")["bio"] == "fits"


@pytest.mark.parametrize("how", ["new folder", "file deleted while in use"])
def test_a_first_save_the_disk_refuses_leaves_an_empty_file(folder, monkeypatch, how):
    store = TextStore(folder)
    try:
        if how == "file deleted while in use":
            monkeypatch.setattr(store_module, "RECHECK", 0.0)
            store.create("old", user("old"))
            (folder / "users.jsonl").unlink()
            assert "old" not in store
        with file_size_limit(100), pytest.raises(StoreError, match="cannot write the database"):
            store.create("alice", user("alice"))
        assert (folder / "users.jsonl").read_bytes() == b""  # no piece of the line
        assert store.keys() == []
        assert store.create("alice", user("alice"))
    finally:
        store.close()
    assert TextStore(folder).keys() == ["alice"]


def test_a_save_the_disk_takes_only_in_part_is_refused_and_taken_back(store, folder, monkeypatch):
    monkeypatch.setattr(TextStore, "reserve", 0)  # every save grows the file
    for name in ("alice", "bob", "carol"):
        store.create(name, user(name, bio=name * 100))
    before = (folder / "users.jsonl").read_bytes()
    line = encode_line("alice", {**store.get("alice"), "bio": "new " * 100})
    with file_size_limit(len(before) + len(line) - 10):  # all of the line but 10 bytes fits
        with pytest.raises(StoreError, match="^cannot write the database: File too large$"):
            store.update("alice", lambda r: r.update(bio="new " * 100))
    assert (folder / "users.jsonl").read_bytes() == before
    assert TextStore(folder).get("alice")["bio"] == "alice" * 100


def test_a_failed_save_that_cannot_be_taken_back_is_healed_at_the_next_read(
    store, folder, monkeypatch, caplog
):
    store.create("alice", user("alice", bio="old"))
    path = folder / "users.jsonl"
    size = os.path.getsize(path)

    def broken_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with file_size_limit(size + 50), monkeypatch.context() as broken:
        broken.setattr(os, "ftruncate", broken_truncate)
        with pytest.raises(StoreError, match="cannot write the database"):
            store.update("alice", lambda r: r.update(bio="z" * RESERVE))
    assert f"could not roll back a failed write to {path}" in caplog.messages
    assert os.path.getsize(path) == size + 50  # the part written is still there...
    assert store.get("alice")["bio"] == "old"  # ...until the next read turns it into spaces
    assert len(lines(folder)) == 1 and os.path.getsize(path) == size + 50
    assert not list(folder.glob("users.jsonl.foreign-*"))
    assert TextStore(folder).get("alice")["bio"] == "old"


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
    assert f"could not sync {folder} after replacing users.jsonl" in caplog.messages


def test_no_save_goes_into_a_new_file_whose_name_the_folder_has_not_synced(folder, monkeypatch):
    """Until the folder is synced, a power cut can take the new file's name and all in it."""

    def broken_sync(path: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    store = TextStore(folder)
    try:
        with monkeypatch.context() as broken:
            broken.setattr(store_module, "_fsync_dir", broken_sync)
            with pytest.raises(StoreError, match="^cannot open the database: Input/output error$"):
                store.create("alice", user("alice"))
        assert "alice" not in store
        assert store.create("alice", user("alice"))
    finally:
        store.close()
    assert TextStore(folder).keys() == ["alice"]


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


def test_compaction_starts_when_compact_min_dead_lines_are_dead_not_one_before(store, folder):
    store.create("alice", user("alice"))
    store.create("bob", user("bob"))
    for i in range(COMPACT_MIN_DEAD - 1):
        store.update("alice", lambda r, i=i: r.update(bio=str(i)))
    assert len(lines(folder)) == 2 + COMPACT_MIN_DEAD - 1  # not yet: every version still there
    store.update("alice", lambda r: r.update(bio="last"))
    assert len(lines(folder)) == 2  # rewritten, not grown without bound
    assert store.get("alice")["bio"] == "last"
    assert store.get("bob") == user("bob") | {"created": store.get("bob")["created"]}
    assert TextStore(folder).get("alice")["bio"] == "last"


def test_compaction_waits_until_dead_lines_outnumber_live_ones(store, folder, monkeypatch):
    monkeypatch.setattr(TextStore, "compact_min_dead", 1)
    for name in ("alice", "bob", "carol"):
        store.create(name, user(name))
    for i in range(3):
        store.update("alice", lambda r, i=i: r.update(bio=str(i)))
    assert len(lines(folder)) == 6  # as many dead lines as live ones: kept
    store.update("alice", lambda r: r.update(bio="3"))
    assert len(lines(folder)) == 3
    assert TextStore(folder).get("alice")["bio"] == "3"


def test_a_store_opened_on_a_file_counts_the_dead_lines_already_in_it(folder, monkeypatch):
    """Earlier versions and lines that are not records are dead weight; blank lines are not."""
    monkeypatch.setattr(TextStore, "compact_min_dead", 4)
    folder.mkdir()
    (folder / "users.jsonl").write_bytes(
        encode_line("alice", user("alice", bio="v0"))
        + b"not a record\n\n"
        + encode_line("alice", user("alice", bio="v1"))
        + encode_line("bob", user("bob"))
        + b" " * 99
        + b"\n"
    )
    store = TextStore(folder)  # 2 dead lines, 2 live ones
    try:
        store.update("alice", lambda r: r.update(bio="v2"))  # 3 dead: fewer than 4
        assert b"not a record" in (folder / "users.jsonl").read_bytes()
        store.update("alice", lambda r: r.update(bio="v3"))  # 4 dead: compacted
        assert b"not a record" not in (folder / "users.jsonl").read_bytes()
        assert len(lines(folder)) == 2
    finally:
        store.close()
    assert TextStore(folder).get("alice")["bio"] == "v3"


def test_compaction_of_more_than_one_write_chunk_keeps_every_record_in_place(
    store, folder, monkeypatch
):
    """The fresh copy is written CHUNK bytes at a time; what follows the first chunk counts too."""
    names = ("alice", "bob", "carol")
    for name in names:  # each line is more than half a chunk: three of them make two writes
        store.create(name, user(name, bio=name[0] * (CHUNK // 2)))
        store.update(name, lambda r: r.update(phone="+1"))
    live = b"".join(encode_line(name, store.get(name)) for name in names)
    store.compact()
    assert (folder / "users.jsonl").read_bytes() == live + b" " * (RESERVE - 1) + b"\n"
    with monkeypatch.context() as watched:
        reads = watch_reads(watched)
        assert store.get("alice")["phone"] == "+1"
        assert min(reads) >= len(live)  # knows where its copy ends: reads none of it back
    store.update("bob", lambda r: r.update(phone="+2"))  # written just after the last record
    assert (folder / "users.jsonl").read_bytes().startswith(live)
    again = TextStore(folder)
    try:
        assert [again.get(name)["phone"] for name in names] == ["+1", "+2", "+1"]
        assert again.get("carol")["bio"] == "c" * (CHUNK // 2)
    finally:
        again.close()


def test_a_compaction_that_fails_keeps_the_update_that_started_it(
    store, folder, monkeypatch, caplog
):
    monkeypatch.setattr(TextStore, "compact_min_dead", 2)
    path = folder / "users.jsonl"
    store.create("alice", user("alice", bio="0"))
    store.update("alice", lambda r: r.update(bio="1"))
    inode = os.stat(path).st_ino
    with no_free_descriptors():  # the fresh copy cannot be opened
        assert store.update("alice", lambda r: r.update(bio="2"))["bio"] == "2"
    assert f"compaction of {path} failed" in caplog.messages
    assert os.stat(path).st_ino == inode and len(lines(folder)) == 3  # saved, not compacted
    assert TextStore(folder).get("alice")["bio"] == "2"
    store.update("alice", lambda r: r.update(bio="3"))  # the next update compacts
    assert len(lines(folder)) == 1 and TextStore(folder).get("alice")["bio"] == "3"


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
    assert f"could not look for copies left in {folder}" in caplog.messages
    assert store.get("alice") is not None
    assert store.delete("alice")  # once descriptors are free again


def test_leftover_copy_from_a_killed_compaction_is_removed(store, folder, caplog):
    store.create("alice", user("alice"))
    stale = folder / ".users.jsonl.0123456789abcdef.tmp"
    stale.write_text('{"k":"deleted","v":{"bio":"should be forgotten"}}\n')
    fresh = TextStore(folder)
    try:
        fresh.update("alice", lambda r: r.update(bio="x"))
        assert not stale.exists()
    finally:
        fresh.close()
    assert f"removing {stale}, left by an interrupted compaction" in caplog.messages


def test_a_leftover_that_cannot_be_removed_is_logged_and_saving_goes_on(store, folder, caplog):
    store.create("alice", user("alice"))
    store.create("bob", user("bob"))
    stuck = folder / ".users.jsonl.0123456789abcdef.tmp"
    stuck.mkdir()  # named like a copy, but unlink(2) cannot remove it
    fresh = TextStore(folder)
    try:
        fresh.update("alice", lambda r: r.update(bio="saved"))
        assert fresh.delete("bob")  # a compaction goes on too
    finally:
        fresh.close()
    assert f"could not remove {stuck}" in caplog.messages
    again = TextStore(folder)
    assert again.keys() == ["alice"] and again.get("alice")["bio"] == "saved"
    again.close()


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


# -- FolderPhotos: the text backend's photos (what both backends promise: test_store_contract.py)

PHOTO = "ab" * 16 + ".webp"


def test_a_photo_is_synced_under_a_name_remove_accepts_then_renamed_and_the_folder_synced(
    tmp_path, monkeypatch
):
    """A crash before the rename leaves a file prune-photos can remove, never half a photo."""
    folder = tmp_path / "public" / "photos"  # made, parents too, by the first put
    syncs: list[tuple[bool, list[str]]] = []
    real = os.fsync

    def spy(fd: int) -> None:
        syncs.append((stat.S_ISDIR(os.fstat(fd).st_mode), sorted(os.listdir(folder))))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    FolderPhotos(folder).put(PHOTO, b"photo bytes")
    (file_synced, before), (folder_synced, after) = syncs
    assert not file_synced and len(before) == 1 and UPLOAD_TMP_RE.match(before[0])
    assert folder_synced and after == [PHOTO]
    assert (folder / PHOTO).read_bytes() == b"photo bytes"
    assert stat.S_IMODE((folder / PHOTO).stat().st_mode) == 0o644  # public: served to anyone
    FolderPhotos(folder).put("cd" * 16 + ".webp", b"more")  # the folder exists now
    assert sorted(os.listdir(folder)) == [PHOTO, "cd" * 16 + ".webp"]


def test_a_photo_the_disk_cannot_take_whole_leaves_no_file(tmp_path):
    photos = FolderPhotos(tmp_path / "photos")
    with file_size_limit(100), pytest.raises(StoreError, match="^cannot save the photo: File too"):
        photos.put(PHOTO, b"x" * 10_000)
    assert os.listdir(tmp_path / "photos") == []


def test_a_photo_whose_rename_cannot_be_synced_is_taken_away_again(tmp_path, monkeypatch):
    """Not synced, the name could vanish in a power cut after the record named it: refuse."""

    def broken_sync(path: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(store_module, "_fsync_dir", broken_sync)
    with pytest.raises(StoreError, match="^cannot save the photo: Input/output error$"):
        FolderPhotos(tmp_path).put(PHOTO, b"photo bytes")
    assert os.listdir(tmp_path) == []


def test_get_reads_no_symlink_fifo_or_folder_as_a_photo(tmp_path):
    (tmp_path / "secret").write_bytes(b"not a photo")
    names = ["01" * 16 + ".webp", "02" * 16 + ".webp", "03" * 16 + ".webp"]
    (tmp_path / names[0]).symlink_to(tmp_path / "secret")
    os.mkfifo(tmp_path / names[1])  # opening it for reading would wait for a writer
    (tmp_path / names[2]).mkdir()
    photos = FolderPhotos(tmp_path)
    assert [photos.get(name) for name in names] == [None, None, None]


def test_get_from_a_photo_folder_that_is_not_a_folder_is_an_error_not_a_missing_photo(tmp_path):
    (tmp_path / "photos").write_bytes(b"")
    with pytest.raises(StoreError, match="^cannot read the photo: Not a directory$"):
        FolderPhotos(tmp_path / "photos").get(PHOTO)


def test_remove_takes_a_leftover_upload_and_refuses_every_other_name(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    leftover = folder / ".upload-k3_x9Q.tmp"
    leftover.write_bytes(b"half a photo")
    kept = {folder / "users.jsonl": b"data", tmp_path / "victim.webp": b"keep me"}
    for path, data in kept.items():
        path.write_bytes(data)
    photos = FolderPhotos(folder)
    photos.remove(leftover.name)
    assert not leftover.exists()
    for name in ["users.jsonl", "../victim.webp", ".upload-x.tmp/../../victim.webp", 7]:
        with pytest.raises(ValueError):
            photos.remove(name)
    assert all(path.read_bytes() == data for path, data in kept.items())


def test_listing_shows_regular_files_only_and_nothing_for_a_missing_folder(tmp_path):
    folder = tmp_path / "photos"
    assert FolderPhotos(folder).listing() == {}
    folder.mkdir()
    (folder / PHOTO).write_bytes(b"photo")
    (folder / ".upload-abc.tmp").write_bytes(b"left by a crash")
    (folder / "linked.webp").symlink_to(folder / PHOTO)
    (folder / "sub").mkdir()
    listed = FolderPhotos(folder).listing()
    assert sorted(listed) == [".upload-abc.tmp", PHOTO]
    assert listed[PHOTO] == (folder / PHOTO).stat().st_mtime
