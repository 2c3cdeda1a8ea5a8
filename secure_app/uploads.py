"""Profile photos: judged by their bytes, bounded, re-encoded without metadata, randomly named.

The client's filename and Content-Type are never used: the bytes must decode
as JPEG, PNG or WebP, within size limits read from the header before any pixel
is decoded. What is stored is a fresh WebP made from the decoded pixels, so
no metadata (EXIF, GPS, XMP, text chunks, comments) and no trailing payload of
a polyglot survives.
"""

from __future__ import annotations

import io
import logging
import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps

from .store import StoreError

log = logging.getLogger(__name__)

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
MAX_BYTES = 5 * 1024 * 1024
# Pillow's own bomb guard only warns below ~89 and refuses above ~179
# megapixels: too late for a small server, so these are checked first.
MAX_PIXELS = 50_000_000
MAX_SIDE = 12_000
PROFILE_SIZE = (512, 512)
EXTENSION = ".webp"
MIMETYPE = "image/webp"
NAME_RE = re.compile(r"[0-9a-f]{32}\.webp\Z")

_UNREADABLE = "This file is not a JPEG, PNG or WebP image that can be read completely."


class UploadRefused(ValueError):
    """The upload is not an acceptable photo; ``str()`` is the message for the user."""


def read_limited(stream: IO[bytes], limit: int = MAX_BYTES) -> bytes:
    """Read at most ``limit`` bytes from ``stream``, refusing anything longer."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise UploadRefused(f"The photo is larger than {limit // (1024 * 1024)} MiB.")
    return data


def _has_trailing_data(fmt: str, data: bytes) -> bool:
    """True when bytes follow the image's own end: the mark of a polyglot file."""
    if fmt == "PNG":
        return not data.endswith(b"IEND\xaeB`\x82")
    if fmt == "JPEG":
        return not data.endswith(b"\xff\xd9")
    # WebP is a RIFF file whose header states its own length.
    return int.from_bytes(data[4:8], "little") + 8 != len(data)


def reencode(data: bytes) -> bytes:
    """Return ``data`` re-encoded as a metadata-free WebP of at most 512x512.

    Raises :class:`UploadRefused` for anything else, including files whose
    header promises more than ``MAX_PIXELS`` or ``MAX_SIDE``.
    """
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            width, height = img.size  # from the header: nothing decoded yet
            if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
                raise UploadRefused(
                    f"The photo is too large: at most {MAX_SIDE:,} pixels a side "
                    f"and {MAX_PIXELS // 1_000_000} megapixels."
                )
            if img.format not in ALLOWED_FORMATS or _has_trailing_data(img.format, data):
                raise UploadRefused(_UNREADABLE)
            # JPEG can decode at 1/2..1/8 scale: less memory and time, same checks.
            img.draft("RGB", (PROFILE_SIZE[0] * 2, PROFILE_SIZE[1] * 2))
            img.load()  # decodes every byte: truncated or corrupt files fail here
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # a broken EXIF block only costs the orientation
                log.info("ignoring unreadable EXIF orientation")
            has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in img.info
            img = img.convert("RGBA" if has_alpha else "RGB")
            img.thumbnail(PROFILE_SIZE, Image.Resampling.LANCZOS)
            # A new image from raw pixels carries no info dict: no metadata can leak.
            clean = Image.frombytes(img.mode, img.size, img.tobytes())
            out = io.BytesIO()
            clean.save(out, "WEBP", quality=85, method=4)
            return out.getvalue()
    except UploadRefused:
        raise
    except Exception as exc:
        # Pillow reports bad input through many exception types (OSError,
        # SyntaxError, ValueError, struct.error, DecompressionBombError...);
        # every one of them means the same thing here.
        raise UploadRefused(_UNREADABLE) from exc


def save(image: bytes, folder: str | os.PathLike[str]) -> str:
    """Write ``image`` under a new random name in ``folder`` and return the name."""
    folder = Path(folder)
    name = secrets.token_hex(16) + EXTENSION  # 128 bits: not guessable, never client-made
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(image)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / name)
        tmp = None
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        (folder / name).unlink(missing_ok=True)
        raise StoreError(f"cannot save the photo: {exc.strerror}") from exc
    return name


def remove(folder: str | os.PathLike[str], name: str | None) -> None:
    """Delete a stored photo; names that the server could not have made are ignored."""
    if name and NAME_RE.match(name):
        try:
            (Path(folder) / name).unlink(missing_ok=True)
        except OSError:
            log.exception("could not remove photo %s", name)
