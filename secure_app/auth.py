"""Accounts: register, log in and out, change password, delete account, and the session checks."""

from __future__ import annotations

import contextlib
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
from werkzeug.wrappers import Response

from . import audit, events, mail, mfa, passwords, sessions, uploads
from .forms import ChangePasswordForm, DeleteAccountForm, LoginForm, RegisterForm
from .security import limiter, login_failed, login_username_key, password_guess_limit
from .store import Record, RecordGone, StoreError, get_photos, get_store, new_user

bp = Blueprint("auth", __name__)

LOGIN_FAILED = "Invalid username or password."
SESSION_EXPIRED = "Your session has expired. Please log in again."
# Where "this session was ended elsewhere" would only be noise: files, and the
# pages of a mailed link (the link is what the user came for).
NO_ENDED_NOTICE = frozenset(
    {"static", "account.photo", "recovery.reset_password", "recovery.verify_email"}
)
SESSION_ENDED = (
    "You were signed out: this session was ended elsewhere "
    "(from the security page, a password change or a log-out everywhere else). "
    "Please log in again."
)


def _config(key: str) -> Any:
    return current_app.config[key]


def load_logged_in_user() -> Response | None:
    """Put the user's record in ``g.user`` if the session is still live on the server."""
    g.user = None
    cookie = session._get_current_object()  # type: ignore[attr-defined]  # one context look-up
    uid = cookie.get("uid")
    if uid is None:
        return None
    now = int(time.time())
    config = current_app.config
    idle = int(config["SESSION_IDLE_TIMEOUT"])
    record = get_store().get(uid) if isinstance(uid, str) else None
    state = sessions.check(cookie, record, now, idle, int(config["PERMANENT_SESSION_LIFETIME"]))
    if state != "live":
        cookie.clear()  # a replayed, ended or expired cookie is anonymous
        if state == "expired" and request.endpoint != "static":
            flash(SESSION_EXPIRED, "info")
            if request.method == "GET":
                return redirect(url_for("auth.login", next=_here()))
        elif request.endpoint not in NO_ENDED_NOTICE:
            # Ended on the server while this browser still held the cookie: this
            # browser's own logout clears the cookie, so it never lands here.
            # Said on the page the browser asked for; a page that needs a login
            # sends it to the login page, where the message shows. A form posted
            # with the ended cookie is told too: its redirect to the login page
            # would otherwise be a silent logout.
            flash(SESSION_ENDED, "info")
        return None
    g.user = record
    # Not every second: a changed cookie must be signed and sent again
    # (sessions.py explains the bound this puts on the idle timeout).
    if now - cookie["seen"] >= sessions.seen_refresh(idle):
        cookie["seen"] = now
    if sessions.activity_due(record, cookie["sid"], now):
        _note_activity(uid, cookie["sid"], now)
    return None


def _note_activity(username: str, sid: str, now: int) -> None:
    """Refresh this session's "last active" in the record: one write every few minutes at most."""
    ip = sessions.clean_ip(request.remote_addr)
    try:
        get_store().update(username, lambda r: sessions.touch(r, sid, now, ip))
    except (RecordGone, StoreError):
        pass  # only what the security page shows is late; the next request tries again


def _here() -> str:
    query = request.query_string.decode("latin-1")
    return request.path + ("?" + query if query else "")


def login_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """View decorator that sends anonymous users to the login page, and back afterwards."""

    @functools.wraps(view)
    def wrapped_view(**kwargs: Any) -> Any:
        return _to_login_if_anonymous() or view(**kwargs)

    return wrapped_view


def _to_login_if_anonymous() -> Response | None:
    # Decided here, per request, not in login_required (which runs once, at import):
    # mutation testing can only reach code that runs during the tests.
    if g.user is None:
        return redirect(url_for("auth.login", next=_here()))
    return None


def safe_next(target: str | None) -> str | None:
    """Return ``target`` if it is a path on this site, else None (no open redirect).

    Browsers treat ``\\`` as ``/`` and drop tabs and newlines, so ``/\\evil``
    and ``/\\t/evil`` mean ``//evil``: a host. Only a single leading slash
    followed by printable ASCII without backslashes is accepted.
    """
    if not target or not target.startswith("/") or target.startswith("//"):
        return None
    if any(ch == "\\" or not ("\x21" <= ch <= "\x7e") for ch in target):
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    return target


def begin_session(
    username: str, verified_hash: str, new_hash: str | None = None, method: str = "password"
) -> bool:
    """Start a fresh session for ``username`` (prevents session fixation).

    Only if the password is still the one just checked: a login that checked
    the old password while it was being changed gets no session, and its
    upgraded hash (``new_hash``) does not overwrite the new one. Returns False,
    having changed nothing, when the password changed or the account went.

    Logging in again in this browser ends its previous session on the server
    too: a copy of the old cookie must not outlive it. For the same user that,
    the new session, an upgraded hash and the sign-in event (``method``: how
    the user signed in) are one store write. Failed attempts since the last
    sign-in are shown in a notice (events.py).
    """
    old_user = g.user["username"] if g.user is not None else None
    old_sid = session.get("sid", "")
    now = int(time.time())
    lifetime = int(_config("PERMANENT_SESSION_LIFETIME"))
    sid_box: list[str] = []
    failed: list[dict[str, Any] | None] = []

    def change(record: Record) -> None:
        if old_user == username:
            sessions.end(record, old_sid)
        if new_hash is not None:
            record["password_hash"] = new_hash
        sid_box.append(sessions.start(record, now, lifetime))
        failed.append(events.login_succeeded(record, method))

    try:
        get_store().update(username, passwords.only_if_unchanged(verified_hash, change))
    except (passwords.PasswordChanged, RecordGone):
        return False
    if old_user is not None and old_user != username:
        with contextlib.suppress(RecordGone):  # deleted meanwhile: no session left to end
            get_store().update(old_user, lambda r: sessions.end(r, old_sid))
    session.clear()
    session["uid"] = username
    session["sid"] = sid_box[0]
    session["seen"] = now
    session["auth_at"] = now  # reauth.AUTH_AT: the login is a fresh authentication
    if failed[0] is not None:
        flash(events.failure_notice(failed[0]), "info")  # V6.3.5: someone tried the password
    return True


def begin_session_without_password(
    username: str, claim: Callable[[Record], Record | None], method: str
) -> bool:
    """Start a session for a user who proved who they are without a password (a passkey).

    ``claim`` is the compare-and-set on what was verified, run inside the
    store's lock: it returns the changed record (the passkey's new sign count),
    or None to refuse, having changed nothing (the passkey was removed or used
    meanwhile). The session then starts as :func:`begin_session` starts one,
    bound to the password hash that the claim saw: a password change in
    between refuses it too. Returns False when refused.
    """
    seen: list[str] = []

    def change(record: Record) -> Record:
        claimed = claim(record)
        if claimed is None:
            return record  # unchanged: nothing is written
        seen.append(claimed["password_hash"])
        return claimed

    try:
        get_store().update(username, change)
    except RecordGone:
        return False
    return bool(seen) and begin_session(username, seen[0], method=method)


def for_this_session(
    change: Callable[[Record], object] | None = None, verified_hash: str | None = None
) -> Callable[[Record], Any]:
    """Return a store change that applies ``change`` only while this session is live in the record.

    The record was loaded at the start of the request; by the time of the
    write it may have been deleted, deleted and registered again by someone
    else under the same name, or this session ended from another device. Any
    of those raises :class:`RecordGone` inside the store's lock (the
    logged-out path, ``account_gone``), so a late write never lands in
    another account. With ``verified_hash``, the password must also still be
    the one checked (:func:`passwords.only_if_unchanged`).
    """
    cookie = {"sid": session.get("sid"), "seen": session.get("seen")}
    idle = int(_config("SESSION_IDLE_TIMEOUT"))
    lifetime = int(_config("PERMANENT_SESSION_LIFETIME"))
    inner = change
    if verified_hash is not None:
        inner = passwords.only_if_unchanged(verified_hash, change)

    def guarded(record: Record) -> Any:
        # Only "ended" counts: a session that timed out during the request was live at its start.
        if sessions.check(cookie, record, int(time.time()), idle, lifetime) == "ended":
            raise RecordGone(record.get("username"))
        return inner(record) if inner is not None else None

    return guarded


def update_own(change: Callable[[Record], object], verified_hash: str | None = None) -> Record:
    """Apply ``change`` to the logged-in user's record, guarded by :func:`for_this_session`."""
    return get_store().update(g.user["username"], for_this_session(change, verified_hash))


def account_gone(error: RecordGone) -> Response:
    """The account vanished during this request (deleted elsewhere): log out, never a 500."""
    session.clear()
    return redirect(url_for("auth.login"), 303)


def _begin_second_step(
    username: str, verified_hash: str, new_hash: str | None, target: str | None
) -> Response | None:
    """Hand a correct password to the second step; None if the password changed meanwhile.

    An upgraded hash is stored now (still a compare-and-set on the one just
    checked), so the pending login is bound to the hash the record will hold.
    """
    from . import two_factor  # two_factor imports this module

    if new_hash is not None:
        upgrade = passwords.only_if_unchanged(
            verified_hash, lambda r: r.update(password_hash=new_hash)
        )
        try:
            get_store().update(username, upgrade)
        except (passwords.PasswordChanged, RecordGone):
            return None
        verified_hash = new_hash
    return two_factor.begin_pending(username, verified_hash, target)


def _end_session_response(notice: str) -> Response:
    """Forget the session in this browser too, and say so on the home page.

    The message travels as a fixed key in the URL, not as a flash: a flash
    lives in the session cookie, which Clear-Site-Data makes the browser drop.
    """
    session.clear()
    response = redirect(url_for("pages.index", notice=notice))
    # Ask the browser to drop everything this origin stored (ASVS 5.0 V7.4.1).
    response.headers["Clear-Site-Data"] = '"cookies", "storage"'
    return response


def register() -> Any:
    """Create an account; the username must be free and the password strong."""
    form = RegisterForm()
    if form.validate_on_submit():
        username = form.username.data
        record = new_user(username, passwords.hash_password(form.password.data))
        if get_store().create(username, record):
            audit.event("register", username)
            flash("Your account is ready. Please log in.", "success")
            return redirect(url_for("auth.login"))
        form.username.errors.append("This username is taken. Please choose another.")
    status = 422 if form.errors else 200
    return render_template("register.html", form=form), status


def login() -> Any:
    """Log a user in with a new session; one message for every kind of failure."""
    form = LoginForm()
    target = safe_next(request.args.get("next"))
    if form.validate_on_submit():
        username = form.username.data
        record = get_store().get(username)
        verified = record["password_hash"] if record else None
        password = form.password.data
        changed = False
        if passwords.verify_password(verified, password):
            new_hash = None
            if passwords.needs_rehash(verified):
                new_hash = passwords.hash_password(password)
            if mfa.has_factor(record):
                # Not logged in yet: the second step starts the session.
                pending = _begin_second_step(username, verified, new_hash, target)
                if pending is not None:
                    return pending
            elif begin_session(username, verified, new_hash):
                audit.event("login_success", username)
                return redirect(target or url_for("account.details"))
            changed = True  # the password changed (or the account went) during the check
        g.login_failed = True
        why = {"reason": "password changed during the check"} if changed else {}
        audit.event("login_failure", username, **why)
        if record is not None and not changed:
            # For the account's owner to see; written after the response has
            # gone, so a known username answers as fast as an unknown one (V6.3.8).
            events.record_after_response(username, "login_failure")
        form.password.errors.append(LOGIN_FAILED)
    elif request.method == "POST":
        g.login_failed = True
        audit.event("login_failure", form.username.data or None)
        form.password.errors[:] = [LOGIN_FAILED]
        form.username.errors[:] = []
    return render_template("login.html", form=form, next=target)


def logout() -> Response:
    """End this session on the server, so a copy of its cookie is worthless."""
    if g.user is not None:
        sid = session.get("sid", "")
        update_own(lambda r: sessions.end(r, sid))
        audit.event("logout", g.user["username"])
    return _end_session_response("logged-out")


def _fresh_auth_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """reauth.fresh_auth_required, looked up at request time (reauth imports this module)."""

    @functools.wraps(view)
    def wrapped_view(**kwargs: Any) -> Any:
        from .reauth import fresh_auth_required

        return fresh_auth_required(view)(**kwargs)

    return wrapped_view


def logout_others() -> Response:
    """End every session of this user except the current one."""
    sid = session["sid"]

    def change(record: Record) -> None:
        ended = sessions.end_others(record, sid)
        events.record(record, "sessions_ended_others", count=ended)

    update_own(change)
    audit.event("logout_others", g.user["username"])
    flash("Every other session has been logged out.", "success")
    return redirect(url_for("two_factor.security"))


def change_password() -> Any:
    """Change the password after checking the current one; end every other session."""
    form = ChangePasswordForm()
    username = g.user["username"]
    form.for_username = username
    verified = g.user["password_hash"]
    if form.validate_on_submit():
        if passwords.verify_password(verified, form.current_password.data) and _set_password(
            verified, form.new_password.data
        ):
            audit.event("password_change", username)
            mail.notify(g.user, "password_changed")  # to the verified address, if any
            flash("Your password has been changed. Other sessions were logged out.", "success")
            return redirect(url_for("account.details"))
        audit.event("password_change_refused", username)
        form.current_password.errors.append("This is not your current password.")
    status = 422 if form.errors else 200
    return render_template("change-password.html", form=form), status


def delete_account() -> Any:
    """Delete the account, its photo and every session, after checking the password."""
    form = DeleteAccountForm()
    username = g.user["username"]
    verified = g.user["password_hash"]
    if (
        form.validate_on_submit()
        and passwords.verify_password(verified, form.password.data)
        and _delete(username, verified)
    ):
        audit.event("account_deleted", username)
        return _end_session_response("account-deleted")
    audit.event("account_delete_refused", username)
    flash("Your account was not deleted: the password was not right.", "error")
    return redirect(url_for("account.details"), 303)


def _set_password(verified_hash: str, new_password: str) -> bool:
    """Store a new password and end every other session; False if the password changed meanwhile."""
    new_hash = passwords.hash_password(new_password)
    now = int(time.time())
    lifetime = int(_config("PERMANENT_SESSION_LIFETIME"))
    sid_box: list[str] = []

    def change(r: Record) -> None:
        r["password_hash"] = new_hash
        r["sessions"] = {}  # every other device must log in again
        sid_box.append(sessions.start(r, now, lifetime))
        events.record(r, "password_changed")

    try:
        update_own(change, verified_hash)
    except passwords.PasswordChanged:
        return False
    session["sid"] = sid_box[0]  # and this one gets a new session id
    return True


def _delete(username: str, verified_hash: str) -> bool:
    """Delete the record, then its photo; False if the password changed meanwhile.

    The photo to remove is read inside the store's lock, from the record as it
    is deleted: one uploaded from another tab during the password check goes too.
    """
    photo: list[str | None] = []
    check = for_this_session(lambda r: photo.append(r.get("photo")), verified_hash)
    try:
        deleted = get_store().delete(username, check)
    except passwords.PasswordChanged:
        return False
    if not deleted:
        raise RecordGone(username)  # deleted from elsewhere meanwhile: log out
    uploads.remove(get_photos(), photo[0])  # PostgreSQL removed it with the record already
    return True


# The hooks and routes are registered here, not by decorators: mutmut (``make mutation``) leaves
# decorated functions alone, and the mutation score must cover these handlers' checks.
# Each view_func is what the decorators made: the outermost wrapper is listed first.
bp.before_app_request(load_logged_in_user)
bp.app_errorhandler(RecordGone)(account_gone)
bp.add_url_rule(
    "/register",
    view_func=limiter.limit(lambda: _config("REGISTER_RATE_LIMIT_IP"), methods=["POST"])(register),
    methods=("GET", "POST"),
)
bp.add_url_rule(
    "/login",
    view_func=limiter.limit(lambda: _config("LOGIN_RATE_LIMIT_IP"), methods=["POST"])(
        # Shared with the second step (two_factor.py): a wrong code counts like a wrong password.
        limiter.shared_limit(
            lambda: _config("LOGIN_RATE_LIMIT_USER"),
            scope="login-user",
            methods=["POST"],
            key_func=login_username_key,
            deduct_when=login_failed,
        )(login)
    ),
    methods=("GET", "POST"),
)
bp.add_url_rule("/logout", view_func=logout, methods=["POST"])
bp.add_url_rule(
    "/logout-others",
    # V7.5.2: a stolen cookie must not log the owner out everywhere.
    view_func=_fresh_auth_required(logout_others),
    methods=["POST"],
)
bp.add_url_rule(
    "/change-password",
    view_func=login_required(password_guess_limit(methods=["POST"])(change_password)),
    methods=("GET", "POST"),
)
bp.add_url_rule(
    "/delete-account",
    view_func=login_required(password_guess_limit()(delete_account)),
    methods=["POST"],
)
