"""Blueprint: verified email, forgot password and the reset link (ASVS 5.0 V6.3.8, V6.4.1-V6.4.3).

A record keeps ``email`` (the address the user typed, shown on the account
page) and ``email_verified`` (the address whose link was used). Only the
verified one receives reset links and notices; until its link is used a new
address is shown as unverified. A link's token is ``<username, base64>.<256
random bits>``; the record stores only its SHA-256, with an expiry, so it
works once and a stolen data file holds no live link.

A reset link also dies when the password changes by any route (it is bound
to a digest of the password hash), when the verified address changes (bound
to the address it was sent to), and when a newer one is asked for (the
record holds one). A reset ends every session, logs nobody in and leaves the
second factor in place (V6.4.3, FST #479: the inbox alone must not pass the
second factor).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import secrets
import string
import time
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
    url_for,
)
from flask_wtf import FlaskForm
from werkzeug.wrappers import Response
from wtforms import EmailField
from wtforms.validators import DataRequired, Email, Length

from . import audit, events, mail, passwords
from .forms import USERNAME_RE, ResetForm
from .security import limiter
from .store import Record, RecordGone, get_store

bp = Blueprint("recovery", __name__)

# Pages whose URL holds a token: no Referer may carry it anywhere, our own pages included.
TOKEN_ENDPOINTS = frozenset({"recovery.reset_password", "recovery.verify_email"})
SECRET_RE = re.compile(r"[A-Za-z0-9_-]{43}\Z")  # secrets.token_urlsafe(32)
MAX_TOKEN = 100
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def init_app(app: Flask) -> None:
    """Set up mail, register the blueprint, and make token pages send no Referer."""
    mail.init_app(app)
    app.register_blueprint(bp)
    # First in the list, so it runs last: after the perimeter's headers (after_request
    # functions run in reverse order), whose Referrer-Policy it replaces.
    app.after_request_funcs.setdefault(None, []).insert(0, _no_referrer)


def _no_referrer(response: Response) -> Response:
    if request.endpoint in TOKEN_ENDPOINTS:
        response.headers["Referrer-Policy"] = "no-referrer"
    return response


class ForgotForm(FlaskForm):
    email = EmailField(
        "Email",
        validators=[
            DataRequired("Enter the email address of your account."),
            Length(max=254, message="Use at most 254 characters."),
            Email("Enter an email address such as name@example.org."),
        ],
    )


class ConfirmForm(FlaskForm):
    """Only the CSRF token: the button that verifies (a GET changes nothing)."""


# -- tokens ------------------------------------------------------------------------


class LinkDead(Exception):
    """The link was used, replaced or voided between the check and the write."""


def email_key(address: object) -> str:
    """How addresses are compared: ASCII letters in any case, everything else exactly.

    Not ``casefold()`` or ``upper()``: Unicode case mapping sends a dotless ı
    or a Kelvin sign onto ASCII letters, and a reset for ``\\u212aim@...`` must
    not match ``kim@...`` (Django CVE-2019-19844, GitHub 2019).
    """
    return address.strip().translate(_ASCII_LOWER) if isinstance(address, str) else ""


def _digest(token: str) -> str:
    return hashlib.sha256(b"secure_app.link\0" + token.encode()).hexdigest()


def _tag(password_hash: object) -> str:
    return hashlib.sha256(b"secure_app.reset\0" + str(password_hash).encode()).hexdigest()


def new_token(username: str) -> tuple[str, str]:
    """Return a link token for ``username`` and the digest to store."""
    uid = base64.urlsafe_b64encode(username.encode()).rstrip(b"=").decode()
    token = f"{uid}.{secrets.token_urlsafe(32)}"
    return token, _digest(token)


def token_user(token: object) -> str | None:
    """The username a well-formed token names, or None; says nothing about whether it is live."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN:
        return None
    uid, dot, secret = token.partition(".")
    if not dot or not SECRET_RE.match(secret):
        return None
    try:
        name = base64.urlsafe_b64decode(uid + "=" * (-len(uid) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        return None
    # Only the one spelling: base64's spare bits could otherwise name the same user twice.
    canonical = base64.urlsafe_b64encode(name.encode()).rstrip(b"=").decode()
    return name if canonical == uid and USERNAME_RE.match(name) else None


def _matches(state: object, token: str, now: int) -> bool:
    """Whether ``state`` (a stored link) is this token's and has not expired."""
    return (
        isinstance(state, dict)
        and isinstance(state.get("digest"), str)
        and isinstance(state.get("expires"), int)
        and hmac.compare_digest(state["digest"], _digest(token))
        and now <= state["expires"]
    )


def reset_link_live(record: Record | None, token: str, now: int) -> bool:
    """Whether ``token`` may reset this record's password now."""
    if record is None:
        return False
    state = record.get("password_reset")
    return (
        _matches(state, token, now)
        and hmac.compare_digest(state.get("pw", ""), _tag(record.get("password_hash")))
        and state.get("to") == record.get("email_verified")
    )


def verify_link_live(record: Record | None, token: str, now: int) -> bool:
    """Whether ``token`` may verify this record's typed address now."""
    if record is None:
        return False
    state = record.get("email_verify")
    return _matches(state, token, now) and state.get("address") == record.get("email")


# -- forgot password -------------------------------------------------------------


def forgot_email_key() -> str:
    """The limiter key for one email address, compared as the look-up compares it."""
    return "email:" + email_key(request.form.get("email", "", type=str)[:254])


def forgot_password() -> Any:
    """Queue a reset link for the address; the same page whether or not an account has it.

    The look-up itself happens on the mail thread (V6.3.8): this request does
    the same work, in the same time, for every valid address.
    """
    form = ForgotForm()
    if form.validate_on_submit():
        address = form.email.data
        mail.submit(functools.partial(send_reset_links, address))
        audit.event("password_reset_asked")
        return render_template("recovery/forgot_sent.html", email=address)
    status = 422 if form.errors else 200
    return render_template("recovery/forgot.html", form=form), status


def send_reset_links(address: str) -> int:
    """Mail a new reset link to every account whose verified address is ``address``.

    Runs on the mail thread. A new link replaces the account's previous one.
    Returns how many were sent.
    """
    wanted = email_key(address)
    store = get_store()
    timeout = int(current_app.config["PASSWORD_RESET_TIMEOUT"])
    sent = 0
    # One read of every record (on PostgreSQL one query, not one per account).
    for username, record in store.items():
        if not wanted or email_key(record.get("email_verified")) != wanted:
            continue
        token, digest = new_token(username)
        to: list[str] = []

        def issue(r: Record, token_digest: str = digest, box: list[str] = to) -> None:
            verified = r.get("email_verified")
            if email_key(verified) != wanted:
                raise LinkDead  # changed since the look-up
            r["password_reset"] = {
                "digest": token_digest,
                "expires": int(time.time()) + timeout,
                "pw": _tag(r.get("password_hash")),
                "to": verified,
            }
            box.append(verified)

        try:
            store.update(username, issue)
        except (LinkDead, RecordGone):
            continue
        # To the address stored and verified, never the one typed (CVE-2019-19844).
        mail.send(
            mail.message(
                to[0],
                "Reset your password",
                "recovery/mail/reset.txt",
                username=username,
                link=mail.link("recovery.reset_password", token=token),
                minutes=max(1, timeout // 60),
            )
        )
        audit.event("password_reset_sent", username)
        sent += 1
    return sent


# -- the reset link ----------------------------------------------------------------


def _dead_link() -> tuple[str, int]:
    return render_template("recovery/dead_link.html"), 404


def reset_password(token: str) -> Any:
    """Show the new-password form for a live link; set the password, end every session."""
    username = token_user(token)
    record = get_store().get(username) if username else None
    if not reset_link_live(record, token, int(time.time())):
        if request.method == "POST":
            audit.event("password_reset_refused", username)
        return _dead_link()
    form = ResetForm()
    form.for_username = username
    if form.validate_on_submit():
        verified = record["password_hash"]
        new_hash = passwords.hash_password(form.password.data)

        def change(r: Record) -> None:
            if not reset_link_live(r, token, int(time.time())):
                raise LinkDead  # used, replaced or voided during the hashing
            r["password_hash"] = new_hash
            r["sessions"] = {}  # every device logs in again, with its second factor
            del r["password_reset"]
            events.record(r, "password_reset")

        try:
            # The hash checked above must still be the stored one (compare-and-set).
            updated = get_store().update(username, passwords.only_if_unchanged(verified, change))
        except (LinkDead, passwords.PasswordChanged, RecordGone):
            audit.event("password_reset_refused", username, reason="changed meanwhile")
            return _dead_link()
        audit.event("password_reset", username)
        mail.notify(updated, "password_reset")
        flash(
            "Your password has been reset and every device was logged out. Please log in.",
            "success",
        )
        return redirect(url_for("auth.login"), 303)
    status = 422 if form.errors else 200
    return render_template("recovery/reset.html", form=form, token=token), status


# -- verified email ----------------------------------------------------------------


def email_status(record: Record) -> dict[str, Any]:
    """What the account page shows: the typed address and whether it is verified or pending."""
    address = record.get("email") or ""
    verified = bool(address) and address == record.get("email_verified")
    state = record.get("email_verify")
    pending = not verified and isinstance(state, dict) and state.get("address") == address
    return {"address": address, "verified": verified, "pending": bool(address) and pending}


def request_email_change(new_email: str) -> str:
    """Set the logged-in user's email; mail a link to the new address and a notice to the old one.

    Call from the account page, after re-authentication (V7.5.1), with the
    address already validated. Returns ``"pending"`` (a link was sent),
    ``"verified"`` (back to the verified address: nothing to send) or
    ``"removed"`` (no address now; the old one was told).
    """
    from .auth import update_own  # auth's blueprint imports nothing from here

    address = (new_email or "").strip()
    token, digest = new_token(g.user["username"])
    now = int(time.time())
    box: dict[str, Any] = {}

    def change(r: Record) -> None:
        box["old"] = r.get("email_verified")
        events.record(r, "email_changed")
        r["email"] = address
        r.pop("email_verify", None)
        if not address:
            r["email_verified"] = None  # an address removed is not used for recovery
            box["outcome"] = "removed"
        elif address == box["old"]:
            box["outcome"] = "verified"
        else:
            r["email_verify"] = {
                "digest": digest,
                "expires": now + int(current_app.config["EMAIL_VERIFY_TIMEOUT"]),
                "address": address,
            }
            box["outcome"] = "pending"

    record = update_own(change)
    username = record["username"]
    if box["outcome"] == "pending":
        mail.send(
            mail.message(
                address,
                "Confirm your email address",
                "recovery/mail/verify.txt",
                username=username,
                link=mail.link("recovery.verify_email", token=token),
            )
        )
    old = box["old"]
    if box["outcome"] != "verified" and old and email_key(old) != email_key(address):
        mail.notify(
            {"username": username, "email_verified": old},
            "email_change_requested",
            detail=f"The new address is {_masked(address)}." if address else "",
        )
    audit.event("email_change_requested", username, outcome=box["outcome"])
    return box["outcome"]


def _masked(address: str) -> str:
    """``a***@example.org``: enough for the owner to recognise, little for anyone else."""
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}"


def verify_email(token: str) -> Any:
    """Show a confirm button (a GET changes nothing: mail scanners follow links); POST verifies."""
    username = token_user(token)
    record = get_store().get(username) if username else None
    if not verify_link_live(record, token, int(time.time())):
        return _dead_link()
    form = ConfirmForm()
    if form.validate_on_submit():

        def change(r: Record) -> None:
            if not verify_link_live(r, token, int(time.time())):
                raise LinkDead
            r["email_verified"] = r.pop("email_verify")["address"]
            events.record(r, "email_verified")

        try:
            get_store().update(username, change)
        except (LinkDead, RecordGone):
            return _dead_link()
        audit.event("email_verified", username)
        return render_template("recovery/verified.html")
    address = record["email_verify"]["address"]
    return render_template("recovery/verify.html", form=form, token=token, address=address)


# The routes are registered here, not by decorators: mutmut (``make mutation``) leaves decorated
# functions alone, and the mutation score must cover these handlers' checks.
# Each view_func is what the decorators made: the outermost wrapper is listed first.
bp.add_url_rule(
    "/forgot-password",
    view_func=limiter.limit(
        lambda: current_app.config["FORGOT_PASSWORD_RATE_LIMIT_IP"], methods=["POST"]
    )(
        limiter.limit(
            lambda: current_app.config["FORGOT_PASSWORD_RATE_LIMIT_EMAIL"],
            methods=["POST"],
            key_func=forgot_email_key,
        )(forgot_password)
    ),
    methods=("GET", "POST"),
)
# One budget per address for guessing at both kinds of link.
_links_limit = limiter.shared_limit(
    lambda: current_app.config["LOGIN_RATE_LIMIT_IP"], scope="recovery-links", methods=["POST"]
)
bp.add_url_rule(
    "/reset-password/<token>", view_func=_links_limit(reset_password), methods=("GET", "POST")
)
bp.add_url_rule(
    "/verify-email/<token>", view_func=_links_limit(verify_email), methods=("GET", "POST")
)
