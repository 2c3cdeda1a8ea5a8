"""The ``flask`` commands: create-user (piped input, refusals), rotate-secret-key, prune-photos."""

from __future__ import annotations

import io
import json
import os
import stat
import time
from pathlib import Path

import pytest

from helpers import OTHER_PASSWORD, PASSWORD, AuthActions, csrf_token
from images import png
from secure_app import create_app
from secure_app.config import KEYS_FILE
from secure_app.store import get_store


def _stored(app, username: str):
    with app.app_context():
        return get_store().get(username)


def test_create_user_reads_two_lines_from_piped_stdin(app, runner, client):
    result = runner.invoke(args=["create-user", "Bob"], input=f"{PASSWORD}\n{PASSWORD}\n")
    assert result.exit_code == 0, result.output
    assert "Created user bob." in result.output
    assert PASSWORD not in result.output
    assert _stored(app, "bob")["password_hash"].startswith("$argon2id$")
    assert AuthActions(client).login("bob", PASSWORD).status_code == 302


def test_create_user_keeps_spaces_in_the_password(app, runner, client):
    padded = f"  {PASSWORD} "
    result = runner.invoke(args=["create-user", "bob"], input=f"{padded}\r\n{padded}\r\n")
    assert result.exit_code == 0, result.output
    assert AuthActions(client).login("bob", PASSWORD).status_code == 200
    assert AuthActions(client).login("bob", padded).status_code == 302


def test_create_user_refuses_mismatched_passwords(app, runner):
    result = runner.invoke(args=["create-user", "bob"], input=f"{PASSWORD}\n{OTHER_PASSWORD}\n")
    assert result.exit_code == 1
    assert "do not match" in result.output
    assert "Traceback" not in result.output
    assert _stored(app, "bob") is None


def test_create_user_refuses_a_weak_password(app, runner):
    result = runner.invoke(
        args=["create-user", "bob"], input="passwordpassword\npasswordpassword\n"
    )
    assert result.exit_code == 1
    assert "too easy to guess" in result.output
    assert _stored(app, "bob") is None


def test_create_user_refuses_a_short_password(app, runner):
    result = runner.invoke(args=["create-user", "bob"], input="short\nshort\n")
    assert result.exit_code == 1
    assert "at least 15 characters" in result.output
    assert _stored(app, "bob") is None


def test_create_user_refuses_missing_input(app, runner):
    result = runner.invoke(args=["create-user", "bob"], input="")
    assert result.exit_code == 1
    assert _stored(app, "bob") is None


def test_create_user_refuses_a_duplicate_and_keeps_the_first(app, runner, client):
    runner.invoke(args=["create-user", "bob"], input=f"{PASSWORD}\n{PASSWORD}\n")
    result = runner.invoke(
        args=["create-user", "BOB"], input=f"{OTHER_PASSWORD}\n{OTHER_PASSWORD}\n"
    )
    assert result.exit_code == 1
    assert "already exists" in result.output
    assert AuthActions(client).login("bob", PASSWORD).status_code == 302


def test_create_user_refuses_a_malformed_username(app, runner):
    result = runner.invoke(args=["create-user", "bob smith"], input=f"{PASSWORD}\n{PASSWORD}\n")
    assert result.exit_code == 1
    assert "Use 3 to 32 characters" in result.output
    with app.app_context():
        assert len(get_store()) == 0


def test_rotate_secret_key_writes_mode_0600_and_keeps_one_fallback(tmp_path, monkeypatch):
    monkeypatch.delenv("FLASK_SECRET_KEY", raising=False)
    monkeypatch.setenv("FLASK_INSTANCE_PATH", str(tmp_path / "instance"))
    app = create_app({"TESTING": True, "DATA_DIR": str(tmp_path / "data")})
    path = tmp_path / "instance" / KEYS_FILE
    seen = [app.secret_key]
    for _ in range(3):
        result = app.test_cli_runner().invoke(args=["rotate-secret-key"])
        assert result.exit_code == 0, result.output
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        keys = json.loads(path.read_text())
        assert keys["current"] not in seen
        assert keys["fallbacks"] == [seen[-1]]
        seen.append(keys["current"])
        assert keys["current"] not in result.output  # the key is never printed
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_rotate_secret_key_warns_when_the_environment_overrides_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASK_SECRET_KEY", "from-the-environment-" + "k" * 32)
    monkeypatch.setenv("FLASK_INSTANCE_PATH", str(tmp_path / "instance"))
    app = create_app({"TESTING": True, "DATA_DIR": str(tmp_path / "data")})
    result = app.test_cli_runner().invoke(args=["rotate-secret-key"])
    assert result.exit_code == 0
    assert "FLASK_SECRET_KEY is set and overrides the key file" in result.output


# -- prune-photos ------------------------------------------------------------------------------

HOUR = 3600


def _upload(client) -> None:
    response = client.post(
        "/account-details",
        data={
            "full_name": "",
            "email": "",
            "phone": "",
            "bio": "",
            "photo": (io.BytesIO(png()), "me.png"),
            "csrf_token": csrf_token(client, "/account-details"),
        },
        content_type="multipart/form-data",
    )
    assert response.status_code == 303


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.text_database  # photo files; on PostgreSQL: test_store_postgres.py
def test_prune_photos_removes_only_old_files_no_record_points_to(app, runner, logged_in):
    _upload(logged_in)
    folder = Path(app.config["PHOTO_DIR"])
    kept = folder / _stored(app, "alice")["photo"]  # alice's photo, old but referenced
    crashed = folder / ("ab" * 16 + ".webp")  # left by a crash between the two steps
    fresh = folder / ("cd" * 16 + ".webp")  # an upload whose record is about to point to it
    half = folder / ".upload-k3j_x9q1.tmp"  # a save killed before its rename
    half_fresh = folder / ".upload-zz8wq01m.tmp"  # a save writing right now
    foreign = [folder / "README.txt", folder / ("ef" * 16 + ".webp.bak"), folder / "sub"]
    for path in (crashed, fresh, half, half_fresh, *foreign[:2]):
        path.write_bytes(b"x")
    foreign[2].mkdir()
    (folder / ("01" * 16 + ".webp")).symlink_to(kept)  # a link is not a file the server made
    for path in (kept, crashed, half, *foreign):
        _age(path, 2 * HOUR)

    result = runner.invoke(args=["prune-photos"])

    assert result.exit_code == 0, result.output
    assert not crashed.exists() and not half.exists()
    assert kept.is_file() and fresh.is_file() and half_fresh.is_file()
    assert all(path.exists() for path in foreign)
    assert (folder / ("01" * 16 + ".webp")).is_symlink()
    assert "Removed 2 photo(s)" in result.output
    assert logged_in.get("/public/images/profile/" + kept.name).status_code == 200


@pytest.mark.text_database  # photo files; on PostgreSQL: test_store_postgres.py
def test_prune_photos_grace_and_dry_run(app, runner):
    folder = Path(app.config["PHOTO_DIR"])
    folder.mkdir(parents=True)
    orphan = folder / ("ab" * 16 + ".webp")
    orphan.write_bytes(b"x")
    dry = runner.invoke(args=["prune-photos", "--grace", "0", "--dry-run"])
    assert dry.exit_code == 0
    assert f"would remove {orphan.name}" in dry.output
    assert orphan.is_file()
    assert runner.invoke(args=["prune-photos"]).exit_code == 0
    assert orphan.is_file()  # younger than the default grace period
    assert runner.invoke(args=["prune-photos", "--grace", "0"]).exit_code == 0
    assert not orphan.exists()
    refused = runner.invoke(args=["prune-photos", "--grace", "-1"])
    assert refused.exit_code == 2


@pytest.mark.text_database  # photo files; on PostgreSQL: test_store_postgres.py
def test_prune_photos_removes_the_photo_of_a_record_deleted_before_its_file(app, runner, logged_in):
    """What a crash between deleting the record and removing the file leaves behind."""
    _upload(logged_in)
    photo = Path(app.config["PHOTO_DIR"]) / _stored(app, "alice")["photo"]
    with app.app_context():
        assert get_store().delete("alice")
    _age(photo, 2 * HOUR)
    assert logged_in.get("/public/images/profile/" + photo.name).status_code == 200  # still public
    result = runner.invoke(args=["prune-photos"])
    assert result.exit_code == 0, result.output
    assert not photo.exists()
    assert logged_in.get("/public/images/profile/" + photo.name).status_code == 404


@pytest.mark.text_database  # photo files; on PostgreSQL: test_store_postgres.py
def test_prune_photos_reports_records_whose_photo_is_missing(app, runner, logged_in):
    _upload(logged_in)
    photo = Path(app.config["PHOTO_DIR"]) / _stored(app, "alice")["photo"]
    photo.unlink()
    result = runner.invoke(args=["prune-photos"])
    assert result.exit_code == 0
    assert "Records whose photo is missing: alice" in result.output


@pytest.mark.text_database  # photo files; on PostgreSQL: test_store_postgres.py
def test_prune_photos_without_a_photo_folder_does_nothing(app, runner):
    result = runner.invoke(args=["prune-photos"])
    assert result.exit_code == 0
    assert "Removed 0 photo(s)" in result.output
    assert not Path(app.config["PHOTO_DIR"]).exists()
