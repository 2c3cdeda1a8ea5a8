"""The store: user records and profile photos, behind one interface and two backends.

Everything above this package (login, the account page, second factors,
the security page) speaks only the interface below, so the backend is a
deployment choice, made by ``FLASK_DATABASE_URL``:

* unset: :mod:`.text`, the text database in ``FLASK_DATA_DIR`` (a file a
  person can read with ``less``) and photos as files in ``PHOTO_DIR``. One
  host: it needs one disk with working ``flock``.
* ``postgresql://...``: :mod:`.postgres`, records and photos in PostgreSQL,
  for several hosts behind one database.

Both keep the same promises: a record's read-modify-write (``update``) is
one critical section, so concurrent requests never lose each other's work; a
change the caller was told is saved survives a crash; a failure raises
:class:`StoreError` (the app answers 503) instead of saving half a change.
"""

from __future__ import annotations

import re
import time
from typing import Any, NamedTuple, Protocol

from flask import Flask, current_app

Record = dict[str, Any]


# The only photo names a backend stores: 128 random bits, as uploads.save makes
# them. A name from anywhere else (a record, an export folder) is checked
# against this before it comes near a file path or a row.
PHOTO_NAME_RE = re.compile(r"[0-9a-f]{32}\.webp\Z")


def photo_name(name: object) -> str:
    """``name`` if the server could have made it; any other name never reaches a path or a row."""
    if not isinstance(name, str) or not PHOTO_NAME_RE.match(name):
        raise ValueError(f"not a photo name: {name!r}")
    return name


class StoreError(Exception):
    """A change could not be saved, or the store could not be reached."""


class StoreUncertain(StoreError):
    """The connection failed while the change was being committed: it may or may not be saved.

    Callers must not undo side effects that a saved change would rely on (a
    photo the record may now name); the page says the outcome is unknown.
    """


class RecordGone(KeyError):
    """There is no record for the key (any more): deleted, perhaps by another request meanwhile.

    A ``KeyError``, so code that expects one still works; the app turns it
    into the logged-out path (``auth.account_gone``) instead of a 500.
    """


class Photo(NamedTuple):
    data: bytes
    modified: float  # seconds since the epoch: Last-Modified, and prune-photos' grace period


class Records(Protocol):
    """A dictionary of JSON records, safe across threads, processes and hosts."""

    def get(self, key: str) -> Record | None: ...
    def create(self, key: str, record: Record) -> bool: ...
    def update(self, key: str, change: Any) -> Record: ...
    def delete(self, key: str, check: Any = None) -> bool: ...
    def keys(self) -> list[str]: ...
    def items(self) -> list[tuple[str, Record]]: ...
    def find(self, field: str, value: str) -> list[str]: ...
    def __contains__(self, key: str) -> bool: ...
    def __len__(self) -> int: ...
    def compact(self) -> None: ...
    def close(self) -> None: ...


class Photos(Protocol):
    """Photo bytes by name. Names are made by ``uploads.save``; a name's bytes never change."""

    def put(self, name: str, data: bytes) -> None: ...
    def get(self, name: str) -> Photo | None: ...
    def remove(self, name: str) -> None: ...
    def listing(self) -> dict[str, float]: ...


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
        "photo": None,  # a name in the photo store, made by uploads.save
        "sessions": {},  # SHA-256 of each live session id -> login time
    }


def open_backend(app: Flask) -> tuple[Records, Photos]:
    """Open the configured backend's records and photos."""
    url = app.config.get("DATABASE_URL")
    if url:
        # Imported only here: a site on the text database never loads psycopg.
        from .postgres import PostgresStore

        records = PostgresStore(
            url,
            pool_size=int(app.config["DATABASE_POOL_SIZE"]),
            timeout=float(app.config["DATABASE_TIMEOUT"]),
        )
        return records, records.photos
    from .text import FolderPhotos, TextStore

    return TextStore(app.config["DATA_DIR"]), FolderPhotos(app.config["PHOTO_DIR"])


def init_app(app: Flask) -> None:
    """Give the app its store: records and photos, from the configured backend."""
    records, photos = open_backend(app)
    app.extensions["secure_app.store"] = records
    app.extensions["secure_app.photos"] = photos


def get_store() -> Records:
    """Return the current app's records."""
    return current_app.extensions["secure_app.store"]


def get_photos() -> Photos:
    """Return the current app's photo store."""
    return current_app.extensions["secure_app.photos"]
