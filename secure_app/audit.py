"""The audit trail (ASVS 5.0 V16.3): one JSON line per security event on ``secure_app.audit``.

Values are data in a JSON object, never text pasted into a message, so a
username with a newline cannot forge a second log line. Passwords, hashes,
cookies and tokens are never passed here.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from flask import Flask, has_request_context, request

logger = logging.getLogger("secure_app.audit")

# A failed login logs whatever was typed as the username; bound it so junk
# names cannot flood the log. Valid usernames are at most 32 characters.
MAX_USERNAME = 64


def init_app(app: Flask) -> None:
    """Send audit lines to stderr (where gunicorn and log collectors look) unless configured.

    The lines do not propagate: this logger sits under the app's own logger
    (``secure_app``), where Flask attaches its text handler the first time
    anything logs an error, and every event was then written a second time,
    not as JSON. An operator who wants them elsewhere adds a handler here.
    """
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    logger.propagate = False


def event(name: str, username: str | None = None, **details: object) -> None:
    """Record security event ``name`` with the client's address and ``details``."""
    entry: dict[str, object] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "event": name,
        "username": username[:MAX_USERNAME] if isinstance(username, str) else username,
    }
    if has_request_context():
        entry["ip"] = request.remote_addr
        # The route's pattern, not the path: a path can hold a live token
        # (/reset-password/<token>), and tokens never go to the log.
        rule = request.url_rule
        entry["path"] = rule.rule if rule is not None else request.path
    entry.update(details)
    logger.info(json.dumps(entry, ensure_ascii=True, default=str))
