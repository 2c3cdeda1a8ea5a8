"""The text database: an append-only log of JSON lines that a person can read.

The file ``users.jsonl`` in the data folder is UTF-8, one JSON object a line::

    {"k":"alice","v":{"username":"alice","full_name":"Alice Liddell",...}}
    {"k":"alice","v":{...the whole record again, after an update...}}

A line holds a key ``k`` and the whole record ``v``; the last line for a key
wins. Records are JSON, so no user text (newlines, quotes, any Unicode) can
break the format. Deleting a key rewrites the file without it at once.

How each promise is kept:

* **Locked.** Writers take a thread lock and an exclusive ``flock`` on the
  separate file ``users.lock`` (not on the data file, whose inode changes at
  compaction). A read-modify-write (``update``) is one critical section.
* **Atomic.** A change is one line written with one ``write``. Readers take
  only complete lines (ending in ``\\n``), so they see a record before or
  after a write, never half of it. Compaction swaps whole files with
  ``os.replace``.
* **Durable.** Every append is ``fsync``-ed before the call returns; a new
  file or a rename is followed by an ``fsync`` of the folder.
* **Self-healing.** A torn last line (a writer killed mid-write) has no
  newline; the next writer, holding the lock, truncates it away. Lines that
  are not valid JSON are skipped, never fatal.
* **O(1) per update.** An update appends one line. Each process keeps an
  index in memory and reads only the bytes it has not seen yet. When dead
  lines outnumber live ones, the file is compacted; other processes notice
  the new inode and reload.

A failed save (full disk, read-only folder) raises :class:`StoreError` after
putting the file back as it was: the caller reports "nothing was changed".
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flask import Flask, current_app

Record = dict[str, Any]

log = logging.getLogger(__name__)

# Compact only once there are more dead lines than live ones, and at least
# this many, so a small file is not rewritten on every other update.
COMPACT_MIN_DEAD = 100


class StoreError(Exception):
    """A change could not be saved; the stored data is as it was before."""


def _encode(key: str, record: Record) -> bytes:
    line = json.dumps({"k": key, "v": record}, ensure_ascii=False, separators=(",", ":"))
    return line.encode("utf-8") + b"\n"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """A dictionary of JSON records kept in one text file, safe across processes.

    Create one per process (gunicorn creates the app after forking, so each
    worker has its own); it is safe to share between threads.
    """

    def __init__(self, folder: str | os.PathLike[str], name: str = "users.jsonl") -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.lock_path = self.folder / (Path(name).stem + ".lock")
        self._mutex = threading.RLock()
        self._lock_fd: int | None = None
        self._fd: int | None = None  # read handle on the file we have indexed
        self._ino: tuple[int, int] | None = None
        self._offset = 0  # bytes of complete lines consumed
        self._lines = 0  # lines consumed, live or dead
        self._index: dict[str, Record] = {}

    # -- reading -----------------------------------------------------------

    def get(self, key: str) -> Record | None:
        """Return a copy of the record for ``key``, or ``None``."""
        with self._mutex:
            self._refresh()
            record = self._index.get(key)
            return copy.deepcopy(record) if record is not None else None

    def __contains__(self, key: str) -> bool:
        with self._mutex:
            self._refresh()
            return key in self._index

    def __len__(self) -> int:
        with self._mutex:
            self._refresh()
            return len(self._index)

    def keys(self) -> list[str]:
        with self._mutex:
            self._refresh()
            return list(self._index)

    def _reset(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._ino = None, None
        self._offset, self._lines = 0, 0
        self._index = {}

    def _refresh(self) -> None:
        """Bring the index up to date by reading only what is new."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._reset()
            return
        if self._fd is None or (st.st_dev, st.st_ino) != self._ino or st.st_size < self._offset:
            # First read, a compaction elsewhere (new inode), or an outside edit.
            self._reset()
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return
            fst = os.fstat(self._fd)
            self._ino = (fst.st_dev, fst.st_ino)
        size = os.fstat(self._fd).st_size
        if size > self._offset:
            self._consume(os.pread(self._fd, size - self._offset, self._offset))

    def _consume(self, data: bytes) -> None:
        end = data.rfind(b"\n") + 1  # a torn tail without newline is left alone
        for raw in data[:end].splitlines():
            self._lines += 1
            try:
                entry = json.loads(raw)
                key, record = entry["k"], entry["v"]
                if not isinstance(key, str) or not isinstance(record, dict):
                    raise ValueError("not a record")
            except (ValueError, KeyError, TypeError):
                log.warning("skipping an unreadable line in %s", self.path)
                continue
            self._index[key] = record
        self._offset += end

    # -- writing -----------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the thread lock and the cross-process lock, with a fresh, healed index."""
        with self._mutex:
            try:
                if self._lock_fd is None:
                    self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                    self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise StoreError(f"cannot lock the database: {exc.strerror}") from exc
            try:
                self._refresh()
                self._heal()
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _heal(self) -> None:
        """Cut off a torn last line. Only called under the lock, so no writer is live."""
        if self._fd is None or os.fstat(self._fd).st_size == self._offset:
            return
        log.warning("discarding a torn write at the end of %s", self.path)
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.ftruncate(fd, self._offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StoreError(f"cannot repair the database: {exc.strerror}") from exc

    def _append(self, data: bytes) -> None:
        """Append complete lines with one write and fsync them, or change nothing."""
        created = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the database: {exc.strerror}") from exc
        try:
            start = os.fstat(fd).st_size
            try:
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(28, "short write")  # ENOSPC part-way through
                os.fsync(fd)
                if created:
                    _fsync_dir(self.folder)
            except OSError as exc:
                try:  # take back whatever part of the line reached the file
                    os.ftruncate(fd, start)
                    os.fsync(fd)
                except OSError:
                    log.exception("could not roll back a failed append to %s", self.path)
                raise StoreError(f"cannot write the database: {exc.strerror}") from exc
        finally:
            os.close(fd)
        self._refresh()

    def _rewrite(self, index: dict[str, Record]) -> None:
        """Replace the file with one holding exactly ``index``."""
        tmp = self.folder / f".{self.path.name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                chunk: list[bytes] = []
                for key, record in index.items():
                    chunk.append(_encode(key, record))
                    if len(chunk) >= 1024:
                        os.write(fd, b"".join(chunk))
                        chunk = []
                data = b"".join(chunk)
                if os.write(fd, data) != len(data):
                    raise OSError(28, "short write")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.folder)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot rewrite the database: {exc.strerror}") from exc
        self._reset()
        self._refresh()

    def _maybe_compact(self) -> None:
        dead = self._lines - len(self._index)
        if dead > len(self._index) and dead >= COMPACT_MIN_DEAD:
            try:
                self._rewrite(dict(self._index))
            except StoreError:
                # The append that triggered this is already durable; a failed
                # compaction only postpones the clean-up.
                log.exception("compaction of %s failed", self.path)

    def create(self, key: str, record: Record) -> bool:
        """Store ``record`` under a new ``key``; return False if the key exists."""
        data = _encode(key, record)
        with self._locked():
            if key in self._index:
                return False
            self._append(data)
            return True

    def update(self, key: str, change: Callable[[Record], Record | None]) -> Record:
        """Apply ``change`` to a copy of the record and save the result, atomically.

        ``change`` runs inside the lock, so concurrent updates never lose each
        other's work. It may mutate its argument and return ``None``. Raises
        ``KeyError`` if there is no such record.
        """
        with self._locked():
            current = self._index[key]
            draft = copy.deepcopy(current)
            result = change(draft)
            new = draft if result is None else result
            if new != current:
                self._append(_encode(key, new))
                self._maybe_compact()
            return copy.deepcopy(new)

    def delete(self, key: str) -> bool:
        """Remove ``key`` and every earlier version of it from the file, at once."""
        with self._locked():
            if key not in self._index:
                return False
            remaining = dict(self._index)
            del remaining[key]
            self._rewrite(remaining)
            return True

    def compact(self) -> None:
        """Rewrite the file with only the live records."""
        with self._locked():
            self._rewrite(dict(self._index))

    def close(self) -> None:
        with self._mutex:
            self._reset()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


def new_user(username: str, password_hash: str) -> Record:
    """Return the record of a new user: the shape every user record has."""
    return {
        "username": username,
        "password_hash": password_hash,
        "created": int(time.time()),
        "full_name": "",
        "email": "",
        "phone": "",
        "bio": "",
        "photo": None,  # file name in the photo folder, made by uploads.save
        "sessions": {},  # SHA-256 of each live session id -> login time
    }


def init_app(app: Flask) -> None:
    """Give the app its store, in the configured data folder."""
    app.extensions["secure_app.store"] = Store(app.config["DATA_DIR"])


def get_store() -> Store:
    """Return the current app's store."""
    return current_app.extensions["secure_app.store"]
