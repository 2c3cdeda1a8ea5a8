"""``flask`` commands: create a user, rotate the secret key."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from . import passwords
from .config import rotate_keys
from .forms import USERNAME_RE, normalize_username
from .store import get_store, new_user


def init_app(app: Flask) -> None:
    """Register the commands. ``with_appcontext`` lets them run from ``app.cli`` too (tests)."""
    app.cli.add_command(create_user)
    app.cli.add_command(rotate_secret_key)


def _read_password() -> tuple[str, str]:
    """Prompt twice with hidden input, or read two lines when stdin is a pipe."""
    if sys.stdin.isatty():
        first = click.prompt("Password", hide_input=True)
        second = click.prompt("Repeat the password", hide_input=True)
        return first, second
    # Only the line ending is removed: the password is taken exactly as typed.
    lines = [sys.stdin.readline().removesuffix("\n").removesuffix("\r") for _ in range(2)]
    return lines[0], lines[1]


@click.command("create-user")
@click.argument("username")
@with_appcontext
def create_user(username: str) -> None:
    """Create a user; the password is asked for twice (or read as two lines from stdin)."""
    username = normalize_username(username)
    if not USERNAME_RE.match(username):
        raise click.ClickException(
            "Use 3 to 32 characters: letters, digits, dot, underscore or hyphen."
        )
    password, again = _read_password()
    if password != again:
        raise click.ClickException("The two passwords do not match.")
    problem = passwords.policy_problem(password, username)
    if problem:
        raise click.ClickException(problem)
    record = new_user(username, passwords.hash_password(password))
    if not get_store().create(username, record):
        raise click.ClickException(f"The user {username} already exists.")
    click.echo(f"Created user {username}.")


@click.command("rotate-secret-key")
@with_appcontext
def rotate_secret_key() -> None:
    """Make a new secret key current; keep the previous one as the only fallback."""
    instance = Path(current_app.instance_path)
    rotate_keys(instance)
    click.echo(
        f"A new secret key is current in {instance}. Sessions signed with the previous key "
        "stay valid until the next rotation. Restart the server to use it."
    )
    if "FLASK_SECRET_KEY" in os.environ:
        click.echo("Note: FLASK_SECRET_KEY is set and overrides the key file.", err=True)
