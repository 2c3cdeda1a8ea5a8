"""``flask export-data`` and ``import-data``: text -> PostgreSQL -> text gives back every byte."""

from __future__ import annotations

import io
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import images
from helpers import close_apps, database_rows, make_app, namespaced_url, stored_bytes
from secure_app.store import get_photos, get_store, new_user
from secure_app.store.text import FolderPhotos, TextStore, encode_line, read_records
from secure_app.store.transfer import MAX_PHOTO_BYTES
from secure_app.uploads import PROFILE_SIZE

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


def webp(
    size: tuple[int, int] = (8, 8), colour: tuple[int, int, int] = (200, 30, 90), **options: object
) -> bytes:
    """A small WebP, as uploads.py stores photos (``options`` go to Pillow: exif=, xmp=...)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "WEBP", **options)
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


def test_export_writes_every_record_and_photo_as_the_text_backend_keeps_them(app, runner, tmp_path):
    photos = fill(app, {"alice": ({"bio": "a"}, webp()), "bob": ({}, None), "carol": ({}, webp())})
    folder = tmp_path / "out"
    result = runner.invoke(args=["export-data", str(folder)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Exported 3 user(s) and 2 photo(s) to {folder}.\n"
    assert result.stderr == ""
    names = sorted(photos)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "photos",
        *(f"photos/{name}" for name in names),
        "users.jsonl",  # and no lock file: nothing serves this folder yet
    ]
    with app.app_context():
        store = get_store()
        assert read_records(folder / "users.jsonl") == {key: store.get(key) for key in store.keys()}
    assert {name: (folder / "photos" / name).read_bytes() for name in names} == photos
    # The records hold password hashes: the operator's alone. The photos are public anyway.
    assert stat.S_IMODE((folder / "users.jsonl").stat().st_mode) == 0o600
    assert {stat.S_IMODE((folder / "photos" / name).stat().st_mode) for name in names} == {0o644}


@pytest.mark.parametrize("exists", [True, False], ids=["into an empty folder", "into a new one"])
def test_an_export_of_no_users_is_an_export_folder_that_imports_nobody(runner, tmp_path, exists):
    folder = tmp_path / "backups" / "today"
    if exists:
        folder.mkdir(parents=True)
    result = runner.invoke(args=["export-data", str(folder)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Exported 0 user(s) and 0 photo(s) to {folder}.\n"
    assert [p.name for p in folder.iterdir()] == ["users.jsonl"]
    assert (folder / "users.jsonl").read_bytes() == b""
    assert stat.S_IMODE((folder / "users.jsonl").stat().st_mode) == 0o600
    target = make_app(tmp_path / "target")
    imported = target.test_cli_runner().invoke(args=["import-data", str(folder)])
    assert imported.exit_code == 0, imported.output
    assert imported.stdout == f"Imported 0 user(s) and 0 photo(s) from {folder}.\n"


def test_import_refuses_when_any_user_exists_and_imports_nobody(app, runner, tmp_path):
    source = make_app(tmp_path / "source")
    fill(source, {"carol": ({}, None), "alice": ({"bio": "theirs"}, webp()), "bob": ({}, None)})
    assert source.test_cli_runner().invoke(args=["export-data", str(tmp_path / "x")]).exit_code == 0
    fill(app, {"carol": ({"bio": "ours"}, None), "bob": ({"bio": "ours"}, None)})
    with app.app_context():
        before = get_store().get("bob"), get_store().keys(), get_photos().listing()
    result = runner.invoke(args=["import-data", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert result.stderr == "Error: nothing was imported: these users exist already: bob, carol\n"
    with app.app_context():
        assert (get_store().get("bob"), get_store().keys(), get_photos().listing()) == before


def test_import_of_a_folder_that_is_no_export_is_refused(runner, tmp_path):
    result = runner.invoke(args=["import-data", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {tmp_path} has no users.jsonl: not an export folder\n"


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


NAME, OTHER = "ab" * 16 + ".webp", "cd" * 16 + ".webp"  # names the server could have made
NOT_A_PHOTO = (
    "is not a photo the server stores "
    "(a whole WebP of at most 512 x 512 pixels without EXIF or XMP)"
)


def riff(body: bytes) -> bytes:
    """A RIFF WebP file around ``body`` (its chunks), its length field right."""
    return b"RIFF" + (4 + len(body)).to_bytes(4, "little") + b"WEBP" + body


def chunk(kind: bytes, data: bytes) -> bytes:
    """One RIFF chunk (``data`` of an even length: no padding byte)."""
    return kind + len(data).to_bytes(4, "little") + data


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
        (
            alice(photo="../../x.webp"),
            "alice: the photo name '../../x.webp' is not one the server makes",
        ),
        (
            alice(photo="/etc/shadow"),
            "alice: the photo name '/etc/shadow' is not one the server makes",
        ),
        ({**alice(), "username": "mallory"}, "'alice': its username field differs from its key"),
        (
            {k: v for k, v in alice().items() if k != "password_hash"},
            "'alice': it has no password hash",
        ),
        (alice(password_hash=""), "'alice': it has no password hash"),
        (alice(password_hash=["$argon2id$v=19$x"]), "'alice': it has no password hash"),
        (alice(sessions=["not", "a", "mapping"]), "'alice': its sessions are not a mapping"),
    ],
)
def test_import_refuses_a_hostile_record_and_writes_nothing(app, runner, tmp_path, record, why):
    folder = export_of(tmp_path, {"alice": record, "bob": {**new_user("bob", "$a$x")}}, {})
    before = stored_bytes(app)
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == 1
    assert result.stderr == f"Error: nothing was imported: {why}\n"
    assert stored_bytes(app) == before


@pytest.mark.parametrize("key", ["Alice", "nul\x00", "al/../ice", "x" * 40])
def test_import_refuses_a_key_that_is_no_username(app, runner, tmp_path, key):
    folder = export_of(tmp_path, {key: {**alice(), "username": key}}, {})
    before = stored_bytes(app)
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == 1
    assert (
        result.stderr == f"Error: nothing was imported: {key!r}: not a username the site accepts\n"
    )
    assert stored_bytes(app) == before


def test_import_moves_every_user_and_photo_and_says_how_many(app, runner, tmp_path):
    records = {
        "alice": alice(photo=NAME, bio="a"),
        "bob": {**new_user("bob", "$a$x"), "photo": OTHER},
        "carol": new_user("carol", "$a$x"),
    }
    photos = {NAME: webp(PROFILE_SIZE), OTHER: webp((1, 1))}  # the largest and the smallest
    folder = export_of(tmp_path, records, photos)
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Imported 3 user(s) and 2 photo(s) from {folder}.\n"
    assert result.stderr == ""
    with app.app_context():
        assert {key: get_store().get(key) for key in get_store().keys()} == records
        assert {name: get_photos().get(name).data for name in get_photos().listing()} == photos


def test_a_photo_missing_from_the_folder_is_named_and_its_user_imported_without_it(
    app, runner, tmp_path
):
    records = {
        "alice": alice(photo=NAME, bio="a"),
        "bob": {**new_user("bob", "$a$x"), "photo": OTHER},
    }
    folder = export_of(tmp_path, records, {})
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Imported 2 user(s) and 0 photo(s) from {folder}.\n"
    assert result.stderr == "Users whose photo was missing (their record was kept): alice, bob\n"
    with app.app_context():
        assert get_store().get("alice") == alice(photo=None, bio="a")
        assert get_store().get("bob")["photo"] is None and get_photos().listing() == {}


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(images.png(), id="a PNG"),
        pytest.param(images.jpeg(), id="a JPEG"),
        pytest.param(images.HTML, id="an HTML page"),
        pytest.param(riff(b"<script>alert(1)</script>"), id="HTML as a WebP"),
        pytest.param(images.truncated(webp()), id="a WebP cut short"),
        pytest.param(riff(chunk(b"VP8 ", webp()[20:40])), id="a WebP cut short, lengths mended"),
        pytest.param(images.polyglot_html(webp()), id="a WebP with HTML after it"),
        pytest.param(webp(exif=images.exif().tobytes()), id="a WebP with EXIF"),
        pytest.param(webp(xmp=images.XMP), id="a WebP with XMP"),
        pytest.param(webp((PROFILE_SIZE[0] + 1, 1)), id="a WebP too wide"),
        pytest.param(webp((1, PROFILE_SIZE[1] + 1)), id="a WebP too tall"),
    ],
)
def test_import_refuses_a_photo_the_server_could_not_have_stored(app, runner, tmp_path, data):
    """Import stores photo bytes as they are: only what uploads.py would have made gets in."""
    records = {"alice": alice(photo=NAME), "bob": {**new_user("bob", "$a$x"), "photo": OTHER}}
    folder = export_of(tmp_path, records, {NAME: data, OTHER: webp()})
    before = stored_bytes(app)
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == 1
    assert result.stderr == f"Error: nothing was imported: alice: photos/{NAME} {NOT_A_PHOTO}\n"
    assert stored_bytes(app) == before


def padded(data: bytes, size: int) -> bytes:
    """The WebP ``data`` grown to ``size`` bytes by a chunk that decoders skip."""
    body = data[12:]
    return riff(body + chunk(b"JUNK", bytes(size - len(data) - 8)))


@pytest.mark.parametrize(
    ("size", "imported"),
    # A RIFF file's length is even: the next size after the limit is two bytes more.
    [(MAX_PHOTO_BYTES, True), (MAX_PHOTO_BYTES + 2, False)],
    ids=["5 MiB", "5 MiB and 2 bytes"],
)
def test_import_reads_no_photo_file_over_5_mib(app, runner, tmp_path, size, imported):
    data = padded(webp(), size)
    assert len(data) == size
    folder = export_of(tmp_path, {"alice": alice(photo=NAME)}, {NAME: data})
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == (0 if imported else 1), result.output
    with app.app_context():
        assert get_photos().listing().keys() == ({NAME} if imported else set())


def test_import_refuses_a_photo_name_already_stored(app, runner, tmp_path):
    """Two accounts sharing one photo: deleting one would delete the other's."""
    with app.app_context():
        get_photos().put(NAME, webp((3, 3)))
        get_store().create("bob", {**new_user("bob", "$a$x"), "photo": NAME})
    folder = export_of(tmp_path, {"alice": alice(photo=NAME)}, {NAME: webp()})
    before = stored_bytes(app)
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: nothing was imported: alice: a photo named {NAME} is stored already\n"
    )
    assert stored_bytes(app) == before


def test_import_refuses_two_users_naming_one_photo(app, runner, tmp_path):
    """Deleting either account would delete the other's photo."""
    records = {"alice": alice(photo=NAME), "bob": {**new_user("bob", "$a$x"), "photo": NAME}}
    folder = export_of(tmp_path, records, {NAME: webp()})
    before = stored_bytes(app)
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == 1
    assert (
        result.stderr == f"Error: nothing was imported: bob: a photo named {NAME} is alice's too\n"
    )
    assert stored_bytes(app) == before


def test_a_refused_import_names_every_problem_not_only_the_first(app, runner, tmp_path):
    taken = "ef" * 16 + ".webp"
    with app.app_context():
        get_photos().put(taken, webp())
        for key in ("ivan", "judy"):
            get_store().create(key, new_user(key, "$ours$"))
    records = {
        "judy": new_user("judy", "$theirs$"),
        "Alice": {**new_user("Alice", "$a$x")},
        "bob": {**new_user("bob", "$a$x"), "photo": "../x.webp"},
        "carol": {**new_user("carol", "$a$x"), "photo": NAME},
        "dave": {**new_user("dave", "$a$x"), "photo": taken},
        "frank": {**new_user("frank", "$a$x"), "photo": NAME},
        "erin": {**new_user("erin", "$a$x"), "sessions": []},
        "ivan": new_user("ivan", "$theirs$"),
    }
    folder = export_of(tmp_path, records, {NAME: images.png(), taken: webp()})
    before = stored_bytes(app)
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: nothing was imported: these users exist already: ivan, judy; "
        "'Alice': not a username the site accepts; "
        "bob: the photo name '../x.webp' is not one the server makes; "
        f"carol: photos/{NAME} {NOT_A_PHOTO}; "
        f"dave: a photo named {taken} is stored already; "
        f"frank: a photo named {NAME} is carol's too; "
        "'erin': its sessions are not a mapping"
    ]
    assert stored_bytes(app) == before


def test_a_user_registered_during_the_import_keeps_their_account(
    app, runner, tmp_path, monkeypatch
):
    """Import creates, never overwrites: a sign-up landing first stays; the operator is told."""
    folder = export_of(tmp_path, {"alice": alice(), "bob": new_user("bob", "$theirs$")}, {})
    store = app.extensions["secure_app.store"]
    create = store.create

    def sign_up_meanwhile(key, record):
        if key == "alice":  # bob registers on the site while alice is being imported
            assert create("bob", new_user("bob", "$ours$"))
        return create(key, record)

    monkeypatch.setattr(store, "create", sign_up_meanwhile)
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == 1
    assert result.stderr == "Error: bob was created meanwhile; the users before it were imported\n"
    with app.app_context():
        assert get_store().get("alice") == alice()
        assert get_store().get("bob")["password_hash"] == "$ours$"


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
    assert refused.exit_code == 1
    assert refused.stderr == (
        f"Error: cannot read {linked / 'users.jsonl'}: Too many levels of symbolic links\n"
    )
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
    assert refused.exit_code == 1
    assert refused.stderr == (
        "Error: nothing was imported: "
        "photos/ is a symlink: an export folder holds its photos itself\n"
    )


def test_import_leaves_the_folder_it_reads_exactly_as_it_was(app, runner, tmp_path):
    folder = export_of(tmp_path, {"alice": alice()}, {})
    path = folder / "users.jsonl"
    path.write_bytes(path.read_bytes().rstrip(b" \n") + b"\n# a line added by hand\n")
    before = {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    result = runner.invoke(args=["import-data", str(folder)])
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
