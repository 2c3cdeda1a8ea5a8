"""``flask export-data`` and ``import-data``: text -> PostgreSQL -> text gives back every byte."""

from __future__ import annotations

import io
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from helpers import close_apps, database_rows, make_app, namespaced_url, stored_bytes
from secure_app.store import get_photos, get_store, new_user
from secure_app.store.text import FolderPhotos, TextStore, encode_line, read_records

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)
usernames = st.from_regex(r"[a-z0-9._-]{3,32}", fullmatch=True)
values = st.recursive(
    st.one_of(any_text, st.integers(), st.booleans(), st.none()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(any_text, inner, max_size=3)
    ),
    max_leaves=8,
)
# Field names a record's shape fixes (new_user) are left to it: import checks them.
field_names = any_text.filter(lambda k: k not in ("username", "password_hash", "sessions", "photo"))
webp_photos = st.builds(
    lambda size, colour: webp(size, colour),
    st.tuples(st.integers(1, 24), st.integers(1, 24)),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)),
)
users = st.dictionaries(
    usernames,
    st.tuples(st.dictionaries(field_names, values, max_size=4), st.none() | webp_photos),
    max_size=4,
)


def webp(size: tuple[int, int] = (8, 8), colour: tuple[int, int, int] = (200, 30, 90)) -> bytes:
    """A small WebP, as uploads.py stores photos."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "WEBP")
    return buffer.getvalue()


def fill(app, generated) -> dict[str, bytes]:
    """Store the generated users (and photos) through the app's backend; return the photos."""
    stored_photos = {}
    with app.app_context():
        for username, (fields, photo) in generated.items():
            record = {**new_user(username, "$argon2id$v=19$x"), **fields}
            record["photo"] = None
            if photo is not None:
                name = secrets.token_hex(16) + ".webp"
                get_photos().put(name, photo)
                record["photo"] = name
                stored_photos[name] = photo
            assert get_store().create(username, record)
    return stored_photos


def exported(folder: Path) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """An export folder's lines by user, and its photos by name, as bytes."""
    store = TextStore(folder)
    try:
        lines = {key: encode_line(key, store.get(key)) for key in store.keys()}
    finally:
        store.close()
    photos = FolderPhotos(folder / "photos").listing()
    return lines, {name: (folder / "photos" / name).read_bytes() for name in photos}


@given(generated=users)
def test_text_to_postgres_to_text_round_trip_is_exact(postgres_server, generated):
    tmp = Path(tempfile.mkdtemp(prefix="transfer-"))
    try:
        text_app = make_app(tmp / "text", DATABASE_URL=None)  # the text database, on any pass
        photos = fill(text_app, generated)
        first, second = tmp / "first", tmp / "second"
        out = text_app.test_cli_runner().invoke(args=["export-data", str(first)])
        assert out.exit_code == 0, out.output

        url = namespaced_url(postgres_server.url(), str(tmp / "pg"))
        pg_app = make_app(tmp / "pg", DATABASE_URL=url)
        result = pg_app.test_cli_runner().invoke(args=["import-data", str(first)])
        assert result.exit_code == 0, result.output
        assert f"Imported {len(generated)} user(s) and {len(photos)} photo(s)" in result.output
        assert len(database_rows(url)) == len(generated) + len(photos)
        out = pg_app.test_cli_runner().invoke(args=["export-data", str(second)])
        assert out.exit_code == 0, out.output

        lines, photo_bytes = exported(second)
        assert exported(first) == (lines, photo_bytes)
        with text_app.app_context():  # and both equal what the text database holds
            store = get_store()
            assert lines == {key: encode_line(key, store.get(key)) for key in store.keys()}
        assert photo_bytes == photos
    finally:
        close_apps()
        shutil.rmtree(tmp, ignore_errors=True)


def test_export_refuses_a_folder_that_is_not_empty_and_writes_nothing(app, runner, tmp_path):
    fill(app, {"alice": ({"bio": "x"}, webp())})
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    result = runner.invoke(args=["export-data", str(folder)])
    assert result.exit_code == 1
    assert "is not empty" in result.output and "Traceback" not in result.output
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


def test_import_refuses_when_any_user_exists_and_imports_nobody(app, runner, tmp_path):
    source = make_app(tmp_path / "source")
    fill(source, {"alice": ({"bio": "theirs"}, webp()), "bob": ({}, None)})
    assert source.test_cli_runner().invoke(args=["export-data", str(tmp_path / "x")]).exit_code == 0
    fill(app, {"bob": ({"bio": "ours"}, None)})
    with app.app_context():
        before = get_store().get("bob"), get_store().keys(), get_photos().listing()
    result = runner.invoke(args=["import-data", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "nothing was imported: these users exist already: bob" in result.output
    with app.app_context():
        assert (get_store().get("bob"), get_store().keys(), get_photos().listing()) == before


def test_import_of_a_folder_that_is_no_export_is_refused(runner, tmp_path):
    result = runner.invoke(args=["import-data", str(tmp_path)])
    assert result.exit_code == 1
    assert "not an export folder" in result.output


def test_a_missing_photo_is_reported_and_the_record_still_moves(app, runner, tmp_path):
    fill(app, {"alice": ({}, webp())})
    with app.app_context():
        name = get_store().get("alice")["photo"]
        get_photos().remove(name)
    result = runner.invoke(args=["export-data", str(tmp_path / "out")])
    assert result.exit_code == 0
    assert "Exported 1 user(s) and 0 photo(s)" in result.output
    assert "photo was missing (their record was kept): alice" in result.output
    lines, photos = exported(tmp_path / "out")
    assert list(lines) == ["alice"] and photos == {}


# -- an export folder is input from outside (the live attack on issue 18) --------------------


def export_of(tmp_path: Path, records: dict[str, dict], photos: dict[str, bytes]) -> Path:
    """An export folder as someone could hand it over: any records, any files in photos/."""
    folder = tmp_path / "handed-over"
    store = TextStore(folder)
    for key, record in records.items():
        store.create(key, record)
    store.close()
    (folder / "photos").mkdir()
    for name, data in photos.items():
        (folder / "photos" / name).write_bytes(data)
    return folder


def alice(**fields: object) -> dict:
    return {**new_user("alice", "$argon2id$v=19$x"), **fields}


@pytest.mark.parametrize(
    "photo",
    ["../../../outside.webp", "/tmp/outside.webp", "..", "x" * 32 + ".webp", {"a": 1}, 7, "a\x00"],
)
def test_export_never_writes_outside_its_folder_whatever_a_record_names(
    app, runner, tmp_path, photo
):
    """A row written by whoever holds the web role must not aim the operator's export."""
    with app.app_context():
        get_store().create("alice", alice(photo=photo))
    out = tmp_path / "deep" / "er" / "out"
    result = runner.invoke(args=["export-data", str(out)])
    assert result.exit_code == 0, result.output
    assert "photo was missing (their record was kept): alice" in result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["users.jsonl"]
    assert read_records(out / "users.jsonl")["alice"]["photo"] is None  # so it imports again
    assert (
        not (tmp_path / "deep" / "outside.webp").exists() and not Path("/tmp/outside.webp").exists()
    )


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (alice(photo="../../victim.webp"), "is not one the server makes"),
        (alice(photo="/etc/shadow"), "is not one the server makes"),
        ({**alice(), "username": "mallory"}, "username field differs"),
        ({k: v for k, v in alice().items() if k != "password_hash"}, "no password hash"),
        (alice(sessions=["not", "a", "mapping"]), "sessions are not a mapping"),
    ],
)
def test_import_refuses_a_hostile_record_and_writes_nothing(app, runner, tmp_path, record, why):
    folder = export_of(tmp_path, {"alice": record, "bob": {**new_user("bob", "$a$x")}}, {})
    before = stored_bytes(app)
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == 1
    assert "nothing was imported" in result.output and why in result.output
    assert "Traceback" not in result.output
    assert stored_bytes(app) == before


@pytest.mark.parametrize("key", ["Alice", "nul\x00", "al/../ice", "x" * 40])
def test_import_refuses_a_key_that_is_no_username(app, runner, tmp_path, key):
    folder = export_of(tmp_path, {key: {**alice(), "username": key}}, {})
    before = stored_bytes(app)
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == 1 and "not a username the site accepts" in result.output
    assert stored_bytes(app) == before


def test_import_refuses_a_photo_that_is_not_a_webp_image(app, runner, tmp_path):
    name = "ab" * 16 + ".webp"
    html = b"RIFF\x00\x00\x00\x00WEBP<script>alert(1)</script>"
    folder = export_of(tmp_path, {"alice": alice(photo=name)}, {name: html})
    before = stored_bytes(app)
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == 1 and "is not a WebP image" in result.output
    assert stored_bytes(app) == before


def test_import_refuses_a_photo_name_already_stored(app, runner, tmp_path):
    """Two accounts sharing one photo: deleting one would delete the other's."""
    name = "ab" * 16 + ".webp"
    with app.app_context():
        get_photos().put(name, webp((3, 3)))
        get_store().create("bob", {**new_user("bob", "$a$x"), "photo": name})
    folder = export_of(tmp_path, {"alice": alice(photo=name)}, {name: webp()})
    before = stored_bytes(app)
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == 1 and "is stored already" in result.output
    assert stored_bytes(app) == before


def test_import_follows_no_symlink_to_a_photo_or_to_the_data_file(app, client, runner, tmp_path):
    secret = tmp_path / "secret_keys.json"
    secret.write_bytes(b'{"current": "the signing key"}')
    name = "ab" * 16 + ".webp"
    folder = export_of(tmp_path, {"alice": alice(photo=name)}, {})
    (folder / "photos" / name).symlink_to(secret)
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == 0, result.output
    assert "photo was missing (their record was kept): alice" in result.output
    assert b"the signing key" not in b"".join(stored_bytes(app).values())
    assert client.get(f"/public/images/profile/{name}").status_code == 404

    victim = tmp_path / "victim.conf"
    victim.write_bytes(b"setting = 1\n")
    linked = tmp_path / "linked"
    (linked / "photos").mkdir(parents=True)
    (linked / "users.jsonl").symlink_to(victim)
    refused = runner.invoke(args=["import-data", str(linked)])
    assert refused.exit_code == 1 and "cannot read" in refused.output
    assert victim.read_bytes() == b"setting = 1\n"


def test_import_never_waits_on_a_fifo_or_reads_a_symlinked_photo_folder(app, runner, tmp_path):
    name = "ab" * 16 + ".webp"
    folder = export_of(tmp_path, {"alice": alice(photo=name)}, {})
    os.mkfifo(folder / "photos" / name)  # opening it for reading would wait for a writer
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == 0 and "photo was missing" in result.output
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / name).write_bytes(webp())
    other = export_of(tmp_path / "x", {"bob": {**new_user("bob", "$a$x"), "photo": name}}, {})
    (other / "photos").rmdir()
    (other / "photos").symlink_to(elsewhere)
    refused = runner.invoke(args=["import-data", str(other)])
    assert refused.exit_code == 1 and "photos/ is a symlink" in refused.output


def test_import_leaves_the_folder_it_reads_exactly_as_it_was(app, runner, tmp_path):
    folder = export_of(tmp_path, {"alice": alice()}, {})
    path = folder / "users.jsonl"
    path.write_bytes(path.read_bytes().rstrip(b" \n") + b"\n# a line added by hand\n")
    before = {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
