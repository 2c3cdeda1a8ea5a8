"""Error pages: every status gets a page in the layout, never a traceback."""

from __future__ import annotations

import logging

from flask import Flask, Response, render_template, request
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException, InternalServerError
from werkzeug.http import HTTP_STATUS_CODES

from . import audit
from .security import login_username_key, retry_after_seconds
from .store import StoreError, StoreUncertain

log = logging.getLogger(__name__)

PAGES = (400, 403, 404, 405, 413, 415, 429, 500, 503)


class OneLine(logging.Filter):
    """Escape line breaks in a log message, so request data cannot start a forged line.

    Flask logs a crash as "Exception on <path> [<method>]" with the decoded
    path: a ``%0a`` there wrote a line of the attacker's choosing (one that
    looked exactly like an audit event) into the same stream.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\n" in message or "\r" in message:
            record.msg = message.replace("\r", "\\r").replace("\n", "\\n")
            record.args = None
        return True


def init_app(app: Flask) -> None:
    """Route every HTTP error, CSRF refusal, store failure and crash to a page in the layout."""
    app.logger.addFilter(OneLine())
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(CSRFError, _csrf_error)
    app.register_error_handler(StoreError, _store_error)
    app.register_error_handler(InternalServerError, _server_error)


def _render(code: int, **context: object) -> tuple[str | Response, int]:
    template = f"errors/{code}.html" if code in PAGES else "errors/_error.html"
    try:
        return render_template(template, code=code, **context), code
    except Exception:
        # The layout itself cannot be built (a crash in it, or no URL adapter
        # for a Host refused by TRUSTED_HOSTS): keep the status, in plain text.
        log.exception("error page %s failed; sending plain text", code)
        text = f"{code} {HTTP_STATUS_CODES.get(code, 'Error')}\n"
        return Response(text, code, mimetype="text/plain"), code


def _http_error(error: HTTPException):
    code = error.code or 500
    if code == 429:
        seconds = retry_after_seconds()
        username = login_username_key()[5:] if request.endpoint == "auth.login" else None
        audit.event("rate_limited", username, limit=str(error.description))
        body, _ = _render(429, seconds=seconds)
        return body, 429, {"Retry-After": str(seconds)}
    body, status = _render(code, description=error.description)
    # Keep what the status needs (Allow on a 405, Retry-After on a 503); our
    # page brings its own Content-Type.
    kept = [(k, v) for k, v in error.get_headers() if k in ("Allow", "Retry-After")]
    return body, status, kept


def _csrf_error(error: CSRFError) -> tuple[str | Response, int]:
    audit.event("csrf_refused", None, reason=error.description)
    return _render(400, description=error.description)


def _store_error(error: StoreError) -> tuple[str | Response, int]:
    log.error("store failure: %s", error)
    return _render(503, uncertain=isinstance(error, StoreUncertain))


def _server_error(error: InternalServerError) -> tuple[str | Response, int]:
    return _render(500)
