"""The account's recent security events, kept in its record for the security page (ASVS 5.0 V6.3.5).

The audit log (audit.py) is for the operator; this is for the user: the
last ``MAX_EVENTS`` sign-ins, failures and changes, stored as a list in the
user's record, so a guesser's flood of failures replaces older entries and
never grows the record. Superseded versions of the record are reclaimed by
the store's compaction, so the data file stays bounded too.

:func:`record` is a store change: call it inside ``Store.update`` (or inside
the change of ``auth.update_own``, ``mfa.guarded_update``...), so the event
is written with the change it reports, in one write::

    def change(r):
        r["password_hash"] = new_hash
        events.record(r, "password_reset")

A failed password for a known username is written after the response has
gone (:func:`record_after_response`): the response time must not tell a
guesser whether the username exists (V6.3.8), and an unknown one has no
record to write.

Besides the list, the record keeps ``failed_logins``, the count, time and
address of failures since the last successful sign-in, for the notice that
the next sign-in shows (:func:`login_succeeded`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import after_this_request, has_request_context, request, url_for
from markupsafe import Markup
from werkzeug.wrappers import Response

from .sessions import clean_ip
from .store import RecordGone, StoreError, get_store

log = logging.getLogger(__name__)

MAX_EVENTS = 20
# Details are short facts (a method, a device summary), never user text at length.
MAX_DETAILS = 4
MAX_DETAIL = 64
FAILURES = frozenset({"login_failure", "two_factor_failure"})

# What the security page says for each kind; other engineers' kinds fall back to the kind.
LABELS = {
    "login_success": "Signed in",
    "login_failure": "Failed sign-in: wrong password",
    "two_factor_failure": "Failed sign-in: wrong second-step code",
    "password_changed": "Password changed",
    "password_reset": "Password reset with an email link",
    "totp_enabled": "Authenticator app turned on",
    "totp_disabled": "Authenticator app turned off",
    "recovery_codes_regenerated": "New recovery codes made",
    "recovery_code_used": "Recovery code used",
    "session_ended": "Session ended from the security page",
    "sessions_ended_others": "Logged out everywhere else",
    "email_changed": "Email address changed",
    "email_verified": "Email address confirmed",
    "passkey_added": "Passkey added",
    "passkey_removed": "Passkey removed",
    "passkey_renamed": "Passkey renamed",
    "two_factor_reset": "Second factors removed by an operator; every session ended",
}
METHODS = {
    "password": "with your password",
    "totp": "with your password and authenticator app",
    "recovery": "with your password and a recovery code",
    "passkey": "with a passkey",
}

_FROM_REQUEST = object()


def _clean(value: object) -> str | int | bool | None:
    if isinstance(value, bool | int) or value is None:
        return value
    return str(value)[:MAX_DETAIL]


def record(
    rec: dict[str, Any],
    kind: str,
    *,
    ip: object = _FROM_REQUEST,
    now: int | None = None,
    **details: object,
) -> None:
    """Add event ``kind`` to the record ``rec`` (a store change: call it inside an update).

    ``ip`` defaults to the request's address; ``details`` are short facts
    shown with the event (at most four, each cut to 64 characters).
    """
    if ip is _FROM_REQUEST:
        ip = request.remote_addr if has_request_context() else None
    at = int(time.time()) if now is None else now
    entry: dict[str, Any] = {"k": str(kind)[:MAX_DETAIL], "t": at, "ip": clean_ip(ip)}
    for key, value in list(details.items())[:MAX_DETAILS]:
        entry[str(key)[:MAX_DETAIL]] = _clean(value)
    stored = rec.get("events")
    kept = [e for e in stored if isinstance(e, dict)] if isinstance(stored, list) else []
    rec["events"] = [*kept, entry][-MAX_EVENTS:]
    if kind in FAILURES:
        failed = rec.get("failed_logins")
        failed = failed if isinstance(failed, dict) else {}
        past_password = bool(failed.get("tf")) or kind == "two_factor_failure"
        n = int(failed.get("n", 0)) + 1
        rec["failed_logins"] = {"n": n, "t": at, "ip": entry["ip"], "tf": past_password}


def login_succeeded(rec: dict[str, Any], method: str) -> dict[str, Any] | None:
    """Record a sign-in; return the failures since the previous one (for the notice), or None."""
    failed = rec.pop("failed_logins", None)
    record(rec, "login_success", method=method)
    return failed if isinstance(failed, dict) and failed.get("n") else None


def record_now(username: str, kind: str, **details: object) -> None:
    """Write event ``kind`` for ``username`` on its own; a failed write only loses the event."""
    try:
        get_store().update(username, lambda r: record(r, kind, **details))
    except RecordGone:
        pass  # deleted meanwhile: nobody to tell
    except (StoreError, OSError):
        log.exception("could not record %s for a user", kind)


def record_after_response(username: str, kind: str, **details: object) -> None:
    """Write event ``kind`` for ``username`` once this request's response has been sent.

    The write happens when the server closes the response, after its last
    byte went out: its cost is not part of the response time. A write that
    fails is logged and dropped (the event is informative; nothing depends
    on it).
    """
    store = get_store()
    ip = request.remote_addr
    at = int(time.time())

    def write() -> None:
        try:
            store.update(username, lambda r: record(r, kind, ip=ip, now=at, **details))
        except RecordGone:
            pass  # deleted meanwhile: nobody to tell
        except (StoreError, OSError):
            log.exception("could not record %s for a user", kind)

    @after_this_request
    def defer(response: Response) -> Response:
        response.call_on_close(write)
        return response


def when(at: object) -> str:
    """A time for people: ``01 December 2026, 14:02 UTC``."""
    if not isinstance(at, int):
        return "an unknown time"
    return time.strftime("%d %B %Y, %H:%M UTC", time.gmtime(at))


def recent(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The record's events for the security page, newest first, each with its wording."""
    rows = []
    stored = rec.get("events")
    for entry in reversed(stored if isinstance(stored, list) else []):
        if not isinstance(entry, dict):
            continue
        kind = str(entry.get("k", ""))
        label = LABELS.get(kind, kind.replace("_", " ").capitalize())
        extra = []
        if kind == "login_success" and entry.get("method") in METHODS:
            extra.append(METHODS[entry["method"]])
        if kind == "session_ended" and entry.get("device"):
            extra.append(f"({entry['device']})")
        if kind == "sessions_ended_others" and isinstance(entry.get("count"), int):
            extra.append(f"({entry['count']} ended)")
        rows.append(
            {
                "what": " ".join([label, *extra]),
                "when": when(entry.get("t")),
                "ip": entry.get("ip"),
                "failure": kind in FAILURES,
            }
        )
    return rows


def failure_notice(failed: dict[str, Any]) -> Markup:
    """The sign-in notice: failures since the last visit, and the last one's address and time."""
    n = int(failed.get("n", 0))
    attempts = "1 failed sign-in attempt" if n == 1 else f"{n} failed sign-in attempts"
    at = failed.get("t")
    clock = (
        time.strftime("%H:%M UTC", time.gmtime(at)) if isinstance(at, int) else "an unknown time"
    )
    where = failed.get("ip") or "an unknown address"
    text = Markup("{} since your last visit, the last from {} at {}.").format(
        attempts, where, clock
    )
    if failed.get("tf"):
        text += Markup(
            " At least one got past your password: if that was not you, change your password now."
        )
    link = url_for("two_factor.security", _anchor="recent-activity")
    return text + Markup(' <a href="{}">See recent activity</a>').format(link)
