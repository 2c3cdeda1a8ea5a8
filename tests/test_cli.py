"""The ``flask`` commands: create-user (piped input, refusals) and rotate-secret-key."""

from __future__ import annotations

import json
import stat

from helpers import OTHER_PASSWORD, PASSWORD, AuthActions
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
