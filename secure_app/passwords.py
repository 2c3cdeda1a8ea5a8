"""Argon2id password hashing, upgrade on login, and the password policy (ASVS 5.0 V6.2)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError
from flask import Flask, current_app
from zxcvbn import zxcvbn

# The one place the cost parameters live. OWASP's floor for Argon2id is
# m=19 MiB, t=2, p=1; raising any of these upgrades each user's hash at their
# next successful login.
ARGON2_DEFAULTS = {"ARGON2_TIME_COST": 2, "ARGON2_MEMORY_COST": 19 * 1024, "ARGON2_PARALLELISM": 1}

MIN_LENGTH = 15
MAX_LENGTH = 128
MIN_SCORE = 3  # zxcvbn: 3 is "safely unguessable" against an online attack
# zxcvbn refuses input past its max_length (72) and its cost grows with the
# length; the first 72 characters of a guessable password are guessable too.
ZXCVBN_MAX = 72
SITE_WORDS = ["secure_app", "secure", "app", "flask", "login", "password"]


def init_app(app: Flask) -> None:
    """Build the app's hasher from ``ARGON2_*`` config, defaulting to the values above."""
    for key, value in ARGON2_DEFAULTS.items():
        app.config.setdefault(key, value)
    hasher = PasswordHasher(
        time_cost=app.config["ARGON2_TIME_COST"],
        memory_cost=app.config["ARGON2_MEMORY_COST"],
        parallelism=app.config["ARGON2_PARALLELISM"],
        type=Type.ID,
    )
    app.extensions["secure_app.passwords"] = {"hasher": hasher, "dummy": None}


def _ext() -> dict:
    return current_app.extensions["secure_app.passwords"]


def hash_password(password: str) -> str:
    return _ext()["hasher"].hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """Check ``password``; with no stored hash, spend the same time and return False.

    Verifying against a dummy hash when the user does not exist keeps the
    response time of "no such user" equal to "wrong password" (no enumeration
    by timing).
    """
    ext = _ext()
    if stored_hash is None:
        if ext["dummy"] is None:
            ext["dummy"] = ext["hasher"].hash(secrets.token_urlsafe(24))
        try:  # the dummy is a hash of a random token: it cannot match
            ext["hasher"].verify(ext["dummy"], password)
        except (VerificationError, InvalidHashError):
            pass
        return False
    try:
        return ext["hasher"].verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


class PasswordChanged(Exception):
    """The stored hash is no longer the one the password was checked against."""


def only_if_unchanged(
    verified_hash: str, change: Callable[[dict[str, Any]], object] | None = None
) -> Callable[[dict[str, Any]], Any]:
    """Return a store change that applies ``change`` only while the hash is ``verified_hash``.

    A password check takes ~40 ms of Argon2 on a hash read before it; the
    password may change meanwhile. Every write that a check allows goes
    through this compare-and-set, inside the store's lock, so a check of the
    old password cannot act after the new one is in place: it raises
    :class:`PasswordChanged`, and the caller treats it as a failed check.
    Works as ``Store.update``'s change and as ``Store.delete``'s check.
    """

    def guarded(record: dict[str, Any]) -> Any:
        if record.get("password_hash") != verified_hash:
            raise PasswordChanged
        return change(record) if change is not None else None

    return guarded


def needs_rehash(stored_hash: str) -> bool:
    """True when the hash was made with other parameters than the current ones."""
    return _ext()["hasher"].check_needs_rehash(stored_hash)


def policy_problem(password: str, username: str) -> str | None:
    """Return why ``password`` is not acceptable for ``username`` ("" before one is known), or None.

    No composition rules.
    """
    if len(password) < MIN_LENGTH:
        return (
            f"Use at least {MIN_LENGTH} characters. "
            "Several unrelated words make a strong passphrase that is easy to remember."
        )
    if len(password) > MAX_LENGTH:
        return f"Use at most {MAX_LENGTH} characters."
    context = [username, *SITE_WORDS] if username else SITE_WORDS
    result = zxcvbn(password[:ZXCVBN_MAX], user_inputs=context)
    if result["score"] < MIN_SCORE:
        feedback = result["feedback"]
        hint = feedback.get("warning") or " ".join(feedback.get("suggestions", []))
        message = "This password is too easy to guess."
        return f"{message} {hint}".strip() if hint else message + " Add more unrelated words."
    return None
