"""uploads.py on its own: bytes judged by decoding, bombs, polyglots, metadata, naming, removal."""

from __future__ import annotations

import io
import os
import stat

import pytest
from PIL import Image

import images
from secure_app import uploads
from secure_app.store import StoreError

# Bomb headers past Pillow's own warning threshold make it warn before we refuse.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

ALLOWED_CHUNKS = {b"VP8 ", b"VP8L", b"VP8X", b"ALPH"}


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data), formats=["WEBP"])
    img.load()
    return img


def assert_clean_webp(data: bytes) -> Image.Image:
    """The output is a WebP with pixel chunks only, and no trace of any planted metadata."""
    assert set(images.webp_chunks(data)) <= ALLOWED_CHUNKS
    assert images.SECRET not in data
    img = decode(data)
    assert img.format == "WEBP"
    assert not set(img.info) & {"exif", "icc_profile", "xmp"}
    assert len(img.getexif()) == 0
    return img


@pytest.mark.parametrize(
    "data",
    [
        images.jpeg(),
        images.jpeg((300, 200), progressive=True),
        images.png(),
        images.png(mode="RGBA"),
        images.png(mode="P"),
        images.png(mode="L"),
        images.png(mode="I;16"),
        images.webp(),
        images.webp(lossless=True, mode="RGBA"),
    ],
    ids=[
        "jpeg",
        "jpeg-progressive",
        "png",
        "png-rgba",
        "png-palette",
        "png-grey",
        "png-16bit",
        "webp",
        "webp-lossless-alpha",
    ],
)
def test_real_images_are_reencoded_as_webp(data):
    img = assert_clean_webp(uploads.reencode(data))
    assert img.size in ((40, 20), (300, 200))


def test_large_photo_is_scaled_down_to_profile_size():
    img = decode(uploads.reencode(images.png((1200, 600))))
    assert img.size == (512, 256)


@pytest.mark.parametrize("maker", [images.jpeg, images.png, images.webp])
def test_exif_gps_xmp_icc_and_text_chunks_do_not_survive(maker):
    data = maker(metadata=True)
    assert images.SECRET in data  # the planted metadata is really there before
    assert_clean_webp(uploads.reencode(data))


@pytest.mark.parametrize("maker", [images.jpeg, images.png])
def test_exif_orientation_is_applied_to_the_pixels(maker):
    # Stored 40x20 with red on the left, tagged "rotate 90 degrees clockwise".
    img = assert_clean_webp(uploads.reencode(maker(orientation=images.ROTATE_90_CW))).convert("RGB")
    assert img.size == (20, 40)
    red, blue = img.getpixel((10, 5)), img.getpixel((10, 35))
    assert red[0] > 200 and red[2] < 60, red  # red now on top
    assert blue[2] > 200 and blue[0] < 60, blue


@pytest.mark.parametrize(
    "bomb",
    [
        images.png_bomb(12_001, 1),  # one pixel too wide
        images.png_bomb(1, 12_001),
        images.png_bomb(8_000, 7_000),  # 56 MP: under Pillow's own limits, over ours
        images.png_bomb(100_000, 100_000),
        images.jpeg_bomb(8_000, 7_000),
        images.jpeg_bomb(65_000, 65_000),
        images.webp_bomb(8_000, 7_000),
        images.webp_bomb(16_000, 16_000),
    ],
    ids=[
        "png-wide",
        "png-tall",
        "png-56mp",
        "png-10gp",
        "jpeg-56mp",
        "jpeg-4gp",
        "webp-56mp",
        "webp-256mp",
    ],
)
def test_decompression_bombs_are_refused_from_the_header(bomb):
    # Each bomb is a header and almost no pixels: had the decoder run, it would
    # have failed as "truncated", so "too large" proves the header check came first.
    with pytest.raises(uploads.UploadRefused, match="too large"):
        uploads.reencode(bomb)


def test_limits_allow_an_image_exactly_12000_pixels_wide():
    img = decode(uploads.reencode(images.png((12_000, 4))))
    assert img.size == (512, 1)  # thumbnail keeps at least one row


@pytest.mark.parametrize("maker", [images.jpeg, images.png, images.webp])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.99])
def test_truncated_images_are_refused(maker, keep):
    data = maker((300, 200))
    with pytest.raises(uploads.UploadRefused, match="read completely"):
        uploads.reencode(images.truncated(data, keep))


@pytest.mark.parametrize("maker", [images.jpeg, images.png, images.webp])
@pytest.mark.parametrize(
    "disguise",
    [images.polyglot_html, images.polyglot_zip, images.polyglot_jpeg_disguised],
    ids=["html", "zip", "html-ending-in-ffd9"],
)
def test_polyglots_with_appended_html_or_zip_are_refused(maker, disguise):
    data = disguise(maker())
    Image.open(io.BytesIO(data)).load()  # Pillow alone would happily read it
    with pytest.raises(uploads.UploadRefused, match="read completely"):
        uploads.reencode(data)


def _other_format(fmt: str) -> bytes:
    out = io.BytesIO()
    images.picture().save(out, fmt)
    return out.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        images.SVG,
        images.HTML,
        b"just some text, named photo.png",
        images.zip_archive(),
        b"",
        _other_format("GIF"),
        _other_format("BMP"),
        _other_format("TIFF"),
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
    ],
    ids=["svg", "html", "text", "zip", "empty", "gif", "bmp", "tiff", "pdf"],
)
def test_anything_but_jpeg_png_webp_is_refused(data):
    with pytest.raises(uploads.UploadRefused, match="JPEG, PNG or WebP"):
        uploads.reencode(data)


def test_read_limited_refuses_one_byte_over_five_mib():
    limit = uploads.MAX_BYTES
    assert len(uploads.read_limited(io.BytesIO(b"x" * limit))) == limit
    with pytest.raises(uploads.UploadRefused, match="5 MiB"):
        uploads.read_limited(io.BytesIO(b"x" * (limit + 1)))


def test_save_makes_a_random_128_bit_name_and_leaves_no_temporary_file(tmp_path):
    first = uploads.save(b"one", tmp_path)
    second = uploads.save(b"two", tmp_path)
    assert uploads.NAME_RE.match(first) and uploads.NAME_RE.match(second)
    assert first != second
    assert sorted(os.listdir(tmp_path)) == sorted([first, second])
    assert (tmp_path / first).read_bytes() == b"one"
    assert stat.S_IMODE((tmp_path / first).stat().st_mode) == 0o644


def test_save_failure_raises_store_error_and_writes_nothing(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    with pytest.raises(StoreError):
        uploads.save(b"data", blocker / "photos")
    assert os.listdir(tmp_path) == ["not-a-folder"]


@pytest.mark.parametrize(
    "name",
    ["../victim.webp", "/etc/passwd", "victim", "0" * 32 + ".webp/../../victim", None, ""],
)
def test_remove_ignores_names_the_server_could_not_have_made(tmp_path, name):
    photos = tmp_path / "photos"
    photos.mkdir()
    victim = tmp_path / "victim.webp"
    victim.write_bytes(b"keep me")
    (photos / "victim").write_bytes(b"keep me too")
    uploads.remove(photos, name)
    assert victim.exists() and (photos / "victim").exists()


def test_remove_deletes_a_stored_photo(tmp_path):
    name = uploads.save(b"x", tmp_path)
    uploads.remove(tmp_path, name)
    assert os.listdir(tmp_path) == []


def test_photo_url_for_a_temporary_upload_file_goes_to_the_photo_view_not_static(app):
    # The photo folder is inside the static folder by default: the photo view,
    # which serves only server-made names, must win over Flask's static route.
    adapter = app.url_map.bind("localhost")
    for name in (".upload-abc.tmp", "x.html", "0" * 32 + ".webp"):
        endpoint, _ = adapter.match(f"/public/images/profile/{name}")
        assert endpoint == "account.photo"
    client = app.test_client()
    assert client.get("/public/images/profile/.upload-abc.tmp").status_code == 404
