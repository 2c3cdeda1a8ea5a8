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

``seen`` is refreshed only once it is ``seen_refresh(idle)`` seconds old (at
most 60 s, and at most a thirtieth of the idle timeout), not on every
request: a new ``seen`` means a newly signed cookie in the response, and
refreshing it every second re-signed and re-sent the cookie on nearly every
page view. The idle timeout is still measured from the signed ``seen`` and
enforced by the server; the only difference is that a session can end up to
that many seconds *before* a full idle timeout since its last request, never
after it.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from flask import Flask
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface, SessionMixin
from flask.wrappers import Request, Response
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

# Old sessions are pruned at login; a user never has more than this many.
MAX_SESSIONS_PER_USER = 20
# How stale ``seen`` may get before a request refreshes it (see the module docstring).
SEEN_REFRESH = 60


class _OnceDerivedSigner(TimestampSigner):
    """itsdangerous' TimestampSigner, deriving the signing key from each secret once.

    It derives the key (one more HMAC) on every sign and every check; the
    result depends only on the secret, the salt and the digest, all fixed
    for the signer's life.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._derived: dict[Any, bytes] = {}

    def derive_key(self, secret_key: str | bytes | None = None) -> bytes:
        derived = self._derived.get(secret_key)
        if derived is None:
            derived = self._derived[secret_key] = super().derive_key(secret_key)
        return derived


class OnceSerializer(URLSafeTimedSerializer):
    """itsdangerous' URLSafeTimedSerializer, building its signer once instead of per call.

    A signer holds only the keys, the salt and the algorithm, so one can
    serve every request and thread. What the session cookie signs and
    accepts is unchanged.
    """

    default_signer = _OnceDerivedSigner

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._signers: dict[Any, Any] = {}

    def make_signer(self, salt: str | bytes | None = None) -> Any:
        signer = self._signers.get(salt)
        if signer is None:
            signer = self._signers[salt] = super().make_signer(salt)
        return signer


class Sha256SessionInterface(SecureCookieSessionInterface):
    """Flask's cookie session, signed with HMAC-SHA256 instead of HMAC-SHA1 (ASVS 5.0 V11.4.1)."""

    digest_method = staticmethod(hashlib.sha256)
    salt = "secure_app.session"

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        # Flask builds a new serializer (and derives its keys) on every
        # request; build it once per set of keys instead. The same arguments
        # as Flask's own, with the current key last.
        if not app.secret_key:
            return None
        fallbacks = tuple(app.config.get("SECRET_KEY_FALLBACKS") or ())
        keys = (app.secret_key, fallbacks)
        cached = getattr(self, "_serializer", None)
        if cached is None or cached[0] != keys:
            serializer = OnceSerializer(
                [*fallbacks, app.secret_key],
                salt=self.salt,
                serializer=self.serializer,
                signer_kwargs={
                    "key_derivation": self.key_derivation,
                    "digest_method": self.digest_method,
                },
            )
            cached = self._serializer = (keys, serializer)
        return cached[1]

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if app.secret_key and not request.environ.get("HTTP_COOKIE"):
            return self.session_class()  # no cookie at all: what Flask returns, without parsing
        return super().open_session(app, request)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        # Flask works out the cookie's name, domain, path and flags before it
        # finds, on most requests, that nothing changed; skip to that answer.
        # An unchanged session sets no cookie either way, and Vary is the same.
        if not session.modified and not (
            session.permanent and app.config["SESSION_REFRESH_EACH_REQUEST"]
        ):
            if session.accessed:
                vary_on_cookie(response)
            return
        super().save_session(app, session, response)


def vary_on_cookie(response: Response) -> None:
    """Add ``Cookie`` to ``Vary``, without parsing the header when it is absent or just that."""
    current = response.headers.get("Vary")
    if current is None:
        response.headers.add("Vary", "Cookie")
    elif current != "Cookie":
        response.vary.add("Cookie")


def seen_refresh(idle: int) -> int:
    """Seconds ``seen`` may age before it is refreshed: 60 s, less for short idle timeouts."""
    return max(1, min(SEEN_REFRESH, idle // 30))


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
