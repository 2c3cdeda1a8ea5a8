"""The account page: personal details and the profile photo, read from and saved to the store."""

from __future__ import annotations

import io
from typing import Any

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)
from werkzeug.exceptions import ServiceUnavailable
from werkzeug.wrappers import Response

from . import audit, reauth, recovery, sessions, uploads
from .auth import login_required, update_own
from .forms import AccountForm, DeleteAccountForm
from .security import carries_no_photo, limiter, session_user_key
from .store import StoreUncertain, get_photos

bp = Blueprint("account", __name__)

PROFILE_FIELDS = ("full_name", "email", "phone", "bio")
EMAIL_OUTCOMES = {
    "pending": "We sent a link to your new address: open it to verify the address. "
    "Until then it is not used to recover your account.",
    "verified": "Your email address is the verified one again.",
    "removed": "Your email address was removed; it can no longer be used to recover the account.",
}
# What a busy server tells the browser to wait before sending the photo again.
UPLOAD_RETRY_SECONDS = 2


def details() -> Any:
    """Show the account form prefilled from the store; save valid changes and a new photo."""
    user = g.user
    form = AccountForm(data={field: user.get(field, "") for field in PROFILE_FIELDS})
    if form.validate_on_submit():
        new_email = (form.email.data or "").strip()
        email_changed = _changes_email()
        if email_changed and not reauth.is_fresh():
            # The address that receives reset links is a factor's worth of
            # trust (V7.5.1): confirm it is the owner before anything is saved.
            flash("To change your email address, confirm it is you, then save again.", "info")
            target = url_for("reauth.reauthenticate", next=url_for("account.details"))
            return redirect(target, 303)
        image = None
        upload = form.photo.data
        if upload is not None and upload.filename:
            try:
                image = uploads.reencode(uploads.read_limited(upload.stream))
            except uploads.UploadBusy:
                # Not the photo's fault: say "try again shortly", keep nothing.
                audit.event("upload_busy", user["username"])
                raise ServiceUnavailable(retry_after=UPLOAD_RETRY_SECONDS) from None
            except uploads.UploadRefused as refused:
                audit.event("upload_refused", user["username"], reason=str(refused))
                form.photo.errors = [str(refused)]
        if not form.photo.errors:
            # An account deleted meanwhile raises RecordGone: the logged-out path (auth.py).
            _save({f: form[f].data or "" for f in PROFILE_FIELDS if f != "email"}, image)
            flash("Your details have been saved.", "success")
            if email_changed:
                outcome = recovery.request_email_change(new_email)
                flash(EMAIL_OUTCOMES[outcome], "info")
            return redirect(url_for("account.details"), 303)
    status = 422 if form.errors else 200
    return render_template(
        "account-details.html",
        form=form,
        user=user,
        session_count=sessions.count(user),
        email=recovery.email_status(user),
        # Only rendered here: its token is the page's csrf_token(), checked on POST.
        delete_form=DeleteAccountForm(formdata=None, meta={"csrf": False}),
    ), status


def _changes_email() -> bool:
    """Whether this POST asks to set an email address other than the stored one."""
    typed = request.form.get("email")  # absent: the form keeps the stored address
    return g.user is not None and typed is not None and typed.strip() != (g.user.get("email") or "")


def _save(fields: dict[str, str], image: bytes | None) -> None:
    """Store the fields and the photo; the record points to the new photo before the old goes.

    The old photo's name is read inside the store's lock, from the record as
    it is changed, never from the copy loaded at the start of the request.
    """
    new_name = uploads.save(image, get_photos()) if image is not None else None
    old: list[str | None] = []

    def change(record: dict[str, Any]) -> None:
        record.update(fields)
        if new_name is not None:
            old.append(record.get("photo"))
            record["photo"] = new_name

    try:
        update_own(change)  # only into this session's account, if it still exists
    except StoreUncertain:
        raise  # the record may name the new photo now: keep it (prune-photos takes orphans)
    except BaseException:
        uploads.remove(get_photos(), new_name)  # no orphan photo when the save fails
        raise
    if old:
        uploads.remove(get_photos(), old[0])


def remove_photo() -> Response:
    """Remove the current photo: first from the record, then the file."""
    old: list[str | None] = []

    def change(record: dict[str, Any]) -> None:
        old.append(record.get("photo"))
        record["photo"] = None

    update_own(change)
    uploads.remove(get_photos(), old[0])
    flash("Your photo has been removed.", "success")
    return redirect(url_for("account.details"), 303)


def photo(name: str) -> Response:
    """Serve a stored photo. Only names the server makes can match; others are 404."""
    if not uploads.NAME_RE.match(name):
        abort(404)
    stored = get_photos().get(name)
    if stored is None:
        abort(404)
    # A name's bytes never change (a new photo gets a new name), so the name
    # is a strong ETag, the same on every host and on either backend.
    response = send_file(
        io.BytesIO(stored.data),
        mimetype=uploads.MIMETYPE,
        etag=name.removesuffix(uploads.EXTENSION),
        last_modified=stored.modified,
        conditional=True,
    )
    # Revalidate every time (a cheap 304): a removed photo must not live on in caches.
    response.cache_control.no_cache = True
    response.cache_control.private = True
    return response


# The routes are registered here, not by decorators: mutmut (``make mutation``) leaves decorated
# functions alone, and the mutation score must cover these handlers' checks.
# Each view_func is what the decorators made: the outermost wrapper is listed first.
bp.add_url_rule(
    "/account-details",
    view_func=login_required(
        # Decoding a photo is the most expensive thing a user can ask for: bound how
        # often one account may ask (a save without a photo costs nothing here).
        limiter.limit(
            lambda: current_app.config["UPLOAD_RATE_LIMIT_USER"],
            key_func=session_user_key,
            methods=["POST"],
            exempt_when=carries_no_photo,
        )(
            # Each new address gets a verification mail: bound how often one account can
            # make the site mail an address of its choosing (a flood through our sender).
            limiter.limit(
                lambda: current_app.config["EMAIL_CHANGE_RATE_LIMIT_USER"],
                key_func=session_user_key,
                methods=["POST"],
                exempt_when=lambda: not _changes_email(),
            )(details)
        )
    ),
    methods=("GET", "POST"),
)
bp.add_url_rule(
    "/account-details/remove-photo", view_func=login_required(remove_photo), methods=["POST"]
)
bp.add_url_rule("/public/images/profile/<name>", view_func=photo, methods=["GET"])
