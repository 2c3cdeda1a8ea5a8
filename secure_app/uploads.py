"""Profile photos: judged by their bytes, bounded, re-encoded without metadata, randomly named.

The client's filename and Content-Type are never used: the bytes must decode
as JPEG, PNG or WebP. What is stored is a fresh WebP made from the decoded
pixels, so no metadata (EXIF, GPS, XMP, text chunks, comments) and no
trailing payload of a polyglot survives.

Every upload costs bounded memory and CPU, whatever it claims to be. Before
any pixel is decoded, the file's structure is walked (segments, chunks and
scans counted) and its decoding cost is estimated from the header: pixels
times the bytes each decoder really holds per pixel, measured with
bench/uploads.py. A JPEG is decoded at a reduced DCT scale; other formats
are reduced before any full-size copy; orientation is applied to the small
image. Decodes run on a pool of ``MAX_DECODES`` threads per process, with
at most ``MAX_WAITING`` more queued; any further upload is refused at once
as busy, so uploads never hold more than four of gunicorn's eight threads.
"""

from __future__ import annotations

import io
import logging
import os
import re
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import IO

from PIL import Image, PngImagePlugin

from .store import PHOTO_NAME_RE, Photos, StoreError

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
NAME_RE = PHOTO_NAME_RE  # names the server makes; the store refuses any other

# What one decode may hold in pixel and coefficient buffers. With Python's
# and the allocator's own overhead, bench/uploads.py measures at most 104 MiB
# of added peak RSS for any accepted file (the target is 160).
DECODE_BUDGET = 96 * 1024 * 1024
# Decodes at once per process: two fill both cores of the reference machine.
# They run on their own threads, Pillow's parsing included, so that only two
# malloc arenas ever hold a decode's buffers: with the same two-at-a-time
# limit on gunicorn's eight request threads the worker peaked at 782 MiB, on
# the pool at 322 MiB (bench/uploads.py). An upload that arrives while two
# more already wait is refused at once rather than queued: a waiting upload
# holds one of gunicorn's threads, and eight of them left none for the pages
# (GET /second p99 1.8 s; 86 ms with the refusal).
MAX_DECODES = 2
MAX_WAITING = 2
# A safety net only: a queued upload waits for at most two bounded decodes.
DECODE_WAIT = 10.0
# Real files have a few dozen JPEG segments and, written 8 KiB per IDAT as
# libpng does, about 640 PNG chunks in 5 MiB. Every one of them is parsed in
# Python, by us and by Pillow, so a flood of tiny ones costs seconds; libwebp
# keeps a record per animation frame (18 MiB for 100,000 one-pixel frames).
MAX_JPEG_SEGMENTS = 1_000
MAX_CHUNKS = 10_000  # PNG chunks, or WebP chunks (one per animation frame)
# libjpeg's progressive script has 10 scans (6 for grey) and optimizing
# encoders (mozjpeg, jpegrescan) stay under 20. libjpeg walks every block of
# the scan's components once per scan, so a scan repeated thousands of times
# costs minutes of CPU in a small file. With the coefficient budget, scans x
# blocks is at most 32 x 786,432: 0.5 s of CPU measured at that limit.
MAX_SCANS = 32
# Pillow holds RGB, RGBA, LA, CMYK, I and F in 4 bytes a pixel, I;16 in 2.
_STORED = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}
# Modes whose pixels can be averaged as they are (LA and RGBA are averaged
# premultiplied, through one more 4-byte copy).
_REDUCIBLE = {"L", "RGB", "CMYK", "I", "F", "LA", "RGBA"}
# libwebp's animation decoder (which Pillow uses for every WebP) keeps two
# canvases, a lossless frame its own ARGB copy, and Pillow adds a bytes copy
# and the image: 953 MiB measured for 50 megapixels.
_WEBP_BYTES_PER_PIXEL = 20
# Pillow keeps up to 64 MiB of decompressed PNG text; nothing here reads it.
PngImagePlugin.MAX_TEXT_MEMORY = 4 * PngImagePlugin.MAX_TEXT_CHUNK

_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_UNREADABLE = "This file is not a JPEG, PNG or WebP image that can be read completely."
_TOO_LARGE = (
    f"The photo is too large: at most {MAX_SIDE:,} pixels a side "
    f"and {MAX_PIXELS // 1_000_000} megapixels."
)
_UNUSUAL = "This {} is built in a way no camera or common program writes ({}). Please re-save it."
_BUSY = "The server is busy with other photos right now. Please try again in a moment."

_pool = ThreadPoolExecutor(MAX_DECODES, thread_name_prefix="photo-decode")
_admitted = threading.BoundedSemaphore(MAX_DECODES + MAX_WAITING)


def _fresh_pool() -> None:
    """Give a forked child its own decode pool and places (threads do not fork).

    A child inherits the pool's bookkeeping, which counts the parent's idle
    threads as its own: it would queue every decode for threads that do not
    exist, and refuse every upload as busy after ``DECODE_WAIT``. Places held
    by the parent's decodes would never come back either.
    """
    global _pool, _admitted
    _pool = ThreadPoolExecutor(MAX_DECODES, thread_name_prefix="photo-decode")
    _admitted = threading.BoundedSemaphore(MAX_DECODES + MAX_WAITING)


os.register_at_fork(after_in_child=_fresh_pool)


class UploadRefused(ValueError):
    """The upload is not an acceptable photo; ``str()`` is the message for the user."""


class UploadBusy(UploadRefused):
    """Every decode slot and queue place is taken; the photo itself may be fine."""


def read_limited(stream: IO[bytes], limit: int = MAX_BYTES) -> bytes:
    """Read at most ``limit`` bytes from ``stream``, refusing anything longer."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise UploadRefused(f"The photo is larger than {limit // (1024 * 1024)} MiB.")
    return data


@dataclass
class _Layout:
    """What the structure walk learned: where the image ends and what decoding it costs."""

    end: int | None = None
    scans: int = 0
    scan_components: int = 0  # the fewest components any scan carries
    sof: int | None = None
    components: list[tuple[int, int]] = field(default_factory=list)  # (h, v) sampling


# In entropy-coded JPEG data a 0xFF is followed by 0x00 (stuffing), a restart
# marker (0xD0-0xD7) or another 0xFF (fill): anything else is a real marker.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# Sequential (baseline, extended) and progressive Huffman-coded frames: what
# cameras and encoders write. Lossless, hierarchical and arithmetic-coded are not.
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2}


def _walk_png(data: bytes) -> _Layout:
    """Walk the chunks by their lengths to just past IEND, counting them."""
    pos, count = 8, 0  # after the signature
    while pos + 12 <= len(data):
        count += 1
        if count > MAX_CHUNKS:
            raise UploadRefused(_UNUSUAL.format("PNG", f"over {MAX_CHUNKS:,} chunks"))
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        pos += 12 + length  # length, type, data, CRC
        if kind == b"IEND":
            return _Layout(end=pos)
    return _Layout()


def _walk_webp(data: bytes) -> _Layout:
    """Walk the RIFF chunks (an animation has one per frame), counting them."""
    pos, count = 12, 0  # after RIFF, the length and WEBP
    while pos + 8 <= len(data):
        count += 1
        if count > MAX_CHUNKS:
            raise UploadRefused(_UNUSUAL.format("WebP", f"over {MAX_CHUNKS:,} chunks"))
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        pos += 8 + length + (length & 1)  # chunks are padded to an even length
    return _Layout(end=pos)


def _walk_jpeg(data: bytes) -> _Layout:
    """Walk the segments to just past the first image's EOI, counting segments and scans."""
    layout, pos, count = _Layout(), 2, 0  # after SOI
    while pos + 2 <= len(data):
        if data[pos] != 0xFF:
            return layout
        marker = data[pos + 1]
        if marker == 0xD9:
            layout.end = pos + 2
            return layout
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 1 if marker == 0xFF else 2  # fill byte or a marker without length
            continue
        count += 1
        if count > MAX_JPEG_SEGMENTS:
            raise UploadRefused(_UNUSUAL.format("JPEG", f"over {MAX_JPEG_SEGMENTS:,} segments"))
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = data[pos + 4 : pos + 2 + length]
        pos += 2 + length
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header
            if layout.sof is not None:
                return layout  # a second frame: not one image
            layout.sof = marker
            parts = segment[5] if len(segment) > 5 else 0
            layout.components = [(b >> 4, b & 15) for b in segment[7 : 6 + 3 * parts : 3]]
        if marker == 0xDA:  # start of scan: the entropy-coded data runs to the next marker
            layout.scans += 1
            if layout.scans > MAX_SCANS:
                raise UploadRefused(_UNUSUAL.format("JPEG", f"over {MAX_SCANS} scans"))
            in_scan = segment[0] if segment else 0
            first = layout.scans == 1
            layout.scan_components = in_scan if first else min(layout.scan_components, in_scan)
            found = _JPEG_MARKER.search(data, pos)
            if found is None:
                return layout
            pos = found.start()
    return layout


def _walk(fmt: str, data: bytes) -> _Layout:
    """Walk the container; ``end`` stays None unless it ends exactly where the file does.

    The end is found by walking the container's structure, not by looking at
    the last bytes, so HTML or a ZIP appended after a valid image is caught
    even when the attacker ends it with the format's end marker.
    """
    if fmt == "PNG":
        layout = _walk_png(data)
    elif fmt == "JPEG":
        layout = _walk_jpeg(data)
    else:
        layout = _walk_webp(data)
        # A RIFF file states its own length too: both must end where the file does.
        if int.from_bytes(data[4:8], "little") + 8 != len(data):
            layout.end = None
    if layout.end != len(data):
        layout.end = None
    return layout


def _sniff(data: bytes) -> str:
    """The format by its signature; Pillow's parsers run only after the structure walk."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    raise UploadRefused(_UNREADABLE)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _reduce_first(img: Image.Image) -> bool:
    """True when the pixels can be averaged as they are: no palette, no colour-key transparency."""
    return img.mode in _REDUCIBLE and "transparency" not in img.info


def _jpeg_scale(size: tuple[int, int]) -> int:
    """The largest DCT scale (1/8 to 1) leaving twice the profile size on the long side."""
    return next(s for s in (8, 4, 2, 1) if max(size) // s >= 2 * max(PROFILE_SIZE) or s == 1)


def _ceil_div(a: int, b: int) -> int:
    return -(a // -b)


def _coefficients(size: tuple[int, int], components: list[tuple[int, int]]) -> int:
    """DCT coefficients libjpeg buffers for a multi-scan JPEG: every block of every component."""
    if not components or not all(1 <= h <= 4 and 1 <= v <= 4 for h, v in components):
        raise UploadRefused(_UNREADABLE)
    hmax = max(h for h, _ in components)
    vmax = max(v for _, v in components)
    total = 0
    for h, v in components:
        blocks_w = _ceil_div(_ceil_div(size[0] * h, hmax), 8)
        blocks_h = _ceil_div(_ceil_div(size[1] * v, vmax), 8)
        total += _ceil_div(blocks_w, h) * h * _ceil_div(blocks_h, v) * v * 64  # whole MCUs
    return total


def _buffered(layout: _Layout) -> bool:
    """Whether libjpeg decodes through a whole-image coefficient buffer.

    It does for every progressive frame, and for a sequential one with more
    than one scan or a scan that carries fewer than all the components
    (libjpeg's ``has_multiple_scans``), even when the file holds a single
    scan: a progressive JPEG cut after its DC scan costs the full buffer.
    """
    return layout.sof == 0xC2 or layout.scans > 1 or layout.scan_components < len(layout.components)


def _cost(img: Image.Image, layout: _Layout) -> int:
    """Bytes the decode holds at its peak, estimated from the header alone."""
    width, height = img.size
    pixels = width * height
    if img.format == "WEBP":
        return pixels * _WEBP_BYTES_PER_PIXEL
    if img.format == "JPEG":
        scaled = pixels * 4 // _jpeg_scale(img.size) ** 2
        if not _buffered(layout):
            return scaled  # decoded a band at a time, at the reduced scale
        # libjpeg keeps every coefficient of the whole image (2 bytes each)
        # until the last scan.
        return _coefficients(img.size, layout.components) * 2 + scaled
    stored = _STORED.get(img.mode, 4)
    if _reduce_first(img):
        return pixels * (stored + (4 if img.mode in ("LA", "RGBA") else 0))
    # Converted at full size first, then averaged premultiplied if it has alpha.
    return pixels * (stored + 4 + (4 if _has_alpha(img) else 0))


def _too_costly(img: Image.Image, cost: int) -> str:
    """The message for a file within the general limits whose format cannot be decoded reduced."""
    fmt = {"JPEG": "progressive JPEG", "PNG": "PNG", "WEBP": "WebP"}[img.format or ""]
    other = "a baseline (not progressive) JPEG" if img.format == "JPEG" else "a JPEG"
    limit = img.width * img.height * DECODE_BUDGET / cost / 1_000_000
    return (
        f"The photo is too large for a {fmt} of this kind: at most about {limit:.1f} "
        f"megapixels. Please upload a smaller image, or {other}."
    )


def _eight_bits(img: Image.Image) -> Image.Image:
    """16-bit grey as 8-bit grey, scaled: Pillow's own conversion clips at 255, to white."""
    # One 2-byte and one 1-byte copy at full size, less than _cost counts for the conversion.
    grey = img.point(lambda v: v / 256).convert("L")
    if "transparency" in img.info:  # the colour key, at the precision the pixels now have
        grey.info["transparency"] = img.info["transparency"] >> 8
    return grey


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception:  # a broken EXIF block only costs the orientation
        log.info("ignoring unreadable EXIF orientation")
        return None


def _shrink(img: Image.Image) -> Image.Image:
    """Decode ``img`` and return it oriented and at most ``PROFILE_SIZE``, reducing first."""
    if img.format == "JPEG":
        # Decoded at 1/2..1/8 scale: less memory and time, every byte still read.
        scale = _jpeg_scale(img.size)
        img.draft(None, (max(1, img.width // scale), max(1, img.height // scale)))
    img.load()  # decodes every byte: truncated or corrupt files fail here
    orientation = _orientation(img)
    if img.mode.startswith("I;16"):
        img = _eight_bits(img)
    target = "RGBA" if _has_alpha(img) else "RGB"
    factor = max(1, max(img.size) // (2 * max(PROFILE_SIZE)))
    if _reduce_first(img):
        img = (img.reduce(factor) if factor > 1 else img).convert(target)
    else:
        img = img.convert(target)
        img = img.reduce(factor) if factor > 1 else img
    img.thumbnail(PROFILE_SIZE, Image.Resampling.LANCZOS)
    if orientation in _ORIENT:  # on the small image: no full-size copy
        img = img.transpose(_ORIENT[orientation])
    return img


def _process(data: bytes, fmt: str, layout: _Layout) -> bytes:
    """Check the header against every limit, then decode, shrink and re-encode."""
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = img.size  # from the header: nothing decoded yet
        if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
            raise UploadRefused(_TOO_LARGE)
        if img.format != fmt or layout.end is None or not width or not height:
            raise UploadRefused(_UNREADABLE)
        if fmt == "JPEG" and layout.sof not in _JPEG_FRAMES:
            raise UploadRefused(_UNUSUAL.format("JPEG", "lossless, hierarchical or arithmetic"))
        cost = _cost(img, layout)
        if cost > DECODE_BUDGET:
            raise UploadRefused(_too_costly(img, cost))
        small = _shrink(img)
    except UploadRefused:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fires inside open() for headers past ~179 megapixels.
        raise UploadRefused(_TOO_LARGE) from exc
    except Exception as exc:
        # Pillow reports bad input through many exception types (OSError,
        # SyntaxError, ValueError, struct.error, EOFError...); every one of
        # them means the same thing here.
        raise UploadRefused(_UNREADABLE) from exc
    # A new image from raw pixels carries no info dict: no metadata can leak.
    clean = Image.frombytes(small.mode, small.size, small.tobytes())
    out = io.BytesIO()
    clean.save(out, "WEBP", quality=85, method=4)
    return out.getvalue()


def reencode(data: bytes) -> bytes:
    """Return ``data`` re-encoded as a metadata-free WebP of at most 512x512.

    Raises :class:`UploadRefused` for anything else: files whose header
    promises more than ``MAX_PIXELS`` or ``MAX_SIDE``, whose decoding would
    cost more than ``DECODE_BUDGET``, or whose structure no real encoder
    writes; and :class:`UploadBusy` (a subclass) when the decode queue is full.
    """
    fmt = _sniff(data)
    layout = _walk(fmt, data)  # pure Python over a bounded count: cheap, so not queued
    # Pillow's parsers and decoders run only on the pool, where at most
    # MAX_DECODES run and MAX_WAITING more wait.
    if not _admitted.acquire(blocking=False):
        raise UploadBusy(_BUSY)
    try:
        job = _pool.submit(_process, data, fmt, layout)
    except BaseException:
        _admitted.release()
        raise
    # The place is given back when the decode ends, even if this request stopped waiting.
    job.add_done_callback(lambda _: _admitted.release())
    try:
        return job.result(timeout=DECODE_WAIT)
    except FutureTimeout:
        job.cancel()
        raise UploadBusy(_BUSY) from None


def save(image: bytes, photos: Photos) -> str:
    """Store ``image`` (re-encoded bytes) under a new random name and return the name."""
    name = secrets.token_hex(16) + EXTENSION  # 128 bits: not guessable, never client-made
    photos.put(name, image)
    return name


def remove(photos: Photos, name: str | None) -> None:
    """Delete a stored photo; names that the server could not have made are ignored.

    A failure is logged, not raised: the record no longer points to the photo,
    so what is left is an orphan that ``flask prune-photos`` removes later.
    """
    if name and NAME_RE.match(name):
        try:
            photos.remove(name)
        except (OSError, StoreError):
            log.exception("could not remove photo %s", name)
