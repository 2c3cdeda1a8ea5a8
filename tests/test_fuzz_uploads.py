"""Hypothesis against the photo upload: random, mutated and truncated bytes, hostile filenames.

Through the real handler (multipart POST to ``/account-details``) and straight
at ``uploads``. Properties: never a 5xx; nothing written outside the photo
folder; either exactly one new clean WebP replaced the old photo, or nothing
changed at all.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from flask import Flask, request
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import images
from helpers import AuthActions, csrf_token, database_rows, make_app, photo_bytes, photo_names
from secure_app import ROOT, uploads
from secure_app.store.text import FolderPhotos

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

REAL = [
    images.jpeg((64, 48)),
    images.jpeg((64, 48), metadata=True, orientation=images.ROTATE_90_CW),
    images.jpeg((64, 48), progressive=True),
    images.png((64, 48), metadata=True),
    images.png((64, 48), mode="RGBA"),
    images.png((64, 48), mode="P"),
    images.webp((64, 48), metadata=True),
    images.webp((64, 48), lossless=True, mode="RGBA"),
]
HOSTILE_NAMES = [
    "../../../../etc/passwd",
    "../data/users.jsonl",
    "..\\..\\windows\\win.ini",
    "/etc/passwd",
    "/tmp/x.png",
    "C:\\Windows\\win.ini",
    "photo.png\x00.html",
    "photo\x00",
    "a\r\nContent-Type: text/html\r\n\r\n<script>",
    "\x1b[31mred.png",
    "CON",
    "NUL.png",
    "COM1.jpg",
    "LPT9.webp",
    "aux",
    "ｐｈｏｔｏ．ｐｎｇ",  # full-width look-alikes
    "..\u2215..\u2215victim.png",  # division slash
    "\u202egnp.lmth",  # right-to-left override: shows as "html.png"
    "x" * 5000 + ".png",
    ".htaccess",
    ".",
    "..",
    "",
    "photo.svg",
    "index.html",
    "%2e%2e%2fvictim.png",
    "0" * 32 + ".webp",  # a name that looks server-made
]
CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            "image/png",
            "image/jpeg",
            "image/webp",
            "image/svg+xml",
            "text/html",
            "application/zip",
            "application/octet-stream",
        ]
    ),
    st.from_regex(r"[a-z]{1,12}/[a-z0-9.+-]{1,24}", fullmatch=True),
)
FILENAMES = st.one_of(st.sampled_from(HOSTILE_NAMES), st.text(max_size=300))


@st.composite
def mutated(draw) -> bytes:
    """A real image with a few bytes overwritten anywhere, header included."""
    data = bytearray(draw(st.sampled_from(REAL)))
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


truncated = st.builds(
    lambda data, cut: data[: cut % len(data)], st.sampled_from(REAL), st.integers(0, 10_000)
)
with_suffix = st.builds(
    lambda data, tail: data + tail, st.sampled_from(REAL), st.binary(min_size=1, max_size=200)
)
BODIES = st.one_of(
    st.binary(max_size=2000),
    st.sampled_from(REAL),
    mutated(),
    truncated,
    with_suffix,
    st.sampled_from([images.SVG, images.HTML, images.zip_archive()]),
)
ALLOWED_CHUNKS = {b"VP8 ", b"VP8L", b"VP8X", b"ALPH"}
# An upload example costs milliseconds: run several times the profile's count,
# so the "thorough" profile scales these up too.
MORE = settings(max_examples=settings().max_examples * 5)


def assert_clean_webp(data: bytes) -> None:
    assert set(images.webp_chunks(data)) <= ALLOWED_CHUNKS
    assert images.SECRET not in data
    img = Image.open(io.BytesIO(data), formats=["WEBP"])
    img.load()
    assert max(img.size) <= max(uploads.PROFILE_SIZE)
    assert not set(img.info) & {"exif", "icc_profile", "xmp"}


_echo = Flask("echo")


@_echo.post("/")
def _echo_filename() -> str:
    upload = request.files.get("photo")
    return "1" if upload is not None and upload.filename else "0"


_ECHO = _echo.test_client()


def _transmittable(filename: str) -> bool:
    """True when the server receives this name as a file part with a filename at all.

    The test client's multipart encoding drops or cuts some names (a CR or LF
    breaks the part; a quote ends the name), so ask a bare Flask app what
    arrives instead of guessing.
    """
    sent = {"photo": (io.BytesIO(b"x"), filename, "application/octet-stream")}
    return _ECHO.post("/", data=sent).data == b"1"


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its contents, by relative path."""
    return {
        str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()
    }


def repo_photo_folder() -> list[str]:
    folder = ROOT / "public" / "images" / "profile"
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_fuzzed_uploads_never_5xx_and_either_replace_the_photo_or_change_nothing(tmp_path):
    app = make_app(tmp_path / "site")
    client = app.test_client()
    root = tmp_path / "site"
    photo_dir = Path(app.config["PHOTO_DIR"])
    store = app.extensions["secure_app.store"]
    auth = AuthActions(client)
    assert auth.register().status_code == 302
    assert auth.login().status_code == 302
    token = csrf_token(client, "/account-details")  # valid for the whole session
    repo_before = repo_photo_folder()

    def snapshot() -> dict[str, bytes]:
        """Every file under the site's folder, and every row when it is on PostgreSQL."""
        url = app.config.get("DATABASE_URL")
        return {**tree(root), **(database_rows(url) if url else {})}

    def is_photo(path: str) -> bool:
        return path.startswith("postgres:photos/") or (root / path).is_relative_to(photo_dir)

    @MORE
    @given(body=BODIES, filename=FILENAMES, content_type=CONTENT_TYPES)
    def upload(body: bytes, filename: str, content_type: str) -> None:
        before = snapshot()
        old = store.get("alice")["photo"]
        response = client.post(
            "/account-details",
            data={
                "csrf_token": token,
                "full_name": "Alice",
                "photo": (io.BytesIO(body), filename, content_type),
            },
            content_type="multipart/form-data",
        )
        assert response.status_code < 500
        after = snapshot()
        outside = {p for p in set(before) | set(after) if not is_photo(p)}
        new = store.get("alice")["photo"]
        if response.status_code == 303 and new == old:
            # The server saw no file (a browser sends an empty filename when none was
            # chosen; a CR/LF in the name breaks the client's multipart part): only the
            # details were saved, the photo folder is as it was.
            assert not _transmittable(filename)
            assert {p for p in after if p not in outside} == {p for p in before if p not in outside}
        elif response.status_code == 303:
            # Exactly one new clean photo replaced the old one, and it is served.
            assert new != old and uploads.NAME_RE.match(new)
            assert photo_names(app) == [new]
            assert_clean_webp(photo_bytes(app, new))
            served = client.get(f"/public/images/profile/{new}")
            assert served.status_code == 200 and served.mimetype == "image/webp"
            assert served.data == photo_bytes(app, new)
            changed = {p for p in outside if before.get(p) != after.get(p)}
            # only the record changed elsewhere
            assert changed <= {"data/users.jsonl", "postgres:users/alice"}
        else:
            assert response.status_code in (400, 413, 422), response.status_code
            assert after == before  # nothing at all changed
            assert new == old
        if body in REAL and _transmittable(filename):
            # A real image must always be accepted, whatever its name and declared type.
            assert response.status_code == 303
        assert repo_photo_folder() == repo_before

    upload()


@MORE
@given(body=BODIES)
def test_reencode_either_refuses_or_returns_a_clean_webp(body):
    try:
        out = uploads.reencode(body)
    except uploads.UploadRefused as refused:
        assert str(refused)  # a message for the user, never an empty one
        return
    assert_clean_webp(out)
    if body in REAL:
        return
    # Anything accepted must have decoded completely as one of the three formats.
    fmt = Image.open(io.BytesIO(body)).format
    assert fmt in uploads.ALLOWED_FORMATS


@given(name=st.one_of(st.sampled_from(HOSTILE_NAMES), st.text(max_size=300)))
def test_remove_never_deletes_anything_for_a_hostile_name(tmp_path_factory, name):
    root = tmp_path_factory.mktemp("remove")
    folder = root / "photos"
    folder.mkdir()
    victims = [root / "victim.png", root / "users.jsonl", folder / "keep.png"]
    for victim in victims:
        victim.write_bytes(b"keep")
    uploads.remove(FolderPhotos(folder), name)
    assert all(victim.exists() for victim in victims)


@given(body=st.binary(max_size=1000))
def test_save_writes_only_a_server_named_file_inside_the_folder(tmp_path_factory, body):
    root = tmp_path_factory.mktemp("save")
    folder = root / "photos"
    name = uploads.save(body, FolderPhotos(folder))
    assert uploads.NAME_RE.match(name)
    assert tree(root) == {f"photos/{name}": body}
