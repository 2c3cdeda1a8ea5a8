"""A small factory of real image bytes for the upload tests, hostile ones included.

Every image is made by Pillow (or, for bombs, by writing only a header), so
the tests exercise the real decoders. ``SECRET`` is planted in every kind of
metadata: if it ever appears in a stored photo, metadata leaked.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

from PIL import Image

SECRET = b"SECRET-METADATA-48.8584N-2.2945E"
XMP = (
    b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?>'
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
    b'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:creator>' + SECRET + b"</dc:creator>"
    b'</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
)
HTML = b"<html><body><script>alert(document.cookie)</script></body></html>"
SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
    b"<script>alert(1)</script></svg>"
)

# EXIF orientation 6 means "rotate 90 degrees clockwise to display": a 40x20
# image stored that way is shown 20 wide and 40 high.
ROTATE_90_CW = 6


def picture(size: tuple[int, int] = (40, 20), mode: str = "RGB") -> Image.Image:
    """Return an image whose left half is red and right half blue, so rotation is visible."""
    img = Image.new("RGB", size, (255, 0, 0))
    img.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return img.convert(mode)


def exif(orientation: int | None = None, gps: bool = True) -> Image.Exif:
    """EXIF with the secret as artist and description, GPS coordinates, and an orientation."""
    data = Image.Exif()
    data[0x013B] = SECRET.decode()  # Artist
    data[0x010E] = SECRET.decode()  # ImageDescription
    if orientation is not None:
        data[0x0112] = orientation
    if gps:
        data[0x8825] = {  # the GPS IFD: latitude and longitude of the Eiffel Tower
            1: "N",
            2: (48.0, 51.0, 30.0),
            3: "E",
            4: (2.0, 17.0, 40.0),
        }
    return data


def _icc() -> bytes:
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return profile.tobytes()


def jpeg(
    size: tuple[int, int] = (40, 20),
    *,
    metadata: bool = False,
    orientation: int | None = None,
    progressive: bool = False,
) -> bytes:
    """A real JPEG; with ``metadata`` it carries EXIF+GPS, XMP, ICC and a comment."""
    out = io.BytesIO()
    extra: dict = {"quality": 90, "progressive": progressive}
    if metadata or orientation is not None:
        extra["exif"] = exif(orientation, gps=metadata).tobytes()
    if metadata:
        extra.update(xmp=XMP, icc_profile=_icc(), comment=SECRET)
    picture(size).save(out, "JPEG", **extra)
    return out.getvalue()


def png(
    size: tuple[int, int] = (40, 20),
    *,
    mode: str = "RGB",
    metadata: bool = False,
    orientation: int | None = None,
) -> bytes:
    """A real PNG; with ``metadata`` it carries tEXt/iTXt/zTXt chunks, eXIf, XMP and ICC."""
    from PIL import PngImagePlugin

    out = io.BytesIO()
    extra: dict = {}
    if metadata or orientation is not None:
        extra["exif"] = exif(orientation, gps=metadata).tobytes()
    if metadata:
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", SECRET.decode())
        info.add_text("Author", SECRET.decode(), zip=True)
        info.add_itxt("Description", SECRET.decode(), lang="en")
        info.add_itxt("XML:com.adobe.xmp", XMP.decode())
        extra.update(pnginfo=info, icc_profile=_icc())
    picture(size, mode).save(out, "PNG", **extra)
    return out.getvalue()


def webp(
    size: tuple[int, int] = (40, 20),
    *,
    metadata: bool = False,
    lossless: bool = False,
    mode: str = "RGB",
) -> bytes:
    """A real WebP; with ``metadata`` it carries EXIF+GPS, XMP and ICC chunks."""
    out = io.BytesIO()
    extra: dict = {"lossless": lossless}
    if metadata:
        extra.update(exif=exif().tobytes(), xmp=XMP, icc_profile=_icc())
    picture(size, mode).save(out, "WEBP", **extra)
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int, **kind) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but which holds one row of pixels.

    A decoder that trusts the header would allocate the whole image before
    noticing the rest is missing. ``kind``: ``png_raw``'s bit_depth,
    color_type and transparency.
    """
    return png_raw((width, height), rows=1, **kind)


def claim_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG ``data`` with its frame header patched to claim ``width`` x ``height``.

    Its scans stay those of the small image: libjpeg decodes the blocks they
    lack as flat grey, so only the header's size decides what decoding costs.
    """
    sof = next(start for marker, start, _ in jpeg_segments(data) if 0xC0 <= marker <= 0xC2)
    # SOFn: marker(2) length(2) precision(1) height(2) width(2)
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


def jpeg_bomb(
    width: int,
    height: int,
    *,
    mode: str = "RGB",
    progressive: bool = False,
    subsampling: int = -1,
) -> bytes:
    """A real 16x16 JPEG of that kind whose frame header claims ``width`` x ``height``."""
    out = io.BytesIO()
    extra = {"subsampling": subsampling} if subsampling >= 0 else {}
    picture((16, 16), mode).save(out, "JPEG", quality=90, progressive=progressive, **extra)
    return claim_size(out.getvalue(), width, height)


def webp_bomb(width: int, height: int) -> bytes:
    """A small real lossy WebP whose VP8 frame header is patched to claim ``width`` x ``height``."""
    data = bytearray(webp((16, 16)))
    start = data.index(b"\x9d\x01\x2a")  # the VP8 key frame start code
    # 14 bits of size and 2 bits of upscaling hint each, little-endian (at most 16383).
    data[start + 3 : start + 7] = struct.pack("<HH", width, height)
    return bytes(data)


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    """The first ``keep`` fraction of ``data``, as a broken upload or a cut-off file."""
    return data[: max(1, int(len(data) * keep))]


def zip_archive() -> bytes:
    """A real ZIP holding an HTML page."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("index.html", HTML)
    return out.getvalue()


def polyglot_html(image: bytes) -> bytes:
    """A valid image followed by an HTML page."""
    return image + HTML


def polyglot_zip(image: bytes) -> bytes:
    """A valid image followed by a ZIP archive (readable by unzip from the end)."""
    return image + zip_archive()


def polyglot_jpeg_disguised(image: bytes) -> bytes:
    """A JPEG + HTML that ends in a JPEG end marker again, to fool a check of the last bytes."""
    return image + HTML + b"\xff\xd9"


def insert_png_chunk(data: bytes, kind: bytes, payload: bytes) -> bytes:
    """The PNG ``data`` with one more chunk, just before its first IDAT."""
    idat = data.index(b"IDAT") - 4  # the chunk starts with its length
    return data[:idat] + _png_chunk(kind, payload) + data[idat:]


def webp_chunks(data: bytes) -> list[bytes]:
    """The chunk types of a RIFF/WebP file, in order."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP", data[:16]
    kinds, pos = [], 12
    while pos + 8 <= len(data):
        kind = data[pos : pos + 4]
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        kinds.append(kind)
        pos += 8 + length + (length & 1)
    return kinds


# Hostile images that are valid files: small on the wire, expensive to decode.
# The big ones are cached: building them costs a few hundred MiB once.


@functools.cache
def jpeg_scan_bomb(size: tuple[int, int] = (2000, 2000), scans: int = 2000) -> bytes:
    """A progressive JPEG whose last (tiny) AC refinement scan is repeated until ``scans`` scans.

    libjpeg walks every block of the image once per scan, so the cost grows
    with scans x pixels while the file stays small.
    """
    base = Image.new("RGB", size, (90, 140, 200))
    out = io.BytesIO()
    base.save(out, "JPEG", quality=90, progressive=True)
    data = out.getvalue()
    segments = jpeg_segments(data)
    sos = [s for s in segments if s[0] == 0xDA]
    last = data[sos[-1][1] : sos[-1][2]]
    extra = last * (scans - len(sos))
    return data[: sos[-1][2]] + extra + data[sos[-1][2] :]


def jpeg_segment_flood(count: int = 200_000) -> bytes:
    """A small JPEG with ``count`` empty comment segments before its frame header."""
    data = jpeg((16, 16))
    return data[:2] + b"\xff\xfe\x00\x02" * count + data[2:]


@functools.cache
def jpeg_large(
    size: tuple[int, int] = (8660, 5773),
    mode: str = "RGB",
    progressive: bool = False,
    subsampling: int = -1,
) -> bytes:
    """A real JPEG of ``size`` (50 megapixels by default), two flat colours, so it stays small."""
    out = io.BytesIO()
    extra = {"subsampling": subsampling} if subsampling >= 0 else {}
    picture(size, mode).save(out, "JPEG", quality=75, progressive=progressive, **extra)
    return out.getvalue()


@functools.cache
def webp_lossless_bomb(size: tuple[int, int] = (12_000, 4_166)) -> bytes:
    """A lossless WebP of one colour: about 2 KB for 50 megapixels."""
    out = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(out, "WEBP", lossless=True, quality=0, method=0)
    return out.getvalue()


@functools.cache
def webp_lossy_large(size: tuple[int, int] = (12_000, 4_166)) -> bytes:
    """A lossy WebP of one colour at the pixel limit."""
    out = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(out, "WEBP", quality=10, method=0)
    return out.getvalue()


def _riff_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + b"\x00" * (len(data) & 1)


def webp_animated(canvas: tuple[int, int] = (4000, 4000), frames: int = 20_000) -> bytes:
    """An animated WebP: a big canvas and ``frames`` one-pixel lossless frames."""
    one = webp((1, 1), lossless=True)
    frame = one[12:]  # the VP8L chunk of a 1x1 image
    width, height = canvas
    vp8x = struct.pack("<I", 0x02 | 0x10)[:1] + b"\x00\x00\x00"
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = _riff_chunk(b"VP8X", vp8x) + _riff_chunk(b"ANIM", b"\x00" * 4 + b"\x00\x00")
    anmf = b"\x00" * 6 + b"\x00" * 6 + (10).to_bytes(3, "little") + b"\x00" + frame
    body += _riff_chunk(b"ANMF", anmf) * frames
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def png_raw(
    size: tuple[int, int],
    *,
    bit_depth: int = 8,
    color_type: int = 2,
    chunk: int = 8192,
    extra_chunks: int = 0,
    frames: int = 0,
    text_bombs: int = 0,
    transparency: bool = False,
    rows: int | None = None,
) -> bytes:
    """A PNG written by hand: any bit depth and colour type, all-zero pixels, small on the wire.

    ``chunk`` is the IDAT chunk size, ``extra_chunks`` adds that many tiny
    private chunks before IDAT, and ``frames`` makes it an APNG with that
    many extra one-pixel frames. ``text_bombs`` adds zTXt chunks of 1 KiB
    that each inflate to 1 MiB; ``transparency`` adds a tRNS chunk. With
    ``rows`` only that many rows of pixels are written: the file is cut short.
    """
    width, height = size
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    row = 1 + (width * channels * bit_depth + 7) // 8
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(b"\x00" * row) for _ in range(height if rows is None else rows))
    # With ``rows``, the compressed stream stops unfinished, as in a file cut short.
    idat += packer.flush() if rows is None else packer.flush(zlib.Z_SYNC_FLUSH)
    out = [b"\x89PNG\r\n\x1a\n"]
    out.append(
        _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
    )
    if color_type == 3:
        out.append(_png_chunk(b"PLTE", bytes(range(256)) * 3))
    if transparency:
        out.append(_png_chunk(b"tRNS", b"\x00" * {0: 2, 2: 6, 3: 256}[color_type]))
    out.extend(_png_chunk(b"prIv", b"") for _ in range(extra_chunks))
    bomb = b"Comment\x00\x00" + zlib.compress(b"a" * (1 << 20), 9)
    out.extend(_png_chunk(b"zTXt", bomb) for _ in range(text_bombs))
    seq = 0
    if frames:
        out.append(_png_chunk(b"acTL", struct.pack(">II", frames + 1, 0)))
        out.append(
            _png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, width, height, 0, 0, 1, 10, 0, 0))
        )
        seq += 1
    out.extend(_png_chunk(b"IDAT", idat[i : i + chunk]) for i in range(0, len(idat), chunk))
    tiny = zlib.compress(b"\x00" * (1 + (channels * bit_depth + 7) // 8))
    for _ in range(frames):
        out.append(_png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, 1, 1, 0, 0, 1, 10, 0, 0)))
        out.append(_png_chunk(b"fdAT", struct.pack(">I", seq + 1) + tiny))
        seq += 2
    out.append(_png_chunk(b"IEND", b""))
    return b"".join(out)


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment, a scan's entropy-coded data included."""
    pos, out = 2, []
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            out.append((marker, pos, pos + 2))
            break
        end = pos + 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker == 0xDA:  # the scan's data runs to the next real marker
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] in (0x00, 0xFF) or 0xD0 <= data[end + 1] <= 0xD7:
                    end += 1
                    continue
                break
        out.append((marker, pos, end))
        pos = end
    return out


def jpeg_first_scan_only(size: tuple[int, int], mode: str = "RGB", subsampling: int = 0) -> bytes:
    """A progressive JPEG cut after its first (DC) scan: one scan, yet a whole-image buffer."""
    out = io.BytesIO()
    Image.new(mode, size, 128 if mode == "L" else None).save(
        out, "JPEG", progressive=True, quality=90, subsampling=subsampling
    )
    data = out.getvalue()
    first = next(end for marker, _, end in jpeg_segments(data) if marker == 0xDA)
    return data[:first] + b"\xff\xd9"


def jpeg_one_component_scan(size: tuple[int, int]) -> bytes:
    """A baseline 3-component frame whose only scan carries component 1 (non-interleaved)."""
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, "JPEG", quality=90, subsampling=0)
    data = out.getvalue()
    _, start, _ = next(s for s in jpeg_segments(data) if s[0] == 0xDA)
    length = struct.unpack(">H", data[start + 2 : start + 4])[0]
    sos = data[start + 4 : start + 2 + length]
    grey = io.BytesIO()
    Image.new("L", size, 80).save(grey, "JPEG", quality=90)
    g = grey.getvalue()
    segments = jpeg_segments(g)
    _, g_start, g_end = next(s for s in segments if s[0] == 0xDA)
    g_length = struct.unpack(">H", g[g_start + 2 : g_start + 4])[0]
    tables = b"".join(g[a:b] for marker, a, b in segments if marker in (0xC4, 0xDB))
    one = bytes([1, sos[1], sos[2], 0, 63, 0])  # Ns=1: component 1 only, full spectrum
    scan = b"\xff\xda" + struct.pack(">H", 2 + len(one)) + one
    return data[:start] + tables + scan + g[g_start + 2 + g_length : g_end] + b"\xff\xd9"


# Runs in a fresh interpreter: imports and warms every decoder, then reports
# what one reencode() added to the peak RSS (VmHWM, which sees C allocations;
# ru_maxrss would start from the parent's peak, which Linux keeps across
# exec) and the CPU it used. Both are behaviour bounds, not timings.
_MEASURE = """
import io, json, resource, sys, warnings
warnings.simplefilter("ignore")
from PIL import Image
from secure_app import uploads
for fmt in ("JPEG", "PNG", "WEBP"):
    warm = io.BytesIO()
    Image.new("RGB", (64, 64)).save(warm, fmt)
    uploads.reencode(warm.getvalue())
data = open(sys.argv[1], "rb").read()
def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
base = peak_kib()
before = resource.getrusage(resource.RUSAGE_SELF)
try:
    uploads.reencode(data)
    result = "accepted"
except uploads.UploadRefused as refused:
    result = str(refused)
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "rss_mib": (peak_kib() - base) / 1024,
    "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
    "result": result,
}))
"""


def measure_reencode(path: Path, timeout: float = 600) -> dict:
    """Run one ``uploads.reencode`` of the file at ``path`` in a fresh interpreter.

    Returns ``rss_mib`` (peak RSS it added), ``cpu_s`` and ``result``
    ("accepted", or the refusal's message).
    """
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return json.loads(done.stdout.splitlines()[-1])
