"""The second factor's parts: TOTP codes, recovery codes, and the key that hides the secrets.

No views here: ``two_factor.py`` and ``reauth.py`` use these functions.

* **TOTP** (RFC 6238): SHA-1, 6 digits, 30-second steps, a 160-bit secret from
  ``secrets``. Only the current step's code is accepted (ASVS 5.0 V6.5.5: a
  TOTP lives at most 30 s), and only if that step is later than the last one
  accepted for the user, which is kept in the user's record: a code works
  once, across processes (V6.5.1).
* **Recovery codes**: 10 codes of 24 characters from a 30-letter alphabet
  without look-alikes (no 0, 1, I, L, O, U): 117 bits each, so a salted SHA-256
  is enough to store them (V6.5.2). Typed in any case, with or without spaces
  and hyphens; each works once.
* **Secrets at rest**: the TOTP secret is encrypted with Fernet (AES-CBC with
  an HMAC-SHA256 over it) under a key kept in ``instance/mfa_keys.json``
  (mode 0600), never in the data folder, so a stolen data file yields no
  codes. The plaintext names the user, so a secret copied into another record
  does not decrypt. ``rotate_key`` re-keys every record; the previous key stays
  a fallback, and every process notices a new key file at its next use.

A user's record gains ``totp`` (``id``, ``secret``, ``last_step``, ``added``)
and ``recovery_codes`` (a list of ``salt$sha256`` strings) while a factor is on.
Passkeys (``passkeys.py``) are a factor too: ``has_factor`` counts them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyotp
import segno
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from flask import Flask, current_app
from markupsafe import Markup

from .config import load_keys, rotate_keys
from .store import get_store

log = logging.getLogger(__name__)

ISSUER = "secure_app"
DIGITS = 6
STEP = 30
SECRET_BYTES = 20  # 160 bits, RFC 4226's recommended length
RECOVERY_COUNT = 10
RECOVERY_ALPHABET = "23456789ABCDEFGHJKMNPQRSTVWXYZ"
RECOVERY_LENGTH = 24  # log2(30) * 24 = 117.8 bits
RECOVERY_GROUP = 4
# An enrolment form must be answered within this many seconds.
ENROL_TTL = 600
# The code field takes at most this many characters, spaces and hyphens included.
MAX_CODE_INPUT = 64
KEY_FILE = "mfa_keys.json"

_SEPARATORS = str.maketrans("", "", " -")
_ALPHABET = frozenset(RECOVERY_ALPHABET)


@dataclass(frozen=True)
class Match:
    """A code that matched: a TOTP ``step``, or the stored hash of a recovery code."""

    kind: str  # "totp" or "recovery"
    step: int = 0
    stored: str = ""


# -- codes -------------------------------------------------------------------


def new_secret() -> str:
    """Return a new TOTP secret: 160 random bits in base32 (32 characters, no padding)."""
    return base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def spaced(secret: str) -> str:
    """The secret in groups of four, for typing it into an app by hand."""
    return " ".join(secret[i : i + 4] for i in range(0, len(secret), 4))


def step_at(now: float) -> int:
    return int(now) // STEP


def code_at(secret: str, step: int) -> str:
    """The TOTP code of ``step``; tests and benchmarks use it as the user's app would."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP).generate_otp(step)


def normalize_totp(value: object) -> str | None:
    """Return six ASCII digits, spaces removed; None for anything else.

    ``str.isdigit`` is true for Arabic-Indic and full-width digits too; only
    ``0-9`` are taken, so no two different strings count as the same code.
    """
    if not isinstance(value, str) or len(value) > MAX_CODE_INPUT:
        return None
    code = value.replace(" ", "")
    if len(code) == DIGITS and code.isascii() and code.isdigit():
        return code
    return None


def normalize_recovery(value: object) -> str | None:
    """Return a recovery code in its stored form (upper case, no spaces or hyphens), or None."""
    if not isinstance(value, str) or len(value) > MAX_CODE_INPUT or not value.isascii():
        return None
    code = value.translate(_SEPARATORS).upper()
    if len(code) == RECOVERY_LENGTH and _ALPHABET.issuperset(code):
        return code
    return None


def totp_step(secret: str, code: str, now: float, last_step: int) -> int | None:
    """Return the step ``code`` is valid for, if it is now's step and later than ``last_step``."""
    step = step_at(now)
    if step <= last_step:
        return None  # this step's code was already used: refuse it, right or wrong
    return step if hmac.compare_digest(code, code_at(secret, step)) else None


def provisioning_uri(secret: str, username: str) -> str:
    """The ``otpauth://`` URI an authenticator app reads, with issuer and account name."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP).provisioning_uri(
        name=username, issuer_name=ISSUER
    )


def qr_svg(uri: str) -> Markup:
    """The URI as a QR code in inline SVG: no script, no style attribute, no ``data:`` URI.

    segno writes colours as SVG presentation attributes (``fill``,
    ``stroke``), which a ``style-src 'self'`` policy does not block.
    """
    # A viewBox instead of a fixed size: site.css scales the code to its card,
    # which the longest username's (265 px) would overflow on a 320 px phone.
    svg = segno.make(uri, error="m").svg_inline(
        scale=5,
        dark="#000",
        light="#fff",
        svgclass="totp-qr",
        title="QR code for your app",
        omitsize=True,
    )
    return Markup(svg.replace("<svg ", '<svg role="img" ', 1))


def new_recovery_codes() -> list[str]:
    """Ten new recovery codes, grouped for reading: ``ABCD-EFGH-...``."""
    codes = []
    for _ in range(RECOVERY_COUNT):
        raw = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(RECOVERY_LENGTH))
        codes.append(
            "-".join(raw[i : i + RECOVERY_GROUP] for i in range(0, RECOVERY_LENGTH, RECOVERY_GROUP))
        )
    return codes


def hash_recovery(code: str) -> str:
    """Salted SHA-256 of a normalised recovery code (enough at 117 bits: ASVS 5.0 V6.5.2)."""
    salt = secrets.token_bytes(16)
    return f"{salt.hex()}${hashlib.sha256(salt + code.encode('ascii')).hexdigest()}"


def find_recovery(stored: list[Any], code: str) -> str | None:
    """Return the stored hash that ``code`` (normalised) matches, or None."""
    found = None
    for entry in stored:
        salt_hex, _, digest = str(entry).partition("$")
        try:
            salt = bytes.fromhex(salt_hex)
        except ValueError:
            continue
        candidate = hashlib.sha256(salt + code.encode("ascii")).hexdigest()
        if hmac.compare_digest(candidate, digest):
            found = entry
    return found


# -- the user's record ---------------------------------------------------------


def has_factor(record: dict[str, Any] | None) -> bool:
    """True when the user has a second factor: TOTP, or at least one passkey."""
    return has_totp(record) or bool(passkeys_of(record))


def has_totp(record: dict[str, Any] | None) -> bool:
    return bool(record and isinstance(record.get("totp"), dict))


def passkeys_of(record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The user's passkeys (``passkeys.py`` writes them), oldest first."""
    keys = record.get("passkeys") if record else None
    return [key for key in keys if isinstance(key, dict)] if isinstance(keys, list) else []


def factor_id(record: dict[str, Any] | None) -> str | None:
    """The id of the user's TOTP factor: a write after a code check compares it."""
    totp = record.get("totp") if record else None
    return totp.get("id") if isinstance(totp, dict) else None


def recovery_left(record: dict[str, Any] | None) -> int:
    codes = record.get("recovery_codes") if record else None
    return len(codes) if isinstance(codes, list) else 0


def check_code(record: dict[str, Any], value: object, now: float) -> Match | None:
    """Match ``value`` against the user's TOTP or recovery codes; change nothing."""
    code = normalize_totp(value)
    if code is not None:
        totp = record.get("totp")
        if not isinstance(totp, dict):
            return None
        secret = decrypt_secret(record["username"], totp.get("secret"))
        if secret is None:
            return None
        step = totp_step(secret, code, now, int(totp.get("last_step", -1)))
        return Match("totp", step=step) if step is not None else None
    code = normalize_recovery(value)
    if code is not None:
        stored = find_recovery(record.get("recovery_codes") or [], code)
        return Match("recovery", stored=stored) if stored is not None else None
    return None


def guarded_update(
    username: str,
    password_hash: str,
    factor: str | None,
    change: Callable[[dict[str, Any]], bool | None],
) -> bool:
    """Apply ``change`` only if the password hash and the factor are still the ones checked.

    A compare-and-set inside the store's lock: a password change, a disabled
    or replaced factor, or a deleted account between the check and this write
    makes it write nothing and return False. ``change`` may refuse too, by
    returning False.
    """
    done: list[bool] = []

    def apply(record: dict[str, Any]) -> None:
        if record.get("password_hash") != password_hash or factor_id(record) != factor:
            return
        draft = dict(record)
        if change(draft) is not False:
            record.clear()
            record.update(draft)
            done.append(True)

    try:
        get_store().update(username, apply)
    except KeyError:
        return False
    return bool(done)


def consume(match: Match) -> Callable[[dict[str, Any]], bool]:
    """A ``guarded_update`` change that uses up ``match``, refusing if it was used meanwhile."""

    def change(record: dict[str, Any]) -> bool:
        if match.kind == "totp":
            totp = dict(record["totp"])
            if match.step <= int(totp.get("last_step", -1)):
                return False  # another request took this step first
            totp["last_step"] = match.step
            record["totp"] = totp
            return True
        codes = list(record.get("recovery_codes") or [])
        if match.stored not in codes:
            return False  # another request used this code first
        codes.remove(match.stored)
        record["recovery_codes"] = codes
        return True

    return change


def enable_totp(username: str, secret: str, step: int, now: int) -> tuple[dict, list[str]]:
    """Return the record fields that switch TOTP on, and the recovery codes to show once."""
    codes = new_recovery_codes()
    totp = {
        "id": secrets.token_hex(8),
        "secret": encrypt_secret(username, secret),
        "last_step": step,  # the code that confirmed enrolment cannot log in
        "added": now,
    }
    return {"totp": totp, "recovery_codes": recovery_hashes(codes)}, codes


def recovery_hashes(codes: list[str]) -> list[str]:
    return [hash_recovery(normalize_recovery(code) or "") for code in codes]


def remove_totp(record: dict[str, Any]) -> None:
    """Delete the TOTP secret and every recovery code from ``record``; passkeys stay."""
    record.pop("totp", None)
    record.pop("recovery_codes", None)


def remove_factors(record: dict[str, Any]) -> None:
    """Delete every factor from ``record``: TOTP, recovery codes and passkeys."""
    remove_totp(record)
    record.pop("passkeys", None)
    record.pop("passkey_challenges", None)


# -- secrets at rest -------------------------------------------------------------


def init_app(app: Flask) -> None:
    """Create the key file at start-up, not at the first enrolment.

    Several hosts must share one key (README, "Several hosts"): made at start,
    the file is there to copy from the first host before any secret uses it.
    """
    with app.app_context():
        _fernet()


def _new_fernet_key() -> str:
    return Fernet.generate_key().decode("ascii")


def _key_dir() -> Path:
    instance = Path(current_app.instance_path).resolve()
    data = Path(current_app.config["DATA_DIR"]).resolve()
    if instance == data or data in instance.parents:
        # The whole point of the key file is that the data file alone is not enough.
        raise RuntimeError(f"The instance folder {instance} must not be inside the data folder.")
    return instance


def _fernet() -> MultiFernet:
    """The keys, current first, reloaded whenever the key file has been replaced."""
    folder = _key_dir()
    path = folder / KEY_FILE
    try:
        st = os.stat(path)
        stamp: tuple[int, ...] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
    except FileNotFoundError:
        stamp = None
    cache = current_app.extensions.setdefault("secure_app.mfa", {})
    if stamp is None or cache.get("stamp") != stamp:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        current, fallbacks = load_keys(folder, KEY_FILE, _new_fernet_key)
        try:
            fernet = MultiFernet([Fernet(k) for k in (current, *fallbacks)])
        except ValueError as error:
            raise RuntimeError(f"{path} holds a key that is not a Fernet key.") from error
        st = os.stat(path)
        cache["stamp"], cache["fernet"] = (st.st_ino, st.st_mtime_ns, st.st_size), fernet
    return cache["fernet"]


def encrypt_secret(username: str, secret: str) -> str:
    return _fernet().encrypt(f"totp\0{username}\0{secret}".encode()).decode("ascii")


def decrypt_secret(username: str, token: object) -> str | None:
    """The TOTP secret, or None when the token is not this user's or no key opens it."""
    return _open(token, f"totp\0{username}\0", None, 0)


def enrol_token(username: str, secret: str, now: int) -> str:
    """Seal a secret offered for enrolment into the form, bound to the user and the time."""
    data = f"enrol\0{username}\0{secret}".encode()
    return _fernet().encrypt_at_time(data, now).decode("ascii")


def open_enrol_token(username: str, token: object, now: int) -> str | None:
    """The secret sealed by ``enrol_token`` for this user, if at most ``ENROL_TTL`` old."""
    return _open(token, f"enrol\0{username}\0", ENROL_TTL, now)


def _open(token: object, prefix: str, ttl: int | None, now: int) -> str | None:
    if not isinstance(token, str) or not token or len(token) > 1024 or not token.isascii():
        return None
    try:
        if ttl is None:
            plain = _fernet().decrypt(token).decode()
        else:
            plain = _fernet().decrypt_at_time(token, ttl, now).decode()
    except (InvalidToken, UnicodeDecodeError):
        if ttl is None:
            log.error("a stored TOTP secret does not decrypt: is %s the right key file?", KEY_FILE)
        return None
    return plain[len(prefix) :] if plain.startswith(prefix) else None


def rotate_key() -> tuple[int, list[str]]:
    """Make a new key current and re-encrypt every stored secret under it.

    First every secret is re-encrypted under the current key, so that the
    keys older than it, which the new key file drops, are no longer needed;
    then the new key becomes current (the previous one stays a fallback for
    processes that have not yet read the new file) and every secret moves to
    it. Returns how many secrets were re-encrypted and the users whose secret
    no key opens (they need ``reset-two-factor``).
    """
    _reencrypt()
    rotate_keys(_key_dir(), KEY_FILE, _new_fernet_key)
    return _reencrypt()


def _reencrypt() -> tuple[int, list[str]]:
    fernet = _fernet()
    store = get_store()
    moved, lost = 0, []
    for username in store.keys():
        if not has_factor(store.get(username)):
            continue

        def change(record: dict[str, Any]) -> None:
            nonlocal moved
            totp = record.get("totp")
            if not isinstance(totp, dict):
                return
            try:
                totp["secret"] = fernet.rotate(str(totp.get("secret"))).decode("ascii")
                moved += 1
            except InvalidToken:
                lost.append(record.get("username", "?"))

        try:
            store.update(username, change)
        except KeyError:
            continue  # deleted meanwhile
    return moved, lost
