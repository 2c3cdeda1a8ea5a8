"""Re-authentication: a recent password or second-factor check before sensitive changes.

ASVS 5.0 V7.5.1: enrolling or disabling a factor and regenerating recovery
codes need an authentication less than ``REAUTH_WINDOW`` seconds old. The
session's ``auth_at`` is the time of the last one: a password login, the
second step of a login, or ``/reauthenticate``. A stale session is sent to
``/reauthenticate?next=...`` and comes back to the page it was on.
Re-authenticating renews the session id, as a login does (V7.2.4).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf import FlaskForm
from werkzeug.wrappers import Response
from wtforms import PasswordField, StringField
from wtforms.validators import Length

from . import audit, events, mail, mfa, passwords, sessions
from .auth import for_this_session, login_required, safe_next
from .security import password_guess_limit

bp = Blueprint("reauth", __name__)

AUTH_AT = "auth_at"
FAILED = "That did not match. Please try again."


def _text_only(value: object) -> str:
    # A file sent in a text field is no text (and has no len() for Length).
    return value if isinstance(value, str) else ""


class ReauthForm(FlaskForm):
    password = PasswordField(
        "Password", validators=[Length(max=passwords.MAX_LENGTH)], filters=[_text_only]
    )
    code = StringField(
        "Or a code from your app, or a recovery code",
        validators=[Length(max=mfa.MAX_CODE_INPUT)],
        filters=[_text_only],
    )


def mark_fresh(now: int) -> None:
    """Record in the session that the user has just authenticated."""
    session[AUTH_AT] = now


def is_fresh(now: int | None = None) -> bool:
    """True when this session authenticated less than ``REAUTH_WINDOW`` seconds ago."""
    at = session.get(AUTH_AT)
    if not isinstance(at, int) or isinstance(at, bool):
        return False
    now = int(time.time()) if now is None else now
    return 0 <= now - at <= int(current_app.config["REAUTH_WINDOW"])


def _return_path() -> str:
    """Where to come back after re-authenticating: this page, or the page that held the form."""
    # A GET reaches a view only through a rule that allows GET, so the rule alone decides.
    if "GET" in (request.url_rule.methods or ()):
        return request.path
    referrer = urlsplit(request.referrer or "")
    if referrer.netloc == request.host:
        back = safe_next(referrer.path + ("?" + referrer.query if referrer.query else ""))
        if back:
            return back
    return url_for("two_factor.security")


def fresh_auth_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """View decorator: logged in and authenticated within ``REAUTH_WINDOW``, or re-authenticate."""

    @functools.wraps(view)
    @login_required
    def wrapped_view(**kwargs: Any) -> Any:
        return _to_reauth_if_stale() or view(**kwargs)

    return wrapped_view


def _to_reauth_if_stale() -> Response | None:
    # Decided here, per request, not in fresh_auth_required (which runs once, at import):
    # mutation testing can only reach code that runs during the tests.
    if is_fresh():
        return None
    flash("Please confirm it is you before changing your sign-in settings.", "info")
    # 303: a stale POST must come back as a GET, its body dropped.
    return redirect(url_for("reauth.reauthenticate", next=_return_path()), 303)


def reauthenticate() -> Any:
    """Check the password, or a TOTP or recovery code, then renew the session and go back."""
    form = ReauthForm()
    user = g.user
    username = user["username"]
    target = safe_next(request.args.get("next")) or url_for("two_factor.security")
    has_factor = mfa.has_totp(user)  # codes come with TOTP; a passkey has its own button
    if form.validate_on_submit():
        now = int(time.time())
        code = form.code.data or ""
        if code.strip() and has_factor:  # the code exactly as typed: mfa decides what counts
            match = mfa.check_code(user, code, now)
            ok = match is not None and _renew(user, now, using(match))
            how = match.kind if match else "code"
            if ok and how == "recovery":
                mail.notify(user, "recovery_code_used")
        else:
            ok = bool(form.password.data) and passwords.verify_password(
                user["password_hash"], form.password.data
            )
            ok = ok and _renew(user, now, lambda record: True)
            how = "password"
        if ok:
            audit.event("reauth_success", username, method=how)
            return redirect(target, 303)
        audit.event("reauth_failure", username, method=how)
        (form.code if how != "password" else form.password).errors[:] = [FAILED]
    elif request.method == "POST":
        audit.event("reauth_failure", username, method="form")
        form.password.errors[:] = [FAILED]
    status = 422 if request.method == "POST" else 200
    return render_template(
        "security/reauthenticate.html", form=form, has_factor=has_factor, next=target
    ), status


def using(match: mfa.Match) -> Callable[[dict[str, Any]], bool]:
    """Use up ``match``; a recovery code used is an event the owner sees (events.py)."""
    consume = mfa.consume(match)

    def use(record: dict[str, Any]) -> bool:
        if not consume(record):
            return False
        if match.kind == "recovery":
            events.record(record, "recovery_code_used")
        return True

    return use


def renew(user: dict[str, Any], now: int, change: Callable[[dict[str, Any]], bool]) -> bool:
    """Re-authenticate after a check made elsewhere (a passkey): ``change`` is its write."""
    return _renew(user, now, change)


def _renew(user: dict[str, Any], now: int, change: Callable[[dict[str, Any]], bool]) -> bool:
    """Give this browser a new session id and a fresh ``auth_at``, in one guarded write."""
    old_sid = session.get("sid", "")
    lifetime = int(current_app.config["PERMANENT_SESSION_LIFETIME"])
    sid_box: list[str] = []

    def renew(record: dict[str, Any]) -> bool:
        if change(record) is False:
            return False
        sessions.end(record, old_sid)  # the cookie from before re-authentication is dead
        sid_box.append(sessions.start(record, now, lifetime))
        return True

    # Only while this session is still live in the record: a re-authentication
    # racing "log out everywhere else" or reset-two-factor must not bring back
    # the session they ended (auth.for_this_session refuses it).
    guarded = for_this_session(renew)
    factor = mfa.factor_id(user)
    if not mfa.guarded_update(user["username"], user["password_hash"], factor, guarded):
        return False
    session["sid"] = sid_box[0]
    session["seen"] = now
    mark_fresh(now)
    return True


# The route is registered here, not by decorators: mutmut (``make mutation``) leaves decorated
# functions alone, and the mutation score must cover this handler's checks.
# The view_func is what the decorators made: the outermost wrapper is listed first.
bp.add_url_rule(
    "/reauthenticate",
    view_func=login_required(password_guess_limit(methods=["POST"])(reauthenticate)),
    methods=("GET", "POST"),
)
