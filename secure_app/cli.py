"""``flask`` commands: users, keys, orphaned photos, two-factor resets, moving data."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from . import audit, events, mail, mfa, passwords, uploads
from .config import rotate_keys
from .forms import USERNAME_RE, normalize_username
from .store import StoreError, get_photos, get_store, new_user, transfer
from .store.text import UPLOAD_TMP_RE


def init_app(app: Flask) -> None:
    """Register the commands. ``with_appcontext`` lets them run from ``app.cli`` too (tests)."""
    app.cli.add_command(create_user)
    app.cli.add_command(rotate_secret_key)
    app.cli.add_command(prune_photos)
    app.cli.add_command(reset_two_factor)
    app.cli.add_command(rotate_mfa_key)
    app.cli.add_command(export_data)
    app.cli.add_command(import_data)


def _store_errors(command: Callable[..., None]) -> Callable[..., None]:
    """A store that cannot be reached is a one-line error, not a traceback."""

    @functools.wraps(command)
    def run(*args: object, **kwargs: object) -> None:
        try:
            command(*args, **kwargs)
        except StoreError as exc:
            raise click.ClickException(
                f"{exc}. Stopped there: what was done before the failure stays done "
                "(the command says what, where it can). Is the database up?"
            ) from None

    return run


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
@_store_errors
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


# A save stores the photo first and points the record at it a moment later
# (one store write). A photo younger than this may be in that moment.
PRUNE_GRACE = 3600


@click.command("prune-photos")
@click.option(
    "--grace",
    default=PRUNE_GRACE,
    show_default=True,
    type=click.IntRange(min=0),
    help="Keep photos younger than this many seconds: an upload in progress stores its photo "
    "before its record points to it.",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@with_appcontext
@_store_errors
def prune_photos(grace: int, dry_run: bool) -> None:
    """Remove photos that no record points to, and uploads a crash left half-written."""
    photos = get_photos()
    # Photos first, records second. Only a save names a record's photo, and
    # only with a photo it stored just before: one already older than the
    # grace period cannot become a record's photo later. Anything whose name
    # the server could not have made is not ours and is never touched.
    cutoff = time.time() - grace
    stored = photos.listing()
    candidates = [
        name
        for name, modified in stored.items()
        if (uploads.NAME_RE.match(name) or UPLOAD_TMP_RE.match(name)) and modified <= cutoff
    ]
    store = get_store()
    records = [record for _, record in store.items()]
    referenced = {r.get("photo") for r in records}
    orphans = sorted(name for name in candidates if name not in referenced)
    for name in orphans:
        if not dry_run:
            photos.remove(name)
        click.echo(f"{'would remove' if dry_run else 'removed'} {name}")
    verb = "Would remove" if dry_run else "Removed"
    click.echo(f"{verb} {len(orphans)} photo(s) no record points to.")
    missing = sorted(r["username"] for r in records if r.get("photo") and r["photo"] not in stored)
    if missing:
        click.echo(f"Records whose photo is missing: {', '.join(missing)}", err=True)


@click.command("export-data")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@with_appcontext
@_store_errors
def export_data(folder: Path) -> None:
    """Write every record (the text database's format) and photo into FOLDER, a new folder."""
    try:
        moved = transfer.export_to(folder, get_store(), get_photos())
    except transfer.TransferError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Exported {moved.records} user(s) and {moved.photos} photo(s) to {folder}.")
    _report_missing(moved)


@click.command("import-data")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@with_appcontext
@_store_errors
def import_data(folder: Path) -> None:
    """Load a folder made by export-data into the configured backend."""
    try:
        moved = transfer.import_from(folder, get_store(), get_photos(), USERNAME_RE)
    except transfer.TransferError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Imported {moved.records} user(s) and {moved.photos} photo(s) from {folder}.")
    _report_missing(moved)


def _report_missing(moved: transfer.Moved) -> None:
    if moved.missing_photos:
        click.echo(
            f"Users whose photo was missing (their record was kept): "
            f"{', '.join(moved.missing_photos)}",
            err=True,
        )


@click.command("reset-two-factor")
@click.argument("username")
@with_appcontext
@_store_errors
def reset_two_factor(username: str) -> None:
    """Remove every second factor and recovery code of USERNAME, and end all their sessions.

    The way back for a lost phone, once you have confirmed out of band that
    the person asking is the account's owner (SECURITY.md says how).
    """
    username = normalize_username(username)

    def reset(record: dict) -> None:
        mfa.remove_factors(record)
        record["sessions"] = {}  # whoever holds the phone or a session is out too
        record.pop("pending_login", None)  # and a login waiting for its second step
        events.record(record, "two_factor_reset", ip=None)

    try:
        record = get_store().update(username, reset)
    except KeyError:
        raise click.ClickException(f"There is no user {username}.") from None
    audit.event("two_factor_reset", username, by="operator")
    mail.notify(record, "two_factor_reset", ip="the command line")
    mail.flush()  # the command exits next: send the notice first
    click.echo(
        f"Removed every second factor and recovery code of {username} and ended every "
        "session. They log in with their password and can enrol again."
    )


@click.command("rotate-mfa-key")
@with_appcontext
@_store_errors
def rotate_mfa_key() -> None:
    """Make a new key for second-factor secrets current and re-encrypt every secret with it."""
    moved, lost = mfa.rotate_key()
    click.echo(
        f"A new key for second-factor secrets is current in {current_app.instance_path}; "
        f"{moved} secret(s) re-encrypted with it. The previous key stays as a fallback. "
        "Running servers use the new key file from their next request; no restart needed."
    )
    if lost:
        click.echo(
            f"No key opens the secret of: {', '.join(lost)}. "
            "They can log in with a recovery code, or need reset-two-factor.",
            err=True,
        )
