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

What the record keeps per session (the security page shows it)::

    "sessions": {"<SHA-256 of the id>": {"t": 1764550000, "s": 1764551200,
                                         "ua": "Firefox 128 on Windows", "ip": "203.0.113.7"}}

``t`` is the login time (the absolute lifetime counts from it), ``s`` the
last activity, refreshed in the record at most every ``ACTIVE_REFRESH``
seconds (a page view does not cost a store write), ``ua`` a short summary
that ua-parser reads from the User-Agent (never the raw header) and ``ip``
the address of the last refresh. Records from before held the login time
alone (``"<digest>": 1764550000``); every function here reads both, and a
write turns the old form into the new one, so nobody is logged out by it.

The security page names a session by :func:`public_id`, a domain-separated
hash of the stored digest: it can be shown and posted back, and neither it
nor the digest can be turned back into the cookie's id.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
from typing import Any

import ua_parser
from flask import Flask, current_app, has_request_context, request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface, SessionMixin
from flask.wrappers import Request, Response
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

# The default of FLASK_MAX_SESSIONS_PER_USER: a new login ends the oldest beyond it.
MAX_SESSIONS_PER_USER = 20
# How stale ``seen`` may get before a request refreshes it (see the module docstring).
SEEN_REFRESH = 60
# How stale a session's "last active" in the record may get: one store write
# per session every five minutes at most.
ACTIVE_REFRESH = 300
# ua-parser's rules are regular expressions: parse a bounded prefix only
# (a real User-Agent is a few hundred characters; the header may be 8 KiB).
MAX_AGENT_INPUT = 512
MAX_DEVICE = 64
UNKNOWN_DEVICE = "Unknown browser"
PUBLIC_ID_RE = re.compile(r"[0-9a-f]{32}")


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


def public_id(digest: str) -> str:
    """The name of a session on the security page: not the cookie's id, and no way back to it."""
    return hashlib.sha256(b"secure_app.session-public-id\0" + digest.encode()).hexdigest()[:32]


def public_id_of(sid: str) -> str:
    """The security page's name for the session whose cookie holds ``sid``."""
    return public_id(_digest(sid))


def describe_agent(header: object) -> str:
    """A short summary of a User-Agent header, such as ``Firefox 128 on Windows``."""
    if not isinstance(header, str) or not header.strip():
        return UNKNOWN_DEVICE
    parsed = ua_parser.parse(header[:MAX_AGENT_INPUT])
    browser = parsed.user_agent
    system = parsed.os
    name = ""
    if browser is not None and browser.family != "Other":
        name = f"{browser.family} {browser.major}" if browser.major else browser.family
    if system is not None and system.family != "Other":
        name = f"{name or UNKNOWN_DEVICE} on {system.family}"
    return (name or UNKNOWN_DEVICE)[:MAX_DEVICE]


def clean_ip(value: object) -> str | None:
    """The client's address if it is one (a forwarded header may carry any text), else None."""
    if not isinstance(value, str) or len(value) > 45:
        return None
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    # An IPv6 zone ("fe80::1%eth0") names an interface of the host that saw the
    # address, and Python accepts any text after the "%": keep the address alone.
    return str(address).partition("%")[0]


def _entry(value: object) -> dict[str, Any] | None:
    """One session's stored value, in the current form; None if it is not one."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"t": value, "s": value}  # a record from before: the login time alone
    if isinstance(value, dict) and isinstance(value.get("t"), int):
        return value
    return None


def _live(record: dict[str, Any], now: int, lifetime: int) -> dict[str, dict[str, Any]]:
    live = {}
    for digest, value in (record.get("sessions") or {}).items():
        entry = _entry(value)
        if entry is not None and now - entry["t"] <= lifetime:
            live[digest] = entry
    return live


def _cap() -> int:
    if has_request_context():
        return max(1, int(current_app.config.get("MAX_SESSIONS_PER_USER", MAX_SESSIONS_PER_USER)))
    return MAX_SESSIONS_PER_USER


def start(
    record: dict[str, Any],
    now: int,
    lifetime: int,
    *,
    device: str | None = None,
    ip: str | None = None,
    cap: int | None = None,
) -> str:
    """Add a new live session to ``record`` and return its id; prune dead ones.

    Past ``cap`` live sessions (``MAX_SESSIONS_PER_USER``) the oldest logins
    end. In a request, ``device`` and ``ip`` default to the request's.
    """
    if has_request_context():
        device = device if device is not None else describe_agent(request.user_agent.string)
        ip = ip if ip is not None else clean_ip(request.remote_addr)
    cap = cap if cap is not None else _cap()
    live = _live(record, now, lifetime)
    while len(live) >= cap:
        del live[min(live, key=lambda d: live[d]["t"])]
    sid = secrets.token_urlsafe(32)
    live[_digest(sid)] = {
        "t": now,
        "s": now,
        "ua": (device or UNKNOWN_DEVICE)[:MAX_DEVICE],
        "ip": ip,
    }
    record["sessions"] = live
    return sid


def end(record: dict[str, Any], sid: str) -> None:
    """Remove one session from ``record``."""
    record.get("sessions", {}).pop(_digest(sid), None)


def end_others(record: dict[str, Any], sid: str) -> int:
    """Keep only session ``sid`` in ``record``; return how many others ended."""
    keep = _digest(sid)
    before = record.get("sessions", {})
    record["sessions"] = {d: v for d, v in before.items() if d == keep}
    return len(before) - len(record["sessions"])


def end_public(record: dict[str, Any], shown_id: str, keep_sid: str) -> dict[str, Any] | None:
    """End the session the security page calls ``shown_id``; return it, or None if there is none.

    Never ``keep_sid`` (the session asking): that one logs out instead.
    """
    if not isinstance(shown_id, str) or not PUBLIC_ID_RE.fullmatch(shown_id):
        return None  # compare_digest refuses non-ASCII text: check the shape first
    keep = _digest(keep_sid)
    for digest, value in list(record.get("sessions", {}).items()):
        if digest != keep and secrets.compare_digest(public_id(digest), shown_id):
            del record["sessions"][digest]
            return _entry(value) or {}
    return None


def count(record: dict[str, Any]) -> int:
    return len(record.get("sessions", {}))


def activity_due(record: dict[str, Any], sid: str, now: int) -> bool:
    """True when this session's "last active" in the record is ``ACTIVE_REFRESH`` old."""
    entry = _entry(record.get("sessions", {}).get(_digest(sid)))
    return entry is not None and now - int(entry.get("s", entry["t"])) >= ACTIVE_REFRESH


def touch(record: dict[str, Any], sid: str, now: int, ip: str | None) -> None:
    """Store this session's last activity and address; a session ended meanwhile stays ended."""
    stored = record.get("sessions", {})
    digest = _digest(sid)
    entry = _entry(stored.get(digest))
    if entry is not None:
        stored[digest] = {**entry, "s": now, "ip": ip if ip is not None else entry.get("ip")}


def listing(
    record: dict[str, Any], current_sid: str | None, now: int, lifetime: int
) -> list[dict[str, Any]]:
    """The live sessions for the security page: this one first, then the most recently active."""
    mine = _digest(current_sid) if isinstance(current_sid, str) else None
    rows = []
    for digest, entry in _live(record, now, lifetime).items():
        rows.append(
            {
                "id": public_id(digest),
                "current": digest == mine,
                "started": entry["t"],
                "active": max(int(entry.get("s", entry["t"])), entry["t"]),
                "device": entry.get("ua") or UNKNOWN_DEVICE,
                "ip": entry.get("ip"),
            }
        )
    rows.sort(key=lambda row: (not row["current"], -row["active"]))
    return rows


def check(
    cookie: dict[str, Any], record: dict[str, Any] | None, now: int, idle: int, lifetime: int
) -> str:
    """Return ``"live"``, ``"expired"`` (a timeout) or ``"ended"`` (logged out or deleted)."""
    sid, seen = cookie.get("sid"), cookie.get("seen")
    if record is None or not isinstance(sid, str) or not isinstance(seen, int):
        return "ended"
    entry = _entry(record.get("sessions", {}).get(_digest(sid)))
    if entry is None:
        return "ended"
    if now - entry["t"] > lifetime or now - seen > idle:
        return "expired"
    return "live"
