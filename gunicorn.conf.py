"""gunicorn settings for ``make run``: correct by default, several workers only with Redis.

The rate limiter's default ``memory://`` storage counts inside one process,
so the default is one worker process with threads. Set ``WEB_CONCURRENCY``
above 1 only together with ``FLASK_RATELIMIT_STORAGE_URI=redis://...``.
"""

import os

wsgi_app = "secure_app.wsgi:app"
# Loopback only unless the operator says otherwise (a reverse proxy in front).
bind = [f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"]
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
timeout = 30
graceful_timeout = 10
keepalive = 5
# Bound what one request may hold open (slowloris-style header floods).
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190
accesslog = "-"
errorlog = "-"
# The app's audit lines go to stderr as JSON; keep gunicorn's own on the same stream.
capture_output = False


def on_starting(server):
    """Refuse a multi-process start that would silently weaken the login limits."""
    storage = os.environ.get("FLASK_RATELIMIT_STORAGE_URI", "memory://")
    limits_on = os.environ.get("FLASK_RATELIMIT_ENABLED", "true").lower() != "false"
    if server.cfg.workers > 1 and limits_on and storage.startswith("memory://"):
        raise SystemExit(
            "secure_app: several workers need a shared rate-limit storage; "
            "set FLASK_RATELIMIT_STORAGE_URI=redis://host:port or use one worker."
        )
