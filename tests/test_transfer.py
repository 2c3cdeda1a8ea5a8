"""``flask export-data`` and ``import-data``: text -> PostgreSQL -> text gives back every byte."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from helpers import close_apps, database_rows, make_app, namespaced_url
from secure_app.store import get_photos, get_store, new_user
from secure_app.store.text import FolderPhotos, TextStore, encode_line

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)
usernames = st.from_regex(r"[a-z0-9._-]{3,32}", fullmatch=True)
values = st.recursive(
    st.one_of(any_text, st.integers(), st.booleans(), st.none()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(any_text, inner, max_size=3)
    ),
    max_leaves=8,
)
users = st.dictionaries(
    usernames,
    st.tuples(
        st.dictionaries(any_text, values, max_size=4),
        st.one_of(st.none(), st.binary(min_size=1, max_size=2000)),
    ),
    max_size=4,
)


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
    fill(app, {"alice": ({"bio": "x"}, b"photo")})
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    result = runner.invoke(args=["export-data", str(folder)])
    assert result.exit_code == 1
    assert "is not empty" in result.output and "Traceback" not in result.output
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


def test_import_refuses_when_any_user_exists_and_imports_nobody(app, runner, tmp_path):
    source = make_app(tmp_path / "source")
    fill(source, {"alice": ({"bio": "theirs"}, b"a"), "bob": ({}, None)})
    assert source.test_cli_runner().invoke(args=["export-data", str(tmp_path / "x")]).exit_code == 0
    fill(app, {"bob": ({"bio": "ours"}, None)})
    with app.app_context():
        before = get_store().get("bob"), get_store().keys(), get_photos().listing()
    result = runner.invoke(args=["import-data", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "exist already, nothing was imported: bob" in result.output
    with app.app_context():
        assert (get_store().get("bob"), get_store().keys(), get_photos().listing()) == before


def test_import_of_a_folder_that_is_no_export_is_refused(runner, tmp_path):
    result = runner.invoke(args=["import-data", str(tmp_path)])
    assert result.exit_code == 1
    assert "not an export folder" in result.output


def test_a_missing_photo_is_reported_and_the_record_still_moves(app, runner, tmp_path):
    fill(app, {"alice": ({}, b"a photo")})
    with app.app_context():
        name = get_store().get("alice")["photo"]
        get_photos().remove(name)
    result = runner.invoke(args=["export-data", str(tmp_path / "out")])
    assert result.exit_code == 0
    assert "Exported 1 user(s) and 0 photo(s)" in result.output
    assert "photo was missing (their record was kept): alice" in result.output
    lines, photos = exported(tmp_path / "out")
    assert list(lines) == ["alice"] and photos == {}
