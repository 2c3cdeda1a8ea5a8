"""Configuration: defaults, ``FLASK_*`` overrides, the instance folder and the secret keys.

Order of precedence, lowest first: the defaults below, ``FLASK_``-prefixed
environment variables (Flask's own ``from_prefixed_env``), then the mapping a
test passes to ``create_app``.

The secret keys live in ``instance/secret_keys.json`` (mode 0600) unless
``FLASK_SECRET_KEY`` is set. The file holds the current key and at most one
fallback, so ``rotate-secret-key`` keeps sessions signed with the previous key
alive for exactly one rotation.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask

DEFAULTS: dict[str, object] = {
    "DATA_DIR": "data",
    # Unset: the text database in DATA_DIR and photos in PHOTO_DIR. postgresql://...:
    # records and photos in PostgreSQL (store/postgres.py), for several hosts.
    "DATABASE_URL": None,
    # Connections per process: one for each gunicorn thread, plus two for the
    # threads that write after a response (events) or outside one (the mail queue).
    "DATABASE_POOL_SIZE": int(os.environ.get("GUNICORN_THREADS", "8")) + 2,
    # Seconds a request waits for a connection before the 503 page: a database
    # that is down must not hold every thread for long.
    "DATABASE_TIMEOUT": 5.0,
    "FORCE_HTTPS": False,
    # The site's canonical origin (default http://localhost:$PORT, set in
    # configure): the https redirect and every absolute link go there.
    "PUBLIC_URL": None,
    "PROXY_HOPS": 0,
    # X-Forwarded-Host and -Port from the trusted proxies: only when the
    # operator says the proxy sets them (PUBLIC_URL makes them unneeded).
    "TRUST_FORWARDED_HOST": False,
    "LOGIN_RATE_LIMIT_IP": "20 per minute",
    "LOGIN_RATE_LIMIT_USER": "5 per minute",
    "REGISTER_RATE_LIMIT_IP": "10 per hour",
    "CHANGE_PASSWORD_RATE_LIMIT_USER": "5 per minute",
    "UPLOAD_RATE_LIMIT_USER": "10 per minute",
    # Email changes per user: each one mails a verification link (account.py).
    "EMAIL_CHANGE_RATE_LIMIT_USER": "5 per hour",
    # Seconds a login or re-authentication counts as fresh for factor changes (reauth.py).
    "REAUTH_WINDOW": 300,
    # Send every logged-in user without a second factor to enrolment first (two_factor.py).
    "REQUIRE_TWO_FACTOR": False,
    # Mail (mail.py): "file" writes one .eml per message into MAIL_FILE_PATH
    # (unset: the outbox folder inside DATA_DIR, data/outbox); "smtp" sends.
    "MAIL_BACKEND": "file",
    "MAIL_FILE_PATH": None,
    "MAIL_SERVER": "localhost",
    "MAIL_PORT": 25,
    "MAIL_USE_TLS": False,
    "MAIL_USE_SSL": False,
    "MAIL_USERNAME": None,
    "MAIL_PASSWORD": None,
    "MAIL_DEFAULT_SENDER": None,  # unset: no-reply@<PUBLIC_URL's host>
    "MAIL_TIMEOUT": 10,  # seconds per SMTP operation: a dead server never hangs the queue
    "MAIL_CA_FILE": None,  # an extra CA to trust for the SMTP server (a private relay)
    "MAIL_RETRY_DELAY": 5.0,  # seconds before the first retry; doubles each time
    "MAIL_MAX_ATTEMPTS": 6,
    # Account recovery (recovery.py).
    "PASSWORD_RESET_TIMEOUT": 900,
    "EMAIL_VERIFY_TIMEOUT": 86400,
    "FORGOT_PASSWORD_RATE_LIMIT_IP": "10 per hour",
    "FORGOT_PASSWORD_RATE_LIMIT_EMAIL": "3 per hour",
    "RATELIMIT_STORAGE_URI": "memory://",
    # Retry-After goes on the 429 page only (errors.py). Flask-Limiter's own
    # headers would put it on every response and tell a guesser how many
    # attempts are left.
    "RATELIMIT_HEADERS_ENABLED": False,
    "SESSION_IDLE_TIMEOUT": 1800,
    "PERMANENT_SESSION_LIFETIME": 43200,
    # Live sessions one account may hold; a new login ends the oldest (sessions.py).
    "MAX_SESSIONS_PER_USER": 20,
    "SESSION_COOKIE_HTTPONLY": True,
    "SESSION_COOKIE_SAMESITE": "Lax",
    # The CSRF token lives in the session, which already ends at the idle and
    # absolute timeouts; a separate one-hour token expiry only breaks forms.
    "WTF_CSRF_TIME_LIMIT": None,
    # The largest request is the account form with a 5 MiB photo.
    "MAX_CONTENT_LENGTH": 6 * 1024 * 1024,
    # Werkzeug also checks this against its multipart buffer, which takes the
    # body in 64 KiB reads: at 64 KiB or less every photo over 64 KiB got a 413.
    "MAX_FORM_MEMORY_SIZE": 128 * 1024,
    # The account form has six parts; anything far past that is not our form.
    "MAX_FORM_PARTS": 16,
    "TEMPLATES_AUTO_RELOAD": False,
}

KEYS_FILE = "secret_keys.json"


def configure(app: Flask, test_config: dict | None) -> None:
    """Fill ``app.config`` from defaults, the environment and ``test_config``."""
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env()
    if test_config:
        app.config.from_mapping(test_config)

    root = Path(app.root_path).parent
    data_dir = Path(app.config["DATA_DIR"])
    app.config["DATA_DIR"] = str(data_dir if data_dir.is_absolute() else root / data_dir)
    app.config.setdefault("PHOTO_DIR", str(Path(app.static_folder) / "images" / "profile"))

    force_https = bool(app.config["FORCE_HTTPS"])
    app.config["SESSION_COOKIE_SECURE"] = force_https
    # __Host- makes the browser refuse the cookie unless it is Secure, has
    # Path=/ and no Domain: a sibling subdomain cannot plant or overwrite it.
    # Flask's own default is "session", so setdefault would never apply: replace only that.
    if force_https and app.config["SESSION_COOKIE_NAME"] == "session":
        app.config["SESSION_COOKIE_NAME"] = "__Host-session"
    app.config["PREFERRED_URL_SCHEME"] = "https" if force_https else "http"
    app.config["PUBLIC_URL"] = public_origin(app.config["PUBLIC_URL"], force_https)
    url = app.config.get("DATABASE_URL")
    if url and not str(url).startswith(("postgresql://", "postgres://")):
        # Better no start than a site that quietly writes to the text database
        # while the operator believes it is on some other database.
        raise RuntimeError(
            "FLASK_DATABASE_URL must be a postgresql:// URL; unset it to use the text database."
        )

    os.makedirs(app.instance_path, mode=0o700, exist_ok=True)
    if not app.config.get("SECRET_KEY"):
        current, fallbacks = load_keys(Path(app.instance_path))
        app.config["SECRET_KEY"] = current
        app.config["SECRET_KEY_FALLBACKS"] = fallbacks


def public_origin(value: object, force_https: bool) -> str:
    """Return the configured ``PUBLIC_URL`` as a bare origin, refusing one that cannot be.

    The default is ``http://localhost:$PORT``, the address ``make run``
    prints (passkeys need a host name; an IP address cannot be an RP ID).
    """
    url = str(value or f"http://localhost:{os.environ.get('PORT') or 8000}").rstrip("/")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        parts = parts._replace(netloc="")
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or "@" in parts.netloc
        or parts[2:] != ("", "", "")
    ):
        raise RuntimeError(
            f"FLASK_PUBLIC_URL={url!r} is not an origin such as https://www.example.org"
        )
    if force_https and parts.scheme != "https":
        raise RuntimeError(
            "FLASK_FORCE_HTTPS=true needs FLASK_PUBLIC_URL=https://<your host>: "
            "the https redirect and every link go there."
        )
    return url


def _write_keys(path: Path, keys: list[str], *, replace: bool = True) -> None:
    """Write the key file atomically with mode 0600 from the first byte.

    With ``replace=False`` an existing file wins (``FileExistsError``): two
    workers starting at once must end up with the same key, not one each.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"current": keys[0], "fallbacks": keys[1:]}, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _new_key() -> str:
    return secrets.token_hex(32)


def load_keys(
    instance: Path, name: str = KEYS_FILE, new_key: Callable[[], str] = _new_key
) -> tuple[str, list[str]]:
    """Return ``(current, fallbacks)``, creating the key file on first start.

    ``name`` and ``new_key`` let another key file (mfa.py's) share this code.
    """
    path = instance / name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        data = None  # refused below, with every other malformed file
    except FileNotFoundError:
        key = new_key()
        try:
            _write_keys(path, [key], replace=False)
        except FileExistsError:  # another worker created it first: use theirs
            pass
        data = json.loads(path.read_text(encoding="utf-8"))
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    try:
        current, fallbacks = data["current"], list(data.get("fallbacks", []))
    except (TypeError, KeyError, AttributeError):
        current, fallbacks = None, []
    if (
        not isinstance(current, str)
        or not current
        or not all(isinstance(k, str) for k in fallbacks)
    ):
        # Never start with a made-up key: every session would silently end.
        raise RuntimeError(f"{path} is not a valid key file; restore it or delete it.")
    return current, fallbacks


def rotate_keys(
    instance: Path, name: str = KEYS_FILE, new_key: Callable[[], str] = _new_key
) -> None:
    """Make a new key current and keep only the previous one as a fallback."""
    os.makedirs(instance, mode=0o700, exist_ok=True)
    current, _ = load_keys(instance, name, new_key)
    _write_keys(instance / name, [new_key(), current])
