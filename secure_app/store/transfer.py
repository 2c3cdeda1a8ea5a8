"""Moving data between backends: ``flask export-data FOLDER`` and ``import-data FOLDER``.

An export folder is a text database and a photo folder, exactly as the text
backend keeps them: ``FOLDER/users.jsonl`` (its line format, readable with
``less``) and ``FOLDER/photos/<name>.webp``. So an export of either backend
can be read by a person, served by pointing ``FLASK_DATA_DIR`` and
``FLASK_PHOTO_DIR`` at it, or imported into PostgreSQL; records and photo
bytes come back unchanged (a property test proves text -> PostgreSQL -> text).

An export folder is also input from outside: a backup that sat somewhere,
or a folder someone handed over. Import reads it without writing to it and
without following symlinks, and checks everything before it writes anything:
keys are usernames that match their records, every photo name is one the
server could have made and is not taken, every photo is a WebP image. One
problem refuses the whole import.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..uploads import PROFILE_SIZE
from . import Photos, Record, Records, photo_name
from .text import FolderPhotos, TextStore, read_records

# Re-encoded profile photos are a few tens of KiB; anything near this is not one.
MAX_PHOTO_BYTES = 5 * 1024 * 1024
# Why a photo file is refused: all the operator needs to know to mend the folder.
NOT_A_PHOTO = (
    f"is not a photo the server stores (a whole WebP of at most {PROFILE_SIZE[0]} x "
    f"{PROFILE_SIZE[1]} pixels without EXIF or XMP)"
)


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
        for key, record in records.items():
            name = record.get("photo")
            if name:
                photo = photos.get(name) if _is_photo_name(name) else None
                if photo is None:
                    moved.missing_photos.append(key)
                    record = {**record, "photo": None}  # so that the export imports again
                else:
                    out_photos.put(name, photo.data)
                    moved.photos += 1
            out.create(key, record)
            moved.records += 1
    finally:
        out.close()
        out.lock_path.unlink(missing_ok=True)  # only a live database needs its lock file
    if not out.path.exists():  # no users: still an export folder, one that imports nothing
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(out.path, os.O_WRONLY | os.O_CREAT, 0o600))
    return moved


def import_from(
    folder: Path, records: Records, photos: Photos, username_re: re.Pattern[str]
) -> Moved:
    """Load an export folder into ``records`` and ``photos``, all of it or, on any problem, nothing.

    Photos go first, then the record that points to each, so that no record
    ever names a photo that is not stored (the order ``account._save`` keeps).
    A record whose photo the folder lacks is imported without one, and named.
    """
    folder = Path(folder)
    try:
        source = read_records(folder / "users.jsonl")
    except FileNotFoundError:
        raise TransferError(f"{folder} has no users.jsonl: not an export folder") from None
    except OSError as exc:
        raise TransferError(f"cannot read {folder / 'users.jsonl'}: {exc.strerror}") from None
    source_photos = FolderPhotos(folder / "photos")
    problems: list[str] = []
    if (folder / "photos").is_symlink():
        problems.append("photos/ is a symlink: an export folder holds its photos itself")
    clashes = sorted(key for key in source if key in records)
    if clashes:
        problems.append(f"these users exist already: {', '.join(clashes)}")
    plan: list[tuple[str, Record, bytes | None]] = []
    moved = Moved()
    named_by: dict[str, str] = {}  # photo name -> the user it is imported for
    for key, record in source.items():
        problem = _record_problem(key, record, username_re)
        if problem:
            problems.append(f"{key!r}: {problem}")
            continue
        name, data = record.get("photo"), None
        if name:
            if not _is_photo_name(name):
                problems.append(f"{key}: the photo name {name!r} is not one the server makes")
                continue
            if name in named_by:
                problems.append(f"{key}: a photo named {name} is {named_by[name]}'s too")
                continue
            named_by[name] = key
            stored = source_photos.get(name)
            if stored is None:
                moved.missing_photos.append(key)
                record = {**record, "photo": None}
            elif not _is_webp(stored.data):
                problems.append(f"{key}: photos/{name} {NOT_A_PHOTO}")
                continue
            elif photos.get(name) is not None:
                problems.append(f"{key}: a photo named {name} is stored already")
                continue
            else:
                data = stored.data
        plan.append((key, record, data))
    if problems:
        raise TransferError("nothing was imported: " + "; ".join(problems))
    for key, record, data in plan:
        if data is not None:
            photos.put(record["photo"], data)
            moved.photos += 1
        if not records.create(key, record):
            raise TransferError(f"{key} was created meanwhile; the users before it were imported")
        moved.records += 1
    return moved


def _is_photo_name(name: object) -> bool:
    try:
        photo_name(name)
    except ValueError:
        return False
    return True


def _record_problem(key: str, record: Record, username_re: re.Pattern[str]) -> str | None:
    """Why this record could not be served as an account, or None."""
    if not username_re.match(key):
        return "not a username the site accepts"
    if record.get("username") != key:
        return "its username field differs from its key"
    if not isinstance(record.get("password_hash"), str) or not record["password_hash"]:
        return "it has no password hash"
    if not isinstance(record.get("sessions", {}), dict):
        return "its sessions are not a mapping"
    return None


def _is_webp(data: bytes) -> bool:
    """Whether ``data`` is a WebP as uploads.py stores them: decodable, at most the profile
    size, without the metadata (EXIF, XMP) the re-encoding drops, and nothing after it."""
    if len(data) > MAX_PHOTO_BYTES or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    if int.from_bytes(data[4:8], "little") + 8 != len(data):  # HTML appended: a polyglot
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "WEBP" or image.info.get("exif") or image.info.get("xmp"):
                return False
            if image.width > PROFILE_SIZE[0] or image.height > PROFILE_SIZE[1]:
                return False
            image.load()  # decodes every pixel: a cut or corrupt file raises here
            return True
    except Exception:  # noqa: BLE001 - any decoder failure means "not an image"
        return False
