"""Profile photos: judged by their bytes, bounded, re-encoded without metadata, randomly named.

The client's filename and Content-Type are never used: the bytes must decode
as JPEG, PNG or WebP, within size limits read from the header before any pixel
is decoded. What is stored is a fresh WebP made from the decoded pixels, so
no metadata (EXIF, GPS, XMP, text chunks, comments) and no trailing payload of
a polyglot survives.
"""

from __future__ import annotations

import contextlib
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
_TOO_LARGE = (
    f"The photo is too large: at most {MAX_SIDE:,} pixels a side "
    f"and {MAX_PIXELS // 1_000_000} megapixels."
)


class UploadRefused(ValueError):
    """The upload is not an acceptable photo; ``str()`` is the message for the user."""


def read_limited(stream: IO[bytes], limit: int = MAX_BYTES) -> bytes:
    """Read at most ``limit`` bytes from ``stream``, refusing anything longer."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise UploadRefused(f"The photo is larger than {limit // (1024 * 1024)} MiB.")
    return data


# In entropy-coded JPEG data a 0xFF is followed by 0x00 (stuffing), a restart
# marker (0xD0-0xD7) or another 0xFF (fill): anything else is a real marker.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _png_end(data: bytes) -> int | None:
    """Offset just past the IEND chunk, walking the chunks by their lengths."""
    pos = 8  # after the signature
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        pos += 12 + length  # length, type, data, CRC
        if kind == b"IEND":
            return pos
    return None


def _jpeg_end(data: bytes) -> int | None:
    """Offset just past the EOI marker of the first image, walking the segments."""
    pos = 2  # after SOI
    while pos + 2 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xD9:
            return pos + 2
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 1 if marker == 0xFF else 2  # fill byte or a marker without length
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: the entropy-coded data runs to the next marker
            found = _JPEG_MARKER.search(data, pos)
            if found is None:
                return None
            pos = found.start()
    return None


def _has_trailing_data(fmt: str, data: bytes) -> bool:
    """True when bytes follow the image's own end: the mark of a polyglot file.

    The end is found by walking the container's structure, not by looking at
    the last bytes, so HTML or a ZIP appended after a valid image is caught
    even when the attacker ends it with the format's end marker.
    """
    if fmt == "PNG":
        return _png_end(data) != len(data)
    if fmt == "JPEG":
        return _jpeg_end(data) != len(data)
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
                raise UploadRefused(_TOO_LARGE)
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
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fires inside open() for headers past ~179 megapixels.
        raise UploadRefused(_TOO_LARGE) from exc
    except Exception as exc:
        # Pillow reports bad input through many exception types (OSError,
        # SyntaxError, ValueError, struct.error, DecompressionBombError...);
        # every one of them means the same thing here.
        raise UploadRefused(_UNREADABLE) from exc


def save(image: bytes, folder: str | os.PathLike[str]) -> str:
    """Write ``image`` under a new random name in ``folder`` and return the name.

    The bytes go to a temporary file in the same folder and are renamed into
    place, so a reader never sees half a photo; on any failure nothing is left.
    """
    folder = Path(folder)
    name = secrets.token_hex(16) + EXTENSION  # 128 bits: not guessable, never client-made
    tmp: str | None = None
    placed = False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(image)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / name)
        placed = True
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        # Clean up without letting a second error hide the first one.
        with contextlib.suppress(OSError):
            if placed:
                (folder / name).unlink()
            elif tmp is not None:
                os.unlink(tmp)
        raise StoreError(f"cannot save the photo: {exc.strerror}") from exc
    return name


def remove(folder: str | os.PathLike[str], name: str | None) -> None:
    """Delete a stored photo; names that the server could not have made are ignored."""
    if name and NAME_RE.match(name):
        try:
            (Path(folder) / name).unlink(missing_ok=True)
        except OSError:
            log.exception("could not remove photo %s", name)
