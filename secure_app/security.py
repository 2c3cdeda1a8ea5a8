"""The perimeter, in one place: proxies, HTTPS, headers, CSRF and rate limits.

Talisman sets the CSP and most headers. Two things are done by hand here
because Talisman gets them wrong for us: it decides "was this https?" by also
trusting a raw ``X-Forwarded-Proto`` header, which any client can send, so
the redirect and HSTS below use only ``request.is_secure`` (which ProxyFix
sets from exactly ``PROXY_HOPS`` trusted proxies); and it has no
cross-origin isolation headers.

The https redirect keeps the path and query and goes to the site's own
origin, ``PUBLIC_URL``, never to the request's Host or ``X-Forwarded-Host``:
a forged header must not turn the redirect into a link to another site.

Form routes take forms only. Flask-WTF would otherwise read a JSON body as
the form (``request.get_json()``), whose values are dicts, lists and numbers
that no field rule was written for; so every body that is not
``application/x-www-form-urlencoded`` or ``multipart/form-data`` in UTF-8 is
refused with 415 before CSRF, the limiter's keys or any form look at it.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from urllib.parse import quote, urlsplit

from flask import Flask, Response, abort, current_app, g, redirect, request, session
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_talisman import Talisman
from flask_wtf.csrf import CSRFProtect
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.security import safe_join

from .forms import USERNAME_RE
from .sessions import vary_on_cookie


class _OnceTalisman(Talisman):
    """Talisman, asked for its headers once instead of on every request.

    Measured: Talisman rebuilt the same CSP and Permissions-Policy strings
    and drew a nonce for every response, about 60 us of a 215 us bare page.
    Here the headers never vary by request (no nonces, no per-view options,
    HTTPS handled below), so the first response's headers are kept and
    copied onto every later one. ``test_security_headers.py`` asserts the
    exact headers, so this cannot drift from what Talisman would send.
    """

    _headers: list[tuple[str, str]] | None = None

    def init_app(self, app: Flask, **options: object) -> None:
        self._headers = None
        super().init_app(app, **options)

    def _force_https(self) -> None:
        """Not used: the redirect is ``_require_https`` (see the module docstring)."""

    def _make_nonce(self) -> None:
        """Not used: the CSP allows no inline code at all (one same-origin script), so no nonce."""

    def _set_response_headers(self, response: Response) -> Response:
        if self._headers is None:
            probe = Response()
            super()._set_response_headers(probe)
            headers = probe.headers.items()
            self._headers = [(k, v) for k, v in headers if k not in _RESPONSE_DEFAULTS]
        response.headers.extend(self._headers)
        return response


class _MethodFirstCSRFProtect(CSRFProtect):
    """Flask-WTF's ``CSRFProtect``, asking "is this a POST?" first.

    Flask-WTF looks up the view and its exemptions before it looks at the
    method, then does nothing for a GET: about 8 us of every page view.
    Every method it would check still goes through its own ``protect``
    unchanged (``test_csrf.py`` attacks it), so nothing is skipped that it
    would have checked.
    """

    def protect(self, apply_exemptions: bool = False) -> None:
        if request.method not in current_app.config["WTF_CSRF_METHODS"]:
            return
        super().protect(apply_exemptions=apply_exemptions)


_RESPONSE_DEFAULTS = frozenset(Response().headers.keys())  # Content-Type and such
csrf = _MethodFirstCSRFProtect()
talisman = _OnceTalisman()
# The client address, after ProxyFix: a forged X-Forwarded-For counts only
# behind exactly PROXY_HOPS proxies that we trust to overwrite it.
limiter = Limiter(key_func=get_remote_address)

CSP = {
    "default-src": "'none'",
    # One same-origin file, public/js/passkeys.js, pinned by SRI in the pages that load it;
    # no inline script, no eval, no nonce.
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self'",
    "form-action": "'self'",
    "base-uri": "'none'",
    "frame-ancestors": "'none'",
    "object-src": "'none'",
}
# A photo opened on its own is a document too: it may load nothing and run nothing.
PHOTO_CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"
PERMISSIONS_POLICY = {
    # Passkeys: this origin may create and use credentials; no frame of another origin may.
    "publickey-credentials-create": "(self)",
    "publickey-credentials-get": "(self)",
} | {
    feature: "()"
    for feature in (
        "accelerometer",
        "autoplay",
        "browsing-topics",
        "camera",
        "display-capture",
        "fullscreen",
        "geolocation",
        "gyroscope",
        "hid",
        "magnetometer",
        "microphone",
        "midi",
        "payment",
        "screen-wake-lock",
        "serial",
        "usb",
        "xr-spatial-tracking",
    )
}
HSTS = "max-age=31536000; includeSubDomains"
# The only form that carries a file, and the one field that may hold it;
# every other body is held to MAX_FORM_MEMORY_SIZE and may carry no file.
UPLOAD_FIELDS = {"account.details": frozenset({"photo"})}
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
}
_PAGE_HEADERS = [*ISOLATION_HEADERS.items(), ("Cache-Control", "no-store")]


def init_app(app: Flask) -> None:
    """Install the perimeter on ``app``. Order matters: https first, then body limits, then CSRF."""
    hops = int(app.config["PROXY_HOPS"])
    if hops > 0:
        # The forwarded host and port only when the operator says the proxy
        # sets them: a proxy that passes a client's X-Forwarded-Host through
        # would otherwise let the client choose the host the app believes in.
        host_hops = hops if app.config["TRUST_FORWARDED_HOST"] else 0
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=hops, x_proto=hops, x_host=host_hops, x_port=host_hops
        )
    if app.config["FORCE_HTTPS"]:
        app.before_request(_public_host_check(app.config["PUBLIC_URL"]))
    app.before_request(_require_https)
    app.before_request(_require_form_body)
    app.before_request(_limit_body)
    app.before_request(_require_known_parts)
    app.before_request(_keep_photos_off_static)
    # after_request functions run in reverse order of registration: registered
    # before Talisman, _add_headers runs after it, so the photo CSP replaces
    # Talisman's page CSP instead of being overwritten by it.
    app.after_request(_add_headers)
    csrf.init_app(app)
    talisman.init_app(
        app,
        force_https=False,  # done by _require_https, see the module docstring
        strict_transport_security=False,  # done by _add_headers
        session_cookie_secure=bool(app.config["FORCE_HTTPS"]),
        session_cookie_samesite=app.config["SESSION_COOKIE_SAMESITE"],
        content_security_policy=CSP,
        frame_options="DENY",
        referrer_policy="same-origin",
        permissions_policy=PERMISSIONS_POLICY,
        x_content_type_options=True,
    )
    limiter.init_app(app)
    _install_app_wide_limit_check(app)
    _check_limiter_storage(app)


def _https_url() -> str:
    """This request's path and query on the site's own origin (``PUBLIC_URL``, https).

    The path is percent-encoded again: Werkzeug decoded it, and a ``%0d%0a``
    in it must not reach the ``Location`` header as a line break.
    """
    path = quote(request.path, safe="/:@!$&'()*+,;=~")
    query = quote(request.query_string.decode("latin-1"), safe="/?:@!$&'()*+,;=~%")
    return current_app.config["PUBLIC_URL"] + path + ("?" + query if query else "")


def _public_host_check(public_url: str) -> Callable[[], None]:
    """Return a hook that answers 400 to a request for any host but the site's own.

    In production a request that names another host (DNS rebinding, a forged
    Host meant to poison a link or a cache) is not for this site. Done here
    rather than with Flask's ``TRUSTED_HOSTS`` so that the refusal is the
    site's own 400 page. The port is not compared: a proxy may add one.
    """
    name, colon, port = urlsplit(public_url).netloc.rpartition(":")
    if not (colon and port.isdigit()):  # no port, or the end of an IPv6 literal
        name = name + colon + port
    allowed = re.compile(re.escape(name.lower()) + r"(?::[0-9]{1,5})?")

    def require_public_host() -> None:
        if not allowed.fullmatch(request.host.lower()):
            abort(400)

    return require_public_host


def _require_https() -> Response | None:
    # request.is_secure is the server's own scheme, or X-Forwarded-Proto only
    # from the PROXY_HOPS proxies that ProxyFix trusts: a client cannot fake it.
    if current_app.config["FORCE_HTTPS"] and not request.is_secure:
        # 308 keeps the method and body; browsers only send GET here in practice.
        return redirect(_https_url(), 301 if request.method in ("GET", "HEAD") else 308)
    return None


FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})
# Methods whose body nobody reads: no Content-Type rule for them.
_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS"})


def _require_form_body() -> None:
    """Refuse (415) a body to a form route that is not a UTF-8 web form; see the docstring."""
    if request.method in _NO_BODY or request.routing_exception is not None:
        return  # a 404 or 405 is the better answer, given by routing
    mimetype = request.mimetype
    if mimetype in FORM_TYPES:
        charset = request.mimetype_params.get("charset", "utf-8").lower()
        if charset in ("utf-8", "utf8"):  # Werkzeug decodes forms as UTF-8 whatever is declared
            return
    elif (
        not mimetype
        and not request.content_length
        and "chunked" not in (request.headers.get("Transfer-Encoding", "").lower())
    ):
        return  # no body at all (a bare POST): CSRF refuses it if it needed a token
    abort(415)


def _limit_body() -> None:
    """Only a multipart upload form may send megabytes; every other body gets the text limit.

    Werkzeug applies ``MAX_FORM_MEMORY_SIZE`` to each text part of a multipart
    body but reads an urlencoded body into memory whole, bounded only by
    ``MAX_CONTENT_LENGTH``. A body that cannot carry a file is all text, so
    the whole of it gets the text limit (a request over it is refused with 413).
    """
    if request.method in _NO_BODY:
        return  # nothing reads it
    if request.endpoint in UPLOAD_FIELDS and request.mimetype == "multipart/form-data":
        return
    limits = (current_app.config["MAX_FORM_MEMORY_SIZE"], current_app.config["MAX_CONTENT_LENGTH"])
    request.max_content_length = min((n for n in limits if n is not None), default=None)


def _require_known_parts() -> None:
    """Refuse (400) a multipart form with a nameless part, or a file where none (or two) belong.

    Werkzeug files a part without a name under the key ``None`` (Flask-WTF's
    CSRF check then crashes on it), and Flask-WTF hands a text field a file
    if one is sent under its name (``Length`` then crashes): neither is a
    form a browser sends from our pages. Runs after ``_limit_body``, which
    bounds what this parse may read.
    """
    if request.method in _NO_BODY or request.mimetype != "multipart/form-data":
        return
    allowed = UPLOAD_FIELDS.get(request.endpoint or "", frozenset())
    files = request.files
    if None in request.form or any(
        name not in allowed or len(files.getlist(name)) > 1 for name in files
    ):
        # Two parts named "photo": the limiter would look at one (an empty
        # first part is "no photo") and Flask-WTF decode the other.
        abort(400)


def _keep_photos_off_static() -> None:
    """Serve profile photos only through their own route (its sandbox CSP), never as static files.

    The photo folder lies inside the static folder, and the static route
    normalises ``images/./profile/x`` and ``images/profile/x/`` to the same
    file; so any static path that resolves into the photo folder is a 404.
    """
    if request.endpoint != "static":
        return
    static = current_app.static_folder or ""
    path = safe_join(static, (request.view_args or {}).get("filename", ""))
    if path is None:
        return  # the static route answers 404 itself
    photos = os.path.realpath(current_app.config["PHOTO_DIR"])
    real = os.path.realpath(path)
    if real == photos or real.startswith(photos + os.sep):
        abort(404)


def _add_headers(response: Response) -> Response:
    """Add what Talisman does not: cross-origin isolation, HSTS, the photo CSP, no-store."""
    headers = response.headers
    endpoint = request.endpoint
    if endpoint == "static":
        headers.extend(ISOLATION_HEADERS)
    elif endpoint == "account.photo":
        headers.extend(ISOLATION_HEADERS)
        headers["Content-Security-Policy"] = PHOTO_CSP
    else:
        # Pages depend on who is logged in and many carry forms with a CSRF
        # token: no shared or browser cache may keep them (back button after
        # logout included).
        headers.extend(_PAGE_HEADERS)
        vary_on_cookie(response)
    if current_app.config["FORCE_HTTPS"] and request.is_secure:
        headers["Strict-Transport-Security"] = HSTS
    return response


def _install_app_wide_limit_check(app: Flask) -> None:
    """Run Flask-Limiter's every-request check only when there is an app-wide limit to check.

    Flask-Limiter checks every request in a ``before_request`` hook, about
    55 us a request with limits on, but that hook only applies limits that
    cover routes without a decorator: default, application, blueprint and
    meta limits, and the in-memory fallback. Decorated routes (login,
    register, change-password, delete-account) are checked by their own
    decorator when the view is called. This site sets none of the app-wide
    kinds, so the hook finds nothing to do on every page; it now runs only
    when one is configured (``FLASK_RATELIMIT_DEFAULT`` and friends), looked
    up on each request so that limits added after start-up count too.
    """
    if not limiter.enabled:  # RATELIMIT_ENABLED=false: Flask-Limiter installed no hooks
        return
    hooks = app.before_request_funcs.setdefault(None, [])
    # ValueError here means Flask-Limiter changed how it hooks in: refuse to start.
    hooks[hooks.index(limiter._check_request_limit)] = _check_app_wide_limits


def _check_app_wide_limits() -> None:
    manager = limiter.limit_manager
    if (
        manager._default_limits
        or manager._application_limits
        or manager._blueprint_limits
        or limiter._meta_limits
        or limiter._in_memory_fallback
    ):
        limiter._check_request_limit()


def _check_limiter_storage(app: Flask) -> None:
    """Fail at start-up, not silently at the first login, when the limiter's storage is away."""
    uri = str(app.config["RATELIMIT_STORAGE_URI"])
    if not app.config.get("RATELIMIT_ENABLED", True) or uri.startswith("memory://"):
        return
    with app.app_context():
        reachable = limiter.storage.check()
    if not reachable:
        where = urlsplit(uri)
        raise RuntimeError(
            f"Rate-limit storage {where.scheme}://{where.hostname}:{where.port} cannot be "
            "reached. Start it, or fix FLASK_RATELIMIT_STORAGE_URI; the site will not run "
            "without working login limits."
        )


# -- keys for the rate limits ------------------------------------------------


def login_username_key() -> str:
    """The limiter key for one username, normalised and bounded.

    Names that cannot exist share one bucket, so junk names cannot fill the
    limiter's storage; valid names are at most 32 characters.
    """
    name = request.form.get("username", "", type=str).lower()
    return "user:" + (name if USERNAME_RE.match(name) else "<invalid>")


def session_user_key() -> str:
    return "user:" + str(session.get("uid", "<anonymous>"))


def password_guess_limit(methods: list[str] | None = None) -> Callable[..., object]:
    """The one per-user budget of password guesses once logged in, for every view that checks one.

    Change password, delete account and re-authentication (password or passkey) share it, so a
    stolen cookie cannot try more passwords by spreading them over several forms.
    """
    return limiter.shared_limit(
        lambda: current_app.config["CHANGE_PASSWORD_RATE_LIMIT_USER"],
        scope="reauthenticate",
        key_func=session_user_key,
        methods=methods,
    )


def carries_no_photo() -> bool:
    """An account save counts against the upload limit only when it carries a photo."""
    return not any(photo.filename for photo in request.files.getlist("photo"))


def login_failed(response: Response) -> bool:
    """Count an attempt against the username only when it failed."""
    return bool(g.get("login_failed"))


def retry_after_seconds() -> int:
    """Seconds until the limit that refused this request lets the client try again."""
    current = limiter.current_limit
    if current is None:
        return 60
    return max(1, int(current.reset_at - time.time()))
