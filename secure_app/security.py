"""The perimeter, in one place: proxies, HTTPS, headers, CSRF and rate limits.

Talisman sets the CSP and most headers. Two things are done by hand here
because Talisman gets them wrong for us: it decides "was this https?" by also
trusting a raw ``X-Forwarded-Proto`` header, which any client can send, so
the redirect and HSTS below use only ``request.is_secure`` (which ProxyFix
sets from exactly ``PROXY_HOPS`` trusted proxies); and it has no
cross-origin isolation headers.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from flask import Flask, Response, current_app, g, redirect, request, session
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_talisman import Talisman
from flask_wtf.csrf import CSRFProtect
from werkzeug.middleware.proxy_fix import ProxyFix

from .forms import USERNAME_RE

csrf = CSRFProtect()
talisman = Talisman()
# The client address, after ProxyFix: a forged X-Forwarded-For counts only
# behind exactly PROXY_HOPS proxies that we trust to overwrite it.
limiter = Limiter(key_func=get_remote_address)

CSP = {
    "default-src": "'none'",
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
    feature: "()"
    for feature in (
        "accelerometer",
        "autoplay",
        "bluetooth",
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
        "publickey-credentials-get",
        "screen-wake-lock",
        "serial",
        "usb",
        "xr-spatial-tracking",
    )
}
HSTS = "max-age=31536000; includeSubDomains"
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
}


def init_app(app: Flask) -> None:
    """Install the perimeter on ``app``. Order matters: https first, then CSRF, then limits."""
    hops = int(app.config["PROXY_HOPS"])
    if hops > 0:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops
        )
    app.before_request(_require_https)
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
    app.after_request(_add_headers)
    limiter.init_app(app)
    _check_limiter_storage(app)


def _require_https() -> Response | None:
    if current_app.config["FORCE_HTTPS"] and not request.is_secure:
        url = request.url.replace("http://", "https://", 1)
        # 308 keeps the method and body; browsers only send GET here in practice.
        return redirect(url, 301 if request.method in ("GET", "HEAD") else 308)
    return None


def _add_headers(response: Response) -> Response:
    headers = response.headers
    headers.update(ISOLATION_HEADERS)
    if current_app.config["FORCE_HTTPS"] and request.is_secure:
        headers["Strict-Transport-Security"] = HSTS
    if request.endpoint == "account.photo":
        headers["Content-Security-Policy"] = PHOTO_CSP
    elif request.endpoint != "static":
        # Pages depend on who is logged in and many carry forms with a CSRF
        # token: no shared or browser cache may keep them (back button after
        # logout included).
        headers["Cache-Control"] = "no-store"
        response.vary.add("Cookie")
    return response


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


def login_failed(response: Response) -> bool:
    """Count an attempt against the username only when it failed."""
    return bool(g.get("login_failed"))


def retry_after_seconds() -> int:
    """Seconds until the limit that refused this request lets the client try again."""
    current = limiter.current_limit
    if current is None:
        return 60
    return max(1, int(current.reset_at - time.time()))
