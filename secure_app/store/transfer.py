"""Moving data between backends: ``flask export-data FOLDER`` and ``import-data FOLDER``.

An export folder is a text database and a photo folder, exactly as the text
backend keeps them: ``FOLDER/users.jsonl`` (its line format, readable with
``less``) and ``FOLDER/photos/<name>.webp``. So an export of either backend
can be read by a person, served by pointing ``FLASK_DATA_DIR`` and
``FLASK_PHOTO_DIR`` at it, or imported into PostgreSQL; records and photo
bytes come back unchanged (a property test proves text -> PostgreSQL -> text).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from . import Photos, Records
from .text import FolderPhotos, TextStore


class TransferError(Exception):
    """The export or import was refused before anything was written."""


@dataclass
class Moved:
    records: int = 0
    photos: int = 0
    missing_photos: list[str] = field(default_factory=list)  # users whose photo is not stored


def export_to(folder: Path, records: Records, photos: Photos) -> Moved:
    """Write every record and the photos they point to into a new, empty ``folder``."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise TransferError(f"{folder} is not empty: export into a new folder")
    out = TextStore(folder)
    out_photos = FolderPhotos(folder / "photos")
    moved = Moved()
    try:
        for key in records.keys():
            record = records.get(key)
            if record is None:
                continue  # deleted while the export ran
            name = record.get("photo")
            if name:
                photo = photos.get(name)
                if photo is None:
                    moved.missing_photos.append(key)
                else:
                    out_photos.put(name, photo.data)
                    moved.photos += 1
            out.create(key, record)
            moved.records += 1
    finally:
        out.close()
    if not out.path.exists():  # no users: still an export folder, one that imports nothing
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(out.path, os.O_WRONLY | os.O_CREAT, 0o600))
    return moved


def import_from(folder: Path, records: Records, photos: Photos) -> Moved:
    """Load an export folder into ``records`` and ``photos``; refuse if any user already exists.

    Photos go first, then the record that points to each, so that no record
    ever names a photo that is not stored (the order ``account._save`` keeps).
    """
    folder = Path(folder)
    if not (folder / "users.jsonl").is_file():
        raise TransferError(f"{folder} has no users.jsonl: not an export folder")
    source = TextStore(folder)
    source_photos = FolderPhotos(folder / "photos")
    moved = Moved()
    try:
        keys = source.keys()
        clashes = sorted(key for key in keys if key in records)
        if clashes:
            raise TransferError(
                f"these users exist already, nothing was imported: {', '.join(clashes)}"
            )
        for key in keys:
            record = source.get(key)
            name = record.get("photo") if record else None
            if name:
                photo = source_photos.get(name)
                if photo is None:
                    moved.missing_photos.append(key)
                else:
                    photos.put(name, photo.data)
                    moved.photos += 1
            if not records.create(key, record):
                raise TransferError(
                    f"{key} was created meanwhile; the users before it were imported"
                )
            moved.records += 1
    finally:
        source.close()
    return moved
