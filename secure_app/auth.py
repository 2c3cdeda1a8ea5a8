"""Accounts: register, log in and out, change password, delete account, and the session checks."""

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
from werkzeug.wrappers import Response

from . import audit, passwords, sessions, uploads
from .forms import ChangePasswordForm, DeleteAccountForm, LoginForm, RegisterForm
from .security import limiter, login_failed, login_username_key, session_user_key
from .store import get_store, new_user

bp = Blueprint("auth", __name__)

LOGIN_FAILED = "Invalid username or password."
SESSION_EXPIRED = "Your session has expired. Please log in again."


def _config(key: str) -> Any:
    return current_app.config[key]


@bp.before_app_request
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
        return None
    g.user = record
    # Not every second: a changed cookie must be signed and sent again
    # (sessions.py explains the bound this puts on the idle timeout).
    if now - cookie["seen"] >= sessions.seen_refresh(idle):
        cookie["seen"] = now
    return None


def _here() -> str:
    query = request.query_string.decode("latin-1")
    return request.path + ("?" + query if query else "")


def login_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """View decorator that sends anonymous users to the login page, and back afterwards."""

    @functools.wraps(view)
    def wrapped_view(**kwargs: Any) -> Any:
        if g.user is None:
            return redirect(url_for("auth.login", next=_here()))
        return view(**kwargs)

    return wrapped_view


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


def _begin_session(username: str, new_hash: str | None = None) -> None:
    """Start a fresh session for ``username`` (prevents session fixation).

    Logging in again in this browser ends its previous session on the server
    too: a copy of the old cookie must not outlive it. For the same user that,
    the new session and an upgraded hash are one store write.
    """
    old_user = g.user["username"] if g.user is not None else None
    old_sid = session.get("sid", "")
    if old_user is not None and old_user != username:
        get_store().update(old_user, lambda r: sessions.end(r, old_sid))
    session.clear()
    now = int(time.time())
    lifetime = int(_config("PERMANENT_SESSION_LIFETIME"))
    sid_box: list[str] = []

    def change(record: dict[str, Any]) -> None:
        if old_user == username:
            sessions.end(record, old_sid)
        if new_hash is not None:
            record["password_hash"] = new_hash
        sid_box.append(sessions.start(record, now, lifetime))

    get_store().update(username, change)
    session["uid"] = username
    session["sid"] = sid_box[0]
    session["seen"] = now


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


@bp.route("/register", methods=("GET", "POST"))
@limiter.limit(lambda: _config("REGISTER_RATE_LIMIT_IP"), methods=["POST"])
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


@bp.route("/login", methods=("GET", "POST"))
@limiter.limit(lambda: _config("LOGIN_RATE_LIMIT_IP"), methods=["POST"])
@limiter.limit(
    lambda: _config("LOGIN_RATE_LIMIT_USER"),
    methods=["POST"],
    key_func=login_username_key,
    deduct_when=login_failed,
)
def login() -> Any:
    """Log a user in with a new session; one message for every kind of failure."""
    form = LoginForm()
    target = safe_next(request.args.get("next"))
    if form.validate_on_submit():
        username = form.username.data
        record = get_store().get(username)
        password = form.password.data
        if passwords.verify_password(record["password_hash"] if record else None, password):
            new_hash = None
            if passwords.needs_rehash(record["password_hash"]):
                new_hash = passwords.hash_password(password)
            _begin_session(username, new_hash)
            audit.event("login_success", username)
            return redirect(target or url_for("account.details"))
        g.login_failed = True
        audit.event("login_failure", username)
        form.password.errors.append(LOGIN_FAILED)
    elif request.method == "POST":
        g.login_failed = True
        audit.event("login_failure", form.username.data or None)
        form.password.errors[:] = [LOGIN_FAILED]
        form.username.errors[:] = []
    return render_template("login.html", form=form, next=target)


@bp.post("/logout")
def logout() -> Response:
    """End this session on the server, so a copy of its cookie is worthless."""
    if g.user is not None:
        sid = session.get("sid", "")
        get_store().update(g.user["username"], lambda r: sessions.end(r, sid))
        audit.event("logout", g.user["username"])
    return _end_session_response("logged-out")


@bp.post("/logout-others")
@login_required
def logout_others() -> Response:
    """End every session of this user except the current one."""
    sid = session["sid"]
    get_store().update(g.user["username"], lambda r: sessions.end_others(r, sid))
    audit.event("logout_others", g.user["username"])
    flash("Every other session has been logged out.", "success")
    return redirect(url_for("account.details"))


@bp.route("/change-password", methods=("GET", "POST"))
@login_required
@limiter.shared_limit(
    lambda: _config("CHANGE_PASSWORD_RATE_LIMIT_USER"),
    scope="reauthenticate",
    key_func=session_user_key,
    methods=["POST"],
)
def change_password() -> Any:
    """Change the password after checking the current one; end every other session."""
    form = ChangePasswordForm()
    username = g.user["username"]
    form.for_username = username
    if form.validate_on_submit():
        if not passwords.verify_password(g.user["password_hash"], form.current_password.data):
            audit.event("password_change_refused", username)
            form.current_password.errors.append("This is not your current password.")
        else:
            new_hash = passwords.hash_password(form.new_password.data)
            now = int(time.time())
            lifetime = int(_config("PERMANENT_SESSION_LIFETIME"))
            sid_box: list[str] = []

            def change(r: dict[str, Any]) -> None:
                r["password_hash"] = new_hash
                r["sessions"] = {}  # every other device must log in again
                sid_box.append(sessions.start(r, now, lifetime))

            get_store().update(username, change)
            session["sid"] = sid_box[0]  # and this one gets a new session id
            audit.event("password_change", username)
            flash("Your password has been changed. Other sessions were logged out.", "success")
            return redirect(url_for("account.details"))
    status = 422 if form.errors else 200
    return render_template("change-password.html", form=form), status


@bp.post("/delete-account")
@login_required
@limiter.shared_limit(
    lambda: _config("CHANGE_PASSWORD_RATE_LIMIT_USER"),
    scope="reauthenticate",
    key_func=session_user_key,
)
def delete_account() -> Any:
    """Delete the account, its photo and every session, after checking the password."""
    form = DeleteAccountForm()
    username = g.user["username"]
    if form.validate_on_submit() and passwords.verify_password(
        g.user["password_hash"], form.password.data
    ):
        get_store().delete(username)
        uploads.remove(_config("PHOTO_DIR"), g.user.get("photo"))
        audit.event("account_deleted", username)
        return _end_session_response("account-deleted")
    audit.event("account_delete_refused", username)
    flash("Your account was not deleted: the password was not right.", "error")
    return redirect(url_for("account.details"), 303)
