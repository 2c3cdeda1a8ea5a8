"""Blueprint: the security page's sessions and recent events, and ending one session (V7.5.2).

The page itself is ``two_factor.security`` (``/security``): other modules
and mails link to that endpoint, so it stays where it is and takes its
sessions and events from :func:`overview`. Ending a session removes its
digest from the user's record; since every request checks the record
(``auth.load_logged_in_user``), that cookie is dead at once in every worker
process and on every host that shares the store.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, current_app, flash, redirect, session, url_for
from flask_wtf import FlaskForm
from werkzeug.wrappers import Response
from wtforms import HiddenField
from wtforms.validators import DataRequired, Length

from . import audit, events, sessions
from .auth import update_own
from .reauth import fresh_auth_required

bp = Blueprint("security_page", __name__)

NOT_FOUND = (
    "That session was not found: it may have ended already, or it is not one of yours. "
    "Nothing was changed."
)
IS_CURRENT = "That is the session you are using now. To end it, log out."


def _text_only(value: object) -> str:
    # A file sent in a text field is no text (and has no len() for Length).
    return value if isinstance(value, str) else ""


class EndSessionForm(FlaskForm):
    session_id = HiddenField(validators=[DataRequired(), Length(max=64)], filters=[_text_only])


class _Refused(Exception):
    """The posted id names no other live session of this user: write nothing."""


def overview(user: dict[str, Any]) -> dict[str, Any]:
    """What the security page shows about sessions and events, for the logged-in ``user``."""
    now = int(time.time())
    lifetime = int(current_app.config["PERMANENT_SESSION_LIFETIME"])
    rows = sessions.listing(user, session.get("sid"), now, lifetime)
    for row in rows:
        row["started_text"] = events.when(row["started"])
        row["active_text"] = _ago(now - row["active"])
    return {
        "live_sessions": rows,
        "session_count": len(rows),
        "recent_events": events.recent(user),
    }


def _ago(seconds: int) -> str:
    # The record's "last active" is refreshed every few minutes, so say no more than that.
    if seconds < sessions.ACTIVE_REFRESH:
        return "in the last 5 minutes"
    if seconds < 3600:
        return f"about {seconds // 60} minutes ago"
    hours = seconds // 3600
    return "about 1 hour ago" if hours == 1 else f"about {hours} hours ago"


def end_session() -> Response:
    """End one other session of this user, named by its id on the security page."""
    form = EndSessionForm()
    username = session["uid"]
    shown = form.session_id.data if form.validate_on_submit() else None
    current = session["sid"]
    if shown and sessions.public_id_of(current) == shown:
        flash(IS_CURRENT, "error")
        return redirect(url_for("two_factor.security"), 303)
    ended: list[dict[str, Any]] = []

    def change(record: dict[str, Any]) -> None:
        entry = sessions.end_public(record, shown or "", current)
        if entry is None:
            raise _Refused
        events.record(record, "session_ended", device=entry.get("ua"))
        ended.append(entry)

    try:
        update_own(change)
    except _Refused:
        audit.event("session_end_refused", username)
        flash(NOT_FOUND, "error")
        return redirect(url_for("two_factor.security"), 303)
    audit.event("session_ended", username)
    device = ended[0].get("ua") or sessions.UNKNOWN_DEVICE
    flash(f"The session on {device} has ended: it must sign in again.", "success")
    return redirect(url_for("two_factor.security"), 303)


# The route is registered here, not by a decorator: mutmut (``make mutation``) leaves decorated
# functions alone, and the mutation score must cover this handler's checks.
bp.add_url_rule(
    "/security/sessions/end", view_func=fresh_auth_required(end_session), methods=["POST"]
)
