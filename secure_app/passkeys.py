"""Blueprint: passkeys (WebAuthn) to sign in, as the login's second step, and to re-authenticate.

Every ceremony has two requests, both ordinary POST forms with a CSRF token
(the CSP allows no ``fetch``: ``default-src 'none'`` and no ``connect-src``):

1. *begin* draws a challenge (256 bits from ``secrets``), keeps it in the
   session with the ceremony's kind, its user and the time, and answers with
   a page whose form carries the options as JSON (``passkeys/ceremony.html``);
2. ``public/js/passkeys.js`` asks the browser for the passkey and posts
   ``credential`` (``JSON.stringify(credential.toJSON())``) to *verify*.

*verify* pops the challenge before looking at anything (single use), refuses
it after ``TIMEOUT`` seconds or for another kind or user, and lets py_webauthn
check the origin and RP ID (both from ``PUBLIC_URL``, never the request),
the challenge, user presence and verification, and the signature. A sign
count that does not go up is refused and audited (a cloned authenticator).
The write that follows is a compare-and-set in the store's lock: the passkey
still there, its sign count not moved meanwhile, and the challenge not
answered before: answered challenges are kept in the record until they
expire, so an old cookie replayed with its challenge is refused too.

A passkey is looked up only where the ceremony allows: in the whole site by
its user handle for a sign-in with no username (discoverable credential), and
only among the pending or logged-in user's own passkeys for the second step
and re-authentication (Flask-Security-Too's GHSA-f66q-9rf6-8795 accepted
another user's credential there). User verification is required everywhere:
a passkey alone is two factors.

A record gains ``webauthn_user`` (the random user handle, never the username:
the authenticator keeps it), ``passkeys`` (id, public key, sign count,
transports, name, created, last used) and ``passkey_challenges``.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import base64url_to_bytes, bytes_to_base64url
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)
from werkzeug.wrappers import Response

from . import audit, auth, events, mail, mfa, reauth, two_factor
from .auth import login_required, safe_next
from .reauth import fresh_auth_required
from .security import limiter, login_failed, password_guess_limit
from .store import get_store

log = logging.getLogger(__name__)
bp = Blueprint("passkeys", __name__)

CEREMONY = "passkey_ceremony"
TIMEOUT = 60  # seconds: the browser's timeout for the dialog, and the challenge's life
CHALLENGE_BYTES = 32  # 256 bits; ASVS 5.0 V6.7.2 asks for at least 64
HANDLE_BYTES = 16
MAX_CREDENTIAL_ID = 1023  # bytes: WebAuthn's own limit
MAX_PASSKEYS = 10
MAX_NAME = 64
# A real credential's JSON is under 2 KB (an RSA key a little more); the form limit bounds it too.
MAX_CREDENTIAL = 16 * 1024
ALGORITHMS = [
    COSEAlgorithmIdentifier.ECDSA_SHA_256,
    COSEAlgorithmIdentifier.EDDSA,
    COSEAlgorithmIdentifier.RSASSA_PKCS1_v1_5_SHA_256,
]
TRANSPORTS = frozenset(t.value for t in AuthenticatorTransport)
SCRIPT = Path("js") / "passkeys.js"
REFUSED = "That passkey did not work. Please try again."
EXPIRED = "That took too long. Please try again."


def init_app(app: Flask) -> None:
    """Register the blueprint; pin the script by its hash (SRI), computed once at start."""
    digest = hashlib.sha384((Path(app.static_folder or "") / SCRIPT).read_bytes()).digest()
    app.jinja_env.globals["passkeys_js_integrity"] = "sha384-" + base64.b64encode(digest).decode()
    # In the URL too, so a browser never pairs a cached old file with the new hash.
    app.jinja_env.globals["passkeys_js_version"] = digest[:6].hex()
    host = urlsplit(app.config["PUBLIC_URL"]).hostname or ""
    try:
        ipaddress.ip_address(host)
        log.warning("PUBLIC_URL's host %s is an IP address: passkeys need a host name", host)
    except ValueError:
        pass
    app.register_blueprint(bp)


def passkey_context() -> dict[str, Any]:
    return {"passkeys_of_current_user": passkeys_of_current_user}


def passkeys_of_current_user() -> list[dict[str, Any]]:
    """The logged-in user's passkeys as the security page shows them."""
    user = g.get("user")
    return [
        {
            "id": key.get("id", ""),
            "name": key.get("name", ""),
            "created": events.when(key.get("created")),
            "last_used": events.when(key.get("last_used")) if key.get("last_used") else "never",
        }
        for key in mfa.passkeys_of(user)
    ]


# -- the ceremony's state -------------------------------------------------------------


def _b64(data: bytes) -> str:
    return bytes_to_base64url(data)


def _relying_party() -> tuple[str, str]:
    """The expected origin and RP ID: ``PUBLIC_URL`` and its host name, never the request's."""
    origin = current_app.config["PUBLIC_URL"]
    return origin, urlsplit(origin).hostname or ""


def _begin(kind: str, username: str, **extra: str) -> bytes:
    """Draw a challenge and keep it in the session for one ceremony of ``kind`` by ``username``."""
    challenge = secrets.token_bytes(CHALLENGE_BYTES)
    session[CEREMONY] = {
        "k": kind,
        "u": username,
        "c": _b64(challenge),
        "t": int(time.time()),
        **extra,
    }
    return challenge


def _take(kind: str, username: str, now: int) -> dict[str, Any] | None:
    """Pop the ceremony (single use, before anything is checked); None if not this one or old."""
    state = session.pop(CEREMONY, None)
    if (
        isinstance(state, dict)
        and state.get("k") == kind
        and state.get("u") == username
        and isinstance(state.get("c"), str)
        and isinstance(state.get("t"), int)
        and 0 <= now - state["t"] <= TIMEOUT
    ):
        return state
    return None


def _spend(record: dict[str, Any], challenge: str, now: int) -> bool:
    """Mark ``challenge`` answered in ``record``; False if it was answered before."""
    spent = record.get("passkey_challenges")
    spent = (
        {k: v for k, v in spent.items() if isinstance(v, int) and v >= now}
        if isinstance(spent, dict)
        else {}
    )
    key = hashlib.sha256(challenge.encode()).hexdigest()[:32]
    if key in spent:
        return False
    spent[key] = now + TIMEOUT
    record["passkey_challenges"] = spent
    return True


def _ceremony_page(mode: str, options: Any, action: str, title: str, prompt: str, back: str) -> str:
    return render_template(
        "passkeys/ceremony.html",
        mode=mode,
        options=options_to_json(options),
        action=action,
        title=title,
        prompt=prompt,
        back=back,
    )


def _ask_for_passkey(
    kind: str,
    username: str,
    allowed: list[PublicKeyCredentialDescriptor],
    action: str,
    title: str,
    prompt: str,
    back: str,
    **extra: str,
) -> str:
    """Begin a ceremony that asks for a passkey: one of ``allowed``, or any of this site's."""
    challenge = _begin(kind, username, **extra)
    _, rp_id = _relying_party()
    options = generate_authentication_options(
        rp_id=rp_id,
        challenge=challenge,
        timeout=TIMEOUT * 1000,
        allow_credentials=allowed,
        user_verification=UserVerificationRequirement.REQUIRED,
    )
    return _ceremony_page("get", options, action, title, prompt, back)


def _descriptors(record: dict[str, Any] | None) -> list[PublicKeyCredentialDescriptor]:
    found = []
    for key in mfa.passkeys_of(record):
        transports = [
            AuthenticatorTransport(t) for t in key.get("transports", []) if t in TRANSPORTS
        ]
        found.append(
            PublicKeyCredentialDescriptor(
                id=base64url_to_bytes(key["id"]), transports=transports or None
            )
        )
    return found


# -- reading and checking a credential --------------------------------------------------


def _credential() -> dict[str, Any] | None:
    """The posted ``credential`` as a JSON object, or None for anything else."""
    value = request.form.get("credential")
    if not isinstance(value, str) or not value or len(value) > MAX_CREDENTIAL:
        return None
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("id"), str):
        return None
    return parsed


def _user_handle(credential: dict[str, Any]) -> str | None:
    """The user handle an assertion names, as stored (base64url), or None."""
    response = credential.get("response")
    handle = response.get("userHandle") if isinstance(response, dict) else None
    if not isinstance(handle, str) or not handle or len(handle) > 128:
        return None
    try:
        return _b64(base64url_to_bytes(handle))
    except ValueError:
        return None


def _find(record: dict[str, Any] | None, credential_id: str) -> dict[str, Any] | None:
    """The passkey of ``record`` with this id; only this record's (see the module docstring)."""
    return next((k for k in mfa.passkeys_of(record) if k.get("id") == credential_id), None)


def _verify(
    credential: dict[str, Any], state: dict[str, Any], passkey: dict[str, Any], username: str
) -> int | None:
    """Check an assertion with py_webauthn; return the new sign count, or None (refused)."""
    origin, rp_id = _relying_party()
    try:
        checked = verify_authentication_response(
            credential=credential,
            expected_challenge=base64url_to_bytes(state["c"]),
            expected_rp_id=rp_id,
            expected_origin=origin,
            credential_public_key=base64url_to_bytes(passkey["public_key"]),
            # The count is compared below, after the signature, so that only a
            # real authenticator's lowered count is audited as a possible clone.
            credential_current_sign_count=0,
            require_user_verification=True,
        )
    except Exception as error:  # malformed input raises many kinds: every one is a refusal
        audit.event("passkey_refused", username, reason=type(error).__name__)
        return None
    stored = int(passkey.get("sign_count", 0))
    new = checked.new_sign_count
    if (new or stored) and new <= stored:
        audit.event("passkey_sign_count_lowered", username, stored=stored, presented=new)
        return None
    return new


def _claim(
    credential_id: str, seen_count: int, new_count: int, challenge: str, now: int
) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    """The compare-and-set after a verified assertion: the changed record, or None to refuse."""

    def claim(record: dict[str, Any]) -> dict[str, Any] | None:
        draft = copy.deepcopy(record)
        passkey = _find(draft, credential_id)
        if passkey is None or int(passkey.get("sign_count", 0)) != seen_count:
            return None  # removed, or used by another request meanwhile
        if not _spend(draft, challenge, now):
            return None  # this challenge was answered before (a replayed cookie)
        passkey["sign_count"] = new_count  # passkey is draft's own entry: draft changes
        passkey["last_used"] = now
        return draft

    return claim


def _as_change(
    claim: Callable[[dict[str, Any]], dict[str, Any] | None],
) -> Callable[[dict[str, Any]], bool]:
    """A claim in the shape ``mfa.guarded_update`` takes."""

    def change(record: dict[str, Any]) -> bool:
        claimed = claim(record)
        if claimed is None:
            return False
        record.clear()
        record.update(claimed)
        return True

    return change


def _assertion(
    state: dict[str, Any] | None, record: dict[str, Any] | None, now: int, **bound: str
) -> Callable[[dict[str, Any]], dict[str, Any] | None] | None:
    """Check the posted assertion against ``record``'s own passkeys, for the ceremony ``state``.

    ``state`` was popped by the caller before this runs. Returns the
    compare-and-set to apply, or None when refused.
    """
    username = record.get("username") if record else None
    if state is None or any(state.get(k) != v for k, v in bound.items()):
        audit.event("passkey_refused", username, reason="no live challenge")
        return None
    credential = _credential()
    passkey = _find(record, credential["id"]) if credential and record else None
    if passkey is None or _user_handle(credential) not in (None, record.get("webauthn_user")):
        audit.event("passkey_refused", username, reason="not a passkey of this user")
        return None
    new_count = _verify(credential, state, passkey, record["username"])
    if new_count is None:
        return None
    return _claim(passkey["id"], int(passkey.get("sign_count", 0)), new_count, state["c"], now)


def _user_for_handle(handle: str) -> str | None:
    """The username whose user handle this is, or None (unknown, or not one account's alone).

    One look-up in the store (on PostgreSQL one query that keeps the rows
    whose JSON text holds the handle; on the text database a pass over the
    lines in memory that decodes only those), never one read per account from
    the request thread. Still linear in the number of accounts, done by the
    database in one statement; the login rate limit bounds how often.
    """
    names = get_store().find("webauthn_user", handle)
    return names[0] if len(names) == 1 else None


# -- signing in with a passkey alone ----------------------------------------------------


def login_begin() -> str:
    """Start a sign-in with a passkey and nothing else: no username (a discoverable credential)."""
    return _ask_for_passkey(
        "login",
        "",
        [],
        url_for("passkeys.login"),
        "Sign in with a passkey",
        "Use the passkey for this site: your device will ask for your fingerprint, face, "
        "PIN or security key.",
        url_for("auth.login"),
        n=safe_next(request.args.get("next")) or "",
    )


def login() -> Response:
    """Check the passkey and start a session for its owner: the passkey alone is two factors."""
    now = int(time.time())
    state = _take("login", "", now)
    credential = _credential() if state else None
    handle = _user_handle(credential) if credential else None
    username = _user_for_handle(handle) if handle else None
    record = get_store().get(username) if username else None
    claim = _assertion(state, record, now)
    if claim is None or username is None:
        # No g.login_failed: this route's only limit is per address and counts every request.
        audit.event("login_failure", username, method="passkey")
        flash(REFUSED if state else EXPIRED, "error")
        return redirect(url_for("auth.login"), 303)
    if not auth.begin_session_without_password(username, claim, method="passkey"):
        audit.event("login_failure", username, method="passkey", reason="changed meanwhile")
        flash(REFUSED, "error")
        return redirect(url_for("auth.login"), 303)
    audit.event("login_success", username, method="passkey")
    return redirect(safe_next(state.get("n")) or url_for("account.details"), 303)


# -- the second step, after a password -----------------------------------------------------


def second_begin() -> Any:
    """Ask for one of the pending user's own passkeys as the login's second step."""
    now = int(time.time())
    pending = two_factor.pending_login(now)
    if isinstance(pending, Response):
        return pending
    state, record = pending
    allowed = _descriptors(record)
    if not allowed:
        flash("This account has no passkey. Use a code instead.", "info")
        return redirect(url_for("two_factor.second_step"), 303)
    return _ask_for_passkey(
        "second",
        state["u"],
        allowed,
        url_for("passkeys.second"),
        "Two-step sign-in",
        "Your password was right. Now use your passkey.",
        url_for("two_factor.second_step"),
        h=state["h"],
    )


def second() -> Any:
    """Finish the login the password started, with one of this user's passkeys."""
    now = int(time.time())
    pending = two_factor.pending_login(now)
    if isinstance(pending, Response):
        session.pop(CEREMONY, None)
        return pending
    state, record = pending
    username = state["u"]
    verified = record["password_hash"]
    claim = _assertion(_take("second", username, now), record, now, h=state["h"])
    spend = two_factor.spend_pending(state, _as_change(claim)) if claim is not None else None
    if spend is None or not mfa.guarded_update(username, verified, mfa.factor_id(record), spend):
        g.login_failed = True
        audit.event("two_factor_failure", username, method="passkey")
        flash(REFUSED, "error")
        return redirect(url_for("two_factor.second_step"), 303)
    if not auth.begin_session(username, verified, method="passkey"):
        flash("Please log in again.", "info")
        return redirect(url_for("auth.login"), 303)
    reauth.mark_fresh(now)
    audit.event("login_success", username, second_factor="passkey")
    return redirect(safe_next(state["n"]) or url_for("account.details"), 303)


# -- re-authentication -------------------------------------------------------------------------


def reauth_begin() -> Any:
    """Ask for one of the logged-in user's own passkeys, to confirm it is them."""
    target = safe_next(request.args.get("next")) or url_for("two_factor.security")
    allowed = _descriptors(g.user)
    if not allowed:
        flash("You have no passkey. Use your password instead.", "info")
        return redirect(url_for("reauth.reauthenticate", next=target), 303)
    return _ask_for_passkey(
        "reauth",
        g.user["username"],
        allowed,
        url_for("passkeys.reauthenticate"),
        "Confirm it is you",
        "Use your passkey to confirm it is you.",
        url_for("reauth.reauthenticate", next=target),
        n=target,
    )


def reauthenticate() -> Response:
    """Check the passkey against the logged-in user's own passkeys only, then renew the session."""
    now = int(time.time())
    user = g.user
    username = user["username"]
    state = _take("reauth", username, now)
    target = safe_next(state.get("n")) if state else None
    target = target or url_for("two_factor.security")
    claim = _assertion(state, user, now)
    if claim is None or not reauth.renew(user, now, _as_change(claim)):
        audit.event("reauth_failure", username, method="passkey")
        flash(REFUSED, "error")
        return redirect(url_for("reauth.reauthenticate", next=target), 303)
    audit.event("reauth_success", username, method="passkey")
    return redirect(target, 303)


# -- adding, renaming and removing passkeys ---------------------------------------------------


def _name(value: object) -> str | None:
    """A passkey's name: 1 to ``MAX_NAME`` printable characters, spaces trimmed."""
    if not isinstance(value, str):
        return None
    name = " ".join(value.split())
    if not name or len(name) > MAX_NAME or not name.isprintable():
        return None
    return name


def _back(message: str, category: str = "error") -> Response:
    flash(message, category)
    return redirect(url_for("two_factor.security"), 303)


def add_begin() -> Any:
    """Ask the browser to make a new passkey for this account, under the name given."""
    user = g.user
    name = _name(request.form.get("name"))
    if name is None:
        return _back(f"Give the passkey a name of 1 to {MAX_NAME} characters.")
    if len(mfa.passkeys_of(user)) >= MAX_PASSKEYS:
        return _back(f"You have {MAX_PASSKEYS} passkeys already. Remove one first.")
    handle = user.get("webauthn_user") or _b64(secrets.token_bytes(HANDLE_BYTES))
    challenge = _begin("register", user["username"], h=handle, m=name)
    _, rp_id = _relying_party()
    options = generate_registration_options(
        rp_id=rp_id,
        rp_name="secure_app",
        user_name=user["username"],
        user_id=base64url_to_bytes(handle),
        user_display_name=user["username"],
        challenge=challenge,
        timeout=TIMEOUT * 1000,
        attestation=AttestationConveyancePreference.NONE,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.REQUIRED,
            user_verification=UserVerificationRequirement.REQUIRED,
        ),
        exclude_credentials=_descriptors(user),
        supported_pub_key_algs=ALGORITHMS,
    )
    return _ceremony_page(
        "create",
        options,
        url_for("passkeys.add"),
        "Add a passkey",
        f"Your device will now make a passkey named \u201c{name}\u201d for this site.",
        url_for("two_factor.security"),
    )


def add() -> Response:
    """Check the new passkey (attestation ``none``) and store it, if nothing changed meanwhile."""
    user = g.user
    username = user["username"]
    now = int(time.time())
    state = _take("register", username, now)
    credential = _credential()
    if state is None or credential is None:
        audit.event("passkey_add_refused", username, reason="no live challenge or no credential")
        return _back(EXPIRED if state is None else REFUSED)
    origin, rp_id = _relying_party()
    try:
        checked = verify_registration_response(
            credential=credential,
            expected_challenge=base64url_to_bytes(state["c"]),
            expected_rp_id=rp_id,
            expected_origin=origin,
            require_user_verification=True,
            supported_pub_key_algs=ALGORITHMS,
        )
    except Exception as error:  # malformed input raises many kinds: every one is a refusal
        audit.event("passkey_add_refused", username, reason=type(error).__name__)
        return _back(REFUSED)
    if len(checked.credential_id) > MAX_CREDENTIAL_ID:
        audit.event("passkey_add_refused", username, reason="credential id too long")
        return _back(REFUSED)
    response = credential.get("response")
    transports = response.get("transports") if isinstance(response, dict) else None
    entry = {
        "id": _b64(checked.credential_id),
        "public_key": _b64(checked.credential_public_key),
        "sign_count": checked.sign_count,
        "transports": sorted({t for t in transports if t in TRANSPORTS})
        if isinstance(transports, list) and all(isinstance(t, str) for t in transports)
        else [],
        "name": state.get("m") or "Passkey",
        "created": now,
        "last_used": 0,
    }

    def store_it(record: dict[str, Any]) -> bool:
        keys = mfa.passkeys_of(record)
        if (
            record.get("webauthn_user", state["h"]) != state["h"]
            or any(k.get("id") == entry["id"] for k in keys)
            or len(keys) >= MAX_PASSKEYS
            or not _spend(record, state["c"], now)
        ):
            return False
        record["webauthn_user"] = state["h"]
        record["passkeys"] = [*keys, entry]
        events.record(record, "passkey_added", name=entry["name"])
        return True

    store_here = auth.for_this_session(store_it)  # not for a session ended meanwhile
    if not mfa.guarded_update(username, user["password_hash"], mfa.factor_id(user), store_here):
        audit.event("passkey_add_refused", username, reason="changed meanwhile or a duplicate")
        return _back("That passkey could not be added. Please look again.")
    audit.event("passkey_added", username)
    mail.notify(user, "passkey_added")
    return _back(f"Passkey \u201c{entry['name']}\u201d added.", "success")


def _change_passkey(
    credential_id: object, change: Callable[[list[dict[str, Any]], int], None], event: str
) -> str | None:
    """Apply ``change`` to this user's passkeys at the one named, if it is still there.

    Returns the passkey's name before the change, or None when it is not (or
    no longer) this user's.
    """
    user = g.user
    names: list[str] = []

    def apply(record: dict[str, Any]) -> bool:
        keys = copy.deepcopy(mfa.passkeys_of(record))
        at = next((i for i, k in enumerate(keys) if k.get("id") == credential_id), None)
        if at is None:
            return False
        names.append(str(keys[at].get("name", "")))
        change(keys, at)
        record["passkeys"] = keys
        events.record(record, event, name=names[-1])
        return True

    if isinstance(credential_id, str) and mfa.guarded_update(
        user["username"], user["password_hash"], mfa.factor_id(user), auth.for_this_session(apply)
    ):
        return names[-1]
    return None


def rename() -> Response:
    """Give one of this user's passkeys a new name."""
    name = _name(request.form.get("name"))
    if name is None:
        return _back(f"Give the passkey a name of 1 to {MAX_NAME} characters.")

    def set_name(keys: list[dict[str, Any]], at: int) -> None:
        keys[at]["name"] = name

    if _change_passkey(request.form.get("passkey"), set_name, "passkey_renamed") is None:
        return _back("That passkey is not on this account any more.")
    audit.event("passkey_renamed", g.user["username"])
    return _back("Passkey renamed.", "success")


def remove() -> Response:
    """Remove one of this user's passkeys: it no longer signs in."""

    def drop(keys: list[dict[str, Any]], at: int) -> None:
        del keys[at]

    name = _change_passkey(request.form.get("passkey"), drop, "passkey_removed")
    if name is None:
        return _back("That passkey is not on this account any more.")
    audit.event("passkey_removed", g.user["username"])
    mail.notify(g.user, "passkey_removed")
    return _back(f"Passkey \u201c{name}\u201d removed. It no longer signs in.", "success")


# The hook and routes are registered here, not by decorators: mutmut (``make mutation``) leaves
# decorated functions alone, and the mutation score must cover these handlers' checks.
# Each view_func is what the decorators made: the outermost wrapper is listed first.
bp.app_context_processor(passkey_context)
bp.add_url_rule("/login/passkey", view_func=login_begin, methods=["POST"])
bp.add_url_rule(
    "/login/passkey/verify",
    view_func=limiter.limit(lambda: current_app.config["LOGIN_RATE_LIMIT_IP"])(login),
    methods=["POST"],
)
bp.add_url_rule("/login/two-factor/passkey", view_func=second_begin, methods=["POST"])
bp.add_url_rule(
    "/login/two-factor/passkey/verify",
    view_func=limiter.limit(lambda: current_app.config["LOGIN_RATE_LIMIT_IP"])(
        # Shared with the password form and the code form: one budget of guesses per user.
        limiter.shared_limit(
            lambda: current_app.config["LOGIN_RATE_LIMIT_USER"],
            scope="login-user",
            key_func=two_factor.pending_username_key,
            deduct_when=login_failed,
        )(second)
    ),
    methods=["POST"],
)
bp.add_url_rule("/reauthenticate/passkey", view_func=login_required(reauth_begin), methods=["POST"])
bp.add_url_rule(
    "/reauthenticate/passkey/verify",
    view_func=login_required(password_guess_limit()(reauthenticate)),
    methods=["POST"],
)
bp.add_url_rule(
    "/security/passkeys/add", view_func=fresh_auth_required(add_begin), methods=["POST"]
)
bp.add_url_rule(
    "/security/passkeys/add/verify", view_func=fresh_auth_required(add), methods=["POST"]
)
bp.add_url_rule(
    "/security/passkeys/rename", view_func=fresh_auth_required(rename), methods=["POST"]
)
bp.add_url_rule(
    "/security/passkeys/remove", view_func=fresh_auth_required(remove), methods=["POST"]
)
