"""The text database: a log of JSON lines that a person can read.

The file ``users.jsonl`` in the data folder is UTF-8, one JSON object a line::

    {"k":"alice","v":{"username":"alice","full_name":"Alice Liddell",...},"c":"5d1f0e2a"}
    {"k":"alice","v":{...the whole record again, after an update...},"c":"9b03c4d1"}
    ␠␠␠␠␠␠␠␠␠␠␠␠␠␠␠...(space reserved for the next lines)...␠␠␠␠␠␠␠␠␠␠␠␠

A line holds a key ``k``, the whole record ``v`` and ``c``, the CRC-32 of the
line's bytes before ``,"c":``; the last line for a key wins. Records are JSON,
so no user text (newlines, quotes, any Unicode) can break the format; a string
that is not valid Unicode (a lone surrogate) is written with ``\\u`` escapes so
the file stays valid UTF-8. After the last record comes one line of spaces: room
reserved for the next records (``Store.reserve`` bytes at a time). Deleting a
key rewrites the file without any version of it, at once. A superseded version
of a record stays in the file until the next compaction: at most until dead
lines outnumber live ones (and at least ``COMPACT_MIN_DEAD`` are dead).

How each promise is kept:

* **Locked.** Writers take a thread lock and an exclusive ``flock`` on the
  separate file ``users.lock`` (not on the data file, whose inode changes at
  compaction). A read-modify-write (``update``) is one critical section.
  Readers take the same lock only to read bytes they have not seen yet.
* **Atomic.** A change is one line written with one ``write``, after the last
  record. A line counts only when its checksum matches, so a reader sees a
  record before or after a write, never half of it: a write cut short, in a
  process or by a power cut that saved some disk sectors of it and not others,
  leaves a line whose checksum fails (the spaces it was written over cannot
  stand in for the missing bytes). Compaction swaps whole files with
  ``os.replace``.
* **Durable.** Writes use ``O_DSYNC``, so they are on disk before the call
  returns (as with ``fdatasync``); a compacted copy is ``fsync``-ed before it
  is renamed into place, and a new file or a rename is followed by an
  ``fsync`` of the folder.
* **Self-healing.** Whoever next reads new bytes or writes, holding the lock,
  turns a torn write after the last good record back into spaces. One write
  leaves at most one line there: more than that was put there some other way,
  so it is first copied to a side file (``users.jsonl.foreign-<time>-<random>``)
  and logged as an error, and saving goes on: nothing is lost, and a stray
  append cannot take the site down. Lines in the
  middle that are not good records are skipped, never fatal. A file written
  before lines had checksums is read as such and converted at the first write.
* **O(1) per update.** An update writes one line into the reserved space, and
  each process reads only the bytes it has not seen. Writing into space the
  file already has, instead of growing it, is why the reserve exists: a synced
  write that grows a file also makes the file system commit the new size to
  its journal, which took about 40% longer per write on ext4 (BENCHMARKS.md).
  When dead lines outnumber live ones the file is compacted (amortised O(1)).
  A compaction marks the old file after its last record, so other processes
  see the mark where they look for new records, then the new inode, and
  reload. A file replaced some other way is noticed within ``RECHECK``
  seconds, and never written into at the old file's offset.

A failed save (full disk, read-only folder) raises :class:`StoreError` after
putting the file back as it was: the caller reports "nothing was changed". A
save that fits in the reserved space succeeds even on a full disk. The file is
not meant to be edited by hand: a line without its checksum is skipped.

This backend's photos (:class:`FolderPhotos`) are files in ``PHOTO_DIR``, each
written to a temporary file, synced and renamed into place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import stat
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from . import Photo, Record, RecordGone, StoreError, photo_name

log = logging.getLogger(__name__)

# Compact only once there are more dead lines than live ones, and at least
# this many, so a small file is not rewritten on every other update.
COMPACT_MIN_DEAD = 100
# Space reserved after the last record, so that updates overwrite the file
# instead of growing it: about twenty user records.
RESERVE = 16 * 1024
# Compaction writes the fresh file in pieces of about this size.
CHUNK = 1 << 20

# Built once: json.dumps with options would build a new encoder on every call.
_READABLE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_ESCAPED = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))
# A line ends with ,"c":"<8 hex digits>"} : the checksum of everything before it.
_SUM_START, _SUM_LEN = b',"c":"', 16
# What the byte after the last record is when nothing new was written: reserved
# space, its last byte, or the end of a file that has no reserve left.
_NOTHING_NEW = (b" ", b"\n", b"")
# Written after the last record of a file that a compaction is replacing.
_REPLACED = b"#"
# How often, in seconds, a process checks that the file at the path is still
# the one it reads, when nothing else has told it to look.
RECHECK = 1.0


def encode_line(key: str, record: Record) -> bytes:
    """Return the file's line for ``record``: readable UTF-8 (``\\u`` escapes only where needed)."""
    entry = {"k": key, "v": record}
    try:
        body = _READABLE.encode(entry).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: escape it rather than write invalid UTF-8
        body = _ESCAPED.encode(entry).encode("ascii")
    body = body[:-1]  # reopen the object to add the checksum as its last member
    return b'%s,"c":"%08x"}\n' % (body, zlib.crc32(body))


def _checked(raw: bytes) -> bool:
    """Whether ``raw`` (a line without its newline) carries its own correct checksum."""
    return (
        raw[-_SUM_LEN:-10] == _SUM_START
        and raw[-2:] == b'"}'
        and raw[-10:-2] == b"%08x" % zlib.crc32(raw[:-_SUM_LEN])
    )


def _decode(raw: bytes, earlier: bool = False) -> tuple[str, Record] | None:
    """Return (key, record) from a line, or None for a line that is not a whole record.

    With ``earlier``, a line of the format before checksums (``k`` and ``v``
    only) counts too.
    """
    checked = _checked(raw)
    if not (checked or earlier):
        return None
    try:
        entry = json.loads(raw)
        key, record = entry["k"], entry["v"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    if not isinstance(key, str) or not isinstance(record, dict):
        return None
    if not checked and entry.keys() != {"k", "v"}:
        return None
    return key, record


def read_records(path: Path) -> dict[str, Record]:
    """Every record in a data file, read without writing to it or following a symlink.

    For files that are not the live database (an export folder, a backup):
    opening them as a :class:`TextStore` would heal and convert them in place.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not block
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        data = f.read()
    earlier = _in_earlier_format(data)
    records: dict[str, Record] = {}
    for raw in data.split(b"\n"):
        decoded = _decode(raw, earlier)
        if decoded is not None:
            records[decoded[0]] = decoded[1]  # the last line for a key wins
    return records


def _in_earlier_format(data: bytes) -> bool:
    """Whether a file starting with ``data`` was written before lines had checksums."""
    first = data[: data.find(b"\n") + 1]
    # A first line with its checksum is today's format, whatever follows it.
    return (
        bool(first) and not _checked(first[:-1]) and _decode(first[:-1], earlier=True) is not None
    )


def _records_end(data: bytes) -> int:
    """Return how many bytes of ``data`` run up to the end of its last good record line."""
    end = data.rfind(b"\n") + 1  # bytes after the last newline never end a record
    while end:
        start = data.rfind(b"\n", 0, end - 1) + 1
        if _checked(data[start : end - 1]):
            return end
        end = start
    return 0


def _reserved(size: int) -> bytes:
    """Return ``size`` bytes of reserved space: spaces, then a newline to end the line."""
    return b" " * (size - 1) + b"\n" if size else b""


def _is_reserved(data: bytes, start: int) -> bool:
    """Whether ``data[start:]`` is reserved space (or nothing), without copying it."""
    size = len(data) - start
    return not size or (data.endswith(b"\n") and data.count(b" ", start) == size - 1)


def _read_to_end(fd: int, offset: int, expected: int) -> bytes:
    """Read from ``offset`` to the end of the file (which may have grown past ``expected``)."""
    parts = []
    while piece := os.pread(fd, max(expected, 1 << 16), offset):
        parts.append(piece)
        offset += len(piece)
        expected = 0
    return b"".join(parts)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``; a full disk shows as a short write, then ENOSPC."""
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _find_statx() -> Callable[..., int] | None:
    try:
        statx = ctypes.CDLL(None, use_errno=True).statx
    except (OSError, AttributeError):  # not Linux, or a C library without statx
        return None
    statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    statx.restype = ctypes.c_int
    return statx


_STATX = _find_statx()
_AT_FDCWD, _STATX_INO, _STATX_SIZE = -100, 0x100, 0x200
# What statx(2) answers where it cannot be used at all, whatever the path:
# no such call (ENOSYS), a sandbox's refusal (EPERM), or a mask the kernel
# does not know (EINVAL).
_STATX_MISSING = frozenset({errno.ENOSYS, errno.EPERM, errno.EINVAL})


def _identity(path: Path) -> tuple[int, int, int]:
    """Return the device, inode and size of ``path``, without asking for its times.

    Written by hand because ``os.stat`` always asks for them (Python has no
    ``os.statx`` before 3.15), and on Linux 6.13 and later a file whose times
    were asked for takes a fine-grained time at its next write, which a synced
    write must then commit to the journal: 1.5x the time per update
    (``bench/sync_writes.py``). ``statx(2)`` asking only for the inode and
    size leaves the file's times alone.
    """
    global _STATX
    if _STATX is not None:
        buf = ctypes.create_string_buffer(256)  # struct statx
        if _STATX(_AT_FDCWD, os.fsencode(path), 0, _STATX_INO | _STATX_SIZE, buf) == 0:
            ino, size = struct.unpack_from("=QQ", buf, 32)  # stx_ino, stx_size
            major, minor = struct.unpack_from("=II", buf, 136)  # stx_dev_major, stx_dev_minor
            return os.makedev(major, minor), ino, size
        code = ctypes.get_errno()
        if code not in _STATX_MISSING:
            raise OSError(code, os.strerror(code), str(path))
        # An older kernel, or a seccomp sandbox that forbids the call: stat(2)
        # gives the same answer, only slower to write after (see above).
        log.warning("statx(2) is not usable here (%s); using stat(2)", os.strerror(code))
        _STATX = None
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TextStore:
    """A dictionary of JSON records kept in one text file, safe across processes.

    Create one per process (gunicorn creates the app after forking, so each
    worker has its own; a store used across a fork reopens its files in the
    child). It is safe to share between threads.
    """

    compact_min_dead = COMPACT_MIN_DEAD  # tests lower it to see compaction often
    reserve = RESERVE  # tests set it to 0 to make every write grow the file

    def __init__(self, folder: str | os.PathLike[str], name: str = "users.jsonl") -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.lock_path = self.folder / (Path(name).stem + ".lock")
        self._pid = os.getpid()
        self._mutex = threading.RLock()
        self._lock_fd: int | None = None
        self._flock_depth = 0
        self._checked_copies = False
        self._fd: int | None = None  # read handle on the file we have indexed
        self._wfd: int | None = None  # write handle on the same file, opened on first write
        self._ino: tuple[int, int] | None = None
        self._offset = 0  # end of the last record read: where the next one goes
        self._size = 0  # bytes in the file when last looked at
        self._torn = False  # something other than reserved space follows the last record
        self._foreign = False  # ...and it holds more lines than one torn write can leave
        self._earlier = False  # the file is in the format before checksums (converted on write)
        self._recheck_at = 0.0  # when _up_to_date next looks at the path
        self._lines = 0  # record lines read or written, live or dead
        self._index: dict[str, bytes] = {}  # key -> its last line, without the newline

    # -- reading -----------------------------------------------------------

    def get(self, key: str) -> Record | None:
        """Return a fresh copy of the record for ``key``, or ``None``."""
        with self._held():
            self._refresh()
            raw = self._index.get(key)
        return None if raw is None else json.loads(raw)["v"]

    def __contains__(self, key: str) -> bool:
        with self._held():
            self._refresh()
            return key in self._index

    def __len__(self) -> int:
        with self._held():
            self._refresh()
            return len(self._index)

    def keys(self) -> list[str]:
        with self._held():
            self._refresh()
            return list(self._index)

    def items(self) -> list[tuple[str, Record]]:
        """Every (key, record): fresh copies, read under the lock once."""
        with self._held():
            self._refresh()
            lines = list(self._index.items())
        return [(key, json.loads(raw)["v"]) for key, raw in lines]

    def find(self, field: str, value: str) -> list[str]:
        """The keys whose record has ``value`` in its top-level ``field``."""
        with self._held():
            self._refresh()
            lines = list(self._index.items())
        # A plain value appears in the line as its own bytes: most lines are
        # ruled out without decoding them.
        probe = value.encode() if value.isascii() and value.isprintable() else None
        if probe is not None and (b'"' in probe or b"\\" in probe):
            probe = None
        return [
            key
            for key, raw in lines
            if (probe is None or probe in raw) and json.loads(raw)["v"].get(field) == value
        ]

    @contextmanager
    def _held(self) -> Iterator[None]:
        """Hold the thread lock; in a forked child, first drop the parent's handles."""
        if self._pid != os.getpid():
            # flock belongs to the open file, which a fork shares with the
            # parent: reusing the parent's lock handle would not exclude it.
            self._pid = os.getpid()
            self._mutex = threading.RLock()
            self._flock_depth = 0
            self.close()
        with self._mutex:
            yield

    def _up_to_date(self) -> bool:
        """Whether nothing follows the last record read, in the file at the path.

        Runs on every request, without the lock, so it costs one ``pread``: a
        space after the last record means nothing new. Our own compactions
        mark the old file (_rewrite), so that needs no look at the path; a file
        replaced some other way (a backup restored while the site runs) is
        noticed within ``RECHECK`` seconds.
        """
        if self._fd is None:
            return not self.path.exists()
        if time.monotonic() >= self._recheck_at:
            try:
                dev, ino, size = _identity(self.path)
            except FileNotFoundError:
                return False
            if (dev, ino) != self._ino or size < self._offset:
                return False
            self._recheck_at = time.monotonic() + RECHECK
        return not self._torn and os.pread(self._fd, 1, self._offset) in _NOTHING_NEW

    def _refresh(self) -> None:
        """Bring the index up to date, reading only what is new (the usual case: nothing)."""
        try:
            if self._up_to_date():
                return
        except OSError as exc:
            raise StoreError(f"cannot read the database: {exc.strerror}") from exc
        with ExitStack() as stack:
            try:
                stack.enter_context(self._flock())
                locked = True
            except StoreError as exc:
                # No lock file and no way to make one (a read-only folder):
                # nobody can be writing there, so read without it. Any other
                # failure to lock is an error.
                cause = exc.__cause__
                if not isinstance(cause, OSError) or cause.errno not in (errno.EROFS, errno.EACCES):
                    raise
                locked = False
            data = self._read_new()
            if locked:
                try:
                    self._heal()
                except StoreError as exc:
                    log.error("%s", exc)  # reading goes on; writing is refused until it is fixed
        self._consume(data)

    def _reset(self) -> None:
        for fd in (self._fd, self._wfd):
            if fd is not None:
                os.close(fd)
        self._fd = self._wfd = self._ino = None
        self._offset, self._size, self._lines = 0, 0, 0
        self._torn = self._foreign = self._earlier = False
        self._recheck_at = 0.0
        self._index = {}

    def _read_new(self) -> bytes:
        """Return the record lines added since the last read; reopen a replaced file."""
        try:
            return self._read_new_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read the database: {exc.strerror}") from exc

    def _read_new_bytes(self) -> bytes:
        if self._up_to_date():
            return b""
        # Something new: records, a torn write, or the mark of a compaction.
        try:
            dev, ino, size = _identity(self.path)
        except FileNotFoundError:
            self._reset()
            return b""
        if self._fd is None or (dev, ino) != self._ino or size < self._offset:
            # First read, or the file was replaced (a compaction elsewhere).
            self._reset()
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return b""
            st = os.fstat(self._fd)
            self._ino, size = (st.st_dev, st.st_ino), st.st_size
        self._recheck_at = time.monotonic() + RECHECK  # just looked
        data = _read_to_end(self._fd, self._offset, size - self._offset)
        self._size = self._offset + len(data)
        end = _records_end(data)
        if not end and not self._offset and _in_earlier_format(data):
            # Written before lines had checksums: read it all (but a last line
            # without its newline); the first write converts it (_locked).
            end, self._earlier = data.rfind(b"\n") + 1, True
        # Anything but reserved space after the last record is a write that was
        # cut short; _heal clears it under the lock. One write leaves at most one
        # line: more than that was put there otherwise and must not be cleared.
        self._torn = not _is_reserved(data, end)
        # (Sectors lost from a write that grew the file read back as zeros.)
        self._foreign = self._torn and b"\n" in data[end:].rstrip(b" \n\0")
        self._offset += end
        return data[:end]

    def _consume(self, data: bytes) -> None:
        if not data:
            return
        lines = data.split(b"\n")
        lines.pop()  # the empty piece after the last newline
        for raw in lines:
            decoded = _decode(raw, self._earlier)
            if decoded is None:
                if raw.strip():
                    self._lines += 1  # dead weight for compaction to remove
                    log.warning("skipping a line that is not a whole record in %s", self.path)
                continue
            self._lines += 1
            self._index[decoded[0]] = raw

    # -- writing -----------------------------------------------------------

    @contextmanager
    def _flock(self) -> Iterator[None]:
        """Hold the exclusive cross-process lock (re-entrant within this store)."""
        if self._flock_depth == 0:
            try:
                if self._lock_fd is None:
                    self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                    # Read-only is enough for flock, and works on a read-only folder.
                    self._lock_fd = os.open(self.lock_path, os.O_RDONLY | os.O_CREAT, 0o600)
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise StoreError(f"cannot lock the database: {exc.strerror}") from exc
        self._flock_depth += 1
        try:
            yield
        finally:
            self._flock_depth -= 1
            if self._flock_depth == 0 and self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold both locks, with an index that is up to date and no torn write after it."""
        with self._held(), self._flock():
            self._consume(self._read_new())
            self._heal()
            if self._earlier:
                log.warning("converting %s to lines with checksums", self.path)
                self._rewrite(
                    {k: encode_line(k, json.loads(raw)["v"])[:-1] for k, raw in self._index.items()}
                )
            if not self._checked_copies:
                self._remove_stale_copies()
                self._checked_copies = True
            yield

    def _heal(self) -> None:
        """Turn a torn write after the last record back into reserved space.

        Only called under the lock, so no writer is live. The file keeps its size.
        Bytes that no interrupted write leaves (more than one line: appended by
        hand, or by another program) are first copied to a side file, so that
        nothing is lost and the site goes on saving.
        """
        if not self._torn:
            return
        try:
            if self._foreign:
                self._move_aside()
            else:
                log.warning("discarding a torn write at the end of %s", self.path)
            _pwrite_all(self._writer(), _reserved(self._size - self._offset), self._offset)
        except OSError as exc:
            raise StoreError(f"cannot repair the database: {exc.strerror}") from exc
        self._torn = self._foreign = False

    def _move_aside(self) -> None:
        """Copy the bytes after the last record to a new side file, durably, before they go."""
        tail = os.pread(self._fd, self._size - self._offset, self._offset)  # type: ignore[arg-type]
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        side = self.folder / f"{self.path.name}.foreign-{stamp}-{secrets.token_hex(4)}"
        fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _pwrite_all(fd, tail, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.folder)
        log.error(
            "%s had %d bytes after its last record that no interrupted write leaves "
            "(was it edited by hand?): they were moved to %s, and saving goes on. "
            "Look at that file; records in it were NOT loaded.",
            self.path,
            len(tail),
            side,
        )

    def _writer(self) -> int:
        """Return the write handle, creating the file if there is none yet."""
        if self._wfd is None:
            # O_DSYNC: each write returns only once it is on disk (one call
            # instead of write plus fdatasync).
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o600)
            fst = os.fstat(fd)
            if self._fd is None:  # a new file
                try:
                    _fsync_dir(self.folder)  # the new name must survive a power cut
                    self._fd = os.open(self.path, os.O_RDONLY)
                except OSError:
                    os.close(fd)
                    raise
                self._ino = (fst.st_dev, fst.st_ino)
            elif (fst.st_dev, fst.st_ino) != self._ino:
                # The path now names another file than the one indexed: writing
                # at our offset there would overwrite its records. Refuse, and
                # look at the path on the next call.
                os.close(fd)
                self._recheck_at = 0.0
                raise OSError(errno.ESTALE, "the file was replaced while the site ran")
            self._wfd = fd
        return self._wfd

    def _append(self, key: str, line: bytes) -> None:
        """Write one line after the last record with one write, durably, or change nothing."""
        try:
            fd = self._writer()
        except OSError as exc:
            raise StoreError(f"cannot open the database: {exc.strerror}") from exc
        start, size = self._offset, self._size
        end = start + len(line)
        # Into the reserved space when the line fits; otherwise grow the file by
        # the line and a fresh reserve, in the same single write.
        data = line if end <= size else line + _reserved(self.reserve)
        try:
            _pwrite_all(fd, data, start)  # durable on return (O_DSYNC)
        except OSError as exc:
            self._undo_write(fd, start, size)
            raise StoreError(f"cannot write the database: {exc.strerror}") from exc
        self._offset, self._size = end, max(size, start + len(data))
        self._lines += 1
        self._index[key] = line[:-1]

    def _undo_write(self, fd: int, start: int, size: int) -> None:
        """Put back the file as it was before a failed write at ``start`` (``size`` bytes long)."""
        try:
            if os.fstat(fd).st_size > size:  # shrink what the write grew; never extend
                os.ftruncate(fd, size)
            os.pwrite(fd, _reserved(size - start), start)  # in place: needs no new disk space
        except OSError:
            log.exception("could not roll back a failed write to %s", self.path)
            self._reset()  # reload from whatever the file now holds; a torn tail heals then

    def _rewrite(self, index: dict[str, bytes]) -> None:
        """Replace the file with one holding exactly the lines in ``index``, and a reserve."""
        self._remove_stale_copies()
        tmp = self.folder / f".{self.path.name}.{secrets.token_hex(8)}.tmp"
        fd: int | None = None
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            size, chunk, chunk_size = 0, [], 0
            for raw in index.values():
                chunk.append(raw + b"\n")
                chunk_size += len(raw) + 1
                if chunk_size >= CHUNK:
                    _pwrite_all(fd, b"".join(chunk), size)
                    size, chunk, chunk_size = size + chunk_size, [], 0
            chunk.append(_reserved(self.reserve))
            _pwrite_all(fd, b"".join(chunk), size)
            size += chunk_size
            os.fsync(fd)
            if self._fd is not None:
                # Mark the old file after its last record: other processes read
                # that byte on every request, and then look for the new file.
                _pwrite_all(self._writer(), _REPLACED, self._offset)
            os.replace(tmp, self.path)
        except OSError as exc:
            if fd is not None:
                os.close(fd)
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot rewrite the database: {exc.strerror}") from exc
        # The new file is in place: index it as written instead of reading it back.
        self._reset()
        self._fd, self._index = fd, index
        fst = os.fstat(fd)
        self._ino = (fst.st_dev, fst.st_ino)
        self._offset, self._size, self._lines = size, fst.st_size, len(index)
        try:
            _fsync_dir(self.folder)
        except OSError:
            # The change is made and other processes see it: reporting it as
            # not made would be wrong. Only a power cut before the folder
            # reaches the disk could bring the old file back.
            log.exception("could not sync %s after replacing %s", self.folder, self.path.name)

    def _remove_stale_copies(self) -> None:
        """Delete half-written copies left by a compaction that was killed.

        Only called under the lock, when no compaction runs. They may hold
        records deleted since, which must not linger on disk.
        """
        try:
            copies = list(self.folder.glob(f".{self.path.name}.*.tmp"))
        except OSError:  # out of descriptors, say: the change goes on; the next compaction looks
            log.exception("could not look for copies left in %s", self.folder)
            return
        for stale in copies:
            log.warning("removing %s, left by an interrupted compaction", stale)
            try:
                stale.unlink(missing_ok=True)
            except OSError:  # a read-only folder: try again on a later write
                log.exception("could not remove %s", stale)

    def _maybe_compact(self) -> None:
        dead = self._lines - len(self._index)
        if dead > len(self._index) and dead >= self.compact_min_dead:
            try:
                self._rewrite(dict(self._index))
            except StoreError:
                # The append that triggered this is already durable; a failed
                # compaction only postpones the clean-up.
                log.exception("compaction of %s failed", self.path)

    def create(self, key: str, record: Record) -> bool:
        """Store ``record`` under a new ``key``; return False if the key exists."""
        line = encode_line(key, record)
        with self._locked():
            if key in self._index:
                return False
            self._append(key, line)
            return True

    def update(self, key: str, change: Callable[[Record], Record | None]) -> Record:
        """Apply ``change`` to a copy of the record and save the result, atomically.

        ``change`` runs inside the lock, so concurrent updates never lose each
        other's work. It may mutate its argument and return ``None``. Returns
        the saved record. Raises :class:`RecordGone` (a ``KeyError``) if there
        is no such record; ``change`` may raise to refuse, and nothing is saved.
        """
        with self._locked():
            raw = self._index.get(key)
            if raw is None:
                raise RecordGone(key)
            draft = json.loads(raw)["v"]
            result = change(draft)
            new = draft if result is None else result
            line = encode_line(key, new)
            if line[:-1] != raw:
                self._append(key, line)
                self._maybe_compact()
            return new

    def delete(self, key: str, check: Callable[[Record], object] | None = None) -> bool:
        """Remove ``key`` and every earlier version of it from the file, at once.

        Returns False if there is no such record. ``check``, if given, sees a
        copy of the record inside the lock, just before it goes: it may raise
        to refuse (nothing is deleted), and what it reads (the photo's name)
        is what is deleted, not what some earlier read saw.
        """
        with self._locked():
            raw = self._index.get(key)
            if raw is None:
                return False
            if check is not None:
                check(json.loads(raw)["v"])
            remaining = dict(self._index)
            del remaining[key]
            self._rewrite(remaining)
            return True

    def compact(self) -> None:
        """Rewrite the file with only the live records."""
        with self._locked():
            self._rewrite(dict(self._index))

    def close(self) -> None:
        """Close the files; the store reopens them if it is used again."""
        with self._mutex:
            self._reset()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


# uploads.save names photos; a put writes ".upload-<random>.tmp" first and
# renames it into place, so a crash can leave one of those behind.
UPLOAD_TMP_RE = re.compile(r"\.upload-[A-Za-z0-9_]+\.tmp\Z")


class FolderPhotos:
    """Photos as files in one folder, each written whole: the text backend's photo store.

    Only names the server makes (``PHOTO_NAME_RE``) are read or written, so a
    name from a record or an export folder can never reach outside the folder,
    and a symlink in the folder is never followed.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def put(self, name: str, data: bytes) -> None:
        """Write ``data`` as ``name``; a reader never sees half a file, a failure leaves none."""
        photo_name(name)
        tmp: str | None = None
        placed = False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".upload-", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.folder / name)
            placed = True
            _fsync_dir(self.folder)
        except OSError as exc:
            # Clean up without letting a second error hide the first one.
            with contextlib.suppress(OSError):
                if placed:
                    (self.folder / name).unlink()
                elif tmp is not None:
                    os.unlink(tmp)
            raise StoreError(f"cannot save the photo: {exc.strerror}") from exc

    def get(self, name: str) -> Photo | None:
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK  # no symlink; a FIFO never blocks
            fd = os.open(self.folder / photo_name(name), flags)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink: not a photo this server stored
                return None
            raise StoreError(f"cannot read the photo: {exc.strerror}") from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a FIFO, a folder (which fdopen would refuse)
            os.close(fd)
            return None
        with os.fdopen(fd, "rb") as f:
            return Photo(f.read(), st.st_mtime)

    def remove(self, name: str) -> None:
        """Delete a photo, or an upload a crash left half-written; any other name is refused."""
        if not (isinstance(name, str) and UPLOAD_TMP_RE.match(name)):
            photo_name(name)
        (self.folder / name).unlink(missing_ok=True)

    def listing(self) -> dict[str, float]:
        """Every regular file in the folder (photos and leftover uploads) -> its mtime."""
        found: dict[str, float] = {}
        if not self.folder.is_dir():
            return found
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    found[entry.name] = entry.stat(follow_symlinks=False).st_mtime
        return found
