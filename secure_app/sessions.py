"""Sessions the server can end: a SHA-256-signed cookie plus live session ids in the user record.

Flask's cookie session is signed, not stored: deleting the cookie at logout
does nothing to a copy an attacker took earlier. So each login gets a random
session id (256 bits). The cookie carries it; the user's record in the text
database carries its SHA-256 digest and the login time. Every request checks
that the id is still live, so logout, "log out everywhere else", a password
change and account deletion end sessions on the server, per device.

The cookie holds only ``uid`` (the username), ``sid``, ``seen`` (the last
request, for the idle timeout), and Flask-WTF's CSRF token: it is readable by
whoever holds it, so nothing personal goes in.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from flask import Flask
from flask.sessions import SecureCookieSessionInterface
from itsdangerous import URLSafeTimedSerializer

# Old sessions are pruned at login; a user never has more than this many.
MAX_SESSIONS_PER_USER = 20


class Sha256SessionInterface(SecureCookieSessionInterface):
    """Flask's cookie session, signed with HMAC-SHA256 instead of HMAC-SHA1 (ASVS 5.0 V11.4.1)."""

    digest_method = staticmethod(hashlib.sha256)
    salt = "secure_app.session"

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        # Flask builds a new serializer (and derives its keys) on every
        # request; build it once per set of keys instead.
        keys = (app.secret_key, tuple(app.config.get("SECRET_KEY_FALLBACKS") or ()))
        cached = getattr(self, "_serializer", None)
        if cached is None or cached[0] != keys:
            cached = self._serializer = (keys, super().get_signing_serializer(app))
        return cached[1]


def _digest(sid: str) -> str:
    # Store a digest, not the id: a leaked data file holds no usable session.
    return hashlib.sha256(sid.encode()).hexdigest()


def start(record: dict[str, Any], now: int, lifetime: int) -> str:
    """Add a new live session to ``record`` and return its id; prune dead ones."""
    live = {d: t for d, t in record.get("sessions", {}).items() if now - t <= lifetime}
    while len(live) >= MAX_SESSIONS_PER_USER:
        del live[min(live, key=live.__getitem__)]
    sid = secrets.token_urlsafe(32)
    live[_digest(sid)] = now
    record["sessions"] = live
    return sid


def end(record: dict[str, Any], sid: str) -> None:
    """Remove one session from ``record``."""
    record.get("sessions", {}).pop(_digest(sid), None)


def end_others(record: dict[str, Any], sid: str) -> None:
    """Keep only session ``sid`` in ``record``."""
    keep = _digest(sid)
    record["sessions"] = {d: t for d, t in record.get("sessions", {}).items() if d == keep}


def count(record: dict[str, Any]) -> int:
    return len(record.get("sessions", {}))


def check(
    cookie: dict[str, Any], record: dict[str, Any] | None, now: int, idle: int, lifetime: int
) -> str:
    """Return ``"live"``, ``"expired"`` (a timeout) or ``"ended"`` (logged out or deleted)."""
    sid, seen = cookie.get("sid"), cookie.get("seen")
    if record is None or not isinstance(sid, str) or not isinstance(seen, int):
        return "ended"
    started = record.get("sessions", {}).get(_digest(sid))
    if started is None:
        return "ended"
    if now - started > lifetime or now - seen > idle:
        return "expired"
    return "live"
