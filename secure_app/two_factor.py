"""Blueprint: the login's second step, the security page, TOTP enrolment and recovery codes.

A correct password for a user with a factor does not start a session:
``begin_pending`` puts a pending login in the signed session cookie (the
username, a tag of the password hash that was checked, the time, where to go
next) and sends the browser to ``/login/two-factor``. Until a code is
accepted nobody is logged in (``g.user`` stays None). The pending login lasts
``PENDING_TTL`` seconds, a new password login replaces it, and a password
change meanwhile kills it (the tag no longer matches the stored hash).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any

from flask import (
    Blueprint,
    Flask,
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
from wtforms import HiddenField, StringField
from wtforms.validators import DataRequired, Length

from . import audit, events, mail, mfa, reauth, security_page, sessions
from .auth import for_this_session, login_required, safe_next
from .reauth import fresh_auth_required
from .security import limiter, login_failed
from .store import get_store

bp = Blueprint("two_factor", __name__)

PENDING = "pending_2fa"
# The record field naming the one pending login that may finish (spend_pending).
PENDING_FIELD = "pending_login"
PENDING_TTL = 300
CODE_FAILED = "That code did not work. Use the current code from your app, or a recovery code."
# What a logged-in user without a factor may still reach when two-factor is required.
# What a user without a factor may reach under REQUIRE_TWO_FACTOR: enrolment
# (an authenticator app, or a passkey from the security page), confirming it
# is them, a verification link, logging out.
GATE_OPEN = frozenset(
    {
        "two_factor.totp",
        "two_factor.security",
        "passkeys.add_begin",
        "passkeys.add",
        "reauth.reauthenticate",
        "recovery.verify_email",
        "auth.logout",
        "static",
        None,
    }
)


def init_app(app: Flask) -> None:
    """Register this blueprint and re-authentication's (after auth: the gate needs ``g.user``)."""
    app.register_blueprint(reauth.bp)
    app.register_blueprint(bp)


def text_only(value: object) -> str:
    """A file sent in a text field is no text: make it empty, never a 500 in a length check."""
    return value if isinstance(value, str) else ""


class CodeForm(FlaskForm):
    code = StringField(
        "Code", validators=[DataRequired(), Length(max=mfa.MAX_CODE_INPUT)], filters=[text_only]
    )


class EnrolForm(CodeForm):
    enrolment = HiddenField(validators=[DataRequired(), Length(max=1024)], filters=[text_only])


# -- the login's second step ---------------------------------------------------


def _tag(password_hash: str) -> str:
    # The cookie is readable by whoever holds it: a digest of the hash, never the hash.
    return hashlib.sha256(b"secure_app.pending-login\0" + password_hash.encode()).hexdigest()


def begin_pending(username: str, verified_hash: str, next_url: str | None) -> Response:
    """After a correct password for a user with a factor: ask for the code, log nobody in.

    Called by ``auth.login`` instead of starting a session. Any session this
    browser had ends now, on the server too.
    """
    if g.get("user") is not None:
        old_sid = session.get("sid", "")
        get_store().update(g.user["username"], lambda r: sessions.end(r, old_sid))
        g.user = None
    session.clear()  # prevents session fixation: nothing from before survives
    # The cookie alone cannot be cancelled: the record names the one pending
    # login that may finish. A new password login (any browser) replaces it,
    # and finishing spends it, so a copy of this cookie is good for nothing.
    nonce = secrets.token_urlsafe(16)
    get_store().update(username, lambda r: r.update({PENDING_FIELD: _nonce_digest(nonce)}))
    session[PENDING] = {
        "u": username,
        "h": _tag(verified_hash),
        "p": nonce,
        "t": int(time.time()),
        "n": safe_next(next_url) or "",
    }
    audit.event("two_factor_asked", username)
    return redirect(url_for("two_factor.second_step"))


def _nonce_digest(nonce: str) -> str:
    return hashlib.sha256(b"secure_app.pending-nonce\0" + nonce.encode()).hexdigest()


def spend_pending(
    state: dict[str, Any], change: Callable[[dict[str, Any]], bool | None]
) -> Callable[[dict[str, Any]], bool]:
    """A ``guarded_update`` change that also spends this browser's pending login, once.

    Refuses when the record names another pending login (replaced by a newer
    password login) or none (already finished): a copied cookie cannot finish
    a second login.
    """
    digest = _nonce_digest(state["p"])

    def spend(record: dict[str, Any]) -> bool:
        if not hmac.compare_digest(str(record.get(PENDING_FIELD) or ""), digest):
            return False
        if change(record) is False:
            return False
        del record[PENDING_FIELD]
        return True

    return spend


def _pending(now: int) -> dict[str, Any] | None:
    state = session.get(PENDING)
    if (
        isinstance(state, dict)
        and isinstance(state.get("u"), str)
        and isinstance(state.get("h"), str)
        and isinstance(state.get("p"), str)
        and isinstance(state.get("t"), int)
        and isinstance(state.get("n"), str)
        and 0 <= now - state["t"] <= PENDING_TTL
    ):
        return state
    return None


def pending_username_key() -> str:
    """The per-username login limit's key, for the user this browser is logging in as."""
    state = session.get(PENDING)
    name = state.get("u") if isinstance(state, dict) else None
    return "user:" + (name if isinstance(name, str) else "<invalid>")


def _start_over(message: str | None) -> Response:
    session.pop(PENDING, None)
    if message:
        flash(message, "info")
    return redirect(url_for("auth.login"), 303)


def pending_login(now: int) -> tuple[dict[str, Any], dict[str, Any]] | Response:
    """The pending login and its user's record, or the answer that starts the login over.

    Starts over when the pending login expired or the account changed (a new
    password, no factor left). The passkey second step uses it too.
    """
    state = _pending(now)
    if state is None:
        expired = PENDING in session
        return _start_over("Your sign-in took too long. Please log in again." if expired else None)
    username = state["u"]
    record = get_store().get(username)
    if (
        record is None
        or not mfa.has_factor(record)
        or not hmac.compare_digest(_tag(record["password_hash"]), state["h"])
        or not hmac.compare_digest(str(record.get(PENDING_FIELD) or ""), _nonce_digest(state["p"]))
    ):
        audit.event("two_factor_refused", username, reason="account changed")
        return _start_over("Please log in again.")
    return state, record


def second_step() -> Any:
    """Take a TOTP or recovery code and finish the login that the password started."""
    now = int(time.time())
    pending = pending_login(now)
    if isinstance(pending, Response):
        return pending
    state, record = pending
    username = state["u"]
    form = CodeForm()
    if form.validate_on_submit():
        match = mfa.check_code(record, form.code.data, now)
        verified = record["password_hash"]
        if match and mfa.guarded_update(
            username, verified, mfa.factor_id(record), spend_pending(state, reauth.using(match))
        ):
            from .auth import begin_session  # auth will import this module

            if not begin_session(username, verified, method=match.kind):
                return _start_over("Please log in again.")
            reauth.mark_fresh(now)
            audit.event("login_success", username, second_factor=match.kind)
            if match.kind == "recovery":
                left = mfa.recovery_left(get_store().get(username))
                flash(f"You used a recovery code; {left} remain.", "info")
                mail.notify(record, "recovery_code_used")
            return redirect(safe_next(state["n"]) or url_for("account.details"))
        g.login_failed = True
        audit.event("two_factor_failure", username)
        _record_failure(username)
        form.code.errors[:] = [CODE_FAILED]
    elif request.method == "POST":
        g.login_failed = True
        audit.event("two_factor_failure", username)
        _record_failure(username)
        form.code.errors[:] = [CODE_FAILED]
    status = 422 if request.method == "POST" else 200
    return render_template(
        "two_factor/login.html",
        form=form,
        has_totp=mfa.has_totp(record),
        has_passkey=bool(mfa.passkeys_of(record)),
    ), status


def _record_failure(username: str) -> None:
    """Tell the account's owner: a wrong code means someone knew the password."""
    events.record_now(username, "two_factor_failure")


# -- the security page and the factor ------------------------------------------------


def security() -> str:
    """Show the sessions, recent events, factors and recovery codes, and the ways to change them."""
    user = g.user
    totp = user.get("totp") if mfa.has_factor(user) else None
    added = int(totp.get("added", 0)) if totp else 0
    return render_template(
        "security/index.html",
        totp=totp,
        totp_added=time.strftime("%d %B %Y", time.gmtime(added)),
        recovery_left=mfa.recovery_left(user),
        **security_page.overview(user),
    )


def totp() -> Any:
    """Offer a new secret; switch TOTP on once the app's first code is right."""
    user = g.user
    username = user["username"]
    if mfa.has_totp(user):
        return render_template("security/totp.html", enabled=True)
    now = int(time.time())
    form = EnrolForm()
    # The key offered on the page the form came from, sealed in the form: a
    # wrong code shows the same key again, since the app already has it.
    secret = None
    if request.method == "POST":
        secret = mfa.open_enrol_token(username, request.form.get("enrolment"), now)
    if form.validate_on_submit():
        code = mfa.normalize_totp(form.code.data)
        step = mfa.totp_step(secret, code, now, -1) if secret and code else None
        if step is not None:
            fields, codes = mfa.enable_totp(username, secret, step, now)

            def switch_on(record: dict[str, Any]) -> None:
                record.update(fields)
                events.record(record, "totp_enabled")

            # Factor None: refused if a factor appeared meanwhile (another tab).
            switch_on_here = for_this_session(switch_on)  # not for a session ended meanwhile
            if not mfa.guarded_update(username, user["password_hash"], None, switch_on_here):
                flash("Your sign-in settings changed meanwhile. Please look again.", "error")
                return redirect(url_for("two_factor.security"), 303)
            audit.event("totp_enabled", username)
            mail.notify(user, "totp_enabled")
            return render_template("security/recovery_codes.html", codes=codes, new_factor=True)
        audit.event("totp_enrol_failure", username)
        if secret is None:
            form.code.errors[:] = ["That set-up expired. Add this new key to your app."]
        else:
            form.code.errors[:] = ["That code is not right. Enter the code your app shows now."]
    elif request.method == "POST":
        form.code.errors[:] = form.code.errors or ["Enter the code your app shows."]
    if secret is None:
        secret = mfa.new_secret()
        form.enrolment.data = mfa.enrol_token(username, secret, now)
    uri = mfa.provisioning_uri(secret, username)
    status = 422 if request.method == "POST" else 200
    return render_template(
        "security/totp.html",
        enabled=False,
        form=form,
        secret=mfa.spaced(secret),
        qr=mfa.qr_svg(uri),
        uri=uri,
    ), status


def _switch_off(record: dict[str, Any]) -> None:
    mfa.remove_totp(record)  # passkeys stay
    events.record(record, "totp_disabled")


def disable_totp() -> Response:
    """Delete the TOTP secret and every recovery code, at once."""
    user = g.user
    username = user["username"]
    if not mfa.has_totp(user):
        flash("Two-step sign-in was already off.", "info")
    elif mfa.guarded_update(
        username, user["password_hash"], mfa.factor_id(user), for_this_session(_switch_off)
    ):
        audit.event("totp_disabled", username)
        mail.notify(user, "totp_disabled")
        flash("Two-step sign-in is off. Your app's codes and your recovery codes no longer work.")
    else:
        flash("Your sign-in settings changed meanwhile. Please look again.", "error")
    return redirect(url_for("two_factor.security"), 303)


def regenerate_codes() -> Any:
    """Make a new set of recovery codes; the old set stops working at once."""
    user = g.user
    username = user["username"]
    if not mfa.has_totp(user):
        flash("Turn on two-step sign-in first: recovery codes come with it.", "info")
        return redirect(url_for("two_factor.security"), 303)
    codes = mfa.new_recovery_codes()
    hashes = mfa.recovery_hashes(codes)

    def replace(record: dict[str, Any]) -> None:
        record["recovery_codes"] = hashes
        events.record(record, "recovery_codes_regenerated")

    replace_here = for_this_session(replace)
    if not mfa.guarded_update(username, user["password_hash"], mfa.factor_id(user), replace_here):
        flash("Your sign-in settings changed meanwhile. Please look again.", "error")
        return redirect(url_for("two_factor.security"), 303)
    audit.event("recovery_codes_regenerated", username)
    mail.notify(user, "recovery_codes_regenerated")
    return render_template("security/recovery_codes.html", codes=codes, new_factor=False)


# -- the operator's switch ------------------------------------------------------------


def require_two_factor() -> Response | None:
    """With ``REQUIRE_TWO_FACTOR``, send a logged-in user without a factor to enrolment first."""
    if not current_app.config["REQUIRE_TWO_FACTOR"]:
        return None
    user = g.get("user")
    if user is None or mfa.has_factor(user) or request.endpoint in GATE_OPEN:
        return None
    return redirect(url_for("two_factor.totp"), 303)


# The hook and routes are registered here, not by decorators: mutmut (``make mutation``) leaves
# decorated functions alone, and the mutation score must cover these handlers' checks.
# Each view_func is what the decorators made: the outermost wrapper is listed first.
bp.add_url_rule(
    "/login/two-factor",
    view_func=limiter.limit(lambda: current_app.config["LOGIN_RATE_LIMIT_IP"], methods=["POST"])(
        # Shared with the password form (auth.py): a wrong code counts like a wrong password.
        limiter.shared_limit(
            lambda: current_app.config["LOGIN_RATE_LIMIT_USER"],
            scope="login-user",
            key_func=pending_username_key,
            deduct_when=login_failed,
            methods=["POST"],
        )(second_step)
    ),
    methods=("GET", "POST"),
)
bp.add_url_rule("/security", view_func=login_required(security), methods=["GET"])
bp.add_url_rule("/security/totp", view_func=fresh_auth_required(totp), methods=("GET", "POST"))
bp.add_url_rule(
    "/security/totp/disable", view_func=fresh_auth_required(disable_totp), methods=["POST"]
)
bp.add_url_rule(
    "/security/recovery-codes", view_func=fresh_auth_required(regenerate_codes), methods=["POST"]
)
bp.before_app_request(require_two_factor)
